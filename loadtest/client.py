"""A lean HTTP/1.1 streaming client built on `asyncio.Protocol`, for measuring, not for general use.

Why not aiohttp: the load client shares two cores with the proxy under test and the simulated providers,
and the original design notes (not in the repository; docs/design.md, "Upstream client", has the same
comparison for the proxy's own client) measured aiohttp's `ClientSession` at ~0.2 CPU-ms per stream
against ~0.06 ms for a raw protocol client.  A client that costs as much as the proxy it measures
skews every figure, so this one does the minimum, all inside protocol callbacks (no task or await per chunk):

* one request per connection at a time, keep-alive pooling per (host, port), `TCP_NODELAY`;
* a status line + header parser, chunked / Content-Length / until-close bodies;
* SSE is parsed (orjson, event by event) only until the first content token, the moment we time;
  after that each chunk is only searched for ``[DONE]`` and an ``{"error"`` event.

Every request ends in exactly one way: `Exchange.done` resolves (never raises) and `Exchange.error` is
``None`` for a complete 2xx stream with a token and ``[DONE]``, else a short reason such as
``connect``, ``timeout``, ``reset``, ``http_429``, ``stream_error``, ``no_token``, ``truncated``,
``cancelled``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import orjson

__all__ = ["Client", "Exchange", "Target", "first_token_in_event"]

_HEAD, _BODY_LEN, _BODY_EOF, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _CHUNK_TRAILER, _IDLE = range(8)
_MAX_HEAD = 64 * 1024
_ERR_BODY_KEEP = 2048
IDLE_DROP_S = 30.0  # aiohttp servers close idle keep-alive connections after 75 s; never reuse near that


def first_token_in_event(event: Any) -> bool:
    """True when a parsed SSE event carries what a caller sees as the answer starting (README "How a
    request is served", step 4).

    Written independently of `hedge.sse` on purpose: the load test must not share the proxy's bugs.
    """
    if not isinstance(event, dict):
        return False
    choices = event.get("choices")
    if not isinstance(choices, list):
        return False
    for ch in choices:
        if not isinstance(ch, dict):
            continue
        if ch.get("finish_reason"):
            return True
        delta = ch.get("delta")
        if isinstance(delta, dict) and (
            delta.get("content")
            or delta.get("tool_calls")
            or delta.get("refusal")
            or delta.get("reasoning_content")
            or delta.get("reasoning")
        ):
            return True
    return False


class Target:
    """A parsed ``http://host:port/path`` endpoint plus the fixed part of every request's head."""

    __slots__ = ("head_prefix", "host", "path", "port", "url")

    def __init__(self, url: str, path: str = "/v1/chat/completions") -> None:
        u = urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"only http://host:port URLs are supported, got {url!r}")
        self.url = url
        self.host = u.hostname
        self.port = u.port or 80
        base = u.path.rstrip("/")
        # a base URL ending in /v1 gets /chat/completions; a bare host gets the whole path
        if base.endswith("/v1") and path.startswith("/v1/"):
            base = base[: -len("/v1")]
        self.path = base + path
        self.head_prefix = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: "
        ).encode()

    def request_bytes(self, body: bytes) -> bytes:
        return b"".join((self.head_prefix, str(len(body)).encode(), b"\r\n\r\n", body))


