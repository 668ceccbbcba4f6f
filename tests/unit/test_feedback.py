"""Feedback + AdaptiveDelay + Race on a fake clock: exact, deterministic, no sockets.

Most tests drive the real decision objects (`Feedback.order`, `AdaptiveDelay`, `HedgeBudget`, `Race`)
through thousands of simulated requests with `Sim`, a thin layer over `hedge.sim.Loop` (the simulator's
own discrete-event loop, so both judge the same thing): requests arrive at fixed intervals, each
provider's answer for an attempt comes from a scripted function of (provider, launch time), and the
loop reports to `Feedback` exactly what the proxy reports (first token, failure, cancelled with the
elapsed time and whether the attempt lost). Everything is seeded, so the figures are exact for a given
code version; the assertions still use margins that state the property, not the figure.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hedge.catalog import Candidate, Catalog
from hedge.config import parse_config
from hedge.errors import ApiError, NoCandidates
from hedge.feedback import Feedback, dial_multiplier
from hedge.health import BreakerState
from hedge.race import Failure, FailureKind
from hedge.request import parse_cost_quality, parse_preference
from hedge.sim import Ended, Loop, Req
from hedge.stats import DecayingHistogram

from ..conftest import raw_config

ROUTE = "gammainfra/fast"
CONNECT = Failure(FailureKind.RETRYABLE, "connect")

# The fake-clock figures README.md quotes ("Measured with a fake clock"), pinned here to +-10 % so the
# README and the code cannot drift apart: change the policy, and these (and the README) must follow.
README_FIGURES: dict[str, float] = {
    "order flips to the faster provider (s)": 1.0,
    "order flips back after the recovery (s)": 1.0,
    "delay reaches 2.5 s after the slowdown (s)": 4.2,
    "delay back under 1 s after the recovery (s)": 2.9,
    "delay back to 0.35 s after the recovery (s)": 37.8,
    "all-slow extra attempts": 190,
    "all-slow bound": 207,
    "all-slow extra attempts without a budget": 2381,
}


def pinned(name: str, measured: float) -> None:
    want = README_FIGURES[name]
    assert abs(measured - want) <= 0.1 * want, f"{name}: measured {measured}, README says {want}"


# ------------------------------------------------------------------------------------------ the sim


@dataclass(frozen=True)
class Answer:
    """What a provider does with one attempt: first token (or `failure`) `after` seconds after launch."""

    after: float
    failure: Failure | None = None


Script = Callable[[str, float], Answer]  # (provider name, launch time) -> Answer


class Sim(Loop):
    """`hedge.sim`'s event loop with scripted providers, recording what Feedback was told.

    The loop (arrivals, order, race, reports to Feedback) is the simulator's own, so these tests and
    `python -m hedge.sim` judge the same thing; this layer adds a config, scripts and the recording.
    """

    fb: Feedback

    def __init__(self, route: dict[str, Any], script: Script, *, providers: Sequence[str] = ("a", "b")):
        raw = raw_config({p: f"http://{p}.invalid/v1" for p in providers}, fast=route)
        self.catalog = Catalog(parse_config(raw))
        plan = self.catalog.resolve(ROUTE)

        def outcome(r: Req, c: Candidate, now: float) -> tuple[float, Failure | None]:
            ans = script(c.provider.name, now)
            return ans.after, ans.failure

        super().__init__(plan, Feedback(self.catalog.config.feedback), outcome)
        self.requests: list[Req] = []
        # what Feedback was told, per provider: (time, value)
        self.exact: dict[str, list[tuple[float, float]]] = {p: [] for p in providers}
        self.censored: dict[str, list[tuple[float, float]]] = {p: [] for p in providers}
        self.exact_as_hedge: dict[str, list[tuple[float, float]]] = {p: [] for p in providers}
        # breaker state of the candidate at each launch; attempts launched on a breaker that was not
        # closed (probes) in flight per provider, and the most ever at once
        self.launch_states: list[tuple[float, str, BreakerState]] = []
        self.probes_inflight: dict[str, int] = {p: 0 for p in providers}
        self.max_probes_inflight: dict[str, int] = {p: 0 for p in providers}
        self._probes: set[tuple[int, int]] = set()  # (request, attempt) of the probes in flight
        self.hooks: list[Callable[[Sim, Req], None]] = []  # called after each request's order

    def cand(self, provider: str) -> Candidate:
        (c,) = [c for c in self.plan.candidates if c.provider.name == provider]
        return c

    # ------------------------------------------------------------------------------ driving

    def run(
        self,
        until: float,
        rate: float,
        *,
        dial: float = 0.5,
        preference: Sequence[str] = (),
    ) -> list[Req]:
        """Requests arrive every 1/rate s from `self.now` until `until`; runs until all are done."""
        n = max(0, math.ceil((until - self.now) * rate - 1e-9))
        k0, start = len(self.requests), self.now
        out = [Req(k0 + k, start + k / rate, dial=dial, preference=tuple(preference)) for k in range(n)]
        self.serve(out)
        self.now = max(self.now, until)
        self.requests += out
        return out

    def ordered(self, r: Req) -> None:
        for hook in self.hooks:
            hook(self, r)

    def launching(self, r: Req, attempt: int, c: Candidate) -> None:
        p, state = c.provider.name, self.fb.breaker(c).state(self.now)
        self.launch_states.append((self.now, p, state))
        if state is not BreakerState.CLOSED:
            self._probes.add((r.k, attempt))
            self.probes_inflight[p] += 1
            self.max_probes_inflight[p] = max(self.max_probes_inflight[p], self.probes_inflight[p])

    def ended(self, r: Req, attempt: int, elapsed: float, how: Ended) -> None:
        p = r.cands[attempt].provider.name
        if (r.k, attempt) in self._probes:
            self._probes.remove((r.k, attempt))
            self.probes_inflight[p] -= 1
        if how == "answered":
            self.exact[p].append((self.now, elapsed))
            if attempt > 0:
                self.exact_as_hedge[p].append((self.now, elapsed))
        elif how == "cancelled":
            self.censored[p].append((self.now, elapsed))

    # ------------------------------------------------------------------------------ reading

    def delay(self, provider: str, dial: float = 0.5) -> float:
        """The hedge delay `provider` would get as the running candidate of a request starting now."""
        c = self.cand(provider)
        pol = self.fb.delay_policy(self.plan, [c], self.now, dial)
        assert pol is not None
        d = pol.delay(0)
        assert d is not None
        return d


def primary(r: Req) -> str | None:
    return r.launches[0][0] if r.launches else None


def extra_attempts(reqs: Sequence[Req], reason: str | None = None) -> int:
    return sum(1 for r in reqs for (_, why, _) in r.launches if why != "initial" and reason in (None, why))


def p99(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)]


def within_bucket(x: float, target: float) -> bool:
    """Equal up to the stats histogram's resolution (20 buckets per decade: ratio 10**(1/20) ~ 1.12)."""
    return abs(math.log(x / target)) <= math.log(10 ** (1 / 20)) + 1e-9


