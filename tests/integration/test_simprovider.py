"""Tests of the simulated provider: real loopback HTTP, aiohttp client.

Timing assertions are lower bounds (the provider must never be early); upper bounds are generous so a
busy CI machine does not make them flaky -- except disconnect detection, whose promptness is the point.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import random
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from hedge.simprovider import PROFILES, Behaviour, LatencyProfile, RequestRecord, SimProvider

ROOT = Path(__file__).resolve().parent.parent.parent
MakeProvider = Callable[..., Awaitable[SimProvider]]
EARLY = 0.005  # timer slack: a sleep may wake this much before its deadline


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def make_provider() -> AsyncIterator[MakeProvider]:
    started: list[SimProvider] = []

    async def make(behaviour: Any = None, name: str = "alpha", **kw: Any) -> SimProvider:
        p = SimProvider(name, behaviour, **kw)
        await p.start()
        started.append(p)
        return p

    yield make
    for p in started:
        await p.stop()


def chat_body(stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "model": "test/model-x",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
        **extra,
    }


async def post(session: aiohttp.ClientSession, p: SimProvider, **kw: Any) -> aiohttp.ClientResponse:
    return await session.post(p.base_url + "/chat/completions", json=chat_body(**kw))


def split_events(raw: bytes) -> list[bytes]:
    """Every SSE event's payload; asserts the exact `data: ...\\n\\n` framing."""
    assert raw.endswith(b"\n\n")
    events = raw.split(b"\n\n")[:-1]
    assert all(e.startswith(b"data: ") for e in events), events
    return [e[len(b"data: ") :] for e in events]


async def next_event(resp: aiohttp.ClientResponse) -> bytes:
    raw = await resp.content.readuntil(b"\n\n")
    assert raw.startswith(b"data: ")
    return raw[len(b"data: ") : -2]


async def eventually(pred: Callable[[], bool], within: float = 1.0) -> None:
    """Poll ``pred`` until true (it reads plain counters, there is no event to wait on)."""
    deadline = time.monotonic() + within
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


CHUNK_KEYS = ["id", "object", "created", "model", "system_fingerprint", "choices"]
CHOICE_KEYS = ["index", "delta", "logprobs", "finish_reason"]


# ---------------------------------------------------------------------------------------------------
# Stream format
# ---------------------------------------------------------------------------------------------------


async def test_stream_format_exact(make_provider: MakeProvider, session: aiohttp.ClientSession) -> None:
    p = await make_provider(Behaviour(tokens=4))
    async with await post(session, p) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        events = split_events(await resp.read())
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert len(chunks) == 1 + 4 + 1  # role, content, finish; no usage chunk unless asked
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    for c in chunks:
        assert list(c) == CHUNK_KEYS  # no "usage" key at all
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == "test/model-x"
        assert isinstance(c["created"], int)
        assert c["system_fingerprint"] is None
        assert len(c["choices"]) == 1 and list(c["choices"][0]) == CHOICE_KEYS
        assert c["choices"][0]["index"] == 0 and c["choices"][0]["logprobs"] is None
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"] for c in chunks[1:5]]
    assert contents == [{"content": f"alpha#0:{i} "} for i in range(4)]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:5])
    assert chunks[5]["choices"][0]["delta"] == {}
    assert chunks[5]["choices"][0]["finish_reason"] == "stop"
    rec = p.records[0]
    assert rec.stream and rec.completed and rec.disconnected_at is None
    assert rec.body == chat_body()


