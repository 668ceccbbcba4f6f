"""A lean HTTP/1.1 upstream client on asyncio's low-level transports and protocols (docs/design.md,
"Upstream client").

Same interface as `upstream.UpstreamClient` (open -> status/headers -> read_chunk -> release/abort),
about a third of aiohttp's CPU per stream, which matters because the upstream client is the largest
per-request cost the proxy controls. What it does, and only that:

- one request per connection at a time, keep-alive pool per (host, port, tls), idle connections dropped
  after `keepalive_s`; a request whose *reused* connection closes before any response byte is retried
  once on a new connection (the server closed an idle connection under us; nothing was processed);
- the request head is built once per (url, headers) and written with the body in one `write`;
- responses are parsed by `http11.ResponseParser` (llhttp, C): bodies framed by Content-Length, chunked
  encoding or connection close; gzip/deflate decoded by `decoding.BodyDecoder` if a server sends them
  despite `Accept-Encoding: identity`;
- read backpressure (`FlowControl`): reading pauses while more than `HIGH_WATER` bytes wait unread;
- timeouts: connect (per connection), and an idle timer that fails the response when the socket has
  been silent for `read_timeout` (one timer per response, re-armed lazily, not per chunk); time spent
  paused by our own backpressure is not silence. One clock: the event loop's;
- `abort()` closes the socket at once, so the provider sees the disconnect and stops generating.

Who does what: `_Conn` (the asyncio protocol) only wires transport callbacks to the parser, the
`_Reply` being read and `FlowControl`; `_Reply` queues the body for the reader and wakes it;
`FastResponse` is the caller's handle with the idle timer; `FastUpstream` is the pool.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from .decoding import BodyDecoder
from .http11 import Data, EndOfMessage, Headers, Response, ResponseParser
from .upstream import read_body
from .upstream_errors import (
    ConnectError,
    ConnectTimeout,
    ReadReset,
    ReadTimeout,
    UpstreamError,
    map_exceptions,
)

HIGH_WATER = 1 << 20


class FlowControl:
    """Read backpressure for one transport, as uvicorn's `FlowControl`: pause reading while more than
    `high_water` bytes wait unread, resume once the reader has taken them."""

    __slots__ = ("high_water", "paused", "transport")

    def __init__(self, transport: asyncio.ReadTransport | None = None, high_water: int = HIGH_WATER) -> None:
        self.transport = transport  # set by connection_made
        self.high_water = high_water
        self.paused = False

    def queued(self, size: int) -> None:
        """`size` bytes now wait unread."""
        if size > self.high_water and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def drained(self) -> bool:
        """The reader took everything queued. True if reading resumes now (it was paused)."""
        if not self.paused:
            return False
        self.paused = False
        if self.transport is not None:
            self.transport.resume_reading()
        return True


class _Reply:
    """The response being read on one connection: its head once known, the decoded body bytes queued
    for the reader, the error that ended it, and the futures a reader waits on."""

    __slots__ = (
        "_chunks",
        "_decoder",
        "_flow",
        "_head_waiter",
        "_loop",
        "_on_resume",
        "_waiter",
        "done",
        "error",
        "headers",
        "queued",
        "status",
    )  # fmt: skip

    def __init__(
        self, loop: asyncio.AbstractEventLoop, flow: FlowControl, on_resume: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._flow = flow
        self._on_resume = on_resume  # the reader emptied the queue of a paused transport
        self._chunks: list[bytes] = []
        self._decoder: BodyDecoder | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._head_waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: Headers = Headers()
        self.queued = 0  # body bytes waiting for the reader
        self.done = False  # the body is complete (and decoded to its end)
        self.error: UpstreamError | None = None

    def on_events(self, events: list[Response | Data | EndOfMessage]) -> None:
        """Apply the parser's events, wake the reader, and tell flow control how much waits unread.
        Raises `ProtocolError` for a body that does not decode."""
        chunks = self._chunks
        dec = self._decoder
        for ev in events:
            if type(ev) is Data:
                data = ev.data if dec is None else dec.decode(ev.data)
                if data:
                    chunks.append(data)
                    self.queued += len(data)
            elif type(ev) is Response:
                self.status = ev.status
                self.headers = ev.headers
                enc = dict.get(ev.headers, "content-encoding")
                dec = self._decoder = None if enc is None else BodyDecoder.for_encoding(enc)
            else:  # EndOfMessage
                if dec is not None:
                    tail = dec.finish()  # raises if the compressed stream is cut short
                    if tail:
                        chunks.append(tail)
                        self.queued += len(tail)
                self.done = True
        self.wake()
        self._flow.queued(self.queued)

    def fail(self, err: UpstreamError) -> None:
        """End the response with `err`; the first error wins, and a complete body stays complete. (A
        gzip body of the right length that does not decode is never complete: `finish` raised first.)"""
        if self.error is None and not self.done:
            self.error = err
        self.wake()

    def wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done() and (self._chunks or self.done or self.error):
            w.set_result(None)
        hw = self._head_waiter
        if hw is not None and not hw.done() and (self.status or self.error):
            hw.set_result(None)

    async def wait_head(self) -> None:
        while not self.status:
            if self.error is not None:
                raise self.error
            self._head_waiter = self._loop.create_future()
            await self._head_waiter
            self._head_waiter = None

    async def read(self) -> bytes:
        """The body bytes queued so far (at least one), or b"" at its end; raises the error that
        ended it, after every byte that came before the error."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self.queued = 0
                if self._flow.paused:
                    self._on_resume()
                return data
            if self.error is not None:
                raise self.error
            if self.done:
                return b""
            self._waiter = self._loop.create_future()
            await self._waiter
            self._waiter = None