def phased(phases: Sequence[tuple[float, float]]) -> Callable[[float], float]:
    """A piecewise-constant TTFT: phases = [(start_time, ttft), ...] in time order."""

    def ttft(t: float) -> float:
        v = phases[0][1]
        for start, value in phases:
            if t >= start:
                v = value
        return v

    return ttft


# ---------------------------------------------------------------------------------- the delay


def test_hedge_delay_follows_a_primary_from_300ms_to_3s_and_back() -> None:
    # a is pinned first (X-GammaInfra-Preference) so it stays the primary; b is the steady hedge at 1 s.
    # a: 0.3 s for 60 s, 3 s for 60 s, 0.3 s again. 10 requests/s.
    a_ttft = phased([(0.0, 0.3), (60.0, 3.0), (120.0, 0.3)])
    sim = Sim(
        {"quantile": 0.95, "min_delay_ms": 25, "max_delay_ms": 5000, "default_delay_ms": 500,
         "max_attempts": 2, "hedge_budget": 0.1, "hedge_burst": 5},
        lambda p, t: Answer(a_ttft(t) if p == "a" else 1.0),
    )  # fmt: skip
    trace: list[tuple[float, float]] = []
    sim.hooks.append(lambda s, r: trace.append((s.now, s.delay("a"))))
    sim.run(until=180.0, rate=10.0, preference=["a"])

    def at(t: float) -> float:
        return [d for (when, d) in trace if when <= t][-1]

    def first_time(cond: Callable[[float], bool], after: float) -> float:
        return next(when for (when, d) in trace if when >= after and cond(d))

    assert trace[0][1] == 0.5  # cold start: default_delay_ms until min_samples
    assert within_bucket(at(59.9), 0.3)
    assert within_bucket(at(119.9), 3.0)  # exact 3 s samples arrived once the delay passed them
    assert within_bucket(at(179.9), 0.3)
    up = first_time(lambda d: d >= 2.5, 60.0) - 60.0
    down = first_time(lambda d: d <= 0.35, 120.0) - 120.0
    # within a few answers of the recovery the delay is capped at 3 x their median (0.9 s, + a bucket)
    near = first_time(lambda d: d <= 1.05, 120.0) - 120.0
    print(
        f"\ndelay follows: reaches 2.5 s {up:.1f} s after the slowdown; after the recovery "
        f"<= 1 s within {near:.1f} s, back to 0.35 s {down:.1f} s after"
    )
    assert near < 5.0
    pinned("delay reaches 2.5 s after the slowdown (s)", up)
    pinned("delay back under 1 s after the recovery (s)", near)
    pinned("delay back to 0.35 s after the recovery (s)", down)
    # "within seconds" at the default half-life of 10 s: up in a few seconds (every answer above the
    # delay is news), down within ~5 half-lives (3 s mass must decay below 5 % of the weight)
    assert up < 15.0
    assert down < 60.0
    # the climb goes through censored samples: a was cancelled while it was slow (b won) before its
    # real 3 s answers were seen, and the censored values only ever pushed its estimate up
    assert any(60.0 <= t < 120.0 for (t, _) in sim.censored["a"])