async def test_stream_usage_only_when_asked(
    make_provider: MakeProvider, session: aiohttp.ClientSession
) -> None:
    p = await make_provider(Behaviour(tokens=3, prompt_tokens=7, finish_reason="length"))
    async with await post(session, p, stream_options={"include_usage": True}) as resp:
        events = split_events(await resp.read())
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all("usage" in c for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert list(usage_chunk) == [*CHUNK_KEYS, "usage"]


async def test_stream_text_padding_no_done_and_distinct_requests(
    make_provider: MakeProvider, session: aiohttp.ClientSession
) -> None:
    p = await make_provider(Behaviour(text="Hello  brave\nnew world", done=False))
    async with await post(session, p) as resp:
        events = split_events(await resp.read())
    assert events[-1] != b"[DONE]"
    contents = [orjson.loads(e)["choices"][0]["delta"].get("content") for e in events[1:-1]]
    assert contents == ["Hello ", "brave ", "new ", "world "]

    p.behaviour = Behaviour(tokens=2, chunk_padding=5000)
    async with await post(session, p) as resp:
        events = split_events(await resp.read())
    contents = [orjson.loads(e)["choices"][0]["delta"]["content"] for e in events[1:3]]
    assert contents[0].startswith("alpha#1:0 ") and len(contents[0]) == len("alpha#1:0 ") + 5000


async def test_callable_behaviour_sees_record(
    make_provider: MakeProvider, session: aiohttp.ClientSession
) -> None:
    seen: list[RequestRecord] = []

    def script(rec: RequestRecord) -> Behaviour:
        seen.append(rec)
        return Behaviour(tokens=rec.index + 1)

    p = await make_provider(script)
    for i in range(3):
        async with await post(session, p, stream=False) as resp:
            data = await resp.json()
        assert data["usage"]["completion_tokens"] == i + 1
    assert [r.index for r in seen] == [0, 1, 2]
    assert seen[0].body["model"] == "test/model-x"


# ---------------------------------------------------------------------------------------------------
# Non-streaming, errors, other endpoints
# ---------------------------------------------------------------------------------------------------


async def test_non_streaming_json(make_provider: MakeProvider, session: aiohttp.ClientSession) -> None:
    p = await make_provider(Behaviour(tokens=3, prompt_tokens=12))
    async with await post(session, p, stream=False) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        raw = await resp.read()
    data = orjson.loads(raw)
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["model"] == "test/model-x"
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "alpha#0:0 alpha#0:1 alpha#0:2 "
    assert choice["finish_reason"] == "stop"
    assert data["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    rec = p.records[0]
    assert not rec.stream and rec.completed and bytes(rec.sent) == raw


async def test_non_streaming_gzip(make_provider: MakeProvider, session: aiohttp.ClientSession) -> None:
    p = await make_provider(Behaviour(tokens=2, gzip=True))
    async with await post(session, p, stream=False) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        data = await resp.json()  # aiohttp decompresses
    assert data["choices"][0]["message"]["content"] == "alpha#0:0 alpha#0:1 "
    assert orjson.loads(gzip.decompress(bytes(p.records[0].sent))) == data


async def test_error_status_json_and_retry_after(
    make_provider: MakeProvider, session: aiohttp.ClientSession
) -> None:
    p = await make_provider(Behaviour(status=429, retry_after=1.5))
    for stream in (True, False):
        async with await post(session, p, stream=stream) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "1.5"
            err = (await resp.json())["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert "alpha" in err["message"]
    assert all(r.completed for r in p.records)


async def test_error_raw_body(make_provider: MakeProvider, session: aiohttp.ClientSession) -> None:
    p = await make_provider(Behaviour(status=502, error_body=b"<html>Bad Gateway</html>"))
    async with await post(session, p) as resp:
        assert resp.status == 502
        assert "Retry-After" not in resp.headers
        assert await resp.read() == b"<html>Bad Gateway</html>"


async def test_bad_json_models_and_unknown_route(
    make_provider: MakeProvider, session: aiohttp.ClientSession
) -> None:
    p = await make_provider()
    async with session.post(p.base_url + "/chat/completions", data=b"{nope") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    async with session.get(p.base_url + "/models") as resp:
        assert resp.status == 200
        models = await resp.json()
    assert models["object"] == "list" and len(models["data"]) >= 2
    assert all(m["object"] == "model" and m["id"] for m in models["data"])
    async with session.get(p.base_url + "/nothing") as resp:
        assert resp.status == 404
        assert "error" in await resp.json()
    assert p.requests_total == 0


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------


async def test_headers_then_first_token_timing(
    make_provider: MakeProvider, session: aiohttp.ClientSession
) -> None:
    p = await make_provider(Behaviour(headers_delay=0.05, ttft=0.2, token_gap=0.03, tokens=3))
    t0 = time.monotonic()
    async with await post(session, p) as resp:
        t_headers = time.monotonic() - t0
        role = orjson.loads(await next_event(resp))
        first = orjson.loads(await next_event(resp))
        t_first = time.monotonic() - t0
        await next_event(resp)
        t_second = time.monotonic() - t0
        await resp.read()
    assert role["choices"][0]["delta"]["role"] == "assistant"
    assert first["choices"][0]["delta"]["content"] == "alpha#0:0 "
    assert 0.05 - EARLY <= t_headers < 0.19
    assert t_first >= 0.2 - EARLY
    assert t_second >= 0.23 - EARLY
    assert t_first < 1.0
    rec = p.records[0]
    assert rec.headers_sent_at is not None and rec.first_token_at is not None and rec.finished_at is not None
    assert rec.arrived_at < rec.headers_sent_at < rec.first_token_at < rec.finished_at


async def test_role_chunk_deferred_to_first_token(
    make_provider: MakeProvider, session: aiohttp.ClientSession
) -> None:
    p = await make_provider(Behaviour(headers_delay=0.0, ttft=0.2, tokens=2, role_chunk_with_headers=False))
    t0 = time.monotonic()
    async with await post(session, p) as resp:
        t_headers = time.monotonic() - t0
        role = orjson.loads(await next_event(resp))
        t_role = time.monotonic() - t0
        await resp.read()
    assert t_headers < 0.15  # headers went out at once, without a body byte
    assert t_role >= 0.2 - EARLY
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}


async def test_stall_between_tokens(make_provider: MakeProvider, session: aiohttp.ClientSession) -> None:
    p = await make_provider(Behaviour(tokens=3, stall_after_tokens=1, stall_seconds=0.25))
    t0 = time.monotonic()
    async with await post(session, p) as resp:
        await next_event(resp)  # role
        await next_event(resp)  # token 0
        await next_event(resp)  # token 1, after the stall
        # measured from the request, not from token 0: a late-read token 0 would shrink the gap
        t_token1 = time.monotonic() - t0
        events = split_events(await resp.read())
    assert t_token1 >= 0.25 - EARLY
    assert events[-1] == b"[DONE]"
    assert p.records[0].completed


# ---------------------------------------------------------------------------------------------------
# Failures mid-stream
# ---------------------------------------------------------------------------------------------------


async def test_reset_mid_stream(make_provider: MakeProvider, session: aiohttp.ClientSession) -> None:
    p = await make_provider(Behaviour(tokens=5, reset_after_tokens=2, token_gap=0.01))
    async with await post(session, p) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientError):
            await resp.read()
    rec = p.records[0]
    assert not rec.completed and rec.finished_at is not None and rec.disconnected_at is None
    assert rec.sent.count(b'"content":"alpha#0:') == 2
    assert p.disconnects_total == 0


async def test_reset_non_streaming(make_provider: MakeProvider, session: aiohttp.ClientSession) -> None:
    p = await make_provider(Behaviour(reset_after_tokens=0))
    with pytest.raises(aiohttp.ClientError):
        async with await post(session, p, stream=False) as resp:
            await resp.read()


async def test_malformed_chunk(make_provider: MakeProvider, session: aiohttp.ClientSession) -> None:
    p = await make_provider(Behaviour(tokens=5, malformed_after_tokens=2))
    async with await post(session, p) as resp:
        raw = await resp.read()  # ends cleanly, just with garbage and no [DONE]
    events = split_events(raw)
    assert len(events) == 4 and events[-1] == b"{not json"
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(events[-1])
    rec = p.records[0]
    assert not rec.completed and rec.finished_at is not None and bytes(rec.sent) == raw


async def test_error_event(make_provider: MakeProvider, session: aiohttp.ClientSession) -> None:
    p = await make_provider(Behaviour(tokens=5, error_event_after_tokens=1))
    async with await post(session, p) as resp:
        events = split_events(await resp.read())
    assert len(events) == 3
    err = orjson.loads(events[-1])["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert not p.records[0].completed


async def test_non_streaming_broken_answers(
    make_provider: MakeProvider, session: aiohttp.ClientSession
) -> None:
    p = await make_provider(Behaviour(malformed_after_tokens=1))
    async with await post(session, p, stream=False) as resp:
        assert resp.status == 200
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(await resp.read())
    p.behaviour = Behaviour(error_event_after_tokens=1)
    async with await post(session, p, stream=False) as resp:
        assert resp.status == 500
        assert "error" in await resp.json()
    assert [r.completed for r in p.records] == [False, False]


async def test_large_prompt_accepted(make_provider: MakeProvider, session: aiohttp.ClientSession) -> None:
    p = await make_provider(Behaviour(tokens=1))
    big = "word " * 600_000  # ~3 MB, over aiohttp's 1 MiB default
    body = io.BytesIO(orjson.dumps(chat_body(stream=False, messages=[{"role": "user", "content": big}])))
    async with session.post(p.base_url + "/chat/completions", data=body) as resp:
        assert resp.status == 200
    assert len(p.records[0].body["messages"][0]["content"]) == len(big)


# ---------------------------------------------------------------------------------------------------
# Client disconnects
# ---------------------------------------------------------------------------------------------------


async def assert_disconnect_seen(p: SimProvider, closed_at: float) -> None:
    rec = p.records[-1]
    gone = await p.wait_disconnected(rec, timeout=1.0)
    assert gone is not None, rec
    assert gone - closed_at < 0.2
    assert not rec.completed and rec.finished_at is None
    assert p.disconnects_total == 1


async def test_disconnect_before_headers(make_provider: MakeProvider, session: aiohttp.ClientSession) -> None:
    p = await make_provider(Behaviour(headers_delay=2.0, ttft=2.0))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(post(session, p), 0.1)
    await assert_disconnect_seen(p, time.monotonic())


async def test_disconnect_while_waiting_first_token(
    make_provider: MakeProvider, session: aiohttp.ClientSession
) -> None:
    p = await make_provider(Behaviour(ttft=2.0))
    resp = await post(session, p)
    await next_event(resp)  # role chunk came with the headers
    resp.close()
    await assert_disconnect_seen(p, time.monotonic())
    assert p.records[0].headers_sent_at is not None and p.records[0].first_token_at is None


async def test_disconnect_between_tokens(make_provider: MakeProvider, session: aiohttp.ClientSession) -> None:
    p = await make_provider(Behaviour(token_gap=2.0, tokens=3))
    resp = await post(session, p)
    await next_event(resp)
    await next_event(resp)  # first token
    resp.close()
    await assert_disconnect_seen(p, time.monotonic())
    assert p.records[0].first_token_at is not None


async def test_disconnect_non_streaming(make_provider: MakeProvider, session: aiohttp.ClientSession) -> None:
    p = await make_provider(Behaviour(ttft=2.0))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(post(session, p, stream=False), 0.1)
    await assert_disconnect_seen(p, time.monotonic())


async def test_open_connections_back_to_zero(make_provider: MakeProvider) -> None:
    p = await make_provider(Behaviour(ttft=0.05, tokens=2))
    assert p.open_connections() == 0
    async with aiohttp.ClientSession() as s:
        resps = await asyncio.gather(*(post(s, p) for _ in range(3)))
        assert p.open_connections() == 3
        for r in resps:
            await r.read()
            r.release()  # back to the pool: the connections stay open (keep-alive)
        assert p.open_connections() == 3
    await eventually(lambda: p.open_connections() == 0)
    assert p.completed_total == 3


# ---------------------------------------------------------------------------------------------------
# Byte accounting, lifecycle
# ---------------------------------------------------------------------------------------------------


async def test_sent_equals_received(make_provider: MakeProvider, session: aiohttp.ClientSession) -> None:
    p = await make_provider(Behaviour(tokens=20, chunk_padding=300))
    async with await post(session, p, stream_options={"include_usage": True}) as resp:
        received = await resp.read()
    assert bytes(p.records[0].sent) == received
    async with await post(session, p, stream=False) as resp:
        received = await resp.read()
    assert bytes(p.records[1].sent) == received


async def test_refuse_and_resume(make_provider: MakeProvider, session: aiohttp.ClientSession) -> None:
    p = await make_provider(Behaviour(tokens=1))
    port = p.port
    await p.refuse()
    assert not p.listening
    with pytest.raises(aiohttp.ClientConnectorError):
        await post(session, p)
    await p.resume()
    assert p.port == port and p.listening
    async with await post(session, p, stream=False) as resp:
        assert resp.status == 200

    p.behaviour = Behaviour(ttft=5.0)
    resp = await post(session, p)
    await p.refuse(drop_connections=True)
    with pytest.raises(aiohttp.ClientError):
        await resp.read()
    rec = p.records[-1]
    assert rec.finished_at is not None and rec.disconnected_at is None and not rec.completed
    await eventually(lambda: p.open_connections() == 0)
    assert p.disconnects_total == 0


async def test_refusing_profile(make_provider: MakeProvider, session: aiohttp.ClientSession) -> None:
    p = await make_provider(PROFILES["down"])
    assert not p.listening and p.port != 0
    with pytest.raises(aiohttp.ClientConnectorError):
        await post(session, p)


async def test_stop_is_quick_with_open_streams(session: aiohttp.ClientSession) -> None:
    p = SimProvider("alpha", Behaviour(ttft=5.0))
    await p.start()
    resp = await post(session, p)
    t0 = time.monotonic()
    await p.stop()
    assert time.monotonic() - t0 < 1.0
    rec = p.records[0]
    assert rec.finished_at is not None and rec.disconnected_at is None  # our doing, not the client's
    with pytest.raises(aiohttp.ClientError):
        await resp.read()


async def test_context_manager_and_counters_without_records(session: aiohttp.ClientSession) -> None:
    async with SimProvider("beta", Behaviour(tokens=2), keep_records=False) as p:
        for _ in range(3):
            async with await post(session, p) as resp:
                await resp.read()
        p.behaviour = Behaviour(headers_delay=2.0, ttft=2.0)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(post(session, p), 0.1)
        await eventually(lambda: p.disconnects_total == 1)
        assert p.records == []
        assert (p.requests_total, p.completed_total, p.disconnects_total) == (4, 3, 1)


# ---------------------------------------------------------------------------------------------------
# Latency profiles
# ---------------------------------------------------------------------------------------------------


def test_profile_sampling_is_deterministic() -> None:
    for name, prof in PROFILES.items():
        r1, r2 = random.Random(42), random.Random(42)
        assert [prof.sample(r1) for _ in range(50)] == [prof.sample(r2) for _ in range(50)], name
    fast = PROFILES["fast"]
    r1, r2 = random.Random(1), random.Random(2)
    assert [fast.sample(r1).ttft for _ in range(10)] != [fast.sample(r2).ttft for _ in range(10)]


def test_profile_presets() -> None:
    assert {"fast", "medium", "slow", "stally", "instant", "flaky"} <= set(PROFILES)
    rng = random.Random(3)
    instant = [PROFILES["instant"].sample(rng) for _ in range(20)]
    assert all(b.ttft == 0 and b.token_gap == 0 and b.headers_delay == 0 and b.tokens == 20 for b in instant)

    def median_ttft(name: str) -> float:
        ttfts = sorted(PROFILES[name].sample(rng).ttft for _ in range(401))
        return ttfts[200]

    assert 0.03 < median_ttft("fast") < 0.05
    assert 0.1 < median_ttft("medium") < 0.14
    assert 0.35 < median_ttft("slow") < 0.45

    stally = [PROFILES["stally"].sample(rng) for _ in range(4000)]
    stall_share = sum(b.ttft == 2.0 for b in stally) / len(stally)
    assert 0.03 < stall_share < 0.07
    flaky = [PROFILES["flaky"].sample(rng) for _ in range(4000)]
    error_share = sum(b.status == 503 for b in flaky) / len(flaky)
    assert 0.07 < error_share < 0.13
    for b in stally[:50]:
        assert 0 <= b.headers_delay <= b.ttft


def test_custom_profile() -> None:
    prof = LatencyProfile(ttft_median=0.2, ttft_sigma=0.0, headers_delay=0.5, token_gap=0.01, tokens=7)
    b = prof.sample(random.Random(0))
    assert (b.ttft, b.headers_delay, b.token_gap, b.tokens) == (0.2, 0.1, 0.01, 7)


async def test_seeded_provider_is_deterministic(session: aiohttp.ClientSession) -> None:
    """Same seed, same profile -> the same per-request token counts and statuses."""
    prof = LatencyProfile(ttft_median=0.0, ttft_sigma=0.0, error_prob=0.5, tokens=1)
    outcomes = []
    for _ in range(2):
        async with SimProvider("gamma", prof, seed=11) as p:
            statuses = []
            for _ in range(12):
                async with await post(session, p, stream=False) as resp:
                    statuses.append(resp.status)
            outcomes.append(statuses)
    assert outcomes[0] == outcomes[1]
    assert set(outcomes[0]) == {200, 503}


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_cli_runs_several_providers_and_exits_cleanly(session: aiohttp.ClientSession) -> None:
    ports = [free_port(), free_port()]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hedge.simprovider",
        "--spec",
        f"alpha:{ports[0]}:instant",
        "--spec",
        f"beta:{ports[1]}:fast",
        "--seed",
        "1",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        for _ in range(2):
            line = await asyncio.wait_for(proc.stdout.readline(), 10)
            assert b"listening on http://127.0.0.1:" in line, line
        for name, port in zip(("alpha", "beta"), ports, strict=True):
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            async with session.post(url, json=chat_body()) as resp:
                events = split_events(await resp.read())
            assert events[-1] == b"[DONE]"
            assert f"{name}#0:0 ".encode() in events[1]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 5) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_under_uvloop() -> None:
    """The demo, the CLI and the load test run on uvloop: stream, timing and disconnects there too."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with (
            SimProvider("uv", Behaviour(headers_delay=0.02, ttft=0.1, token_gap=0.01, tokens=3)) as p,
            aiohttp.ClientSession() as s,
        ):
            t0 = time.monotonic()
            async with await post(s, p) as resp:
                await next_event(resp)
                await next_event(resp)
                t_first = time.monotonic() - t0
                raw = await resp.read()
            assert t_first >= 0.1 - EARLY
            assert raw.endswith(b"data: [DONE]\n\n")

            p.behaviour = Behaviour(ttft=0.0, token_gap=2.0, tokens=2)
            resp = await post(s, p)
            await next_event(resp)
            await next_event(resp)
            resp.close()
            closed_at = time.monotonic()
            gone = await p.wait_disconnected(p.records[-1], timeout=1.0)
            assert gone is not None and gone - closed_at < 0.2
        assert p.open_connections() == 0

    uvloop.run(scenario())


async def test_gate_holds_the_stream_until_opened(
    make_provider: MakeProvider, session: aiohttp.ClientSession
) -> None:
    """Content chunk `gate_before_token` waits for the gate; the rest follows once it opens."""
    gate = asyncio.Event()
    p = await make_provider(Behaviour(tokens=4, gate=gate, gate_before_token=2))
    async with await post(session, p) as r:
        events = [await next_event(r) for _ in range(3)]  # the role chunk and two content chunks
        assert b'"content":"alpha#0:1 "' in events[2]
        await asyncio.sleep(0.1)  # room for a broken gate to let chunk 2 out (no assertion on time)
        rec = p.records[0]
        assert not rec.ended and b"alpha#0:2" not in rec.sent
        gate.set()
        rest = split_events(await r.read())
    assert b'"content":"alpha#0:2 "' in rest[0] and rest[-1] == b"[DONE]"
    assert p.records[0].completed
