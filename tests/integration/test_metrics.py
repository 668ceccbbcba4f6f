"""`GET /metrics` is valid Prometheus exposition text and its counters agree with what the test did.

A scripted sequence of requests through `gammainfra/fast` with a fixed hedge delay (min = max = default),
`X-GammaInfra-Preference: a` on every request (so a is always attempt 1) and a small hedge bucket, so
that every counter has one exact expected value: wins, a delay hedge, a hedge refused by the budget, an
error hedge, a caller 400, and two client disconnects (one before the hedge, one after). The exposition
is parsed with prometheus-client's own parser, which rejects malformed text.

The proxy runs on a `ManualClock`: its hedge timer fires only when the test moves the clock, so "after
the delay" is a step the test takes (once the timer is armed), and "before the delay" holds however
slowly the machine runs. Nothing here waits on wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hedge.clock import ManualClock
from hedge.simprovider import Behaviour, SimProvider

from ..conftest import RunningProxy, chat, eventually, raw_config, run_proxy, sims

URL = "/v1/chat/completions"
ROUTE = "gammainfra/fast"
# Fixed hedge delay, on the proxy's manual clock: it passes only when `hedge_fires` moves the clock.
DELAY = 1.0
PREFER = {"X-GammaInfra-Preference": "a"}
FAST = Behaviour(ttft=0.0, tokens=5, prompt_tokens=10)  # usage: 10 prompt + 5 completion tokens
PROMPT_ESTIMATE = 4  # what the proxy bills a cancelled attempt for chat(): "hi" = 0 chars/4 + 4 per message


def held(**kw: Any) -> Behaviour:
    """A provider held before its first content token until the test opens its gate (or never)."""
    return Behaviour(gate=asyncio.Event(), **kw)


class Exposition:
    """Parsed /metrics: sample values by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.families: dict[str, str] = {}
        for fam in text_string_to_metric_families(text):  # raises on malformed exposition text
            self.families[fam.name] = fam.type
            for s in fam.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def __call__(self, name: str, **labels: str) -> float:
        """The value of one sample (0.0 if absent: a counter that never moved has no child)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def series(self, name: str) -> Iterator[tuple[dict[str, str], float]]:
        for (n, labels), v in self.samples.items():
            if n == name:
                yield dict(labels), v


async def scrape(http: aiohttp.ClientSession, px: RunningProxy) -> Exposition:
    async with http.get(px.url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Exposition(await r.text())


def parse_server_timing(value: str) -> dict[str, dict[str, str]]:
    """Parse a Server-Timing header (RFC: `#metric-name *( OWS ";" OWS name OWS "=" OWS value )`, where
    names are tokens and values tokens or quoted strings); raises AssertionError if it is malformed."""
    token = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
    quoted = r'"(?:[^"\\]|\\.)*"'
    param = rf"\s*;\s*({token})\s*=\s*({token}|{quoted})"
    metric = re.compile(rf"\s*({token})((?:{param})*)\s*(?:,|$)")
    out: dict[str, dict[str, str]] = {}
    pos = 0
    while pos < len(value):
        m = metric.match(value, pos)
        assert m and m.end() > pos, f"malformed Server-Timing at {value[pos:]!r}"
        params: dict[str, str] = {}
        for pm in re.finditer(param, m.group(2)):
            v = pm.group(2)
            params[pm.group(1)] = v[1:-1] if v.startswith('"') else v
        out[m.group(1)] = params
        pos = m.end()
    return out


async def post(http: aiohttp.ClientSession, px: RunningProxy) -> tuple[int, dict[str, str], bytes]:
    async with http.post(px.url + URL, json=chat(ROUTE), headers=PREFER) as r:
        return r.status, dict(r.headers), await r.read()


async def hedge_fires(clock: ManualClock) -> None:
    """Let the hedge delay pass: wait until the request's hedge timer is armed, then move the clock."""
    assert await eventually(lambda: clock.waiting == 1, timeout=10.0)
    clock.advance(DELAY)


async def disconnect_when(
    http: aiohttp.ClientSession,
    px: RunningProxy,
    ready: Callable[[], bool],
    ps: dict[str, SimProvider],
    n: int,
    *,
    after_hedge: ManualClock | None = None,
) -> None:
    """Send a request (letting its hedge delay pass on `after_hedge`'s clock, if given) and hang up as
    soon as `ready()`; wait until the proxy has counted the 499 and every provider saw its connection
    closed (n = how many 499s there should be by then)."""
    req = asyncio.ensure_future(post(http, px))
    if after_hedge is not None:
        await hedge_fires(after_hedge)
    assert await eventually(ready, timeout=10.0)
    req.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await req
    m = px.proxy.metrics.requests.labels(ROUTE, "499", "chat")
    assert await eventually(lambda: m._value.get() == n, timeout=5.0)
    assert await eventually(lambda: all(r.ended for p in ps.values() for r in p.records), timeout=5.0)