class _Conn(asyncio.Protocol):
    """One TCP connection. Wires the transport's callbacks to the parser, the reply being read and
    flow control; decides nothing else."""

    __slots__ = (
        "aborted",
        "closed",
        "flow",
        "got_bytes",
        "idle_since",
        "key",
        "last_activity",
        "loop",
        "parser",
        "pool",
        "reply",
        "transport",
    )  # fmt: skip

    def __init__(self, pool: FastUpstream, key: tuple[str, int, bool]) -> None:
        self.loop = asyncio.get_running_loop()
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.flow = FlowControl()
        self.closed = False
        self.aborted = False  # closed by us, not by the peer
        self.idle_since = 0.0
        self.parser = ResponseParser()
        self.reset()

    def reset(self) -> None:
        """Ready for the next request on this connection."""
        self.parser.reset()
        self.reply = _Reply(self.loop, self.flow, self._resume)
        self.got_bytes = False
        self.last_activity = self.loop.time()

    @property
    def reusable(self) -> bool:
        """The response was read to its end and the connection may carry another request."""
        r = self.reply
        return r.done and r.error is None and self.parser.keep_alive and not self.closed

    # ------------------------------------------------------------------------------- protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.last_activity = self.loop.time()
        try:
            events = self.parser.feed(data)
            if events:
                self.reply.on_events(events)
        except UpstreamError as e:
            self.reply.fail(e)
            self.abort()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:  # abort() already took this connection out of the pool
            self.closed = True
            self.pool.discard(self)
        reply = self.reply
        if reply.done or reply.error is not None:
            return
        try:
            if exc is not None:  # an RST: a crash, never the end of a body
                raise ReadReset("upstream connection reset mid-response")
            reply.on_events(self.parser.feed_eof())  # a clean FIN ends a close-delimited body
        except UpstreamError as e:
            reply.fail(e)

    def _resume(self) -> None:
        if self.flow.drained():
            self.last_activity = self.loop.time()  # the idle clock restarts on resume

    def abort(self) -> None:
        """Close the socket now (an RST-like close the provider notices) and end the reply."""
        if not self.closed:
            self.closed = True
            self.pool.discard(self)  # now, not in connection_lost (a later callback): counts stay exact
        self.aborted = True
        self.reply.fail(ReadReset("upstream connection aborted"))
        if self.transport is not None:
            self.transport.abort()


class FastResponse:
    """One open response (the `upstream.Response` interface), with its idle timer."""

    __slots__ = ("_conn", "_done", "_timeout", "_timer", "headers", "status")

    def __init__(self, conn: _Conn, read_timeout: float) -> None:
        self._conn = conn
        self.status = 0
        self.headers: Mapping[str, str] = Headers()
        self._timeout = read_timeout
        self._done = False
        self._timer: asyncio.TimerHandle | None = None
        self._arm()

    def head_arrived(self) -> None:
        """The status and headers are in (`open` calls this before handing the response out)."""
        reply = self._conn.reply
        self.status = reply.status
        self.headers = reply.headers

    def _arm(self) -> None:
        c = self._conn
        self._timer = c.loop.call_at(c.last_activity + self._timeout, self._check_idle)

    def _check_idle(self) -> None:
        c = self._conn
        if self._done or c.reply.done:
            return
        now = c.loop.time()
        if c.flow.paused:  # our own backpressure, not upstream silence
            c.last_activity = now
            self._arm()
            return
        if now - c.last_activity >= self._timeout - 1e-3:
            c.reply.fail(ReadTimeout("upstream went silent for longer than the idle timeout"))
            c.abort()
        else:
            self._arm()

    async def read_chunk(self) -> bytes:
        try:
            return await self._conn.reply.read()
        except asyncio.CancelledError:
            # a half-read response cannot be reused, and a provider left streaming keeps billing
            self.abort()
            raise

    async def read_all(self, limit: int) -> bytes:
        return await read_body(self, limit)

    def _end(self) -> bool:
        """Stop the timer; False if this handle had already ended (its connection may be pooled now,
        even serving another request, so it must not be touched again)."""
        if self._done:
            return False
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return True

    def release(self) -> None:
        """Body read to the end: the connection goes back to the pool if it can be reused."""
        if not self._end():
            return
        c = self._conn
        if c.reusable:
            c.pool.put(c)
        else:
            c.abort()

    def abort(self) -> None:
        if self._end():
            self._conn.abort()


