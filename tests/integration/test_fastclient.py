"""The lean upstream client (`hedge/fastclient.py`) against real sockets on 127.0.0.1.

Most tests talk to `RawServer`, a few lines of asyncio that write exactly the bytes a test gives it (so
framing, splits, stale connections and silences are under the test's control) and record what the
client did to the connection (accepts, requests, when it hung up). The end of the file runs the same
proxy scenarios with both upstream clients (`server.upstream_client = "fast" | "aiohttp"`), so the
older aiohttp path stays tested and the two stay interchangeable. Every async test runs twice, on
asyncio's loop and on uvloop (what `hedge serve` runs on); the parser tests also feed `_Conn` by hand,
so every split of the bytes can be tried without a socket.

Timing: silences and idle timeouts are a few hundred ms; bounds are generous (the box is shared), and
"promptly" means "well before the server would have given up on its own", not a tight number.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import itertools
import random
import socket
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hedge import http11
from hedge.aiohttp_client import AiohttpUpstream
from hedge.fastclient import HIGH_WATER, FastResponse, FastUpstream, _Conn
from hedge.simprovider import Behaviour
from hedge.upstream import UpstreamError

from ..conftest import chat, eventually, raw_config, read_stream, run_proxy, same_stream, sims
from ..unit.test_http11 import MALFORMED as PARSER_MALFORMED

# The loop switch below overrides pytest-asyncio's `event_loop_policy` fixture, deprecated in favour of
# a conftest hook that would apply to every test file; test_both_loops_really_run says when it stops
# working.
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy" fixture')

HEADERS = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
REQ_BODY = b'{"model":"m","stream":true}'
GONE_BOUND = 2.0  # "the server saw the disconnect": far less than any server-side timeout


# ------------------------------------------------------------------------------------- raw server


class Peer:
    """The server's end of one accepted connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.bodies: list[bytes] = []
        self.heads: list[bytes] = []
        self.gone = asyncio.Event()  # the client closed or reset the connection
        self.gone_at: float | None = None
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small writes leave at once

    def _mark_gone(self) -> None:
        if not self.gone.is_set():
            self.gone_at = asyncio.get_running_loop().time()
            self.gone.set()

    async def request(self) -> bytes | None:
        """The next request's body, or None when the client hung up instead."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            self._mark_gone()
            return None
        self.heads.append(head)
        self.bodies.append(body)
        return body

    async def send(self, data: bytes, *, pieces: list[int] | None = None, gap: float = 0.0) -> None:
        """Write `data`, optionally cut at the given sizes (cycled), yielding to the loop in between so
        the client's `data_received` sees the pieces one by one."""
        if not pieces:
            self.writer.write(data)
            await self.writer.drain()
            return
        pos, i = 0, 0
        while pos < len(data):
            n = max(1, pieces[i % len(pieces)])
            self.writer.write(data[pos : pos + n])
            await self.writer.drain()
            pos += n
            i += 1
            await asyncio.sleep(gap)

    async def until_gone(self, timeout: float = 5.0) -> bool:
        """Read (and drop) whatever comes until the client hangs up; True if it did within `timeout`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        try:
            while loop.time() < end:
                try:
                    data = await asyncio.wait_for(self.reader.read(65536), max(0.0, end - loop.time()))
                except TimeoutError:
                    break
                if not data:
                    self._mark_gone()
                    break
        except ConnectionError:
            self._mark_gone()
        return self.gone.is_set()

    def close(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0) rather than a FIN: a crash, not an orderly end."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Script = Callable[[Peer], Awaitable[None]]


class RawServer:
    """Accepts connections and runs `script(peer)` for each; the n-th connection gets `scripts[n]`
    (the last one repeats). The connection is closed when its script returns."""

    def __init__(self, *scripts: Script) -> None:
        self.scripts = scripts
        self.peers: list[Peer] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def accepts(self) -> int:
        return len(self.peers)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1/chat/completions"

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for p in self.peers:
            p.writer.transport.abort()
        await self._server.wait_closed()

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(reader, writer)
        script = self.scripts[min(len(self.peers), len(self.scripts) - 1)]
        self.peers.append(peer)
        try:
            await script(peer)
        except ConnectionError:
            peer._mark_gone()
        except asyncio.CancelledError:
            pass  # the test is over; ending quietly keeps asyncio from logging the cancelled handler
        finally:
            self._tasks.discard(task)
            writer.close()


def serve_each(response: bytes, **send: Any) -> Script:
    """A keep-alive script: answer every request on the connection with `response`."""

    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(response, **send)

    return script


def answer_then(response: bytes, then: str) -> Script:
    """Answer one request, then `close` (FIN), `reset` (RST) or `wait` until the client leaves."""

    async def script(peer: Peer) -> None:
        if await peer.request() is None:
            return
        await peer.send(response)
        if then == "reset":
            peer.reset()
        elif then == "wait":
            await peer.until_gone()

    return script


async def silent(peer: Peer) -> None:
    """Read the request, never answer, notice when the client leaves."""
    if await peer.request() is not None:
        await peer.until_gone()


# ----------------------------------------------------------------------------------- responses


def length_response(body: bytes, *headers: str, status: str = "200 OK", version: str = "1.1") -> bytes:
    head = [f"HTTP/{version} {status}", *headers, f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunked_response(parts: list[bytes], *headers: str, ext: bool = False, trailers: bool = False) -> bytes:
    head = ["HTTP/1.1 200 OK", "Content-Type: text/event-stream", *headers, "Transfer-Encoding: chunked"]
    out = ("\r\n".join(head) + "\r\n\r\n").encode()
    for i, p in enumerate(parts):
        extension = f";foo=bar;n={i}" if ext else ""
        out += f"{len(p):x}{extension}\r\n".encode() + p + b"\r\n"
    out += b"0" + (b";last=1" if ext else b"") + b"\r\n"
    if trailers:
        out += b"X-Checksum: abc\r\nX-Other: 1\r\n"
    return out + b"\r\n"


def sse_event(content: str) -> bytes:
    ev = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}}],
    }
    return b"data: " + orjson.dumps(ev) + b"\n\n"


BODY = b"".join(sse_event(w) for w in ("Hello", ", ", "wörld", "!", " " * 40)) + b"data: [DONE]\n\n"
PARTS = [BODY[:7], BODY[7:100], BODY[100:101], BODY[101:]]


def deflate_raw(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def gz_parts(data: bytes, compress: Callable[[bytes], bytes]) -> list[bytes]:
    z = compress(data)
    return [z[:5], z[5:20], z[20:]]


# Every framing the client supports, each decoding to BODY. (name, raw response bytes, server closes)
CASES: list[tuple[str, bytes, bool]] = [
    ("length", length_response(BODY, "Content-Type: text/event-stream"), False),
    ("chunked", chunked_response(PARTS), False),
    ("chunked-ext-trailers", chunked_response(PARTS, ext=True, trailers=True), False),
    ("close-delimited-1.0", b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + BODY, True),
    ("close-delimited-1.1", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + BODY, True),
    (
        "interim-100-103",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
        + length_response(BODY),
        False,
    ),
    ("gzip-length", length_response(gzip.compress(BODY, mtime=0), "Content-Encoding: gzip"), False),
    ("gzip-chunked", chunked_response(gz_parts(BODY, gzip.compress), "Content-Encoding: gzip"), False),
    (
        "deflate-zlib-chunked",
        chunked_response(gz_parts(BODY, zlib.compress), "Content-Encoding: deflate"),
        False,
    ),
    ("deflate-raw-length", length_response(deflate_raw(BODY), "Content-Encoding: deflate"), False),
]
CASE_IDS = [c[0] for c in CASES]


# -------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every async test here runs on both loops: tests run on asyncio's, production on uvloop, and
    the two differ in exactly what this client touches (transport close/abort/pause, error timing)."""
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