def test_delay_is_clamped_and_defaults_while_samples_are_few() -> None:
    sim = Sim(
        {"quantile": 0.9, "min_delay_ms": 100, "max_delay_ms": 800, "default_delay_ms": 250},
        lambda p, t: Answer(0.01),
    )
    a = sim.cand("a")
    assert sim.delay("a") == 0.25
    for _ in range(2):
        sim.fb.on_first_token(a, 0.01, 2.0)
    sim.now = 2.0
    assert sim.delay("a") == 0.25  # 2 samples < min_samples (3)
    sim.fb.on_first_token(a, 0.01, 2.0)
    assert sim.delay("a") == 0.1  # 10 ms clamped up to min_delay_ms
    for k in range(50):
        sim.fb.on_first_token(a, 5.0, 3.0 + k * 0.01)
    sim.now = 3.5
    assert sim.delay("a") == 0.8  # clamped down to max_delay_ms


# ---------------------------------------------------------------------------------- the order


def test_order_flips_to_the_faster_provider_and_back() -> None:
    rng = random.Random(7)
    a_ttft = phased([(0.0, 0.3), (60.0, 3.0), (120.0, 0.3)])

    def script(p: str, t: float) -> Answer:
        jitter = rng.lognormvariate(0.0, 0.15)
        return Answer((a_ttft(t) if p == "a" else 1.0) * jitter)

    sim = Sim(
        {"quantile": 0.95, "min_delay_ms": 25, "max_delay_ms": 3000, "default_delay_ms": 500,
         "max_attempts": 2, "hedge_budget": 0.1, "hedge_burst": 5},
        script,
    )  # fmt: skip
    reqs = sim.run(until=240.0, rate=10.0)

    def primaries(t0: float, t1: float) -> list[str | None]:
        return [primary(r) for r in reqs if t0 <= r.arrival < t1]

    def share(t0: float, t1: float, p: str) -> float:
        ps = primaries(t0, t1)
        return ps.count(p) / len(ps)

    def flip_time(after: float, p: str) -> float:
        """First arrival after `after` from which `p` is the primary of 20 requests in a row."""
        rs = [r for r in reqs if r.arrival >= after]
        for k in range(len(rs) - 20):
            if all(primary(r) == p for r in rs[k : k + 20]):
                return rs[k].arrival - after
        return math.inf

    to_b = flip_time(60.0, "b")
    back = flip_time(120.0, "a")
    print(f"\norder: flips to b {to_b:.1f} s after a slows down, back to a {back:.1f} s after it recovers")
    pinned("order flips to the faster provider (s)", to_b)
    pinned("order flips back after the recovery (s)", back)
    assert share(30.0, 60.0, "a") >= 0.95  # learned: a is the faster one
    # the order follows the decayed *median*: it flips once the slow answers outweigh the fast ones
    # still remembered, i.e. about one half-life (10 s) plus the 3 s it takes to see a slow answer
    assert to_b < 20.0
    assert share(to_b + 60.0 + 5.0, 120.0, "b") >= 0.9  # and it stays flipped while a is slow
    assert back < 20.0  # a recovered provider is re-measured once its old samples decay (~2 half-lives)
    assert share(120.0 + back + 5.0, 240.0, "a") >= 0.9
    # once flipped, the client no longer waits for the slow provider: b (~1 s) serves, a is only
    # re-measured now and then (as the primary when its samples have decayed, with b hedging it).
    # Before the flip the hedge budget (10 %) lets most requests wait for a: the price of a budget.
    flipped = [r.ttft for r in reqs if 60.0 + to_b + 5.0 <= r.arrival < 120.0 and r.ttft is not None]
    assert p99(flipped) < 2.0


def test_config_order_breaks_ties_and_unknown_sorts_first() -> None:
    sim = Sim({}, lambda p, t: Answer(0.1), providers=("a", "b", "c"))
    fb, plan = sim.fb, sim.plan
    assert [c.provider.name for c in fb.order(plan, 0.0)] == ["a", "b", "c"]  # cold: config order
    for k in range(5):
        fb.on_first_token(sim.cand("a"), 0.3, float(k))
        fb.on_first_token(sim.cand("b"), 0.1, float(k))
    # c has no samples: it is explored, raced right behind the best known one (launched with it, so
    # the caller never waits on a guess); then by expected TTFT
    explored = fb.order(plan, 4.5)
    assert [c.provider.name for c in explored] == ["b", "c", "a"]
    assert explored.explore is sim.cand("c")
    d = fb.delay_policy(plan, explored, 4.5, 0.5)
    assert d is not None and d.delay(0) == 0.0  # the second attempt starts at once
    # exploring is paid from its own bucket (burst 2): one more request explores c, then it is empty;
    # with the hedge bucket below half full too, c, still unknown, sorts after the known ones
    assert fb.order(plan, 4.501).explore is sim.cand("c")
    hedges = fb.budget(plan.route)
    while hedges.tokens >= hedges.burst / 2:
        assert hedges.try_spend()
    again = fb.order(plan, 4.502)
    assert [c.provider.name for c in again] == ["b", "a", "c"]
    assert again.explore is None
    plain = fb.delay_policy(plan, again, 4.502, 0.5)
    assert plain is not None and plain.delay(0) > 0.0


