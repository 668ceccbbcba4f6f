"""Hostile and broken clients (issue 13): each finding, against a real gateway process, with its bound.

The attacks are `loadtest.abuse`'s (which runs them at full size); here they are scaled to a few seconds
each on a shared 2-core box: 500,000 tiny messages instead of 2,000,000, a 256 MiB bomb instead of 1 GiB,
100 slowloris sockets instead of 300, 600 half-open connections against a 200-connection limit instead
of 20,000 against the fd limit, 60 stalled uploads against 8 slots instead of 2,000 against 2,000.
Every test asserts, from /proc of the gateway process: peak RSS (VmHWM) over its idle RSS, the worst
/healthz latency during the attack against the idle median measured just before (generous: the box is
shared), fds back to the baseline after, no 5xx answer and no ERROR line in the gateway's log.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import aiohttp
import orjson
import pytest

from hedge.server import GUARD_KEY
from hedge.simprovider import Behaviour
from loadtest.abuse import Outcome, run_attack

from ..conftest import chat, raw_config, run_proxy, sims
from ..integration.test_shutdown import serve

# the gateway's [server] settings for these tests: short timeouts so that each attack ends in seconds
FAST = {"header_timeout_s": 1.0, "keepalive_timeout_s": 2.0, "body_timeout_s": 1.5}


LIMIT = 60.0  # no attack may hang the suite


def check_common(o: Outcome, rss_growth_mb: float, extra_fds: int = 0) -> None:
    # no 500 (a 503 is the connection limit's fast refusal, on purpose)
    assert not [s for s in o.statuses if "500" in s or "internal" in s], o.statuses
    assert o.error_lines == 0, f"ERROR lines in the gateway log: {o}"
    assert o.peak_rss_mb - o.rss_before_mb < rss_growth_mb, o
    # /healthz stays responsive: bounded by the idle median of the same run, plus a generous margin
    # for a box shared with other test runs (the original findings stalled it for 1.5-1.8 s)
    assert o.healthz_worst_ms < 50 * o.healthz_base_ms + 750, o
    assert o.fds_after <= o.fds_before + extra_fds, o


async def test_1_compressed_tiny_messages_are_refused_before_parsing(tmp_path: Path) -> None:
    # 500,000 messages in a ~12 KB gzip (6.5 MB of JSON), two at once: parsing one would take ~180 MB
    o = await run_attack("compressed-messages", tmp_path, limit=LIMIT, server=FAST, n=500_000, parallel=2)
    assert o.statuses == {"400 request_too_complex": 2}, o
    check_common(o, rss_growth_mb=40)


async def test_1_zip_bomb_stops_at_the_decompressed_limit(tmp_path: Path) -> None:
    # 256 MiB of zeros against an 8 MiB limit: inflating stops at 8 MiB (the bytearray's growth may
    # hold up to twice that for a moment)
    o = await run_attack(
        "zip-bomb", tmp_path, limit=LIMIT, server={**FAST, "max_body_bytes": 8 << 20}, mib=256, parallel=2
    )
    assert o.statuses == {"413 request_too_large": 2}, o
    check_common(o, rss_growth_mb=2 * 2 * 8 + 16)


async def test_2_slowloris_is_closed_at_the_head_timeout(tmp_path: Path) -> None:
    # one byte a second, for longer than the 1 s head timeout: the attack's own wait (`within`, 6 s)
    # bounds the test, and every socket must have been closed by the gateway within it
    o = await run_attack("slowloris", tmp_path, limit=LIMIT, server=FAST, n=100, within=6.0)
    assert o.statuses["closed"] == 100 and o.statuses["still open"] == 0, o
    check_common(o, rss_growth_mb=20)


async def test_2_half_open_flood_is_held_under_the_connection_limit(tmp_path: Path) -> None:
    o = await run_attack(
        "half-open", tmp_path, limit=LIMIT, server={**FAST, "max_connections": 200}, n=600, within=6.0
    )
    assert o.statuses["still open"] == 0, o
    assert sum(o.statuses.values()) == 600, o
    assert o.statuses["refused 503"] >= 600 - 200, o  # past the limit: refused at once
    # the probe's connection + at most 200 attack connections (+ the listener etc. in the baseline)
    assert o.fds_peak <= o.fds_before + 201 + 5, o
    check_common(o, rss_growth_mb=30)


async def test_3_slow_uploads_hold_no_concurrency_slot(tmp_path: Path) -> None:
    server = {**FAST, "max_concurrency": 8}
    o = await run_attack("slow-uploads", tmp_path, limit=LIMIT, server=server, n=60, normal=6, within=6.0)
    assert o.statuses["normal 200"] == 6, o  # while 60 uploads were stalled against 8 slots
    assert o.statuses["upload 408"] == 60, o  # and each stalled upload ended at the body timeout
    check_common(o, rss_growth_mb=20, extra_fds=6)  # the upstream pool keeps what the 6 opened


async def test_4_broken_compression_is_a_4xx_and_logs_nothing(tmp_path: Path) -> None:
    o = await run_attack("bad-compression", tmp_path, limit=LIMIT, server=FAST, n=40)
    assert set(o.statuses) == {
        "400 bad_compression", "401 missing_api_key", "415 unsupported_encoding"
    }, o  # fmt: skip
    assert o.log_growth == 0, o
    check_common(o, rss_growth_mb=20)


# ------------------------------------------------------------------------------- 5: shutdown


def _stalled_stream(port: int) -> socket.socket:
    """A streaming chat request from a client that then never reads (tiny receive buffer)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    body = orjson.dumps(chat("m/big"))
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return s


