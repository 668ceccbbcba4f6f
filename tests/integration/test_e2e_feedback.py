"""End-to-end feedback: a primary that stalls on a few percent of requests, hedged vs pinned.

Real servers on 127.0.0.1: provider `a` answers in ~30 ms but stalls for 2 s on every 20th request (5 %),
provider `b` answers steadily in ~60 ms. The same number of requests at the same concurrency goes
through the pinned single-provider model `m/a` and through `gammainfra/fast` (a first, b as its hedge).
The test prints the client-visible TTFT percentiles and the extra upstream load it measured (counted by
the providers themselves), and asserts only directions: the fast lane's p99 is far below the pinned p99,
and the extra load stays within the route's hedge budget (plus its burst, spread over the run).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import pytest

from hedge.simprovider import Behaviour, RequestRecord

from ..conftest import chat, raw_config, run_proxy, sims

N = 300  # requests per mode
CONCURRENCY = 8
STALL_EVERY = 20  # a stalls on 1 request in 20: 5 %
STALL_S = 2.0
A_TTFT, B_TTFT = 0.03, 0.06
BUDGET, BURST = 0.10, 5.0


def stally(rec: RequestRecord) -> Behaviour:
    """Provider a: fast, except every STALL_EVERY-th request it receives, which stalls for STALL_S."""
    stalled = rec.index % STALL_EVERY == STALL_EVERY // 2
    return Behaviour(ttft=STALL_S if stalled else A_TTFT, tokens=3)


def pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


async def drive(http: aiohttp.ClientSession, url: str, model: str) -> list[float]:
    """N streaming requests at CONCURRENCY; returns each one's client-visible TTFT (first body bytes:
    the proxy sends nothing, not even headers, before it holds a first content token)."""
    ttfts: list[float] = []
    todo = iter(range(N))

    async def worker() -> None:
        for _ in todo:
            t0 = time.monotonic()
            async with http.post(url + "/v1/chat/completions", json=chat(model)) as r:
                assert r.status == 200, await r.text()
                first = await r.content.readany()
                ttfts.append(time.monotonic() - t0)
                assert first
                await r.read()

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))), timeout=60.0)
    return ttfts


async def test_hedging_cuts_the_stall_tail_within_the_budget(
    http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    async with sims(("a", stally), ("b", Behaviour(ttft=B_TTFT, tokens=3))) as ps:
        route: dict[str, Any] = {
            # q below 1 - stall rate, so the delay sits in a's normal answers, not in its stalls
            "quantile": 0.9,
            "min_delay_ms": 50,
            "max_delay_ms": 3000,
            "default_delay_ms": 200,
            "max_attempts": 2,
            "hedge_budget": BUDGET,
            "hedge_burst": BURST,
        }
        raw = raw_config({n: p.base_url for n, p in ps.items()}, fast=route)
        async with run_proxy(raw) as px:
            a0, b0 = ps["a"].requests_total, ps["b"].requests_total
            fast = await drive(http, px.url, "gammainfra/fast")
            upstream = ps["a"].requests_total - a0 + ps["b"].requests_total - b0
            stalls_fast = sum(stally(r).ttft == STALL_S for r in ps["a"].records[a0:])
            pinned = await drive(http, px.url, "m/a")
            budget = px.proxy.feedback.budget(px.proxy.catalog.resolve("gammainfra/fast").route)
    extra = upstream / N - 1.0
    fast_p99, pinned_p99 = pct(fast, 0.99), pct(pinned, 0.99)
    line = (
        f"E2E-FEEDBACK n={N} conc={CONCURRENCY} stall={1 / STALL_EVERY:.0%}x{STALL_S:.0f}s "
        f"fast_p50_ms={pct(fast, 0.5) * 1000:.0f} fast_p99_ms={fast_p99 * 1000:.0f} "
        f"pinned_p50_ms={pct(pinned, 0.5) * 1000:.0f} pinned_p99_ms={pinned_p99 * 1000:.0f} "
        f"extra_load={extra:.3f} budget={BUDGET:.2f} hedges={budget.spent} refused={budget.refusals} "
        f"stalls_hit_in_fast={stalls_fast} wall_s={time.monotonic() - started:.1f}"
    )
    with capsys.disabled():  # in the CI log too, not only under -s
        print("\n" + line)
    assert pinned_p99 >= STALL_S * 0.9  # the scenario is real: 5 % stalls make the pinned p99 a stall
    assert fast_p99 < pinned_p99 / 2
    # delay hedges are paid from the bucket: at most BUDGET per request plus the burst it starts with
    assert extra <= BUDGET + BURST / N + 1e-9
    assert extra > 0.0