def test_erroring_provider_sorts_after_the_healthy_ones() -> None:
    sim = Sim({}, lambda p, t: Answer(0.1))
    fb, a, b = sim.fb, sim.cand("a"), sim.cand("b")
    for k in range(3):
        fb.on_first_token(a, 0.05, k * 0.1)
        fb.on_first_token(b, 0.5, k * 0.1)
    for k in range(4):  # below the breaker's threshold (5), but a majority of recent outcomes
        fb.on_failure(a, CONNECT, 1.0 + k * 0.1)
    assert fb.breaker(a).state(1.5) is BreakerState.CLOSED
    assert fb.error_rate(a, 1.5) == pytest.approx(4 / 7, rel=0.05)
    # 10x faster, but failing more often than not: healthy b leads
    assert [c.provider.name for c in fb.order(sim.plan, 1.5)] == ["b", "a"]
    # once a's outcomes have decayed below min_samples, the old errors are forgotten too: a leads again
    # (its latency samples are forgotten as well, so it is unknown and measured afresh)
    assert [c.provider.name for c in fb.order(sim.plan, 1.5 + 4 * fb.cfg.half_life_s)] == ["a", "b"]


def test_preference_reorders_for_one_request_only() -> None:
    sim = Sim({}, lambda p, t: Answer(0.1), providers=("a", "b", "c"))
    fb, plan = sim.fb, sim.plan
    for k in range(5):
        for p, v in (("a", 0.1), ("b", 0.2), ("c", 0.3)):
            fb.on_first_token(sim.cand(p), v, float(k))

    def names(pref: Sequence[str]) -> list[str]:
        return [c.provider.name for c in fb.order(plan, 5.0, pref)]

    assert names(()) == ["a", "b", "c"]
    assert names(("c",)) == ["c", "a", "b"]  # by provider; the rest keep the learned order
    assert names(("m/b@b", "c")) == ["b", "c", "a"]  # by endpoint, in the preference's order
    assert names(("m/c",)) == ["c", "a", "b"]  # by model
    assert names(()) == ["a", "b", "c"]  # nothing sticks
    # a cooling-down provider is not resurrected by a preference
    for _ in range(5):
        fb.on_failure(sim.cand("c"), CONNECT, 5.0)
    assert names(("c",)) == ["a", "b"]
    # the header parser: known names pass, anything else is a 400 naming the header
    known = {"a", "b", "c", "m/a", "m/b@b"}
    assert parse_preference(" b , m/a ", known) == ("b", "m/a")
    assert parse_preference(None, known) == ()
    for bad in ("", " , ", "zeta", "b,zeta"):
        with pytest.raises(ApiError) as ei:
            parse_preference(bad, known)
        assert ei.value.status == 400 and ei.value.param == "X-GammaInfra-Preference"


def test_preference_steers_the_race() -> None:
    # b is faster and would lead; a preference for a makes a the primary, with b as its hedge
    sim = Sim({"default_delay_ms": 200, "max_attempts": 2}, lambda p, t: Answer(0.3 if p == "a" else 0.1))
    sim.run(until=10.0, rate=10.0)
    assert primary(sim.requests[-1]) == "b"
    reqs = sim.run(until=20.0, rate=10.0, preference=["a"])
    assert all(primary(r) == "a" for r in reqs)
    assert all(r.winner == "a" for r in reqs[-10:])  # 0.3 s is below a's own learned delay


# ------------------------------------------------------------------------------------ health


def test_failing_provider_is_skipped_until_its_probe_succeeds() -> None:
    # a (fast, 50 ms) fails with 503 after 20 ms from t=10 s to t=40 s; b is steady at 200 ms.
    def script(p: str, t: float) -> Answer:
        if p == "a" and 10.0 <= t < 40.0:
            return Answer(0.02, Failure(FailureKind.RETRYABLE, "http_503", 503))
        return Answer(0.05 if p == "a" else 0.2)

    sim = Sim(
        {"min_delay_ms": 25, "max_delay_ms": 3000, "default_delay_ms": 300, "max_attempts": 2},
        script,
    )
    reqs = sim.run(until=70.0, rate=20.0)
    a = sim.cand("a")
    cfg = sim.fb.cfg
    a_launches = [(t, st) for (t, p, st) in sim.launch_states if p == "a"]
    # never launched while its breaker is open; launched while half-open only as the one probe
    assert all(st is not BreakerState.OPEN for _, st in a_launches)
    assert sim.max_probes_inflight["a"] == 1
    in_window = [(t, st) for (t, st) in a_launches if 10.0 <= t < 40.0]
    probes = [t for (t, st) in in_window if st is BreakerState.HALF_OPEN]
    closed = [t for (t, st) in in_window if st is BreakerState.CLOSED]
    # up to the threshold while closed (fewer: after a few failures a also drops behind b), then probes
    # backing off 1, 2, 4, 8, 16 s: a handful of attempts in 30 s instead of 600
    assert len(closed) <= cfg.failure_threshold
    assert 3 <= len(probes) <= 6
    gaps = [t1 - t0 for t0, t1 in itertools.pairwise(probes)]
    assert all(g2 > g1 for g1, g2 in itertools.pairwise(gaps))  # exponential backoff
    # every request in the window was still served, by b, without waiting for a's errors
    window = [r for r in reqs if 10.0 <= r.arrival < 40.0]
    assert all(r.status == 200 for r in window)
    # after recovery: the first probe succeeds, the breaker closes, a is back as the primary
    after = [(t, st) for (t, st) in a_launches if t >= 40.0]
    assert after[0][1] is BreakerState.HALF_OPEN
    assert sim.fb.breaker(a).state(sim.now) is BreakerState.CLOSED
    assert all(primary(r) == "a" for r in reqs if r.arrival >= 65.0)
    print(f"\nprobes at {[round(t, 2) for t in probes]}; back in service at {after[0][0]:.2f} s")


