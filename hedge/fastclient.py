"""A lean HTTP/1.1 upstream client on asyncio's low-level transports and protocols (DESIGN §7).

Same interface as `upstream.Upstream` (open -> status/headers -> read_chunk -> release/abort), about a
third of aiohttp's CPU per stream, which matters because the upstream client is the largest per-request
cost the proxy controls. What it does, and only that:

- one request per connection at a time, keep-alive pool per (host, port, tls), idle connections dropped
  after `keepalive_s`; a request whose *reused* connection closes before any response byte is retried
  once on a new connection (the server closed an idle connection under us; nothing was processed);
- the request head is built once per (url, headers) and written with the body in one `write`;
- bodies framed by Content-Length, chunked encoding or connection close; gzip/deflate decoded if a
  server sends them despite `Accept-Encoding: identity`;
- read backpressure: reading pauses while more than `HIGH_WATER` bytes wait unread;
- timeouts: connect (per connection), and an idle timer that fails the response when the socket has
  been silent for `read_timeout` (one timer per response, re-armed lazily, not per chunk); time spent
  paused by our own backpressure is not silence;
- `abort()` closes the socket at once, so the provider sees the disconnect and stops generating.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections.abc import Mapping
from urllib.parse import urlsplit

from .upstream import UpstreamError, read_body

HIGH_WATER = 1 << 20
_HEX = b"0123456789abcdefABCDEF"
MAX_HEAD = 64 * 1024

# parser states
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class Headers(dict[str, str]):
    """Response headers: a dict with lower-case keys, looked up case-insensitively."""

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return dict.get(self, key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return dict.__getitem__(self, key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and dict.__contains__(self, key.lower())


class _Conn(asyncio.Protocol):
    """One TCP connection and the response being read on it."""

    __slots__ = (
        "_buf",
        "_chunks",
        "_decoder",
        "_error",
        "_head_waiter",
        "_loop",
        "_need",
        "_paused",
        "_probe",
        "_queued",
        "_state",
        "_waiter",
        "closed",
        "got_bytes",
        "headers",
        "idle_since",
        "keep_alive",
        "key",
        "last_activity",
        "pool",
        "status",
        "transport",
    )  # fmt: skip

    def __init__(self, pool: FastUpstream, key: tuple[str, int, bool]) -> None:
        self._loop = asyncio.get_running_loop()
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self._state = _HEAD
        self._buf = b""
        self._chunks: list[bytes] = []
        self._queued = 0
        self._need = 0
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._head_waiter: asyncio.Future[None] | None = None
        self._decoder: zlib._Decompress | None = None
        self._probe = False  # "deflate": zlib-wrapped or raw? decided by the first body byte
        self._paused = False
        self.status = 0
        self.headers = Headers()
        self.keep_alive = True
        self.got_bytes = False
        self.last_activity = self._loop.time()

    # ------------------------------------------------------------------------------- protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        if self._state == _UNTIL_CLOSE and exc is None:  # FIN ends the body; an RST (exc) cuts it
            self._state = _DONE
            if self._decoder is not None:
                self._decode(len(self._chunks))
            self._wake()
        elif self._state != _DONE:
            self._fail(UpstreamError("reset", "upstream closed the connection mid-response"))

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.last_activity = self._loop.time()
        try:
            self._feed(data)
        except (UpstreamError, ValueError, zlib.error) as e:
            # set directly, not via _fail: the framing may have reached _DONE in this very feed (a
            # broken gzip body of the right length), and such a body must not pass as complete
            if self._error is None:
                self._error = (
                    e if isinstance(e, UpstreamError)
                    else UpstreamError("reset", "upstream sent a malformed HTTP response")
                )  # fmt: skip
            self.abort()
            self._wake()

    # --------------------------------------------------------------------------------- parser

    def _feed(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        pos = 0
        n = len(data)
        out = self._chunks
        mark = len(out)  # body bytes from here on are this feed's (earlier ones are decoded already)
        while pos < n:
            st = self._state
            if st == _CHUNK_DATA:
                take = min(self._need, n - pos)
                out.append(data[pos : pos + take] if take != n or pos else data)
                self._queued += take
                pos += take
                self._need -= take
                if not self._need:
                    self._state = _CHUNK_CRLF
            elif st == _CHUNK_SIZE:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    if n - pos > MAX_HEAD:
                        raise UpstreamError("reset", "upstream chunk-size line too long")
                    self._buf = data[pos:]
                    break
                digits = data[pos:end].split(b";", 1)[0].strip()
                if not digits or digits.strip(_HEX):  # int(x, 16) also takes 0x5, +5 and 0_5
                    raise ValueError("malformed chunk size")
                size = int(digits, 16)
                pos = end + 2
                if size:
                    self._need = size
                    self._state = _CHUNK_DATA
                else:
                    self._state = _TRAILERS
            elif st == _CHUNK_CRLF:
                if n - pos < 2:
                    self._buf = data[pos:]
                    break
                pos += 2
                self._state = _CHUNK_SIZE
            elif st == _LENGTH:
                take = min(self._need, n - pos)
                out.append(data[pos : pos + take] if take != n or pos else data)
                self._queued += take
                pos += take
                self._need -= take
                if not self._need:
                    self._finish()
            elif st == _UNTIL_CLOSE:
                out.append(data[pos:] if pos else data)
                self._queued += n - pos
                pos = n
            elif st == _HEAD:
                end = data.find(b"\r\n\r\n", pos)
                if end < 0:
                    if n - pos > MAX_HEAD:
                        raise UpstreamError("reset", "upstream response head too large")
                    self._buf = data[pos:]
                    break
                self._parse_head(data[pos:end])
                pos = end + 4
            elif st == _TRAILERS:  # trailer lines after the last chunk, up to an empty line
                end = data.find(b"\r\n", pos)
                if end < 0:
                    if n - pos > MAX_HEAD:
                        raise UpstreamError("reset", "upstream trailer line too long")
                    self._buf = data[pos:]
                    break
                empty = end == pos
                pos = end + 2
                if empty:
                    self._finish()
            else:  # _DONE: bytes after the response: the connection is not reusable
                self.keep_alive = False
                break
        if self._decoder is not None:
            self._decode(mark)
        if self._queued > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _decode(self, mark: int) -> None:
        """Decompress the body bytes queued from `mark` on (the ones the current feed added), and the
        decoder's tail once the body is complete."""
        out = self._chunks
        raw = b"".join(out[mark:]) if len(out) - mark != 1 else out[mark]
        del out[mark:]
        if self._probe and raw:
            self._probe = False
            if raw[0] & 0x0F != 8:  # not a zlib header (CM=8): raw deflate, as some servers send
                self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
        dec = self._decoder.decompress(raw) if raw else b""  # type: ignore[union-attr]
        if self._state == _DONE:
            dec += self._decoder.flush()  # type: ignore[union-attr]
            if not self._decoder.eof:  # type: ignore[union-attr]
                # the framing said "complete" but the compressed stream is not: a body cut short
                # (e.g. a close-delimited one whose server closed early) must not pass as whole
                self._error = UpstreamError("reset", "upstream body ended inside its compressed stream")
                self.abort()  # unusable, like any malformed response
            self._decoder = None  # nothing more to decode on this response
        self._queued += len(dec) - len(raw)
        if dec:
            out.append(dec)

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise UpstreamError("reset", "upstream did not answer HTTP/1.x")
        status = int(parts[1])
        h = self.headers
        for line in lines[1:]:
            k, sep, v = line.partition(b":")
            if sep:
                name, value = k.strip().lower().decode("latin-1"), v.strip().decode("latin-1")
                old = dict.get(h, name)
                h[name] = value if old is None else f"{old}, {value}"  # repeated: folded (RFC 9110 5.3)
        if 100 <= status < 200:  # interim response: the real head follows
            h.clear()  # the same object: a FastResponse may already hold it
            return
        self.status = status
        conn = (h.get("connection") or "").lower()
        self.keep_alive = parts[0] == b"HTTP/1.1" and "close" not in conn
        enc = (h.get("content-encoding") or "").lower()
        if enc in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            self._decoder = zlib.decompressobj()
            self._probe = True
        if "chunked" in (h.get("transfer-encoding") or "").lower():
            self._state = _CHUNK_SIZE
        elif "content-length" in h:
            self._need = int(h["content-length"])
            if self._need < 0:
                raise ValueError("negative Content-Length")
            self._state = _LENGTH if self._need else _DONE
            if not self._need:
                self._finish()
        elif status in (204, 304):
            self._finish()
        else:
            self._state = _UNTIL_CLOSE
            self.keep_alive = False
        hw = self._head_waiter
        if hw is not None and not hw.done():
            hw.set_result(None)

    def _finish(self) -> None:
        self._state = _DONE  # a decoder's tail is flushed by _decode, after this feed's bytes
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done() and (self._chunks or self._state == _DONE or self._error):
            w.set_result(None)
        hw = self._head_waiter
        if hw is not None and not hw.done() and (self.status or self._error):
            hw.set_result(None)

    def _fail(self, err: UpstreamError) -> None:
        if self._error is None and self._state != _DONE:
            self._error = err
        self._wake()

    def abort(self) -> None:
        self.closed = True
        self.pool.discard(self)  # now, not in connection_lost (a later callback): the counts stay exact
        if self.transport is not None:
            self.transport.abort()

    # --------------------------------------------------------------------------------- reading

    async def wait_head(self) -> None:
        while not self.status:
            if self._error is not None:
                raise self._error
            self._head_waiter = self._loop.create_future()
            await self._head_waiter
            self._head_waiter = None

    async def read(self) -> bytes:
        while True:
            if self._chunks:
                chunks = self._chunks
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._queued = 0
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.last_activity = self._loop.time()  # the idle clock restarts on resume
                    self.transport.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self._state == _DONE:
                return b""
            self._waiter = self._loop.create_future()
            await self._waiter
            self._waiter = None


