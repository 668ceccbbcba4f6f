"""Soak (issue 6, and issue 2's leak check): steady load, random client aborts, faulty providers.

Everything runs in this process on 127.0.0.1: three simulated providers (one healthy, one that fails in
every way the proxy knows of, one that stalls), the proxy, and a closed-loop client that sometimes
walks away before the first byte or in the middle of a stream. Afterwards nothing may be left over:

* the proxy: no request in flight, no attempt task, no busy upstream connection, and every connection
  the providers still see open is one the proxy's idle pool holds (no orphaned upstream stream);
* the process: asyncio tasks and open file descriptors back at their baseline once the client and the
  pool are closed; RSS within a tolerance of its level after warm-up;
* the client: every committed stream it read to the end finished with `data: [DONE]` or with an OpenAI
  error event; every other answer is error JSON with a gateway status.

`HEDGE_SOAK_SECONDS` sets the length of the soak (default 40 s); the figures are printed (`-s`).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest

from hedge.simprovider import Behaviour, RequestRecord, SimProvider

from ..conftest import chat, eventually, raw_config, run_proxy

DONE = b"data: [DONE]\n\n"
GATEWAY_STATUSES = {429, 502, 503, 504}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


# ------------------------------------------------------------------------------------- providers


def good(rng: random.Random) -> Any:
    def b(_rec: RequestRecord) -> Behaviour:
        return Behaviour(
            ttft=rng.uniform(0.0, 0.02), tokens=rng.randint(1, 10), token_gap=rng.choice([0.0, 0.002])
        )

    return b


def flaky(rng: random.Random) -> Any:
    """Every fault before and after the first token, 2 in 3 requests."""

    def b(_rec: RequestRecord) -> Behaviour:
        r = rng.random()
        n = rng.randint(2, 8)
        if r < 0.08:
            return Behaviour(status=503, retry_after=rng.choice([None, 0.5]))
        if r < 0.16:
            return Behaviour(reset_after_tokens=0)
        if r < 0.26:
            return Behaviour(tokens=n, token_gap=0.002, reset_after_tokens=rng.randint(1, n - 1))
        if r < 0.33:
            return Behaviour(malformed_after_tokens=0)
        if r < 0.42:
            return Behaviour(tokens=n, token_gap=0.002, malformed_after_tokens=rng.randint(1, n - 1))
        if r < 0.48:
            return Behaviour(tokens=n, done=False)
        if r < 0.54:
            return Behaviour(status=500, error_body=b"<html>upstream exploded</html>")
        if r < 0.60:
            return Behaviour(tokens=n, stall_after_tokens=1, stall_seconds=3.0)  # idle timeout
        if r < 0.66:
            return Behaviour(tokens=n, error_event_after_tokens=rng.randint(0, n - 1))
        return Behaviour(ttft=rng.uniform(0.0, 0.03), tokens=n, token_gap=rng.choice([0.0, 0.002]))

    return b


def staller(rng: random.Random) -> Any:
    def b(_rec: RequestRecord) -> Behaviour:
        if rng.random() < 0.15:
            return Behaviour(ttft=5.0, tokens=3)  # beyond first_token_ms: a timeout, or hedged away
        return Behaviour(headers_delay=rng.uniform(0, 0.01), ttft=rng.uniform(0.01, 0.05), tokens=5)

    return b


# ---------------------------------------------------------------------------------------- client


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        if len(self.bad) < 20:
            self.bad.append(what)


def classify_stream_end(body: bytes) -> str:
    if body.endswith(DONE):
        return "done"
    last = [e for e in body.split(b"\n\n") if e][-1:]
    if last and last[0].startswith(b"data: {"):
        try:
            err = orjson.loads(last[0][6:]).get("error")
        except orjson.JSONDecodeError:
            err = None
        if isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}:
            return "error_event"
    return "broken"


Mix = dict[str, int]  # model -> weight


async def one_request(http: aiohttp.ClientSession, url: str, rng: random.Random, mix: Mix, t: Tally) -> None:
    model = rng.choices(list(mix), list(mix.values()))[0]
    stream = rng.random() < 0.8
    mode = rng.choices(["full", "abort_early", "abort_mid"], [70, 15, 15])[0]
    if mode == "abort_early":
        try:
            async with asyncio.timeout(rng.uniform(0.0, 0.03)):
                async with http.post(url, json=chat(model, stream=stream)) as r:
                    await r.read()
            t.outcomes["abort_early_too_late"] += 1  # it answered before the client gave up
        except TimeoutError:
            t.outcomes["abort_early"] += 1
        return
    async with http.post(url, json=chat(model, stream=stream)) as r:
        t.statuses[r.status] += 1
        if r.status != 200:
            body = await r.read()
            err = orjson.loads(body).get("error", {})
            if r.status not in GATEWAY_STATUSES or set(err) != {"message", "type", "param", "code"}:
                t.fail(f"{r.status} {body[:200]!r}")
            t.outcomes["http_error"] += 1
            return
        if not stream:
            orjson.loads(await r.read())["choices"]
            t.outcomes["json"] += 1
            return
        if mode == "abort_mid":
            for _ in range(rng.randint(1, 3)):
                if not await r.content.readany():
                    break
            r.close()  # walk away mid-stream: the connection closes under the proxy's feet
            t.outcomes["abort_mid"] += 1
            return
        body = bytearray()
        try:
            async for chunk in r.content.iter_any():
                body += chunk
        except aiohttp.ClientPayloadError:
            t.fail(f"stream cut without an end: {bytes(body[-200:])!r}")
            return
        kind = classify_stream_end(bytes(body))
        t.outcomes[kind] += 1
        if kind == "broken":
            t.fail(f"stream ended with neither [DONE] nor an error event: {bytes(body[-200:])!r}")


async def client_loop(
    http: aiohttp.ClientSession, url: str, seed: int, until: float, mix: Mix, t: Tally
) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        try:
            await one_request(http, url, rng, mix, t)
        except (aiohttp.ClientError, orjson.JSONDecodeError, KeyError) as e:
            t.fail(f"client error {type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------------ soak


async def settle(px: Any, providers: list[SimProvider]) -> None:
    """Wait for the proxy to wind down after the load, then check nothing is left over but the pool."""
    proxy = px.proxy
    assert await eventually(lambda: proxy.inflight == 0 and not proxy.tasks, timeout=10), (
        proxy.inflight,
        len(proxy.tasks),
    )
    assert await eventually(lambda: proxy.upstream.busy_connections() == 0, timeout=5)
    # the feedback's in-flight bookkeeping balances: a leaked waiting attempt would count as ever older
    # evidence that its provider is slow, and keep it from leading the race again
    for lane in (proxy.feedback, proxy.feedback_json):
        assert not any(lane.in_flight().values()), lane.in_flight()
    # every connection a provider still has open is one the proxy keeps idle for reuse
    assert await eventually(
        lambda: sum(p.open_connections() for p in providers) <= proxy.upstream.pool_size(), timeout=5
    ), ([p.open_connections() for p in providers], proxy.upstream.pool_size())


async def back_to_baseline(tasks0: int, fds0: int) -> tuple[int, int]:
    async def measure() -> tuple[int, int]:
        gc.collect()
        await asyncio.sleep(0.05)
        return len(asyncio.all_tasks()), open_fds()

    for _ in range(100):
        tasks, fds = await measure()
        if tasks <= tasks0 and fds <= fds0:
            break
    return tasks, fds


async def run_soak(
    seconds: float, concurrency: int, specs: list[tuple[str, Any]], mix: Mix, **cfg: Any
) -> tuple[Tally, dict[str, float]]:
    providers = [SimProvider(n, b, seed=i, keep_records=False) for i, (n, b) in enumerate(specs)]
    for p in providers:
        await p.start()
    try:
        raw = raw_config({p.name: p.base_url for p in providers}, **cfg)
        async with run_proxy(raw) as px:
            gc.collect()
            tasks0, fds0 = len(asyncio.all_tasks()), open_fds()
            t = Tally()
            url = px.url + "/v1/chat/completions"
            start = time.monotonic()
            until = start + seconds
            rss: dict[str, float] = {"start": rss_mib()}
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                clients = [
                    asyncio.ensure_future(client_loop(http, url, 1000 + i, until, mix, t))
                    for i in range(concurrency)
                ]
                await asyncio.sleep(seconds * 0.25)
                rss["warm"] = rss_mib()
                await asyncio.gather(*clients)
                rss["end_load"] = rss_mib()
                await settle(px, providers)
            await px.proxy.upstream.close()  # the idle pool was the only thing allowed to remain
            tasks, fds = await back_to_baseline(tasks0, fds0)
            gc.collect()
            rss["final"] = rss_mib()
            figures = {
                "seconds": time.monotonic() - start,
                "requests": float(sum(t.outcomes.values())),
                "tasks0": tasks0,
                "tasks": tasks,
                "fds0": fds0,
                "fds": fds,
                **{f"rss_{k}_mib": v for k, v in rss.items()},
            }
            return t, figures
    finally:
        for p in providers:
            await p.stop()


@pytest.mark.slow
async def test_soak_faulty_providers_and_client_aborts() -> None:
    seconds = float(os.environ.get("HEDGE_SOAK_SECONDS", "40"))
    rnd = random.Random(7)
    specs = [("good", good(random.Random(1))), ("flaky", flaky(random.Random(2))), ("staller", staller(rnd))]
    t, f = await run_soak(
        seconds,
        24,
        specs,
        {"gammainfra/fast": 50, "m/all": 20, "m/good": 15, "m/flaky": 15},
        fast={"default_delay_ms": 60, "max_delay_ms": 400},
        timeouts={"first_token_ms": 800, "idle_ms": 500, "total_ms": 5000},
        feedback={"failure_threshold": 8, "base_backoff_s": 0.5, "max_backoff_s": 2.0},
    )
    print(f"\nsoak: {dict(t.outcomes)} statuses={dict(t.statuses)}")
    print("soak figures: " + ", ".join(f"{k}={v:.1f}" for k, v in f.items()))
    assert not t.bad, t.bad
    assert f["requests"] >= 1000, f  # "steady load": thousands on a normal box, ≥ 1000 on a slow one
    assert t.outcomes["done"] > 0 and t.outcomes["error_event"] > 0  # both ends of a stream were seen
    assert t.outcomes["abort_early"] > 0 and t.outcomes["abort_mid"] > 0
    assert f["tasks"] <= f["tasks0"], f
    assert f["fds"] <= f["fds0"], f
    # RSS after warm-up may still grow by allocator slack and caches, but not with the request count
    assert f["rss_final_mib"] - f["rss_warm_mib"] < max(40.0, 0.25 * f["rss_warm_mib"]), f


@pytest.mark.slow
async def test_thousands_of_aborted_requests_leave_only_the_idle_pool() -> None:
    """Issue 2: after thousands of requests with random client aborts (before the first byte and
    mid-stream, through the hedged lane), no asyncio task and no upstream connection is left over
    beyond the idle pool."""
    specs = [("a", good(random.Random(3))), ("b", good(random.Random(4))), ("c", good(random.Random(5)))]
    mix = {"gammainfra/fast": 80, "m/all": 20}
    t, f = await run_soak(10.0, 16, specs, mix, fast={"default_delay_ms": 5, "min_delay_ms": 1})
    print(f"\nabort soak: {dict(t.outcomes)} statuses={dict(t.statuses)}")
    print("abort soak figures: " + ", ".join(f"{k}={v:.1f}" for k, v in f.items()))
    assert not t.bad, t.bad
    assert f["requests"] >= 1000, f
    assert t.outcomes["abort_early"] + t.outcomes["abort_mid"] >= 200
    assert f["tasks"] <= f["tasks0"] and f["fds"] <= f["fds0"], f