def test_one_probe_at_a_time_while_requests_keep_arriving() -> None:
    # a hangs (times out after 2 s) from t=10 s to t=30 s; the dial is 0 (no delay hedges), so a probe
    # stays in flight for its full 2 s while 40 more requests arrive: none of them may launch a.
    def script(p: str, t: float) -> Answer:
        if p == "a" and 10.0 <= t < 30.0:
            return Answer(2.0, Failure(FailureKind.RETRYABLE, "timeout"))
        return Answer(0.05 if p == "a" else 0.2)

    sim = Sim({"default_delay_ms": 300, "max_attempts": 2}, script)
    reqs = sim.run(until=60.0, rate=20.0, dial=0.0)
    probes = [t for (t, p, st) in sim.launch_states if p == "a" and st is BreakerState.HALF_OPEN]
    assert len(probes) >= 2
    assert sim.max_probes_inflight["a"] == 1
    assert all(st is not BreakerState.OPEN for (_, p, st) in sim.launch_states if p == "a")
    # every request was served: the failed attempts (timeouts) failed over to b at once
    assert all(r.status == 200 for r in reqs)
    assert all(primary(r) == "a" for r in reqs if r.arrival >= 55.0)


def test_probe_is_taken_once_and_goes_first() -> None:
    sim = Sim({}, lambda p, t: Answer(0.1))
    fb, plan, a, b = sim.fb, sim.plan, sim.cand("a"), sim.cand("b")
    for k in range(10):
        fb.on_first_token(a, 0.05, k * 0.01)
        fb.on_first_token(b, 0.5, k * 0.01)
    for _ in range(fb.cfg.failure_threshold):
        fb.on_failure(a, CONNECT, 1.0)
    assert [c.provider.name for c in fb.order(plan, 1.5)] == ["b"]  # open: skipped
    # half-open at 2.0: the first request gets a as its first attempt (the probe), concurrent ones don't
    assert [c.provider.name for c in fb.order(plan, 2.0)] == ["a", "b"]
    assert [c.provider.name for c in fb.order(plan, 2.0)] == ["b"]
    assert [c.provider.name for c in fb.order(plan, 2.01)] == ["b"]
    # a preferred healthy candidate takes the lead: a half-open one is then left out, not probed
    # (a probe placed second might never launch, and would hold the slot)
    fb.on_cancelled(a, 0.01, 2.02, lost=False)  # the client left: no verdict, slot free again
    assert [c.provider.name for c in fb.order(plan, 2.03, ("b",))] == ["b"]
    assert fb.breaker(a).available(2.03)  # not taken by that request
    probe = fb.order(plan, 2.04)
    assert [c.provider.name for c in probe] == ["a", "b"] and probe.probe
    # the probe's caller is hedged even from an empty bucket: probes come at most one per backoff
    bucket = fb.budget(plan.route)
    probe_budget, other = (
        fb.request_budget(plan.route, probe),
        fb.request_budget(plan.route, fb.order(plan, 2.05)),
    )
    while bucket.try_spend():
        pass
    assert probe_budget.try_spend()
    assert not other.try_spend() and not probe_budget.try_spend()  # the others, and a second hedge, pay
    # the probe lost the race to the hedge: a failed probe, re-opened with the backoff doubled
    fb.on_cancelled(a, 0.6, 2.6, lost=True)
    assert fb.breaker(a).state(2.6) is BreakerState.OPEN
    assert fb.breaker(a).retry_at(2.6) == pytest.approx(2.6 + 2 * fb.cfg.base_backoff_s)
    # a loser that was not a probe changes nothing: losing is no failure
    fb.on_cancelled(b, 0.6, 2.6, lost=True)
    assert fb.breaker(b).state(2.6) is BreakerState.CLOSED
    assert fb.breaker(b).consecutive_failures == 0