def _drain(s: socket.socket) -> bytes:
    s.settimeout(5.0)
    out = b""
    try:
        while chunk := s.recv(1 << 16):
            out += chunk
    except (ConnectionError, TimeoutError):
        out += b"<reset>"
    s.close()
    return out


async def test_5_shutdown_ends_slow_readers_properly_and_says_so(tmp_path: Path) -> None:
    # ~4 MB/s for 10 s: more than the stalled client's socket buffers take before the grace ends, and
    # well within what the reading client reads
    big = Behaviour(tokens=5000, token_gap=0.002, chunk_padding=8000)
    async with sims(("big", big)) as ps:
        cfg = raw_config(
            {"big": ps["big"].base_url}, server={"shutdown_grace_s": 1.0, "shutdown_write_timeout_s": 1.0}
        )
        with serve(cfg, tmp_path) as gw:
            await gw.wait_listening()
            stalled = await asyncio.to_thread(_stalled_stream, gw.port)
            async with aiohttp.ClientSession() as http:
                r = await http.post(gw.url + "/v1/chat/completions", json=chat("m/big"))
                assert r.status == 200
                await r.content.readany()
                await asyncio.sleep(0.5)  # the stalled one's buffers fill up
                gw.signal(signal.SIGTERM)
                fast = b""
                try:
                    async for chunk in r.content.iter_any():
                        fast += chunk
                except aiohttp.ClientPayloadError:
                    fast += b"<cut>"
            assert await gw.wait_exit(timeout=15) == 0
            slow = await asyncio.to_thread(_drain, stalled)
            log = "\n".join(gw.lines)
    # the reader that reads: the shutting_down event, then a proper end of the chunked body
    last = [e for e in fast.split(b"\n\n") if e.strip()][-1]
    assert b"<cut>" not in fast, log
    assert orjson.loads(last[6:])["error"]["code"] == "shutting_down", fast[-300:]
    # the one that does not: never a body that ends looking complete (no chunked terminator)
    assert not slow.endswith(b"0\r\n\r\n"), slow[-300:]
    # and the log says what happened to each
    assert "1 stream(s) ended with a shutting_down event, 1 aborted" in log, log
    assert "ERROR" not in log, log


# ------------------------------------------------------------------------ the smaller findings


@pytest.fixture
async def gw_url():
    async with sims(("a", Behaviour(tokens=3))) as ps:
        raw = raw_config(
            {"a": ps["a"].base_url},
            server={"max_body_bytes": 4096, "cors_origins": ["https://app.example"], **FAST},
        )
        async with run_proxy(raw) as px:
            yield px.url