class FastUpstream:
    """Pooled raw HTTP/1.1 client with the `upstream.UpstreamClient` interface."""

    def __init__(
        self,
        *,
        keepalive_s: float = 30.0,
        max_idle_per_host: int = 256,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._keepalive_s = keepalive_s
        self._max_idle = max_idle_per_host
        self._idle: dict[tuple[str, int, bool], list[_Conn]] = {}
        self._busy: set[_Conn] = set()
        self._heads: dict[
            tuple[str, tuple[tuple[str, str], ...]], tuple[tuple[str, int, bool], str, bytes]
        ] = {}
        self._ssl = ssl_context  # None: the system's default trust store, made on first https use

    # ----------------------------------------------------------------------------------- pool

    def put(self, c: _Conn) -> None:
        self._busy.discard(c)
        idle = self._idle.setdefault(c.key, [])
        if len(idle) >= self._max_idle:
            c.abort()
            return
        c.reset()
        c.idle_since = c.loop.time()
        idle.append(c)

    def discard(self, c: _Conn) -> None:
        """Forget `c` (closed or about to be): called once per connection, by `_Conn`."""
        self._busy.discard(c)
        idle = self._idle.get(c.key)
        if idle and c in idle:
            idle.remove(c)

    def _take_idle(self, key: tuple[str, int, bool]) -> _Conn | None:
        idle = self._idle.get(key)
        while idle:
            c = idle.pop()
            # bytes on an idle connection (say an unsolicited "408") or a FIN being processed: unusable
            if (
                not c.closed and not c.got_bytes and c.loop.time() - c.idle_since < self._keepalive_s
                and c.transport is not None and not c.transport.is_closing()
            ):  # fmt: skip
                return c
            c.abort()
        return None

    async def _connect(self, key: tuple[str, int, bool], connect_timeout: float) -> _Conn:
        host, port, tls = key
        loop = asyncio.get_running_loop()
        if tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        with map_exceptions(
            {TimeoutError: ConnectTimeout, OSError: ConnectError}, "cannot connect to upstream"
        ):
            async with asyncio.timeout(connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: _Conn(self, key), host, port, ssl=self._ssl if tls else None,
                    server_hostname=host if tls else None,
                )  # fmt: skip
        return proto  # type: ignore[return-value]

    def _head(self, url: str, headers: Mapping[str, str]) -> tuple[tuple[str, int, bool], str, bytes]:
        hkey = (url, tuple(headers.items()))
        cached = self._heads.get(hkey)
        if cached is None:
            u = urlsplit(url)
            tls = u.scheme == "https"
            host = u.hostname or "localhost"
            port = u.port or (443 if tls else 80)
            path = (u.path or "/") + (f"?{u.query}" if u.query else "")
            hosthdr = f"[{host}]" if ":" in host else host
            if u.port:
                hosthdr += f":{port}"
            lines = [f"POST {path} HTTP/1.1", f"Host: {hosthdr}"]
            lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("host", "content-length")]
            cached = ((host, port, tls), url, ("\r\n".join(lines) + "\r\n").encode("latin-1"))
            if len(self._heads) > 1024:
                self._heads.clear()
            self._heads[hkey] = cached
        return cached

    # ------------------------------------------------------------------------------ interface

    async def open(
        self,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> FastResponse:
        key, _, head = self._head(url, headers)
        request = b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
        for attempt in (0, 1):
            conn = self._take_idle(key) if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(key, connect_timeout)
            self._busy.add(conn)
            conn.last_activity = conn.loop.time()  # the idle timer counts from the request
            resp = FastResponse(conn, read_timeout)
            try:
                assert conn.transport is not None
                conn.transport.write(request)
                await conn.reply.wait_head()
            except ReadReset:
                # closed by the peer before any byte of a reused connection: a stale keep-alive
                # connection, and nothing was processed; retry once on a new one (not if we closed it)
                stale = reused and not conn.got_bytes and not conn.aborted
                resp.abort()
                if stale:
                    continue
                raise
            except BaseException:
                resp.abort()
                raise
            resp.head_arrived()
            return resp
        raise ReadReset("upstream connection failed")  # pragma: no cover

    def pool_size(self) -> int:
        return len(self._busy) + sum(len(v) for v in self._idle.values())

    def busy_connections(self) -> int:
        return len(self._busy)

    async def close(self) -> None:
        for idle in list(self._idle.values()):
            for c in list(idle):  # abort() takes c out of this very list
                c.abort()
        self._idle.clear()
        for c in list(self._busy):
            c.abort()
        self._busy.clear()