class FastResponse:
    """One open response (the `UpstreamResponse` interface)."""

    __slots__ = ("_conn", "_done", "_timeout", "_timer", "headers", "status")

    def __init__(self, conn: _Conn, read_timeout: float) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers: Mapping[str, str] = conn.headers
        self._timeout = read_timeout
        self._done = False
        self._timer: asyncio.TimerHandle | None = None
        if conn._state != _DONE:
            self._arm()

    def _arm(self) -> None:
        c = self._conn
        self._timer = c._loop.call_at(c.last_activity + self._timeout, self._check_idle)

    def _check_idle(self) -> None:
        c = self._conn
        if self._done or c._state == _DONE:
            return
        if c._paused:  # our own backpressure, not upstream silence: look again a window later
            c.last_activity = c._loop.time()
            self._arm()
            return
        if c._loop.time() - c.last_activity >= self._timeout - 1e-3:
            c._fail(UpstreamError("timeout", "upstream went silent for longer than the idle timeout"))
            c.abort()
        else:
            self._arm()

    async def read_chunk(self) -> bytes:
        try:
            return await self._conn.read()
        except asyncio.CancelledError:
            # a half-read response cannot be reused, and a provider left streaming keeps billing
            self.abort()
            raise

    async def read_all(self, limit: int) -> bytes:
        return await read_body(self, limit)

    def _end(self) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def release(self) -> None:
        """Body read to the end: the connection goes back to the pool if it can be reused."""
        if self._done:
            return
        self._end()
        c = self._conn
        if c._state == _DONE and c.keep_alive and not c.closed and not c._error:
            c.pool.put(c)
        else:
            c.abort()
            c.pool.discard(c)

    def abort(self) -> None:
        if self._done:  # after release() the connection may be pooled, even serving another request
            return
        self._end()
        self._conn.abort()
        self._conn.pool.discard(self._conn)


