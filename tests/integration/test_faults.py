"""Upstream faults (issue 6), one test each, before and after the commit (docs/design.md, "The request
path"; README "How a request is served").

Before the first token, a fault is the attempt's failure: the next candidate is tried at once (the pinned
model "m/all" fails over in config order, so only the fault can launch it) or, with none left, one error
JSON with 502/504. After the commit, the stream is the caller's: a fault ends it with an OpenAI error
event, never with another provider's bytes.

Framing and encoding faults that the simulated provider cannot produce (close-delimited bodies, odd chunk
boundaries, a socket that accepts and then says nothing) come from `RawUpstream`, a few lines of asyncio
that write exactly the bytes each test gives it.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest

from hedge.simprovider import Behaviour

from ..conftest import chat, eventually, read_stream, run_proxy, same_stream, sims
from ..conftest import raw_config as base_config

URL = "/v1/chat/completions"
DONE = b"data: [DONE]\n\n"


# ------------------------------------------------------------------------------------------- helpers

CLIENT = {"name": "fast"}


@pytest.fixture(autouse=True, params=["fast", "aiohttp"])
def upstream_client(request: pytest.FixtureRequest) -> str:
    """Every fault against both upstream clients (server.upstream_client): framing, decoding and
    timeouts are exactly where two HTTP client implementations differ."""
    CLIENT["name"] = request.param
    return request.param


def raw_config(providers: dict[str, str], **kw: Any) -> dict[str, Any]:
    kw["server"] = {"upstream_client": CLIENT["name"], **kw.get("server", {})}
    return base_config(providers, **kw)


def events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e]


def error_event(body: bytes) -> dict[str, Any]:
    """The stream's last event must be an OpenAI error event; return its error object."""
    last = events(body)[-1]
    assert last.startswith(b"data: {"), body[-300:]
    err = orjson.loads(last[6:])["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def error_json(body: bytes) -> dict[str, Any]:
    err = orjson.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def text_of(body: bytes) -> str:
    out = []
    for e in events(body):
        if e.startswith(b"data: {"):
            try:
                ev = orjson.loads(e[6:])
            except orjson.JSONDecodeError:
                continue
            for ch in ev.get("choices") or []:
                out.append((ch.get("delta") or {}).get("content") or "")
    return "".join(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sse_chunk(content: str | None = None, finish: str | None = None) -> bytes:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    ev = {
        "id": "chatcmpl-raw",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "raw",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(ev) + b"\n\n"


RAW_STREAM = (
    sse_chunk("")  # role-ish empty delta: not a token
    + sse_chunk("Hello")
    + sse_chunk(", world")
    + sse_chunk(finish="stop")
    + DONE
)
RAW_JSON = orjson.dumps(
    {
        "id": "chatcmpl-raw",
        "object": "chat.completion",
        "created": 0,
        "model": "raw",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
)

Responder = Callable[[asyncio.StreamWriter, bytes], Awaitable[None]]


class RawUpstream:
    """A bare HTTP server: reads one request (headers + Content-Length body), then hands the socket to
    `respond`, which writes whatever bytes the test wants. `requests` counts what arrived; with
    `then_wait`, the socket stays open after `respond` until the peer hangs up (counted in `disconnects`)."""

    def __init__(self, respond: Responder, *, then_wait: bool = False) -> None:
        self.respond = respond
        self.then_wait = then_wait
        self.requests = 0
        self.disconnects = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._conns):
            w.transport.abort()
        await self._server.wait_closed()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            self.requests += 1
            await self.respond(writer, body)
            if self.then_wait:
                await reader.read()  # b"" once the proxy hangs up
                raise ConnectionResetError
        except (ConnectionError, asyncio.IncompleteReadError):
            self.disconnects += 1
        finally:
            self._conns.discard(writer)
            writer.close()


@asynccontextmanager
async def stack(
    *specs: tuple[str, Any], raw: list[tuple[str, RawUpstream]] = (), **cfg: Any
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Providers (sims and raw ones, in this order of failover) and a proxy over them."""
    async with sims(*specs) as ps:
        urls = {n: p.base_url for n, p in ps.items()}
        for name, r in raw:
            urls[name] = r.base_url
        order = [n for n, _ in specs] + [n for n, _ in raw]
        urls = {n: urls[n] for n in order}
        async with run_proxy(raw_config(urls, **cfg)) as px:
            yield px.url, {"proxy": px, **ps}


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any, bytes]:
    async with http.post(url + URL, json=body) as r:
        return r.status, r.headers, await read_stream(r)


# ---------------------------------------------------------------------------------- connect / reset


async def test_refused_connection_fails_over(http: aiohttp.ClientSession) -> None:
    async with sims(("good", Behaviour())) as ps:
        dead = f"http://127.0.0.1:{free_port()}/v1"
        async with run_proxy(raw_config({"dead": dead, "good": ps["good"].base_url})) as px:
            status, headers, body = await post(http, px.url, chat("m/all"))
            assert status == 200
            assert headers["X-GammaInfra-Endpoint"] == "m/all@good"
            assert body.endswith(DONE)
            status, _, body = await post(http, px.url, chat("m/dead"))
    assert status == 502
    err = error_json(body)
    assert "m/dead@dead: connect" in err["message"], err


async def test_sim_that_stops_listening_is_refused_and_skipped(http: aiohttp.ClientSession) -> None:
    async with stack(("a", Behaviour()), ("b", Behaviour())) as (url, ps):
        await ps["a"].refuse()
        status, headers, _ = await post(http, url, chat("m/all", stream=False))
        assert status == 200 and headers["X-GammaInfra-Endpoint"] == "m/all@b"


async def test_reset_before_headers_fails_over(http: aiohttp.ClientSession) -> None:
    async def rst(w: asyncio.StreamWriter, _body: bytes) -> None:
        w.transport.abort()

    async with RawUpstream(rst) as r, stack(("good", Behaviour()), raw=[("rst", r)]) as (url, _):
        # "rst" is second in config order: ask for it first with the preference header
        async with http.post(
            url + URL, json=chat("m/all"), headers={"X-GammaInfra-Preference": "rst"}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["X-GammaInfra-Endpoint"] == "m/all@good"
            assert (await read_stream(resp)).endswith(DONE)
        assert r.requests >= 1


async def test_reset_before_first_token_fails_over(http: aiohttp.ClientSession) -> None:
    # headers and the role chunk go out, then RST before any content
    async with stack(("a", Behaviour(reset_after_tokens=0)), ("b", Behaviour())) as (url, ps):
        status, headers, body = await post(http, url, chat("m/all"))
        assert status == 200 and headers["X-GammaInfra-Endpoint"] == "m/all@b"
        assert same_stream(body, bytes(ps["b"].records[0].sent))
        assert ps["a"].records[0].headers_sent_at is not None


async def test_reset_after_commit_ends_with_error_event(http: aiohttp.ClientSession) -> None:
    async with stack(("a", Behaviour(tokens=6, reset_after_tokens=3)), ("b", Behaviour())) as (url, ps):
        status, headers, body = await post(http, url, chat("m/all"))
        assert status == 200 and headers["X-GammaInfra-Endpoint"] == "m/all@a"
        assert ps["b"].requests_total == 0  # committed: never switches provider
        assert text_of(body) == "a#0:0 a#0:1 a#0:2 "
        assert DONE not in body
        assert error_event(body)["code"] == "upstream_reset"


# --------------------------------------------------------------------------- slow / missing headers


async def test_slow_headers_time_out_and_fail_over(http: aiohttp.ClientSession) -> None:
    async with stack(
        ("slow", Behaviour(headers_delay=5.0)), ("good", Behaviour()), timeouts={"first_token_ms": 300}
    ) as (url, ps):
        status, headers, _ = await post(http, url, chat("m/all"))
        assert status == 200 and headers["X-GammaInfra-Endpoint"] == "m/all@good"
        rec = ps["slow"].records[0]
        assert await eventually(lambda: rec.disconnected_at is not None)  # the proxy hung up on it
        assert rec.headers_sent_at is None


async def test_missing_headers_everywhere_is_504(http: aiohttp.ClientSession) -> None:
    async def silent(_w: asyncio.StreamWriter, _body: bytes) -> None:
        pass  # accepts and reads the request, never answers

    async with RawUpstream(silent, then_wait=True) as r:
        raw = raw_config({"mute": r.base_url}, timeouts={"first_token_ms": 300})
        async with run_proxy(raw) as px:
            status, headers, body = await post(http, px.url, chat("m/mute"))
            assert status == 504, body
            assert "timeout" in error_json(body)["message"]
            assert await eventually(lambda: r.disconnects == 1)  # the proxy closed the socket


async def test_idle_timeout_before_headers_is_a_timeout_too(http: aiohttp.ClientSession) -> None:
    """The socket-read (idle) timeout also covers the wait for headers."""
    async with stack(("slow", Behaviour(headers_delay=5.0)), timeouts={"idle_ms": 300}) as (url, _):
        status, _, body = await post(http, url, chat("m/slow", stream=False))
    assert status == 504, body


# ------------------------------------------------------------------------------------ error bodies


async def test_non_json_5xx_body_fails_over(http: aiohttp.ClientSession) -> None:
    html = b"<html><body><h1>502 Bad Gateway</h1>nginx</body></html>"
    async with stack(("a", Behaviour(status=502, error_body=html)), ("b", Behaviour())) as (url, _):
        status, headers, _ = await post(http, url, chat("m/all"))
        assert status == 200 and headers["X-GammaInfra-Endpoint"] == "m/all@b"
        status, _, body = await post(http, url, chat("m/a"))
    assert status == 502
    assert "http_502" in error_json(body)["message"]
    assert b"nginx" not in body  # upstream bodies are not echoed


async def test_non_json_4xx_body_is_returned_as_error_json(http: aiohttp.ClientSession) -> None:
    async with stack(("a", Behaviour(status=400, error_body=b"Bad Request: what?")), ("b", Behaviour())) as (
        url,
        ps,
    ):
        status, _, body = await post(http, url, chat("m/all"))
        assert status == 400
        err = error_json(body)
        assert "HTTP 400" in err["message"] and err["type"] == "invalid_request_error"
        assert ps["b"].requests_total == 0  # the caller's fault: nothing else is launched


# ------------------------------------------------------------------------------------- broken SSE


async def test_malformed_sse_before_commit_fails_over(http: aiohttp.ClientSession) -> None:
    async with stack(("a", Behaviour(malformed_after_tokens=0)), ("b", Behaviour())) as (url, ps):
        status, headers, body = await post(http, url, chat("m/all"))
        assert status == 200 and headers["X-GammaInfra-Endpoint"] == "m/all@b"
        assert same_stream(body, bytes(ps["b"].records[0].sent))


async def test_malformed_sse_after_commit_ends_with_error_event(http: aiohttp.ClientSession) -> None:
    async with stack(("a", Behaviour(tokens=5, malformed_after_tokens=2)), ("b", Behaviour())) as (url, ps):
        status, headers, body = await post(http, url, chat("m/all"))
        assert status == 200 and headers["X-GammaInfra-Endpoint"] == "m/all@a"
        assert text_of(body) == "a#0:0 a#0:1 "
        assert DONE not in body
        error_event(body)
        assert ps["b"].requests_total == 0


async def test_non_json_200_body_fails_over(http: aiohttp.ClientSession) -> None:
    async with stack(("a", Behaviour(malformed_after_tokens=0)), ("b", Behaviour())) as (url, _):
        status, headers, body = await post(http, url, chat("m/all", stream=False))
        assert status == 200 and headers["X-GammaInfra-Endpoint"] == "m/all@b"
        assert orjson.loads(body)["choices"]


async def test_stream_without_done_gets_an_error_event(http: aiohttp.ClientSession) -> None:
    async with stack(("a", Behaviour(tokens=4, done=False))) as (url, _):
        status, _, body = await post(http, url, chat("m/a"))
    assert status == 200
    assert text_of(body) == "a#0:0 a#0:1 a#0:2 a#0:3 "
    assert DONE not in body
    assert error_event(body)["code"] == "stream_truncated"


async def test_done_before_any_token_fails_over(http: aiohttp.ClientSession) -> None:
    async def empty(w: asyncio.StreamWriter, _b: bytes) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + DONE)
        await w.drain()

    async with RawUpstream(empty) as r, stack(("good", Behaviour()), raw=[("empty", r)]) as (url, _):
        async with http.post(
            url + URL, json=chat("m/all"), headers={"X-GammaInfra-Preference": "empty"}
        ) as resp:
            assert resp.status == 200 and resp.headers["X-GammaInfra-Endpoint"] == "m/all@good"
        assert r.requests == 1


# ---------------------------------------------------------------------------------------- timeouts


async def test_no_first_token_times_out_and_fails_over(http: aiohttp.ClientSession) -> None:
    # headers and the role chunk at once, then nothing for 10 s
    async with stack(
        ("mute", Behaviour(ttft=10.0)), ("good", Behaviour()), timeouts={"first_token_ms": 300}
    ) as (url, ps):
        status, headers, _ = await post(http, url, chat("m/all"))
        assert status == 200 and headers["X-GammaInfra-Endpoint"] == "m/all@good"
        rec = ps["mute"].records[0]
        assert rec.headers_sent_at is not None
        assert await eventually(lambda: rec.disconnected_at is not None)
        status, _, body = await post(http, url, chat("m/mute"))
    assert status == 504
    assert "m/mute@mute: timeout" in error_json(body)["message"]


async def test_silence_after_commit_hits_idle_timeout(http: aiohttp.ClientSession) -> None:
    beh = Behaviour(tokens=5, stall_after_tokens=2, stall_seconds=10.0)
    async with stack(("a", beh), ("b", Behaviour()), timeouts={"idle_ms": 300}) as (url, ps):
        status, headers, body = await post(http, url, chat("m/all"))
        assert status == 200 and headers["X-GammaInfra-Endpoint"] == "m/all@a"
        assert text_of(body) == "a#0:0 a#0:1 "
        assert error_event(body)["code"] == "upstream_timeout"
        rec = ps["a"].records[0]
        assert await eventually(lambda: rec.disconnected_at is not None)  # upstream closed, not leaked
        assert ps["b"].requests_total == 0


async def test_total_timeout_cuts_a_long_stream(http: aiohttp.ClientSession) -> None:
    beh = Behaviour(tokens=200, token_gap=0.02)  # 4 s of tokens, each gap well under the idle timeout
    async with stack(("a", beh), timeouts={"total_ms": 400}) as (url, ps):
        status, _, body = await post(http, url, chat("m/a"))
        assert status == 200
        assert error_event(body)["code"] == "upstream_timeout"
        n = len(text_of(body).split())
        assert 0 < n < 200
        rec = ps["a"].records[0]
        assert await eventually(lambda: rec.disconnected_at is not None)


# ------------------------------------------------------------------------------------ big chunks


@pytest.mark.parametrize("stream", [True, False])
async def test_huge_chunks_pass_through(http: aiohttp.ClientSession, stream: bool) -> None:
    pad = 1_000_000  # ~1 MiB per content event (the first-token parser accepts events up to 1 MiB)
    async with stack(("a", Behaviour(tokens=3, chunk_padding=pad))) as (url, ps):
        status, _, body = await post(http, url, chat("m/a", stream=stream))
        assert status == 200
        if stream:
            assert same_stream(body, bytes(ps["a"].records[0].sent))
            assert len(body) > 3 * pad
        else:
            content = orjson.loads(body)["choices"][0]["message"]["content"]
            assert len(content) > 3 * pad


async def test_first_event_over_one_mib_is_refused_before_commit(http: aiohttp.ClientSession) -> None:
    """The documented bound of the first-token parser (hedge/sse.py): an SSE event over 1 MiB before the
    first token is treated as a broken stream, so the next candidate serves; memory stays bounded."""
    async with stack(("a", Behaviour(tokens=2, chunk_padding=2 << 20)), ("b", Behaviour())) as (url, _):
        status, headers, _ = await post(http, url, chat("m/all"))
    assert status == 200 and headers["X-GammaInfra-Endpoint"] == "m/all@b"


# --------------------------------------------------------------------------------------- framing


def _chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


async def _framed(http: aiohttp.ClientSession, respond: Responder, stream: bool) -> tuple[int, bytes]:
    async with RawUpstream(respond) as r:
        async with run_proxy(raw_config({"raw": r.base_url})) as px:
            status, _, body = await post(http, px.url, chat("m/raw", stream=stream))
    return status, body


async def test_chunked_framing_with_events_split_across_chunks(http: aiohttp.ClientSession) -> None:
    async def respond(w: asyncio.StreamWriter, _b: bytes) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        data = RAW_STREAM
        pieces = [data[i : i + 7] for i in range(0, len(data), 7)]  # cut through events and CRLFs
        for p in pieces:
            w.write(_chunked([p])[:-5])  # one chunk, without the terminator
            await w.drain()
        w.write(b"0\r\n\r\n")
        await w.drain()

    status, body = await _framed(http, respond, True)
    assert status == 200
    assert text_of(body) == "Hello, world"
    assert body.endswith(DONE)


@pytest.mark.parametrize("version", [b"HTTP/1.0", b"HTTP/1.1"])
async def test_close_delimited_stream(http: aiohttp.ClientSession, version: bytes) -> None:
    async def respond(w: asyncio.StreamWriter, _b: bytes) -> None:
        # no Content-Length, no chunked: the body ends when the connection closes
        w.write(version + b" 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        for ev in events(RAW_STREAM):
            w.write(ev + b"\n\n")
            await w.drain()
            await asyncio.sleep(0.005)

    status, body = await _framed(http, respond, True)
    assert status == 200
    assert text_of(body) == "Hello, world"
    assert body.endswith(DONE)


@pytest.mark.parametrize("version", [b"HTTP/1.0", b"HTTP/1.1"])
async def test_close_delimited_json(http: aiohttp.ClientSession, version: bytes) -> None:
    async def respond(w: asyncio.StreamWriter, _b: bytes) -> None:
        w.write(version + b" 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
        w.write(RAW_JSON[:20])
        await w.drain()
        await asyncio.sleep(0.01)
        w.write(RAW_JSON[20:])

    status, body = await _framed(http, respond, False)
    assert status == 200
    assert orjson.loads(body)["choices"][0]["message"]["content"] == "Hello"


async def test_close_delimited_stream_cut_short_gets_error_event(http: aiohttp.ClientSession) -> None:
    async def respond(w: asyncio.StreamWriter, _b: bytes) -> None:
        w.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        w.write(sse_chunk("Hello") + b'data: {"id":"chatcmpl-raw","obj')  # dies inside an event

    status, body = await _framed(http, respond, True)
    assert status == 200
    assert text_of(body) == "Hello"
    error_event(body)


# ------------------------------------------------------------------------------------------- gzip


async def test_gzip_json_body_is_decoded(http: aiohttp.ClientSession) -> None:
    async with stack(("a", Behaviour(gzip=True, tokens=3))) as (url, ps):
        async with http.post(url + URL, json=chat("m/a", stream=False), auto_decompress=False) as r:
            assert r.status == 200
            assert "Content-Encoding" not in r.headers  # we send plain JSON whatever upstream did
            body = await r.read()
        assert ps["a"].records[0].sent[:2] == b"\x1f\x8b"  # the provider really sent gzip
    doc = orjson.loads(body)
    assert doc["choices"][0]["message"]["content"] == "a#0:0 a#0:1 a#0:2 "
    assert r.headers["X-GammaInfra-Cost-USD"] != "unknown"


async def test_gzip_sse_stream_is_decoded(http: aiohttp.ClientSession) -> None:
    async def respond(w: asyncio.StreamWriter, _b: bytes) -> None:
        z = gzip.compress(RAW_STREAM)
        w.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n" % len(z)
        )
        w.write(z)
        await w.drain()

    async with RawUpstream(respond) as r:
        async with run_proxy(raw_config({"raw": r.base_url})) as px:
            async with http.post(px.url + URL, json=chat("m/raw"), auto_decompress=False) as resp:
                assert resp.status == 200 and "Content-Encoding" not in resp.headers
                body = await read_stream(resp)
    assert text_of(body) == "Hello, world" and body.endswith(DONE)


# --------------------------------------------------------------------------------------- overload


async def test_over_concurrency_cap_is_a_fast_503(http: aiohttp.ClientSession) -> None:
    slow = Behaviour(ttft=1.2, tokens=3)
    async with stack(("a", slow), server={"max_concurrency": 2}) as (url, ps):
        px = ps["proxy"].proxy
        busy = [asyncio.ensure_future(post(http, url, chat("m/a"))) for _ in range(2)]
        assert await eventually(lambda: px.inflight == 2)
        status, headers, body = await post(http, url, chat("m/a"))
        assert status == 503
        assert headers["Retry-After"] == "1"
        assert error_json(body)["code"] == "overloaded"
        assert not any(t.done() for t in busy)  # shed at once, not queued behind the two
        assert ps["a"].requests_total == 2
        for status, _, body in await asyncio.gather(*busy):
            assert status == 200 and body.endswith(DONE)
        status, _, _ = await post(http, url, chat("m/a"))  # capacity is back
        assert status == 200
        assert px.inflight == 0


async def test_concurrency_cap_holds_when_bodies_arrive_slowly(http: aiohttp.ClientSession) -> None:
    """The cap must count requests whose body is still arriving: otherwise many slow uploads all pass
    the check before any of them is counted, and the cap is no cap."""
    slow = Behaviour(ttft=1.0, tokens=2)

    async def slow_body() -> AsyncIterator[bytes]:
        data = orjson.dumps(chat("m/a"))
        yield data[:10]
        await asyncio.sleep(0.2)
        yield data[10:]

    async def one(url: str) -> int:
        async with http.post(url + URL, data=slow_body(), headers={"Content-Type": "application/json"}) as r:
            await r.read()
            return r.status

    async with stack(("a", slow), server={"max_concurrency": 2}) as (url, ps):
        statuses = await asyncio.gather(*(one(url) for _ in range(6)))
        assert sorted(statuses) == [200, 200, 503, 503, 503, 503], statuses
        assert ps["a"].requests_total == 2
        assert ps["proxy"].proxy.inflight == 0