def test_a_provider_back_from_an_outage_does_not_lead_on_its_old_answers() -> None:
    """The breaker opening drops its kept answers (they predate the outage): when its probe succeeds
    slowly (a restart that came back 10x slower), its pre-outage 50 ms answers do not make it lead."""
    sim = Sim({}, lambda p, t: Answer(0.1))
    fb, plan, a, b = sim.fb, sim.plan, sim.cand("a"), sim.cand("b")
    for k in range(10):
        fb.on_launch(a, k * 0.01)
        fb.on_first_token(a, 0.05, k * 0.01 + 0.05)
        fb.on_launch(b, k * 0.01)
        fb.on_first_token(b, 0.08, k * 0.01 + 0.08)
    assert fb.order(plan, 0.5)[0] is a
    for _ in range(fb.cfg.failure_threshold):
        fb.on_failure(a, CONNECT, 1.0)
    assert fb.evidence(a).estimate(1.0).ttft is None  # forgotten
    probe = fb.order(plan, 2.0)
    assert probe.probe and probe[0] is a
    fb.on_launch(a, 2.0)
    fb.on_first_token(a, 0.5, 2.5, launched_at=2.0)  # the probe succeeds, slowly: closed again
    assert fb.breaker(a).state(2.5) is BreakerState.CLOSED
    assert fb.order(plan, 2.5)[0] is b


def test_a_straggler_is_not_taken_for_the_probe() -> None:
    # attempts launched before the breaker opened are still in flight when the probe goes out; their
    # failures must not be read as the probe's verdict (that would double the backoff and free the slot
    # while the real probe is still running, letting a second probe overlap it)
    sim = Sim({}, lambda p, t: Answer(0.1))
    fb, a = sim.fb, sim.cand("a")
    for _ in range(fb.cfg.failure_threshold):
        fb.on_failure(a, CONNECT, 1.0, launched_at=0.5)
    assert fb.order(sim.plan, 2.0)[0] is a  # the probe, taken at t=2.0
    fb.on_failure(a, CONNECT, 2.1, launched_at=0.9)  # a straggler
    br = fb.breaker(a)
    assert br.state(2.1) is BreakerState.HALF_OPEN and not br.available(2.1)  # probe still out
    fb.on_cancelled(a, 1.3, 2.2, lost=True, launched_at=0.9)  # a straggler that lost a race
    assert br.state(2.2) is BreakerState.HALF_OPEN and not br.available(2.2)
    fb.on_failure(a, CONNECT, 2.5, launched_at=2.0)  # the probe itself
    assert br.state(2.5) is BreakerState.OPEN
    assert br.retry_at(2.5) == pytest.approx(2.5 + 2 * fb.cfg.base_backoff_s)


def test_every_candidate_cooling_down_is_a_503_with_retry_after() -> None:
    sim = Sim({}, lambda p, t: Answer(0.1))
    for p in ("a", "b"):
        sim.fb.on_failure(sim.cand(p), Failure(FailureKind.RETRYABLE, "http_429", 429, 7.0), 0.0)
    with pytest.raises(NoCandidates) as ei:
        sim.fb.order(sim.plan, 1.0)
    assert ei.value.model == sim.plan.name and ei.value.retry_after_s == pytest.approx(6.0)
    err = ei.value.as_api_error()  # what the edge answers
    assert err.status == 503 and err.code == "providers_unavailable"
    assert err.headers["Retry-After"] == "6"
    assert [c.provider.name for c in sim.fb.order(sim.plan, 7.0)] == ["a"]  # half-open: one probe


def test_caller_errors_do_not_count_against_the_provider() -> None:
    sim = Sim({}, lambda p, t: Answer(0.1))
    a = sim.cand("a")
    for _ in range(20):
        sim.fb.on_failure(a, Failure(FailureKind.CALLER, "http_400", 400), 0.0)
    assert sim.fb.breaker(a).state(0.0) is BreakerState.CLOSED
    assert sim.fb.error_rate(a, 0.0) == 0.0


# ------------------------------------------------------------------------------------ budget


def test_budget_holds_when_every_provider_is_slow_at_once() -> None:
    # three providers at ~100 ms for 20 s, then all at ~2 s for 100 s; 20 requests/s. The delays were
    # learned at 100 ms, so every request of the slowdown wants to hedge at once.
    def make_script(seed: int) -> Script:
        rng = random.Random(seed)

        def script(p: str, t: float) -> Answer:
            base = 0.1 if t < 20.0 else 2.0
            return Answer(base * rng.lognormvariate(0.0, 0.3))

        return script

    route = {"quantile": 0.95, "min_delay_ms": 25, "max_delay_ms": 3000, "default_delay_ms": 500,
             "max_attempts": 3}  # fmt: skip
    ratio, burst = 0.1, 5.0
    sim = Sim({**route, "hedge_budget": ratio, "hedge_burst": burst}, make_script(1), providers="abc")
    reqs = sim.run(until=120.0, rate=20.0)
    slow = [r for r in reqs if r.arrival >= 20.0]
    n, n_slow = len(reqs), len(slow)
    extra, extra_slow = extra_attempts(reqs), extra_attempts(slow)
    budget, explore = sim.fb.budget(sim.plan.route), sim.fb.explore_budget(sim.plan.route)
    # no errors here, so every extra attempt is a delay hedge or an exploration, paid from the buckets
    # (3/4 and 1/4 of the ratio, bursts `burst` and 2)
    burst += explore.burst
    assert extra == extra_attempts(reqs, "delay") == budget.spent + explore.spent
    assert extra <= ratio * n + burst
    assert extra_slow <= ratio * n_slow + burst
    # in any time window, not just in total: hedges launched <= burst + deposits (one per arrival)
    hedge_times = sorted(at for r in reqs for (_, why, at) in r.launches if why != "initial")
    for start in range(0, 120, 5):
        spent = sum(1 for t in hedge_times if start <= t < start + 5)
        arrived = sum(1 for r in reqs if start <= r.arrival < start + 5)
        assert spent <= ratio * arrived + burst
    # the same scenario with no budget to speak of: the budget was what held the load
    free = Sim({**route, "hedge_budget": 1.0, "hedge_burst": 1e6}, make_script(1), providers="abc")
    free_extra = extra_attempts([r for r in free.run(until=120.0, rate=20.0) if r.arrival >= 20.0])
    print(
        f"\nall slow: {extra_slow} extra attempts for {n_slow} requests "
        f"(budget {ratio * n_slow + burst:.0f}, refused {budget.refusals}); without a budget {free_extra}"
    )
    assert budget.refusals > 0
    assert free_extra > ratio * n_slow + burst  # without it the bound would not have held
    pinned("all-slow extra attempts", extra_slow)
    pinned("all-slow bound", ratio * n_slow + burst)
    pinned("all-slow extra attempts without a budget", free_extra)