async def test_metrics_agree_with_a_scripted_run(http: aiohttp.ClientSession) -> None:
    async with sims(("a", FAST), ("b", FAST)) as ps:
        ms = DELAY * 1000
        route: dict[str, Any] = {
            "min_delay_ms": ms, "max_delay_ms": ms, "default_delay_ms": ms, "max_attempts": 2,
            # the bucket starts with 1 token and gains 0.5 per request: see the comments below
            "hedge_budget": 0.5, "hedge_burst": 1,
        }  # fmt: skip
        raw = raw_config({n: p.base_url for n, p in ps.items()}, fast=route)
        clock = ManualClock()
        async with run_proxy(raw, clock=clock, timer=clock) as px:
            a, b = ps["a"], ps["b"]
            # 1-3: a wins before the delay, which never passes (tokens: 1, capped)
            for _ in range(3):
                status, headers, _ = await post(http, px)
                assert status == 200 and headers["X-GammaInfra-Endpoint"] == "m/a@a"
            timing = parse_server_timing(headers["Server-Timing"])
            # 4: a hangs; the delay hedge (paid: tokens 1 -> 0) goes to b, which wins; a is cancelled
            a.behaviour = held()
            req = asyncio.ensure_future(post(http, px))
            await hedge_fires(clock)
            status, headers, _ = await req
            assert status == 200 and headers["X-GammaInfra-Endpoint"] == "m/b@b"
            hedged_timing = parse_server_timing(headers["Server-Timing"])
            # 5: a holds; at the delay the hedge is refused (tokens 0.5 < 1); then a answers and wins
            a.behaviour = gated = held(tokens=5, prompt_tokens=10)
            req = asyncio.ensure_future(post(http, px))
            await hedge_fires(clock)
            refusals = px.proxy.metrics.budget_refusals.labels(ROUTE)
            assert await eventually(lambda: refusals._value.get() == 1, timeout=10.0)
            assert gated.gate is not None
            gated.gate.set()
            status, headers, _ = await req
            assert status == 200 and headers["X-GammaInfra-Endpoint"] == "m/a@a"
            # 6: a fails with a 503: an error hedge to b (not budgeted; tokens 1.0), b wins
            a.behaviour = Behaviour(status=503)
            status, headers, _ = await post(http, px)
            assert status == 200 and headers["X-GammaInfra-Endpoint"] == "m/b@b"
            # 7: a says the request is bad (400): returned as it is, nothing else launched
            a.behaviour = Behaviour(status=400)
            status, _, body = await post(http, px)
            assert status == 400 and b"error" in body
            # 8: the client hangs up before the hedge (as soon as a has the request): a is abandoned
            a.behaviour = held()
            b.behaviour = held()
            await disconnect_when(http, px, lambda: a.requests_total == 8, ps, 1)
            # 9: the client hangs up after the hedge (paid: tokens 1 -> 0; as soon as b has it): a and
            # b are abandoned
            await disconnect_when(http, px, lambda: b.requests_total == 3, ps, 2, after_hedge=clock)
            assert await eventually(lambda: not px.proxy.tasks)
            m = await scrape(http, px)

    assert (a.requests_total, b.requests_total) == (9, 3)
    # requests by route and code
    assert {lab["code"]: v for lab, v in m.series("hedge_requests_total")} == {"200": 6, "400": 1, "499": 2}
    # attempts by outcome: one outcome per upstream request the providers saw
    attempts: dict[tuple[str, str], float] = {}
    for lab, v in m.series("hedge_attempts_total"):  # summed over the api label
        key = (lab["provider"], lab["outcome"])
        attempts[key] = attempts.get(key, 0.0) + v
    assert attempts == {
        ("a", "won"): 4, ("a", "cancelled"): 1, ("a", "failed"): 1, ("a", "rejected"): 1,
        ("a", "abandoned"): 2, ("b", "won"): 2, ("b", "abandoned"): 1,
        ("b", "failed"): 0,  # created at zero at start-up, like every configured candidate's
    }  # fmt: skip
    assert sum(v for (p, _), v in attempts.items() if p == "a") == a.requests_total
    assert sum(v for (p, _), v in attempts.items() if p == "b") == b.requests_total
    # hedges by reason, and the budget
    assert m("hedge_hedges_total", route=ROUTE, reason="delay") == 2
    assert m("hedge_hedges_total", route=ROUTE, reason="error") == 1
    assert m("hedge_budget_refusals_total", route=ROUTE) == 1
    assert m("hedge_hedge_delay_seconds", route=ROUTE) == DELAY
    assert m("hedge_hedge_budget_ratio", route=ROUTE) == 0.5  # the configured budget, for dashboards
    # latency histograms: one client TTFT per 200; one upstream TTFT per first token
    assert m("hedge_client_ttft_seconds_count", route=ROUTE) == 6
    assert m("hedge_upstream_ttft_seconds_count", provider="a", model="up-a") == 4
    assert m("hedge_upstream_ttft_seconds_count", provider="b", model="up-b") == 2
    assert m("hedge_upstream_duration_seconds_count", provider="a", model="up-a") == 4
    assert m("hedge_upstream_duration_seconds_count", provider="b", model="up-b") == 2
    le = {lab["le"] for lab, _ in m.series("hedge_client_ttft_seconds_bucket")}
    assert {"0.005", "60.0", "+Inf"} <= le  # buckets from 5 ms to 60 s
    # tokens and cost of the served responses: 10 prompt + 5 completion tokens each, $1 / $2 per Mtok
    for model, provider, served in (("m/a", "a", 4), ("m/b", "b", 2)):
        assert m("hedge_tokens_total", model=model, provider=provider, kind="prompt") == 10 * served
        assert m("hedge_tokens_total", model=model, provider=provider, kind="completion") == 5 * served
        assert m("hedge_cost_usd_total", model=model, provider=provider) == pytest.approx(
            served * (10 * 1.0 + 5 * 2.0) / 1e6, rel=1e-12
        )
    # waste: every cancelled or abandoned attempt is billed its prompt estimate, by why it was cut:
    # a lost one hedge race (request 4), and a and b were abandoned by the client (requests 8, 9)
    for model, provider, reason, wasted in (
        ("m/a", "a", "lost", 1), ("m/a", "a", "abandoned", 2), ("m/b", "b", "abandoned", 1),
    ):  # fmt: skip
        labels = {"model": model, "provider": provider, "reason": reason}
        assert m("hedge_wasted_tokens_total", **labels) == PROMPT_ESTIMATE * wasted
        assert m("hedge_wasted_cost_usd_total", **labels) == pytest.approx(
            PROMPT_ESTIMATE * wasted * 1.0 / 1e6, rel=1e-12
        )
    assert {lab["reason"] for lab, _ in m.series("hedge_wasted_tokens_total")} == {"lost", "abandoned"}
    # gauges back at rest; breakers closed (one 503 is below the threshold; a caller 400 is no failure)
    assert m("hedge_inflight_requests") == 0
    assert all(v == 0 for _, v in m.series("hedge_inflight_attempts"))
    assert {lab["provider"]: v for lab, v in m.series("hedge_circuit_state")} == {"a": 0, "b": 0}
    assert m.families["hedge_upstream_ttft_seconds"] == "histogram"
    assert m.families["hedge_attempts"] == "counter"
    # Server-Timing: setup <= ttft, the winning endpoint, the number of attempts
    for t, endpoint, attempts_n in ((timing, "m/a@a", 1), (hedged_timing, "m/b@b", 2)):
        assert set(t) == {"setup", "ttft", "race"}
        assert 0.0 <= float(t["setup"]["dur"]) <= float(t["ttft"]["dur"])
        assert t["ttft"]["desc"] == endpoint
        assert t["race"]["desc"] == f"attempts={attempts_n}"
    assert float(hedged_timing["ttft"]["dur"]) == DELAY * 1000  # the clock moved by exactly the delay