class Exchange:
    """One request/response.  Times are `time.perf_counter()` seconds; 0.0 means "did not happen"."""

    __slots__ = (
        "_conn",
        "_sse",
        "_tail",
        "_timer",
        "done",
        "endpoint",
        "err_body",
        "error",
        "got_first",
        "on_first",
        "saw_done",
        "status",
        "t_end",
        "t_first",
        "t_headers",
        "t_send",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[None] = loop.create_future()
        self.status = 0
        self.t_send = 0.0
        self.t_headers = 0.0
        self.t_first = 0.0
        self.t_end = 0.0
        self.endpoint: str | None = None
        self.error: str | None = None
        self.got_first = False
        self.saw_done = False
        self.on_first: Callable[[Exchange], None] | None = None
        self.err_body = bytearray()
        self._sse = bytearray()
        self._tail = b""
        self._timer: asyncio.TimerHandle | None = None
        self._conn: _Conn | None = None

    # -- derived figures ----------------------------------------------------------------------------

    @property
    def ok(self) -> bool:
        return self.done.done() and self.error is None

    @property
    def ttft(self) -> float | None:
        return self.t_first - self.t_send if self.t_first else None

    @property
    def total(self) -> float | None:
        return self.t_end - self.t_send if self.t_end else None

    # -- control ------------------------------------------------------------------------------------

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop now: close the connection (the server sees the client go away)."""
        if self.done.done():
            return
        conn = self._conn
        self._finish(reason)
        if conn is not None:
            conn.abort()

    # -- fed by the connection ----------------------------------------------------------------------

    def _body(self, data: bytes) -> None:
        if self.status != 200:
            if len(self.err_body) < _ERR_BODY_KEEP:
                self.err_body += data[: _ERR_BODY_KEEP - len(self.err_body)]
            return
        if self.got_first:
            probe = self._tail + data if self._tail else data
            if b"[DONE]" in probe:
                self.saw_done = True
            if b'{"error"' in probe and self.error is None:
                self.error = "stream_error"
            self._tail = probe[-16:]
            return
        sse = self._sse
        sse += data
        start = 0
        while True:
            end = sse.find(b"\n\n", start)
            if end < 0:
                break
            event = bytes(sse[start:end])
            start = end + 2
            if self._event(event):
                rest = bytes(sse[start:])
                sse.clear()
                if rest:
                    self._body(rest)
                return
            if self.done.done():
                return
        if start:
            del sse[:start]

    def _event(self, event: bytes) -> bool:
        """Handle one SSE event before the first token; True once it carried the first token."""
        for line in event.split(b"\n"):
            line = line.rstrip(b"\r")
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.saw_done = True
                return False
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                self.error = self.error or "stream_error"
                return False
            if isinstance(obj, dict) and "error" in obj:
                self.error = self.error or "stream_error"
                return False
            if first_token_in_event(obj):
                self.got_first = True
                self.t_first = time.perf_counter()
                cb = self.on_first
                if cb is not None:
                    cb(self)
                return True
        return False

    def _finish(self, error: str | None) -> None:
        if self.done.done():
            return
        self.t_end = time.perf_counter()
        if error is None and self.error is None:
            if self.status != 200:
                error = f"http_{self.status}"
            elif not self.got_first:
                error = "no_token"
            elif not self.saw_done:
                error = "truncated"
        if self.error is None:
            self.error = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._conn = None
        self.done.set_result(None)


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection running one exchange at a time."""

    __slots__ = (
        "buf",
        "chunked",
        "ex",
        "idle_since",
        "keep_alive",
        "lost",
        "owner",
        "pool",
        "remaining",
        "state",
        "transport",
    )

    def __init__(self, pool: deque[_Conn], owner: set[_Conn]) -> None:
        self.pool = pool
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.ex: Exchange | None = None
        self.state = _IDLE
        self.remaining = 0
        self.chunked = False
        self.keep_alive = True
        self.lost = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport: no isinstance check here
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        ex = self.ex
        self.ex = None
        if ex is not None:
            if self.state == _BODY_EOF:
                ex._finish(None)
            else:
                ex._finish("reset")
        self.owner.discard(self)
        try:
            self.pool.remove(self)
        except ValueError:
            pass

    def abort(self) -> None:
        self.ex = None
        self.lost = True
        if self.transport is not None:
            self.transport.abort()

    def send(self, ex: Exchange, data: bytes) -> None:
        self.ex = ex
        ex._conn = self
        self.state = _HEAD
        self.buf.clear()
        ex.t_send = time.perf_counter()
        assert self.transport is not None
        self.transport.write(data)

    def _complete(self) -> None:
        ex = self.ex
        self.ex = None
        self.state = _IDLE
        if ex is not None:
            ex._finish(None)
        if self.keep_alive and not self.lost and not self.buf:
            self.idle_since = time.monotonic()
            self.pool.append(self)
        else:
            self.abort()

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:  # bytes nobody asked for: the connection is not reusable
            self.abort()
            return
        if self.state == _HEAD:
            buf = self.buf
            buf += data
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                if len(buf) > _MAX_HEAD:
                    ex._finish("bad_response")
                    self.abort()
                return
            head = bytes(buf[:i])
            data = bytes(buf[i + 4 :])
            buf.clear()
            if not self._head(ex, head):
                return
            if not data:
                return
        if self.state == _BODY_LEN:
            n = len(data)
            if n >= self.remaining:
                extra = n > self.remaining
                ex._body(data[: self.remaining])
                self.remaining = 0
                if extra:
                    self.keep_alive = False
                self._complete()
            else:
                self.remaining -= n
                ex._body(data)
        elif self.state == _BODY_EOF:
            ex._body(data)
        else:
            self._chunks(ex, data)

    def _head(self, ex: Exchange, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            ex._finish("bad_response")
            self.abort()
            return False
        ex.status = status
        ex.t_headers = time.perf_counter()
        length = -1
        chunked = False
        keep_alive = parts[0] == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"content-length":
                length = int(value)
            elif name == b"connection":
                v = value.strip().lower()
                keep_alive = v == b"keep-alive" if not keep_alive else v != b"close"
            elif name == b"x-gammainfra-endpoint":
                ex.endpoint = value.strip().decode("latin-1")
        self.keep_alive = keep_alive
        if chunked:
            self.state = _CHUNK_SIZE
            self.chunked = True
        elif length >= 0:
            self.state = _BODY_LEN
            self.remaining = length
            if length == 0:
                self._complete()
                return False
        else:
            self.state = _BODY_EOF
            self.keep_alive = False
        return True

    def _chunks(self, ex: Exchange, data: bytes) -> None:
        buf = self.buf
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        pos = 0
        n = len(data)
        while pos < n:
            st = self.state
            if st == _CHUNK_DATA:
                take = min(self.remaining, n - pos)
                if take:
                    ex._body(data[pos : pos + take])
                    if self.ex is not ex:  # the exchange was cancelled from inside a callback
                        return
                pos += take
                self.remaining -= take
                if self.remaining:
                    return
                self.state = _CHUNK_CRLF
            elif st == _CHUNK_CRLF:
                if n - pos < 2:
                    break
                pos += 2
                self.state = _CHUNK_SIZE
            elif st == _CHUNK_SIZE:
                j = data.find(b"\r\n", pos)
                if j < 0:
                    break
                try:
                    size = int(data[pos:j].split(b";", 1)[0], 16)
                except ValueError:
                    ex._finish("bad_response")
                    self.abort()
                    return
                pos = j + 2
                if size == 0:
                    self.state = _CHUNK_TRAILER
                else:
                    self.state = _CHUNK_DATA
                    self.remaining = size
            elif st == _CHUNK_TRAILER:
                j = data.find(b"\r\n", pos)
                if j < 0:
                    break
                if j == pos:
                    pos += 2
                    if pos < n:
                        self.keep_alive = False
                    self._complete()
                    return
                pos = j + 2
            else:  # pragma: no cover - defensive
                return
        if pos < n:
            buf += data[pos:]


class Client:
    """Keep-alive connection pools per (host, port) and the one call that starts a request."""

    def __init__(self, *, connect_timeout: float = 2.0) -> None:
        self._pools: dict[tuple[str, int], deque[_Conn]] = {}
        self._all: set[_Conn] = set()
        self.connect_timeout = connect_timeout
        self.connects = 0

    async def _connection(self, target: Target) -> _Conn:
        key = (target.host, target.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = deque()
        now = time.monotonic()
        while pool:
            conn = pool.pop()
            if not conn.lost and now - conn.idle_since < IDLE_DROP_S:
                return conn
            conn.abort()
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            _, proto = await loop.create_connection(lambda: _Conn(pool, self._all), target.host, target.port)
        self.connects += 1
        self._all.add(proto)
        return proto

    async def start(
        self,
        target: Target,
        body: bytes,
        *,
        time_limit: float = 30.0,
        on_first: Callable[[Exchange], None] | None = None,
    ) -> Exchange:
        """Send one POST; return its `Exchange` at once (await ``.done`` for the end).

        A failed connect gives an exchange that is already done with ``error == "connect"``.
        """
        loop = asyncio.get_running_loop()
        ex = Exchange(loop)
        ex.on_first = on_first
        try:
            conn = await self._connection(target)
        except (OSError, TimeoutError):
            ex.t_send = time.perf_counter()
            ex._finish("connect")
            return ex
        conn.send(ex, target.request_bytes(body))
        ex._timer = loop.call_later(time_limit, ex.cancel, "timeout")
        return ex

    async def fetch(self, target: Target, body: bytes, *, time_limit: float = 30.0) -> Exchange:
        """`start` and wait for the end."""
        ex = await self.start(target, body, time_limit=time_limit)
        await ex.done
        return ex

    def close(self) -> None:
        """Drop every connection (in flight or idle)."""
        for conn in list(self._all):
            if conn.ex is not None:
                conn.ex.cancel("closed")
            conn.abort()
        self._all.clear()
        self._pools.clear()