def test_readme_quotes_the_pinned_figures() -> None:
    readme = (Path(__file__).parent.parent.parent / "README.md").read_text()
    start = readme.index("Measured with a fake clock")
    para = readme[start : readme.index("\n\n", start)]
    for name, value in README_FIGURES.items():
        text = f"{value:g}"
        assert text in para, f"README's fake-clock paragraph does not quote {name} = {text}"


# --------------------------------------------------------------------------------- censoring


def test_censored_samples_do_not_make_a_slow_provider_look_fast() -> None:
    # a: steady ~250 ms. b: 20 % of answers at 100 ms, 80 % at 2 s. b mostly runs as a hedge and
    # loses; the only answers it ever completes are its fast ones. Dropping the cancelled attempts
    # would leave exactly those, and b would look 2.5x faster than a.
    rng = random.Random(3)

    def script(p: str, t: float) -> Answer:
        if p == "a":
            return Answer(0.25 * rng.lognormvariate(0.0, 0.25))
        return Answer(0.1 if rng.random() < 0.2 else 2.0)

    sim = Sim(
        {"quantile": 0.9, "min_delay_ms": 25, "max_delay_ms": 3000, "default_delay_ms": 500,
         "max_attempts": 2, "hedge_budget": 0.2, "hedge_burst": 5},
        script,
    )  # fmt: skip
    reqs = sim.run(until=200.0, rate=10.0)
    a, b = sim.cand("a"), sim.cand("b")
    assert sim.censored["b"], "b must have lost races"
    # the naive estimator: what b's races as a hedge teach when cancellations are ignored (its wins only)
    naive = DecayingHistogram(sim.fb.cfg.half_life_s, min_weight=0.0)
    for t, v in sim.exact_as_hedge["b"]:
        naive.observe(v, t)
    naive_b = naive.quantile(0.5, sim.now)
    est_a = sim.fb.stats(a).expected_ttft(sim.now)
    # b now runs mostly as a hedge (and as primary only when explored), so its decayed weight can sit
    # below min_samples, where expected_ttft says "unknown" and b sorts behind a anyway; read the
    # median of the same histogram regardless, since the claim here is about what censoring puts in it
    hist_b = sim.fb.stats(b).ttft
    hist_b.min_weight = 0.0
    est_b = hist_b.quantile(0.5, sim.now)
    assert naive_b is not None and est_a is not None and est_b is not None
    late = [r for r in reqs if r.arrival >= 50.0]
    b_primary = sum(primary(r) == "b" for r in late) / len(late)
    print(
        f"\ncensoring: a median {est_a * 1000:.0f} ms; b median {est_b * 1000:.0f} ms "
        f"(exact samples only: {naive_b * 1000:.0f} ms); b primary for {b_primary:.1%} of requests"
    )
    assert naive_b < est_a  # the trap is real in this scenario...
    assert est_b > est_a  # ...and the censored samples keep b where it belongs: behind a
    # never below what its cancellations proved (censored values are lower bounds), give or take a bucket
    assert b_primary < 0.1  # b leads only when its samples have decayed (then it is measured again)


# ------------------------------------------------------------------------------- the dial


def test_cost_quality_dial_mapping() -> None:
    sim = Sim({"quantile": 0.5, "min_delay_ms": 10, "max_delay_ms": 3000}, lambda p, t: Answer(0.1))
    a = sim.cand("a")
    for k in range(20):
        sim.fb.on_first_token(a, 0.4, k * 0.01)
    sim.now = 0.5
    base = sim.delay("a")
    assert within_bucket(base, 0.4)
    assert sim.delay("a", dial=1.0) == pytest.approx(base / 2)  # 1 halves the delay
    assert sim.delay("a", dial=0.25) == pytest.approx(base * math.sqrt(2))
    assert sim.delay("a", dial=0.5) == base  # the default keeps the quantile
    assert sim.fb.delay_policy(sim.plan, [a], 0.5, 0.0) is None  # 0 disables delay hedges
    assert [dial_multiplier(x) for x in (0.0, 0.5, 1.0)] == [2.0, 1.0, 0.5]
    # the header: a number in [0, 1]; anything else is a 400
    assert parse_cost_quality(None) is None
    assert parse_cost_quality(" 1 ") == 1.0 and parse_cost_quality("0") == 0.0
    for bad in ("", "1.5", "-0.1", "nan", "inf", "fast"):
        with pytest.raises(ApiError) as ei:
            parse_cost_quality(bad)
        assert ei.value.status == 400 and ei.value.param == "X-GammaInfra-Cost-Quality"