async def test_cooling_down_is_counted_and_shown(http: aiohttp.ClientSession) -> None:
    """Requests refused because every provider is cooling down are counted (503) and the breaker
    state is exported: 2 = open."""
    async with sims(("a", Behaviour(status=503))) as ps:
        raw = raw_config({"a": ps["a"].base_url}, feedback={"failure_threshold": 2, "base_backoff_s": 60})
        async with run_proxy(raw) as px:
            for _ in range(2):
                async with http.post(px.url + URL, json=chat("m/a")) as r:
                    assert r.status == 502
            async with http.post(px.url + URL, json=chat("m/a")) as r:
                assert r.status == 503
                assert (await r.json())["error"]["code"] == "providers_unavailable"
                assert int(r.headers["Retry-After"]) >= 59
            m = await scrape(http, px)
    assert ps["a"].requests_total == 2
    assert {lab["code"]: v for lab, v in m.series("hedge_requests_total")} == {"502": 2, "503": 1}
    assert m("hedge_attempts_total", provider="a", model="up-a", outcome="failed", api="chat") == 2
    assert m("hedge_circuit_state", provider="a", model="up-a") == 2
    assert m("hedge_client_ttft_seconds_count", route="m/a") == 0


def test_server_timing_parser_rejects_malformed_values() -> None:
    assert parse_server_timing('a;dur=1.5, b;desc="x, y";dur=2') == {
        "a": {"dur": "1.5"},
        "b": {"desc": "x, y", "dur": "2"},
    }
    for bad in ('a;desc="unterminated', "a;dur", "a b", ";dur=1", "a;desc=m/a@a"):
        with pytest.raises(AssertionError):
            parse_server_timing(bad)