@pytest.fixture
async def client() -> AsyncIterator[FastUpstream]:
    c = FastUpstream()
    try:
        yield c
    finally:
        await c.close()


async def open_(
    client: FastUpstream, url: str, *, read_timeout: float = 5.0, body: bytes = REQ_BODY
) -> FastResponse:
    return await client.open(url, HEADERS, body, connect_timeout=2.0, read_timeout=read_timeout)


async def read_body(resp: FastResponse, *, max_reads: int = 100_000) -> bytes:
    out = bytearray()
    for _ in range(max_reads):
        chunk = await resp.read_chunk()
        if not chunk:
            return bytes(out)
        out += chunk
    raise AssertionError("body did not end")


async def fetch(client: FastUpstream, url: str, **kw: Any) -> tuple[FastResponse, bytes]:
    resp = await open_(client, url, **kw)
    body = await read_body(resp)
    resp.release()
    return resp, body


async def gone(peer: Peer, timeout: float = GONE_BOUND) -> bool:
    try:
        await asyncio.wait_for(peer.gone.wait(), timeout)
    except TimeoutError:
        return False
    return True


def assert_idle(client: FastUpstream, pooled: int) -> None:
    assert client.busy_connections() == 0
    assert client.pool_size() == pooled


async def test_both_loops_really_run(event_loop_policy: asyncio.AbstractEventLoopPolicy) -> None:
    want = "uvloop" if isinstance(event_loop_policy, uvloop.EventLoopPolicy) else "asyncio"
    assert type(asyncio.get_running_loop()).__module__.split(".")[0] == want


# --------------------------------------------------------------------------------------- framing


async def test_content_length_body_and_headers(client: FastUpstream) -> None:
    raw = length_response(BODY, "Content-Type: text/event-stream", "X-Request-ID: abc", status="200 OK")
    async with RawServer(serve_each(raw)) as srv:
        resp, body = await fetch(client, srv.url)
        assert resp.status == 200
        assert body == BODY
        assert resp.headers["x-request-id"] == "abc"
        assert resp.headers.get("X-Request-Id") == "abc"  # case-insensitive, like aiohttp's
        assert "CONTENT-TYPE" in resp.headers
        assert resp.headers.get("missing") is None
        assert_idle(client, 1)
        head = srv.peers[0].heads[0]
        assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert b"\r\nHost: 127.0.0.1:" in head
        assert f"Content-Length: {len(REQ_BODY)}".encode() in head
        assert srv.peers[0].bodies == [REQ_BODY]