def test_dial_zero_disables_delay_hedges_but_errors_still_fail_over() -> None:
    # a stalls for 2 s on every 10th request and fails on every 7th; b is steady
    count = {"a": 0}

    def script(p: str, t: float) -> Answer:
        if p != "a":
            return Answer(0.1)
        count["a"] += 1
        if count["a"] % 7 == 0:
            return Answer(0.01, CONNECT)
        return Answer(2.0 if count["a"] % 10 == 0 else 0.05)

    route = {"min_delay_ms": 25, "default_delay_ms": 200, "max_attempts": 2, "hedge_budget": 1.0}
    zero = Sim(route, script)
    reqs = zero.run(until=30.0, rate=10.0, dial=0.0, preference=["a"])
    assert extra_attempts(reqs, "delay") == 0
    assert extra_attempts(reqs, "error") > 0
    assert all(r.status == 200 for r in reqs)
    assert max(r.ttft or 0.0 for r in reqs) >= 2.0  # the stalls were waited out
    count["a"] = 0
    eager = Sim(route, script)
    reqs = eager.run(until=30.0, rate=10.0, dial=1.0, preference=["a"])
    assert extra_attempts(reqs, "delay") > 0
    assert max(r.ttft or 0.0 for r in reqs) < 1.0  # hedged instead


def test_cancellations_far_below_a_stale_belief_do_not_keep_it_alive() -> None:
    # a was slow (3 s) and is now only run as a hedge that is cancelled ~50 ms after launch. Such a
    # censored sample lies below everything a's histogram holds: it cannot change any quantile, so it
    # is dropped instead of refreshing the stale 3 s mass; a decays to unknown and gets re-measured.
    h = DecayingHistogram(10.0, min_weight=3.0)
    for k in range(20):
        h.observe(3.0, k * 0.1)
    w0 = h.weight(2.0)
    for k in range(200):
        h.observe_censored(0.05, 2.0 + k * 0.1)
    assert h.weight(22.0) == pytest.approx(w0 * 2 ** (-20.0 / 10.0))
    assert within_bucket(h.quantile(0.5, 22.0), 3.0)
    assert h.quantile(0.5, 40.0) is None  # forgotten: unknown, so it will be tried first again
    # a cancellation just below the mass is a lower bound being confirmed: it keeps counting
    g = DecayingHistogram(10.0, min_weight=3.0)
    g.observe_censored(0.5, 0.0)  # parks just above 0.5 s
    for k in range(1, 100):
        g.observe_censored(0.5, k * 0.1)
    assert g.weight(9.9) == pytest.approx(sum(2 ** (-(9.9 - k * 0.1) / 10) for k in range(100)))
    assert g.quantile(0.0, 9.9) >= 0.5


# ------------------------------------------------------------------------------ the two lanes


def test_lanes_keep_stream_and_json_statistics_apart_but_share_health() -> None:
    """Non-streaming 'first tokens' are whole bodies: they must not inflate the streams' hedge delay,
    while a provider's failures are one thing for both kinds of request."""
    cat = Catalog(parse_config(raw_config({"a": "http://a.invalid/v1", "b": "http://b.invalid/v1"})))
    plan = cat.resolve(ROUTE)
    a, b = plan.candidates
    stream = Feedback(cat.config.feedback)
    js = Feedback(cat.config.feedback, health_from=stream)
    for k in range(20):
        stream.on_launch(a, k * 0.1)
        stream.on_first_token(a, 0.05, k * 0.1 + 0.05)  # streams: first content after 50 ms
        js.on_launch(a, k * 0.1)
        js.on_first_token(a, 4.0, k * 0.1 + 4.0)  # bodies: complete after 4 s
    now = 6.0
    d_stream = stream.delay_policy(plan, plan.candidates, now, 0.5)
    d_json = js.delay_policy(plan, plan.candidates, now, 0.5)
    assert d_stream is not None and d_json is not None
    assert within_bucket(d_stream.delay(0), 0.05)
    assert within_bucket(d_json.delay(0), 3.0)  # clamped at max_delay_ms
    # one breaker per provider: failures seen by the non-streaming lane cool it down for streams too
    fail = Failure(FailureKind.RETRYABLE, "http_503", 503)
    for _ in range(cat.config.feedback.failure_threshold):
        js.on_launch(b, now)
        js.on_failure(b, fail, now)
    assert [c.provider.name for c in stream.order(plan, now)] == ["a"]
    assert stream.budget(plan.route) is js.budget(plan.route)
