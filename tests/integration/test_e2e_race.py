"""End-to-end: simulated providers and the proxy as real servers on 127.0.0.1, aiohttp as the client.

Timing bounds here are generous: the tests assert who won and that losers were disconnected, not how
fast the machine is. Where the order of events matters (a loser cut before the winner's stream ends, a
provider cut only because the client left), a provider waits at a gate (`Behaviour.gate`) that the test
opens, or never opens: such a provider cannot end its request on its own, so no wall-clock margin is
needed to tell the proxy's disconnect from a natural end.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import orjson

from hedge.simprovider import Behaviour, SimProvider

from ..conftest import chat, eventually, raw_config, read_stream, run_proxy, same_stream, sims

SLOW = 5.0  # a loser's TTFT: if it were not cancelled it would run this long


def held(before_token: int = 0, **kw: Any) -> Behaviour:
    """A provider that stops before content chunk `before_token` until the test opens its gate."""
    return Behaviour(gate=asyncio.Event(), gate_before_token=before_token, **kw)


def content_of(stream: bytes) -> str:
    out = []
    for block in stream.split(b"\n\n"):
        if block.startswith(b"data: {"):
            ev = orjson.loads(block[6:])
            for ch in ev.get("choices", []):
                out.append(ch.get("delta", {}).get("content") or "")
    return "".join(out)


async def test_role_chunk_first_does_not_win_against_later_real_token(http: aiohttp.ClientSession) -> None:
    # alpha answers headers + role chunk at once but never a content token (held at its gate);
    # beta is launched 100 ms later, has content 50 ms after that, then holds after its first token:
    # beta must win, and alpha must be cut at the commit, while beta's stream is still going
    beta = held(before_token=1, ttft=0.05)
    async with sims(("alpha", held(role_chunk_with_headers=True)), ("beta", beta)) as ps:
        raw = raw_config({n: p.base_url for n, p in ps.items()}, fast={"default_delay_ms": 100})
        async with run_proxy(raw) as px:
            async with http.post(px.url + "/v1/chat/completions", json=chat()) as r:
                assert r.status == 200
                assert r.headers["X-GammaInfra-Endpoint"] == "m/beta@beta"
                first = await r.content.readany()
                alpha_rec, beta_rec = ps["alpha"].records[0], ps["beta"].records[0]
                assert await eventually(lambda: alpha_rec.disconnected_at is not None)
                assert not beta_rec.ended  # cut at the commit, not when the request ended
                assert beta.gate is not None
                beta.gate.set()
                body = first + await read_stream(r)
            assert same_stream(body, bytes(beta_rec.sent))  # byte for byte the winner's stream
            assert alpha_rec.headers_sent_at is not None  # it did send headers + role early
            assert not alpha_rec.completed


async def test_client_gets_exactly_one_providers_bytes_for_random_timings(
    http: aiohttp.ClientSession,
) -> None:
    rnd = random.Random(42)

    def behaviour(_rec: object) -> Behaviour:
        return Behaviour(
            headers_delay=rnd.uniform(0, 0.01),
            ttft=rnd.uniform(0.0, 0.06),
            token_gap=rnd.choice([0.0, 0.001, 0.003]),
            tokens=rnd.randint(1, 8),
        )

    async with sims(("a", behaviour), ("b", behaviour), ("c", behaviour)) as ps:
        raw = raw_config(
            {n: p.base_url for n, p in ps.items()}, fast={"default_delay_ms": 15, "min_delay_ms": 5}
        )
        async with run_proxy(raw) as px:
            winners: set[str] = set()
            for i in range(120):
                async with http.post(px.url + "/v1/chat/completions", json=chat(), headers={}) as r:
                    assert r.status == 200
                    body = await read_stream(r)
                    endpoint = r.headers["X-GammaInfra-Endpoint"]
                name = endpoint.split("@")[1]
                winners.add(name)
                sent = [bytes(rec.sent) for p in ps.values() for rec in p.records if rec.completed]
                # the usage chunk the proxy asked for is stripped again, so compare without it
                matches = [s for s in sent if same_stream(body, s)]
                assert len(matches) == 1, f"request {i}: body matches {len(matches)} provider streams"
                assert f"{name}#" in content_of(body)
                for p in ps.values():
                    p.records.clear()
            assert len(winners) >= 2  # random timings really did produce different winners


async def test_client_abandoning_cancels_every_attempt(http: aiohttp.ClientSession) -> None:
    # neither provider can answer (both held before their first token): only the proxy can end them
    async with sims(("a", held()), ("b", held())) as ps:
        raw = raw_config({n: p.base_url for n, p in ps.items()}, fast={"default_delay_ms": 50})
        async with run_proxy(raw) as px:
            task = asyncio.ensure_future(http.post(px.url + "/v1/chat/completions", json=chat()))
            assert await eventually(lambda: len(ps["b"].records) == 1)  # both attempts are running
            assert not any(rec.ended for p in ps.values() for rec in p.records)
            task.cancel()  # the client goes away mid-race
            for p in ps.values():
                rec = p.records[0]
                assert await eventually(lambda rec=rec: rec.disconnected_at is not None)
                assert not rec.completed
            assert await eventually(lambda: not px.proxy.tasks)
            assert px.proxy.inflight == 0


async def test_client_leaving_mid_stream_disconnects_winner(http: aiohttp.ClientSession) -> None:
    # a streams its first tokens, then holds: it cannot end the stream on its own
    async with sims(("a", held(before_token=3, ttft=0.01, tokens=50))) as ps:
        async with run_proxy(raw_config({"a": ps["a"].base_url})) as px:
            r = await http.post(px.url + "/v1/chat/completions", json=chat())
            await r.content.readany()
            rec = ps["a"].records[0]
            assert not rec.ended
            r.close()
            assert await eventually(lambda: rec.disconnected_at is not None)
            assert not rec.completed
            assert await eventually(lambda: px.proxy.upstream.busy_connections() == 0)


async def test_errors_before_first_token_launch_next_at_once(http: aiohttp.ClientSession) -> None:
    # delay is 3 s, so only an error-triggered launch can explain a fast answer
    for failing in (
        Behaviour(status=429),
        Behaviour(status=503),
        Behaviour(status=500, error_body=b"<html>oops"),
    ):
        async with sims(("bad", failing), ("good", Behaviour(ttft=0.01))) as ps:
            raw = raw_config({n: p.base_url for n, p in ps.items()}, fast={"default_delay_ms": 3000})
            async with run_proxy(raw) as px:
                async with http.post(px.url + "/v1/chat/completions", json=chat()) as r:
                    assert r.status == 200
                    assert r.headers["X-GammaInfra-Endpoint"] == "m/good@good"
                    await read_stream(r)
                bad, good = ps["bad"].records[0], ps["good"].records[0]
                assert good.arrived_at - bad.arrived_at < 1.0  # not the 3 s hedge delay


async def test_connection_refused_launches_next_at_once(http: aiohttp.ClientSession) -> None:
    down = SimProvider("down", Behaviour())
    await down.start()
    url = down.base_url
    await down.stop()  # nothing listens there now
    async with sims(("good", Behaviour(ttft=0.01))) as ps:
        raw = raw_config({"down": url, "good": ps["good"].base_url}, fast={"default_delay_ms": 3000})
        async with run_proxy(raw) as px:
            t0 = asyncio.get_running_loop().time()
            async with http.post(px.url + "/v1/chat/completions", json=chat()) as r:
                assert r.status == 200
                assert r.headers["X-GammaInfra-Endpoint"] == "m/good@good"
            assert ps["good"].records[0].arrived_at - t0 < 1.0


async def test_caller_400_is_passed_through_with_no_further_attempt(http: aiohttp.ClientSession) -> None:
    err = orjson.dumps({"error": {"message": "bad 'temperature'", "type": "invalid_request_error",
                                  "param": "temperature", "code": "invalid_value"}})  # fmt: skip
    async with sims(("a", Behaviour(status=400, error_body=err)), ("b", Behaviour(ttft=0.01))) as ps:
        raw = raw_config({n: p.base_url for n, p in ps.items()}, fast={"default_delay_ms": 50})
        async with run_proxy(raw) as px:
            async with http.post(px.url + "/v1/chat/completions", json=chat(temperature=9)) as r:
                assert r.status == 400
                body = await r.json()
            assert body["error"]["param"] == "temperature"
            assert body["error"]["type"] == "invalid_request_error"
            assert set(body["error"]) == {"message", "type", "param", "code"}
            await asyncio.sleep(0.15)  # past the hedge delay: still nothing launched
            assert ps["b"].records == []


async def test_all_failed_gives_one_clear_error(http: aiohttp.ClientSession) -> None:
    async with sims(("a", Behaviour(status=503)), ("b", Behaviour(status=502))) as ps:
        async with run_proxy(raw_config({n: p.base_url for n, p in ps.items()})) as px:
            async with http.post(px.url + "/v1/chat/completions", json=chat()) as r:
                assert r.status == 502
                e = (await r.json())["error"]
            assert "m/a@a: http_503" in e["message"] and "m/b@b: http_502" in e["message"]
    async with sims(("a", Behaviour(status=429, retry_after=3)), ("b", Behaviour(status=429))) as ps:
        async with run_proxy(raw_config({n: p.base_url for n, p in ps.items()})) as px:
            async with http.post(px.url + "/v1/chat/completions", json=chat()) as r:
                assert r.status == 429
                assert r.headers["Retry-After"] == "3"


async def test_failure_after_commit_ends_stream_with_error_event(http: aiohttp.ClientSession) -> None:
    for beh in (
        Behaviour(ttft=0.01, tokens=10, reset_after_tokens=3),
        Behaviour(ttft=0.01, tokens=5, done=False),
    ):
        async with sims(("a", beh), ("b", Behaviour(ttft=0.01))) as ps:
            raw = raw_config({n: p.base_url for n, p in ps.items()}, fast={"default_delay_ms": 1000})
            async with run_proxy(raw) as px:
                async with http.post(px.url + "/v1/chat/completions", json=chat()) as r:
                    assert r.headers["X-GammaInfra-Endpoint"] == "m/a@a"
                    body = await read_stream(r)
                last = body.rstrip(b"\n").split(b"\n\n")[-1]
                assert last.startswith(b"data: {") and b'"error"' in last
                assert "b#" not in content_of(body)  # never switched provider
                assert ps["b"].records == []


async def test_non_streaming_first_complete_body_wins(http: aiohttp.ClientSession) -> None:
    async with sims(("a", Behaviour(ttft=SLOW)), ("b", Behaviour(ttft=0.02))) as ps:
        raw = raw_config({n: p.base_url for n, p in ps.items()}, fast={"default_delay_ms": 50})
        async with run_proxy(raw) as px:
            async with http.post(px.url + "/v1/chat/completions", json=chat(stream=False)) as r:
                assert r.status == 200
                assert r.headers["X-GammaInfra-Endpoint"] == "m/b@b"
                body = await r.read()
            assert body == bytes(ps["b"].records[0].sent)
            assert await eventually(lambda: ps["a"].records[0].disconnected_at is not None)


async def test_pinned_model_fails_over_without_hedging(http: aiohttp.ClientSession) -> None:
    async with sims(("a", Behaviour(ttft=0.3)), ("b", Behaviour(ttft=0.01))) as ps:
        async with run_proxy(raw_config({n: p.base_url for n, p in ps.items()})) as px:
            async with http.post(px.url + "/v1/chat/completions", json=chat("m/all")) as r:
                assert r.headers["X-GammaInfra-Endpoint"] == "m/all@a"  # slow but no hedge
                await read_stream(r)
            assert ps["b"].records == []
            ps["a"].behaviour = Behaviour(status=503)
            async with http.post(px.url + "/v1/chat/completions", json=chat("m/all")) as r:
                assert r.headers["X-GammaInfra-Endpoint"] == "m/all@b"  # failed over on the error


async def test_models_and_healthz(http: aiohttp.ClientSession) -> None:
    async with sims(("a", Behaviour())) as ps:
        async with run_proxy(raw_config({"a": ps["a"].base_url})) as px:
            async with http.get(px.url + "/v1/models") as r:
                ids = {m["id"] for m in (await r.json())["data"]}
            assert {"m/a", "m/all", "gammainfra/fast", "gammainfra/cheap", "gammainfra/auto"} <= ids
            async with http.get(px.url + "/healthz") as r:
                assert r.status == 200