async def _raw(port: int, data: bytes, *, wait: float = 3.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = b""
    try:
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                out += chunk
                if b"\r\n\r\n" in out and not out.startswith(b"HTTP/1.1 100"):
                    break
    except TimeoutError:
        pass
    writer.close()
    return out


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_declared_length_over_the_limit_is_refused_before_the_body(gw_url: str) -> None:
    # the body never comes: an answer at all proves the gateway did not wait for it
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    got = await _raw(_port(gw_url), head + b"Content-Length: 1000000000\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 413"), got[:200]


async def test_expect_100_continue_only_after_the_checks(gw_url: str) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
    too_big = await _raw(
        _port(gw_url), head + b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
    )
    assert too_big.startswith(b"HTTP/1.1 413"), too_big[:200]
    wrong_type = await _raw(_port(gw_url), head + b"Content-Type: text/plain\r\nContent-Length: 10\r\n\r\n")
    assert wrong_type.startswith(b"HTTP/1.1 415"), wrong_type[:200]
    ok = await _raw(_port(gw_url), head + b"Content-Type: application/json\r\nContent-Length: 10\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 100 Continue"), ok[:200]


async def test_expect_100_continue_checks_the_key_first(tmp_path: Path) -> None:
    async with sims(("a", Behaviour(tokens=3))) as ps:
        with serve(raw_config({"a": ps["a"].base_url}), tmp_path, env={"HEDGE_API_KEYS": "k1"}) as gw:
            await gw.wait_listening()
            head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            got = await _raw(gw.port, head + b"Content-Type: application/json\r\nContent-Length: 10\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 401"), got[:200]


@pytest.mark.parametrize("ctype", ["text/json", "application/jsonl", "application/x-json", "multipart/json"])
async def test_content_type_is_matched_exactly(gw_url: str, ctype: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            gw_url + "/v1/chat/completions", data=orjson.dumps(chat("m/a")), headers={"Content-Type": ctype}
        ) as r:
            assert r.status == 415, await r.text()


async def test_cors_preflight_and_headers_when_configured(gw_url: str) -> None:
    async with aiohttp.ClientSession() as s:
        pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
        async with s.options(gw_url + "/v1/chat/completions", headers=pre) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert r.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        async with s.options(gw_url + "/v1/models", headers={**pre, "Origin": "https://evil.example"}) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        async with s.post(
            gw_url + "/v1/chat/completions", json=chat("m/a"), headers={"Origin": "https://app.example"}
        ) as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "X-GammaInfra-Cost-USD" in r.headers["Access-Control-Expose-Headers"]
            await r.read()


async def test_cors_is_off_by_default() -> None:
    async with sims(("a", Behaviour(tokens=3))) as ps, run_proxy(raw_config({"a": ps["a"].base_url})) as px:
        async with aiohttp.ClientSession() as s:
            pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
            async with s.options(px.url + "/v1/chat/completions", headers=pre) as r:
                assert r.status == 405 and "Access-Control-Allow-Origin" not in r.headers
            async with s.post(px.url + "/v1/chat/completions", json=chat("m/a"), headers=pre) as r:
                assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


async def test_keep_alive_serves_requests_spaced_under_the_idle_timeout(gw_url: str) -> None:
    """The timeouts do not cut honest keep-alive use: requests 1.2 s apart (over the 1 s head timeout,
    under the 2 s idle one) all go over one connection; after 2 s of silence it is closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(gw_url))
    try:
        for _ in range(3):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
            await reader.readexactly(int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]))
            await asyncio.sleep(1.2)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # then closed by the gateway
    finally:
        writer.close()


async def test_head_and_idle_timeouts_close_and_count_and_release_the_gate() -> None:
    async with sims(("a", Behaviour(tokens=3))) as ps:
        async with run_proxy(raw_config({"a": ps["a"].base_url}, server=FAST)) as px:
            guard = px.runner.app[GUARD_KEY]
            port = _port(px.url)
            r1, w1 = await asyncio.open_connection("127.0.0.1", port)
            w1.write(b"GET /healthz HTTP/1.1\r\nHo")  # a head that never ends
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)  # a connection that never speaks
            assert await asyncio.wait_for(r1.read(), 10) == b""
            assert await asyncio.wait_for(r2.read(), 10) == b""
            w1.close()
            w2.close()
            assert (guard.head_timeouts, guard.idle_timeouts) == (1, 1)
            for _ in range(100):
                if guard.gate.open == 0:
                    break
                await asyncio.sleep(0.02)
            assert guard.gate.open == 0 and guard.gate.refused == 0