@pytest.mark.parametrize("framing", ["length", "close"])
async def test_truncated_gzip_body_is_an_error_not_a_short_body(client: FastUpstream, framing: str) -> None:
    z = gzip.compress(BODY * 20, mtime=0)[:-12]  # the framing is intact, the gzip stream is not
    if framing == "length":
        raw = length_response(z, "Content-Encoding: gzip")
    else:  # close-delimited, ended by a clean FIN
        raw = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nConnection: close\r\n\r\n" + z
    async with RawServer(answer_then(raw, "close" if framing == "close" else "wait")) as srv:
        with pytest.raises(UpstreamError) as e:
            await fetch(client, srv.url, read_timeout=2.0)
        assert e.value.reason == "reset"
        assert_idle(client, 0)


async def test_repeated_headers_are_joined(client: FastUpstream) -> None:
    raw = length_response(BODY, "Via: 1.1 a", "Via: 1.1 b", "X-One: 1", status="200 OK")
    async with RawServer(serve_each(raw)) as srv:
        resp, body = await fetch(client, srv.url)
        assert body == BODY
        assert resp.headers["via"] == "1.1 a, 1.1 b"  # as HTTP folds them (RFC 9110 5.3)
        assert resp.headers["x-one"] == "1"


async def test_chunked_with_extensions_and_trailers_is_reusable(client: FastUpstream) -> None:
    raw = chunked_response(PARTS, ext=True, trailers=True)
    async with RawServer(serve_each(raw)) as srv:
        for _ in range(2):
            resp, body = await fetch(client, srv.url)
            assert body == BODY
            assert "x-checksum" not in resp.headers  # trailers are consumed, not surfaced
        assert srv.accepts == 1
        assert_idle(client, 1)


@pytest.mark.parametrize("version", ["1.0", "1.1"])
async def test_close_delimited_body_is_read_to_eof_and_not_pooled(client: FastUpstream, version: str) -> None:
    raw = f"HTTP/{version} 200 OK\r\nContent-Type: text/event-stream\r\n\r\n".encode() + BODY

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(raw, pieces=[50])

    async with RawServer(script) as srv:
        _, body = await fetch(client, srv.url)
        assert body == BODY
        assert_idle(client, 0)
        await fetch(client, srv.url)
        assert srv.accepts == 2


async def test_close_delimited_body_cut_by_a_reset_is_an_error(client: FastUpstream) -> None:
    # an RST is a crash, not the end of the body: the body must not pass as complete
    raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + BODY[:40]
    async with RawServer(answer_then(raw, "reset")) as srv:
        resp = await open_(client, srv.url)
        with pytest.raises(UpstreamError) as e:
            await read_body(resp)
        assert e.value.reason == "reset"
        resp.abort()
        assert_idle(client, 0)


