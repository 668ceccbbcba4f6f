"""A circuit breaker's whole life, through the proxy, on real sockets: closed -> open -> half-open probe
(fails: re-opened, backoff doubled) -> half-open probe (succeeds) -> closed.

Real servers on 127.0.0.1 (simulated providers a and b, the proxy); the breaker's time is the proxy's
injected clock, which the test moves by hand, so the backoffs are exact and nothing waits on wall time.
Every request prefers a (X-GammaInfra-Preference), so where each one went shows a's breaker: the
providers' own request counts, the answering endpoint, and `hedge_circuit_state` in /metrics (which reads
the breakers with the same clock).
"""

from __future__ import annotations

from typing import Any

import aiohttp

from hedge.simprovider import Behaviour

from ..conftest import RunningProxy, chat, raw_config, read_stream, run_proxy, sims
from .test_metrics import scrape

URL = "/v1/chat/completions"
PREFER = {"X-GammaInfra-Preference": "a"}
THRESHOLD, BACKOFF = 2, 10.0
OK = Behaviour(ttft=0.0, tokens=3)
DOWN = Behaviour(status=503)
CLOSED, HALF_OPEN, OPEN = 0, 1, 2


class FakeClock:
    """The proxy's clock: stands still unless the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def call(http: aiohttp.ClientSession, px: RunningProxy) -> tuple[int, str]:
    """One streaming request preferring a: (status, answering endpoint)."""
    async with http.post(px.url + URL, json=chat(), headers=PREFER) as r:
        await read_stream(r)
        return r.status, r.headers.get("X-GammaInfra-Endpoint", "")


async def state_of_a(http: aiohttp.ClientSession, px: RunningProxy) -> float:
    return (await scrape(http, px))("hedge_circuit_state", provider="a", model="up-a")


async def test_breaker_opens_probes_and_closes_through_the_proxy(http: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    async with sims(("a", DOWN), ("b", OK)) as ps:
        a, b = ps["a"], ps["b"]
        fixed = 30_000  # a hedge delay far beyond the test: only error hedges launch b
        route: dict[str, Any] = {
            "min_delay_ms": fixed, "max_delay_ms": fixed, "default_delay_ms": fixed, "max_attempts": 2,
        }  # fmt: skip
        feedback = {"failure_threshold": THRESHOLD, "base_backoff_s": BACKOFF, "max_backoff_s": 60.0}
        raw = raw_config({n: p.base_url for n, p in ps.items()}, fast=route, feedback=feedback)
        async with run_proxy(raw, clock=clock) as px:
            # closed: a is tried first and fails; the error hedge to b answers
            for i in range(THRESHOLD):
                assert await state_of_a(http, px) == CLOSED
                assert await call(http, px) == (200, "m/b@b")
                assert a.requests_total == i + 1
            # open: a is not tried at all, even preferred, even though it has recovered
            assert await state_of_a(http, px) == OPEN
            a.behaviour = OK
            clock.now += BACKOFF - 0.001
            assert await call(http, px) == (200, "m/b@b")
            assert a.requests_total == THRESHOLD
            assert await state_of_a(http, px) == OPEN

            # half-open: the backoff has elapsed; the next request is a's probe. It fails: re-opened
            # for twice the backoff, and b answers through the error hedge
            clock.now += 0.001
            assert await state_of_a(http, px) == HALF_OPEN
            a.behaviour = DOWN
            b0 = b.requests_total
            assert await call(http, px) == (200, "m/b@b")
            assert (a.requests_total, b.requests_total - b0) == (THRESHOLD + 1, 1)
            assert await state_of_a(http, px) == OPEN
            a.behaviour = OK
            clock.now += BACKOFF  # the first backoff again: not enough any more
            assert await call(http, px) == (200, "m/b@b")
            assert a.requests_total == THRESHOLD + 1
            assert await state_of_a(http, px) == OPEN

            # half-open again after the doubled backoff; this probe succeeds and closes the breaker
            clock.now += BACKOFF
            assert await state_of_a(http, px) == HALF_OPEN
            b0 = b.requests_total
            assert await call(http, px) == (200, "m/a@a")
            assert (a.requests_total, b.requests_total) == (THRESHOLD + 2, b0)  # the probe went alone
            assert await state_of_a(http, px) == CLOSED
            # closed for good: a serves the next requests at once, with no clock movement
            for _ in range(3):
                assert await call(http, px) == (200, "m/a@a")
            assert a.requests_total == THRESHOLD + 5
            m = await scrape(http, px)
    # the outcomes the providers' requests had, as the proxy counted them
    attempts: dict[tuple[str, str], float] = {}
    for lab, v in m.series("hedge_attempts_total"):  # summed over the api label
        key = (lab["provider"], lab["outcome"])
        attempts[key] = attempts.get(key, 0.0) + v
    assert attempts[("a", "failed")] == THRESHOLD + 1  # two to open it, one failed probe
    assert attempts[("a", "won")] == 4  # the good probe and three requests after it
    assert m("hedge_hedges_total", route="gammainfra/fast", reason="error") == THRESHOLD + 1
    assert m("hedge_hedges_total", route="gammainfra/fast", reason="delay") == 0