class FastUpstream:
    """Pooled raw HTTP/1.1 client with the `upstream.Upstream` interface."""

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
        c.idle_since = time.monotonic()
        c._reset()
        idle.append(c)

    def discard(self, c: _Conn) -> None:
        self._busy.discard(c)
        idle = self._idle.get(c.key)
        if idle and c in idle:
            idle.remove(c)

    def _take_idle(self, key: tuple[str, int, bool]) -> _Conn | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            c = idle.pop()
            # bytes on an idle connection (say an unsolicited "408") or a FIN being processed: unusable
            if (
                not c.closed and not c.got_bytes and now - c.idle_since < self._keepalive_s
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
        try:
            async with asyncio.timeout(connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: _Conn(self, key), host, port, ssl=self._ssl if tls else None,
                    server_hostname=host if tls else None,
                )  # fmt: skip
        except TimeoutError:
            raise UpstreamError("timeout", "connecting to upstream timed out") from None
        except OSError as e:
            raise UpstreamError("connect", f"cannot connect to upstream ({type(e).__name__})") from None
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
            try:
                assert conn.transport is not None
                conn.last_activity = conn._loop.time()
                conn.transport.write(request)
                resp = FastResponse(conn, read_timeout)
                try:
                    await conn.wait_head()
                except BaseException:
                    resp.abort()
                    raise
                resp.status = conn.status
                return resp
            except UpstreamError as e:
                self.discard(conn)
                conn.abort()
                if reused and not conn.got_bytes and e.reason == "reset":
                    continue  # a stale keep-alive connection: retry once on a new one
                raise
            except BaseException:
                self.discard(conn)
                conn.abort()
                raise
        raise UpstreamError("reset", "upstream connection failed")  # pragma: no cover

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