async def test_204_has_no_body_and_is_reusable(client: FastUpstream) -> None:
    async with RawServer(serve_each(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")) as srv:
        for _ in range(2):
            resp, body = await fetch(client, srv.url)
            assert resp.status == 204
            assert body == b""
        assert srv.accepts == 1
        assert_idle(client, 1)


async def test_connection_close_header_is_honoured(client: FastUpstream) -> None:
    raw = length_response(BODY, "Connection: close")
    async with RawServer(answer_then(raw, "wait")) as srv:
        _, body = await fetch(client, srv.url)
        assert body == BODY
        assert_idle(client, 0)
        assert await gone(srv.peers[0])  # released = closed by us, not left dangling


async def test_interim_1xx_responses_are_skipped(client: FastUpstream) -> None:
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n"
        + length_response(b'{"ok":1}', "Content-Type: application/json", status="201 Created")
    )
    async with RawServer(serve_each(raw, pieces=[3])) as srv:
        resp, body = await fetch(client, srv.url)
        assert resp.status == 201
        assert body == b'{"ok":1}'
        assert "link" not in resp.headers  # the interim response's headers are dropped
        assert resp.headers["content-type"] == "application/json"
        assert_idle(client, 1)


ENCODED = [c for c in CASES if "gzip" in c[0] or "deflate" in c[0]]


@pytest.mark.parametrize("name,raw,closes", ENCODED, ids=[c[0] for c in ENCODED])
async def test_encoded_bodies_are_decoded(client: FastUpstream, name: str, raw: bytes, closes: bool) -> None:
    async with RawServer(serve_each(raw)) as srv:
        resp, body = await fetch(client, srv.url)
        assert body == BODY
        assert_idle(client, 1)


async def test_gzip_body_arriving_in_pieces_before_the_reader_looks(client: FastUpstream) -> None:
    # Several pieces are queued before the first read_chunk: each must be decompressed exactly once.
    z = gzip.compress(BODY * 20, mtime=0)
    raw = chunked_response([z[:30], z[30:200], z[200:]], "Content-Encoding: gzip")
    sent = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(raw, pieces=[len(raw) // 4], gap=0.01)
        sent.set()
        await peer.until_gone()

    async with RawServer(script) as srv:
        resp = await open_(client, srv.url)
        await asyncio.wait_for(sent.wait(), 5)
        await asyncio.sleep(0.05)  # let every piece land in the client's queue
        assert await read_body(resp) == BODY * 20
        resp.release()
        assert_idle(client, 1)


# --------------------------------------------------------------------------------------- splits


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


class FakeTransport:
    """Enough of a transport for feeding `_Conn` by hand."""

    def __init__(self) -> None:
        self.paused = False
        self.aborted = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted

    def write(self, data: bytes) -> None:
        pass


async def parse_pieces(raw: bytes, pieces: list[bytes], closes: bool, drain: list[bool]) -> bytes:
    conn = _Conn(FastUpstream(), ("127.0.0.1", 1, False))
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    out = bytearray()
    for i, p in enumerate(pieces):
        conn.data_received(p)
        if drain[i % len(drain)] and conn.reply.status:
            while conn.reply.queued:
                out += await conn.reply.read()
    if closes:
        conn.connection_lost(None)
    assert conn.reply.status == 200 or conn.reply.status == 201
    for _ in range(len(raw) + 2):
        chunk = await asyncio.wait_for(conn.reply.read(), 1.0)
        if not chunk:
            break
        out += chunk
    assert conn.reply.error is None
    assert conn.parser.keep_alive is not closes
    return bytes(out)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.sampled_from(CASES),
    cuts=st.lists(st.integers(min_value=0, max_value=4096), max_size=40),
    drain=st.lists(st.booleans(), min_size=1, max_size=8),
)
def test_parser_any_split_any_read_pattern(
    case: tuple[str, bytes, bool], cuts: list[int], drain: list[bool]
) -> None:
    """The parser alone, fed by hand: every cut of the bytes, read between pieces or not."""
    _, raw, closes = case
    assert asyncio.run(parse_pieces(raw, split_at(raw, cuts), closes, drain)) == BODY


@pytest.mark.parametrize("name,raw,closes", CASES, ids=CASE_IDS)
def test_parser_one_byte_at_a_time(name: str, raw: bytes, closes: bool) -> None:
    pieces = [raw[i : i + 1] for i in range(len(raw))]
    assert asyncio.run(parse_pieces(raw, pieces, closes, [False])) == BODY
    assert asyncio.run(parse_pieces(raw, pieces, closes, [True])) == BODY


@pytest.mark.parametrize("name,raw,closes", CASES, ids=CASE_IDS)
async def test_socket_one_byte_at_a_time_and_random_splits(
    client: FastUpstream, name: str, raw: bytes, closes: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over a real socket: byte by byte, then seeded random splits; the decoded body never changes."""
    calls = 0
    original = _Conn.data_received

    def counting(self: _Conn, data: bytes) -> None:
        nonlocal calls
        calls += 1
        original(self, data)

    monkeypatch.setattr(_Conn, "data_received", counting)
    rnd = random.Random(zlib.crc32(name.encode()))
    plans: list[list[int]] = [[1]] + [[rnd.randint(1, 40) for _ in range(8)] for _ in range(3)]
    scripts = []
    for plan in plans:

        async def script(peer: Peer, plan: list[int] = plan) -> None:
            while await peer.request() is not None:
                await peer.send(raw, pieces=plan)
                if closes:
                    return

        scripts.append(script)
    async with RawServer(*scripts) as srv:
        for i, _ in enumerate(plans):
            if not closes:  # a keep-alive connection would be reused: force one connection per plan
                await client.close()
            calls = 0
            resp, body = await fetch(client, srv.url)
            assert body == BODY, f"plan {i}"
            if i == 0:  # byte by byte really arrived in many pieces (the loop ran between the writes)
                assert calls > len(raw) // 4, calls
        assert srv.accepts == len(plans)


# ------------------------------------------------------------------------------------ keep-alive


async def test_sequential_requests_reuse_one_connection(client: FastUpstream) -> None:
    async with RawServer(serve_each(length_response(BODY))) as srv:
        for _ in range(3):
            _, body = await fetch(client, srv.url)
            assert body == BODY
            assert_idle(client, 1)
        assert srv.accepts == 1
        assert len(srv.peers[0].bodies) == 3


async def test_concurrent_requests_each_get_a_connection_then_all_are_reused(client: FastUpstream) -> None:
    async def slow(peer: Peer) -> None:
        while await peer.request() is not None:
            await asyncio.sleep(0.02)
            await peer.send(length_response(BODY))

    async with RawServer(slow) as srv:
        for _ in range(2):
            results = await asyncio.gather(*(fetch(client, srv.url) for _ in range(4)))
            assert [b for _, b in results] == [BODY] * 4
        assert srv.accepts == 4
        assert_idle(client, 4)
        await client.close()  # closes every idle connection
        assert all([await gone(p) for p in srv.peers])
        assert_idle(client, 0)


async def test_abort_after_release_keeps_the_pooled_connection(client: FastUpstream) -> None:
    # proxy._attempt (non-streaming) calls release() and then, in its finally, abort(): the second
    # call must not kill a connection that is back in the pool (maybe already serving someone else)
    async with RawServer(serve_each(length_response(BODY))) as srv:
        resp, _ = await fetch(client, srv.url)
        resp.abort()
        assert_idle(client, 1)
        resp2 = await open_(client, srv.url)
        resp.abort()  # a stale handle must not touch the connection now serving resp2
        assert await read_body(resp2) == BODY
        resp2.release()
        assert srv.accepts == 1


async def test_stale_pooled_connection_is_retried_once_on_a_new_one(client: FastUpstream) -> None:
    # The server closes its idle connection just as our second request arrives (it read it, answered
    # nothing): nothing was processed, so the client retries on a fresh connection, transparently.
    async def first(peer: Peer) -> None:
        await peer.request()
        await peer.send(length_response(BODY))
        await peer.request()
        peer.close()

    async with RawServer(first, serve_each(length_response(b"second"))) as srv:
        await fetch(client, srv.url)
        assert_idle(client, 1)
        resp, body = await fetch(client, srv.url)
        assert (resp.status, body) == (200, b"second")
        assert srv.accepts == 2
        assert len(srv.peers[0].bodies) == 2  # the request did reach the stale connection first
        assert_idle(client, 1)


async def test_idle_connection_closed_by_server_is_dropped_from_the_pool(client: FastUpstream) -> None:
    async with RawServer(
        answer_then(length_response(BODY), "close"), serve_each(length_response(b"x"))
    ) as srv:
        await fetch(client, srv.url)
        assert await eventually(lambda: client.pool_size() == 0)  # the FIN was noticed while idle
        _, body = await fetch(client, srv.url)
        assert body == b"x"
        assert srv.accepts == 2


async def test_stale_retry_happens_only_once(client: FastUpstream) -> None:
    # the pooled connection closes on our request (stale), and so does the retry's fresh connection:
    # that second failure is the answer, with no third connection
    async def answer_once_then_close(peer: Peer) -> None:
        await peer.request()
        await peer.send(length_response(BODY))
        await peer.request()
        peer.close()

    async def close_after_request(peer: Peer) -> None:
        await peer.request()
        peer.close()

    async with RawServer(answer_once_then_close, close_after_request) as srv:
        await fetch(client, srv.url)
        with pytest.raises(UpstreamError) as e:
            await fetch(client, srv.url)
        assert e.value.reason == "reset"
        assert srv.accepts == 2
        assert [len(p.bodies) for p in srv.peers] == [2, 1]
        assert_idle(client, 0)


async def test_fresh_connection_closed_before_response_is_not_retried(client: FastUpstream) -> None:
    async def close_after_request(peer: Peer) -> None:
        await peer.request()
        peer.close()

    async with RawServer(close_after_request) as srv:
        with pytest.raises(UpstreamError) as e:
            await fetch(client, srv.url)
        assert e.value.reason == "reset"
        assert srv.accepts == 1
        assert_idle(client, 0)


async def test_timeout_on_a_reused_connection_is_not_retried(client: FastUpstream) -> None:
    # A silent reused connection may be a provider that is busy generating: resending the request
    # would double the work (and the wait). Only a close before any byte is retried.
    async def answer_once_then_silent(peer: Peer) -> None:
        await peer.request()
        await peer.send(length_response(BODY))
        await silent(peer)

    async with RawServer(answer_once_then_silent, silent) as srv:
        await fetch(client, srv.url)
        with pytest.raises(UpstreamError) as e:
            await fetch(client, srv.url, read_timeout=0.2)
        assert e.value.reason == "timeout"
        assert srv.accepts == 1
        assert await gone(srv.peers[0])
        assert_idle(client, 0)


async def test_partial_answer_on_reused_connection_is_not_retried(client: FastUpstream) -> None:
    async def answer_once_then_half(peer: Peer) -> None:
        await peer.request()
        await peer.send(length_response(BODY))
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-")
        peer.close()

    async with RawServer(answer_once_then_half, serve_each(length_response(b"retry!"))) as srv:
        await fetch(client, srv.url)
        with pytest.raises(UpstreamError):
            await fetch(client, srv.url)
        assert srv.accepts == 1
        assert_idle(client, 0)


async def test_unsolicited_bytes_on_an_idle_connection_are_not_mistaken_for_a_response(
    client: FastUpstream,
) -> None:
    # some servers write "408 Request Timeout" on an idle keep-alive connection before closing it
    async def answer_then_408(peer: Peer) -> None:
        await peer.request()
        await peer.send(length_response(BODY))
        await asyncio.sleep(0.02)
        await peer.send(length_response(b"", "Connection: close", status="408 Request Timeout"))
        await peer.until_gone()

    async with RawServer(answer_then_408, serve_each(length_response(b"fresh"))) as srv:
        await fetch(client, srv.url)
        await asyncio.sleep(0.1)  # the 408 has arrived at the idle connection
        resp, body = await fetch(client, srv.url)
        assert (resp.status, body) == (200, b"fresh")
        assert srv.accepts == 2
        assert await gone(srv.peers[0])


async def test_keepalive_expiry_and_idle_cap() -> None:
    client = FastUpstream(keepalive_s=0.05, max_idle_per_host=1)
    try:
        async with RawServer(serve_each(length_response(BODY))) as srv:
            await fetch(client, srv.url)
            await asyncio.sleep(0.1)  # older than keepalive_s: not reused, closed
            await fetch(client, srv.url)
            assert srv.accepts == 2
            assert await gone(srv.peers[0])
            both = [await open_(client, srv.url) for _ in range(2)]  # 1 pooled + 1 new connection
            for r in both:
                assert await read_body(r) == BODY
                r.release()
            assert srv.accepts == 3
            assert_idle(client, 1)  # the cap: the second released connection was closed
    finally:
        await client.close()


async def test_non_reusable_responses_are_not_pooled(client: FastUpstream) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(length_response(BODY)[:-5])  # the rest never comes
        await peer.until_gone()

    async with RawServer(script) as srv:
        # released before the end of the body: the rest is unread, so the connection is closed
        resp = await open_(client, srv.url)
        assert await resp.read_chunk() == BODY[:-5]
        resp.release()
        assert_idle(client, 0)
        # aborted mid-body
        resp = await open_(client, srv.url)
        resp.abort()
        assert_idle(client, 0)
        assert all([await gone(p) for p in srv.peers])


async def test_bytes_after_the_body_make_the_connection_unusable(client: FastUpstream) -> None:
    raw = length_response(BODY) + b"HTTP/1.1 200 OK\r\n"  # a server bug: not our response to read
    async with RawServer(answer_then(raw, "wait")) as srv:
        _, body = await fetch(client, srv.url)
        assert body == BODY
        assert_idle(client, 0)
        assert await gone(srv.peers[0])


# ----------------------------------------------------------------------------------------- abort


class CountingUpstream(FastUpstream):
    """Counts `discard` calls per connection: a connection leaves the pool exactly once."""

    def __init__(self) -> None:
        super().__init__()
        self.discards: dict[int, int] = {}

    def discard(self, c: _Conn) -> None:
        self.discards[id(c)] = self.discards.get(id(c), 0) + 1
        super().discard(c)


@pytest.mark.parametrize("how", ["abort", "release-early", "cancel", "server-close"])
async def test_each_connection_is_discarded_once(how: str) -> None:
    client = CountingUpstream()

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        if how == "server-close":
            peer.close()
        await peer.until_gone()

    try:
        async with RawServer(script) as srv:
            resp = await open_(client, srv.url)
            assert await resp.read_chunk() == b"hello"
            if how == "abort":
                resp.abort()
                resp.abort()
            elif how == "release-early":
                resp.release()
            elif how == "cancel":
                task = asyncio.ensure_future(resp.read_chunk())
                await asyncio.sleep(0.02)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                with pytest.raises(UpstreamError):
                    await read_body(resp)
                resp.abort()
            assert await gone(srv.peers[0])
            await asyncio.sleep(0.05)  # connection_lost has run
            assert list(client.discards.values()) == [1]
            assert_idle(client, 0)
    finally:
        await client.close()


async def test_abort_while_waiting_for_the_body(client: FastUpstream) -> None:
    async def headers_only(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await peer.until_gone()

    async with RawServer(headers_only) as srv:
        resp = await open_(client, srv.url)
        assert client.busy_connections() == 1
        resp.abort()
        assert await gone(srv.peers[0])
        assert_idle(client, 0)
        resp.abort()  # idempotent


async def test_abort_mid_body_while_a_reader_waits(client: FastUpstream) -> None:
    async def trickle(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await peer.until_gone()

    async with RawServer(trickle) as srv:
        resp = await open_(client, srv.url)
        assert await resp.read_chunk() == b"hello"
        reader = asyncio.ensure_future(resp.read_chunk())
        await asyncio.sleep(0.02)
        t0 = asyncio.get_running_loop().time()
        resp.abort()
        assert await gone(srv.peers[0])
        assert srv.peers[0].gone_at is not None and srv.peers[0].gone_at - t0 < GONE_BOUND
        with pytest.raises(UpstreamError):  # the waiting reader is woken, not left hanging
            await asyncio.wait_for(reader, 2)
        assert_idle(client, 0)


async def test_close_aborts_in_flight_requests(client: FastUpstream) -> None:
    async with RawServer(silent) as srv:
        task = asyncio.ensure_future(open_(client, srv.url))
        assert await eventually(lambda: bool(srv.peers and srv.peers[0].bodies))
        await client.close()
        with pytest.raises(UpstreamError):
            await asyncio.wait_for(task, 2)
        assert await gone(srv.peers[0])
        assert_idle(client, 0)


# -------------------------------------------------------------------------------------- timeouts


async def test_connection_refused_is_a_connect_error(client: FastUpstream) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(UpstreamError) as e:
            await client.open(
                f"http://127.0.0.1:{port}/v1", HEADERS, b"{}", connect_timeout=2, read_timeout=2
            )
    assert e.value.reason == "connect"
    assert_idle(client, 0)


async def test_server_that_never_answers_times_out(client: FastUpstream) -> None:
    async with RawServer(silent) as srv:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(UpstreamError) as e:
            await open_(client, srv.url, read_timeout=0.2)
        elapsed = loop.time() - t0
        assert e.value.reason == "timeout"
        assert 0.15 < elapsed < 3.0
        assert await gone(srv.peers[0])
        assert_idle(client, 0)


async def test_body_that_goes_silent_times_out(client: FastUpstream) -> None:
    async def half(peer: Peer) -> None:
        await peer.request()
        await peer.send(length_response(BODY)[:-10])
        await peer.until_gone()

    async with RawServer(half) as srv:
        resp = await open_(client, srv.url, read_timeout=0.2)
        with pytest.raises(UpstreamError) as e:
            await read_body(resp)
        assert e.value.reason == "timeout"
        assert await gone(srv.peers[0])
        resp.abort()
        assert_idle(client, 0)


async def test_slow_but_steady_body_does_not_time_out(client: FastUpstream) -> None:
    # one byte every 0.05 s for 0.5 s: never silent for the 0.25 s idle window, though the whole body
    # takes twice as long as it
    payload = b"0123456789"

    raw_head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload)

    async def steady(peer: Peer) -> None:
        await peer.request()
        await peer.send(raw_head)
        await peer.send(payload, pieces=[1], gap=0.05)
        await peer.until_gone()

    async with RawServer(steady) as srv:
        resp, body = await fetch(client, srv.url, read_timeout=0.25)
        assert body == payload
        assert_idle(client, 1)


async def test_slow_header_trickle_does_not_time_out(client: FastUpstream) -> None:
    raw = length_response(b"ok", "X-Pad: " + "p" * 8)

    async def steady(peer: Peer) -> None:
        await peer.request()
        await peer.send(raw, pieces=[8], gap=0.04)
        await peer.until_gone()

    async with RawServer(steady) as srv:
        _, body = await fetch(client, srv.url, read_timeout=0.25)
        assert body == b"ok"


# ---------------------------------------------------------------------------------- backpressure


BIG = 8 * 1024 * 1024


def big_payload() -> bytes:
    return random.Random(7).randbytes(BIG)


async def test_backpressure_bounds_the_buffer_and_keeps_the_body_intact(client: FastUpstream) -> None:
    payload = big_payload()

    async def blast(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
        for i in range(0, BIG, 256 * 1024):
            peer.writer.write(payload[i : i + 256 * 1024])
            await peer.writer.drain()
        await peer.until_gone()

    async with RawServer(blast) as srv:
        resp = await open_(client, srv.url)
        conn = resp._conn
        h = hashlib.sha256()
        got, reads, max_queued, paused_seen = 0, 0, 0, False
        while True:
            if reads < 12:
                await asyncio.sleep(0.02)  # a slow consumer: the server outpaces us
            max_queued = max(max_queued, conn.reply.queued)
            paused_seen = paused_seen or conn.flow.paused
            chunk = await resp.read_chunk()
            if not chunk:
                break
            reads += 1
            got += len(chunk)
            h.update(chunk)
            assert reads < 100_000
        resp.release()
        assert got == BIG
        assert h.digest() == hashlib.sha256(payload).digest()
        assert paused_seen  # reading really was paused
        # at most the high-water mark plus one socket read (asyncio reads up to 256 KiB at a time)
        assert max_queued <= HIGH_WATER + 512 * 1024, max_queued
        assert_idle(client, 1)


async def test_paused_reading_is_not_an_idle_timeout(client: FastUpstream) -> None:
    # The consumer (e.g. a slow downstream client) stops reading for longer than read_timeout while
    # the upstream is blocked by *our* backpressure: the upstream was not silent, nothing may fail.
    payload = big_payload()[: 4 * 1024 * 1024]

    async def blast(peer: Peer) -> None:
        await peer.request()
        await peer.send(length_response(payload))
        await peer.until_gone()

    async with RawServer(blast) as srv:
        resp = await open_(client, srv.url, read_timeout=0.2)
        first = await resp.read_chunk()
        assert await eventually(lambda: resp._conn.flow.paused)
        await asyncio.sleep(0.5)  # paused well past the idle timeout
        rest = await read_body(resp)
        assert first + rest == payload
        resp.release()
        assert_idle(client, 1)


# ------------------------------------------------------------------------------------- malformed


# every response the parser refuses (the table lives with the parser's unit tests), plus a body that
# does not decode
MALFORMED = {
    **PARSER_MALFORMED,
    "bad-gzip": b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n\r\nnot gzip!",
}


@pytest.mark.parametrize("raw", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_malformed_responses_fail_and_are_not_pooled(client: FastUpstream, raw: bytes) -> None:
    async with RawServer(answer_then(raw, "wait")) as srv:
        with pytest.raises(UpstreamError) as e:
            await fetch(client, srv.url, read_timeout=2.0)
        assert e.value.reason == "reset"
        assert await gone(srv.peers[0])
        assert_idle(client, 0)


async def test_endless_head_or_chunk_line_is_refused(client: FastUpstream) -> None:
    for raw in (
        b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (http11.MAX_HEAD + 10),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"0" * (http11.MAX_HEAD + 10),
    ):
        async with RawServer(answer_then(raw, "wait")) as srv:
            with pytest.raises(UpstreamError) as e:
                await fetch(client, srv.url, read_timeout=2.0)
            assert e.value.reason == "reset"
            assert_idle(client, 0)


# ---------------------------------------------------------------------------------- cancellation


async def test_cancel_while_waiting_for_headers_closes_the_connection(client: FastUpstream) -> None:
    async with RawServer(silent) as srv:
        task = asyncio.ensure_future(open_(client, srv.url))
        assert await eventually(lambda: bool(srv.peers and srv.peers[0].bodies))
        assert client.busy_connections() == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await gone(srv.peers[0])
        assert_idle(client, 0)


async def test_cancel_while_reading_the_body_closes_the_connection(client: FastUpstream) -> None:
    async def headers_only(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await peer.until_gone()

    async with RawServer(headers_only) as srv:
        resp = await open_(client, srv.url)

        async def consume() -> bytes:
            return await read_body(resp)

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await gone(srv.peers[0])
        assert_idle(client, 0)


async def test_cancel_during_connect_leaks_nothing(client: FastUpstream) -> None:
    async with RawServer(serve_each(length_response(BODY))) as srv:
        task = asyncio.ensure_future(open_(client, srv.url))
        await asyncio.sleep(0)  # the connect is under way
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await eventually(lambda: client.busy_connections() == 0)
        assert_idle(client, 0)
        _, body = await fetch(client, srv.url)  # the client is still fine
        assert body == BODY


# ------------------------------------------------------------------------ proxy parity (both clients)


CLIENTS = ["fast", "aiohttp"]
URL = "/v1/chat/completions"


def client_cfg(client: str) -> dict[str, str]:
    return {"upstream_client": client}


def upstream_type(client: str) -> type:
    return FastUpstream if client == "fast" else AiohttpUpstream


@pytest.mark.parametrize("which", CLIENTS)
async def test_parity_stream_is_forwarded_byte_exact_and_connection_reused(
    http: aiohttp.ClientSession, which: str
) -> None:
    async with sims(("a", Behaviour(ttft=0.01, tokens=12, token_gap=0.001))) as ps:
        raw = raw_config({"a": ps["a"].base_url}, server=client_cfg(which))
        async with run_proxy(raw) as px:
            assert isinstance(px.proxy.upstream, upstream_type(which))
            for i in range(3):
                async with http.post(px.url + URL, json=chat()) as r:
                    assert r.status == 200
                    assert r.headers["X-GammaInfra-Endpoint"] == "m/a@a"
                    body = await read_stream(r)
                assert same_stream(body, bytes(ps["a"].records[i].sent))
            up = px.proxy.upstream
            assert await eventually(lambda: up.busy_connections() == 0)
            assert up.pool_size() == 1  # three streams, one upstream connection


@pytest.mark.parametrize("which", CLIENTS)
async def test_parity_non_streaming_reuses_the_connection(http: aiohttp.ClientSession, which: str) -> None:
    async with sims(("a", Behaviour(ttft=0.01))) as ps:
        raw = raw_config({"a": ps["a"].base_url}, server=client_cfg(which))
        async with run_proxy(raw) as px:
            for i in range(3):
                async with http.post(px.url + URL, json=chat(stream=False)) as r:
                    assert r.status == 200
                    assert await r.read() == bytes(ps["a"].records[i].sent)
            up = px.proxy.upstream
            assert await eventually(lambda: up.busy_connections() == 0)
            assert up.pool_size() == 1


@pytest.mark.parametrize("which", CLIENTS)
async def test_parity_hedge_loser_is_disconnected(http: aiohttp.ClientSession, which: str) -> None:
    async with sims(("slow", Behaviour(ttft=5.0)), ("fast", Behaviour(ttft=0.02))) as ps:
        raw = raw_config(
            {n: p.base_url for n, p in ps.items()}, fast={"default_delay_ms": 50}, server=client_cfg(which)
        )
        async with run_proxy(raw) as px:
            async with http.post(px.url + URL, json=chat()) as r:
                assert r.headers["X-GammaInfra-Endpoint"] == "m/fast@fast"
                body = await read_stream(r)
            assert same_stream(body, bytes(ps["fast"].records[0].sent))
            loser = ps["slow"].records[0]
            assert await eventually(lambda: loser.disconnected_at is not None)
            assert not loser.completed
            up = px.proxy.upstream
            assert await eventually(lambda: up.busy_connections() == 0)
            assert up.pool_size() == 1  # only the winner's connection is kept


@pytest.mark.parametrize("which", CLIENTS)
async def test_parity_503_fails_over(http: aiohttp.ClientSession, which: str) -> None:
    async with sims(("a", Behaviour(status=503)), ("b", Behaviour(ttft=0.01))) as ps:
        raw = raw_config({n: p.base_url for n, p in ps.items()}, server=client_cfg(which))
        async with run_proxy(raw) as px:
            async with http.post(px.url + URL, json=chat("m/all")) as r:
                assert r.status == 200
                assert r.headers["X-GammaInfra-Endpoint"] == "m/all@b"
                body = await read_stream(r)
            assert same_stream(body, bytes(ps["b"].records[0].sent))
            assert len(ps["a"].records) == 1


@pytest.mark.parametrize("which", CLIENTS)
async def test_parity_mid_stream_reset_ends_with_error_event(http: aiohttp.ClientSession, which: str) -> None:
    beh = Behaviour(ttft=0.01, tokens=10, token_gap=0.002, reset_after_tokens=3)
    async with sims(("a", beh), ("b", Behaviour(ttft=0.01))) as ps:
        raw = raw_config(
            {n: p.base_url for n, p in ps.items()}, fast={"default_delay_ms": 1000}, server=client_cfg(which)
        )
        async with run_proxy(raw) as px:
            async with http.post(px.url + URL, json=chat()) as r:
                assert r.headers["X-GammaInfra-Endpoint"] == "m/a@a"
                body = await read_stream(r)
            last = body.rstrip(b"\n").split(b"\n\n")[-1]
            assert last.startswith(b"data: {")
            err = orjson.loads(last[6:])["error"]
            assert err["code"] == "upstream_reset"
            assert ps["b"].records == []  # committed: never switched provider
            up = px.proxy.upstream
            assert await eventually(lambda: up.busy_connections() == 0)
            assert up.pool_size() == 0
