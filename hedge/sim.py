"""Discrete-event simulator for the hedge policy: a fake clock, no sockets (`python -m hedge.sim`).

It drives the real sans-IO objects (`Feedback.order`, `AdaptiveDelay`, the budgets, `Race`) through
thousands of virtual seconds in well under a second each, and compares the policy, on the *same*
per-request luck, with two references:

* **race-all oracle**: every provider launched at arrival; the first answer wins (the lower bound on
  TTFT, at n times the load);
* **best fixed stagger at equal load**: config order, attempt i+1 launched d after attempt i (at once
  after a failure), with d the smallest (best) stagger whose extra load does not exceed the policy's
  own, found by bisection on the same draws.

Common random numbers: request k draws, per provider, one normal deviate and two uniforms (stall, error)
at arrival. Whoever launches that provider for request k, and whenever, gets the outcome those draws
give under the provider's behaviour at launch time, so the policy and both references meet identical
luck, and a run is a pure function of its seed.

Scenarios (`SCENARIOS`) follow issue 9: steady tails, an abrupt 10x slowdown with a brief outage,
gradual drift (over 60 s, and the load test's over 8 s), flapping, all slow, recovery, cold start,
one provider erroring 30 %.
"""

from __future__ import annotations

import heapq
import math
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from .catalog import Candidate, Catalog, Plan
from .config import RouteConfig, parse_config
from .errors import NoCandidates
from .race import Cancel, Commit, Failure, FailureKind, GiveUp, Launch, Race, Reject

ROUTE = "gammainfra/fast"
REFUSED = Failure(FailureKind.RETRYABLE, "connect")
HTTP_503 = Failure(FailureKind.RETRYABLE, "http_503", 503)

Factor = Callable[[float], float]


def const(x: float) -> Factor:
    return lambda t: x


def step(at: float, before: float, after: float) -> Factor:
    """`before` until `at`, then `after`."""
    return lambda t: before if t < at else after


# ------------------------------------------------------------------------------------------ providers


@dataclass(frozen=True)
class Provider:
    """A simulated provider: lognormal TTFT (`median`, `sigma`) times `factor(t)`, plus faults.

    `stall_prob`: share of requests whose first token takes `stall_s` instead; `error_prob`: share
    that fail with a 503 after `error_after` s; `outages`: [start, end) windows in which connections
    are refused (a failure after 1 ms).
    """

    name: str
    median: float
    sigma: float = 0.25
    stall_prob: float = 0.0
    stall_s: float = 2.0
    error_prob: float = 0.0
    error_after: float = 0.05
    factor: Factor = field(default=const(1.0))
    outages: tuple[tuple[float, float], ...] = ()

    def outcome(self, t: float, luck: tuple[float, float, float]) -> tuple[float, Failure | None]:
        """(seconds after launch, failure or None) for an attempt launched at `t` with `luck`."""
        z, u_stall, u_err = luck
        for a, b in self.outages:
            if a <= t < b:
                return 0.001, REFUSED
        if u_err < self.error_prob:
            return self.error_after, HTTP_503
        if u_stall < self.stall_prob:
            return self.stall_s * self.factor(t), None
        return self.median * math.exp(self.sigma * z) * self.factor(t), None


@dataclass(frozen=True)
class Scenario:
    """Providers over `duration` virtual seconds at `rate` req/s, measured on [measure_from, end)."""

    name: str
    summary: str
    providers: tuple[Provider, ...]
    duration: float = 200.0
    rate: float = 20.0
    measure_from: float = 20.0
    change_at: float | None = None  # the instant the story turns (for the target windows)


def _trio(**kw: Any) -> tuple[Provider, ...]:
    """Three providers like the load test's: a fast primary and two slower backups."""
    base = {"a": Provider("a", 0.200), "b": Provider("b", 0.250, sigma=0.3), "c": Provider("c", 0.300)}
    for name, p in kw.items():
        base[name] = p
    return tuple(base.values())


def _fleet(a_factor: Factor) -> tuple[Provider, ...]:
    """The load test fleet's providers (50/80/110 ms), the leader `a` changing by `a_factor`."""
    return (
        Provider("a", 0.050, 0.25, factor=a_factor),
        Provider("b", 0.080, 0.30),
        Provider("c", 0.110, 0.30),
    )


def _flap(period: float, slow: float) -> Factor:
    return lambda t: slow if t >= 20.0 and int((t - 20.0) // period) % 2 == 1 else 1.0


def _drift(t0: float, t1: float, top: float) -> Factor:
    return lambda t: 1.0 if t < t0 else top ** min(1.0, (t - t0) / (t1 - t0))


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "steady",
            "three providers, lognormal TTFT, each stalling 2 s on 3 % of requests",
            (
                Provider("a", 0.050, 0.25, stall_prob=0.03),
                Provider("b", 0.080, 0.30, stall_prob=0.03),
                Provider("c", 0.110, 0.30, stall_prob=0.03),
            ),
        ),
        Scenario(
            "slowdown",
            "a goes 10x slower (200 ms -> 2 s) at 60 s, after a 0.2 s restart (connections refused)",
            _trio(a=Provider("a", 0.200, factor=step(60.2, 1.0, 10.0), outages=((60.0, 60.2),))),
            duration=120.0,
            change_at=60.0,
        ),
        Scenario(
            "slowdown-10rps",
            "the load test fleet's providers at one instance's share (10 req/s): a 50 ms -> 500 ms at 60 s",
            _fleet(step(60.0, 1.0, 10.0)),
            duration=120.0,
            rate=10.0,
            change_at=60.0,
        ),
        Scenario(
            "drift",
            "a's TTFT drifts from 200 ms up 5x between 40 s and 100 s",
            _trio(a=Provider("a", 0.200, factor=_drift(40.0, 100.0, 5.0))),
            duration=140.0,
            change_at=40.0,
        ),
        Scenario(
            "drift-fleet",
            "the load test's drift: its providers (50/80/110 ms) at 20 req/s, a ramps 5x over 30-38 s",
            _fleet(_drift(30.0, 38.0, 5.0)),
            duration=60.0,
            change_at=30.0,
        ),
        Scenario(
            "flapping",
            "a alternates between 200 ms and 2 s every 4 s from 20 s",
            _trio(a=Provider("a", 0.200, factor=_flap(4.0, 10.0))),
            duration=120.0,
            change_at=20.0,
        ),
        Scenario(
            "all-slow",
            "every provider goes 6x slower at once at 40 s",
            tuple(Provider(p.name, p.median, p.sigma, factor=step(40.0, 1.0, 6.0)) for p in _trio()),
            duration=140.0,
            change_at=40.0,
        ),
        Scenario(
            "recovery",
            "c is at 2.5 s until 60 s, then comes back at 100 ms (twice a's speed)",
            _trio(c=Provider("c", 0.100, factor=step(60.0, 25.0, 1.0))),
            duration=100.0,
            change_at=60.0,
        ),
        Scenario(
            "cold-start",
            "nothing known at start; a is the fastest but last in config order",
            (Provider("c", 0.300), Provider("b", 0.250, sigma=0.3), Provider("a", 0.100)),
            duration=30.0,
            measure_from=0.0,
            change_at=0.0,
        ),
        Scenario(
            "errors",
            "a (the fastest) fails 30 % of its requests with a 503 after 50 ms",
            _trio(a=Provider("a", 0.200, error_prob=0.3)),
        ),
    )
}


# ---------------------------------------------------------------------------------------- the policy


class Policy(Protocol):
    """What the simulator needs from a feedback object (`hedge.feedback.Feedback` has it)."""

    def order(self, plan: Plan, now: float, preference: Sequence[str] = ()) -> Any: ...
    def delay_policy(self, plan: Plan, candidates: Any, now: float, eagerness: float) -> Any: ...
    def request_budget(self, route: RouteConfig, order: Any) -> Any: ...
    def on_launch(self, c: Candidate, now: float) -> None: ...
    def on_first_token(self, c: Candidate, ttft: float, now: float, *, launched_at: float) -> None: ...
    def on_failure(self, c: Candidate, failure: Failure, now: float, *, launched_at: float) -> None: ...
    def on_cancelled(
        self, c: Candidate, elapsed: float, now: float, *, lost: bool, launched_at: float
    ) -> None: ...


def make_plan(scenario: Scenario, route: dict[str, Any]) -> Plan:
    names = [p.name for p in scenario.providers]
    models = {
        f"m/{n}": {
            "input_usd_per_mtok": 1.0,
            "output_usd_per_mtok": 2.0,
            "serve": [{"provider": n, "model": f"up-{n}"}],
        }
        for n in names
    }
    fast = {
        "strategy": "hedge",
        "candidates": list(models),
        "quantile": 0.9,
        "min_delay_ms": 10,
        "max_delay_ms": 3000,
        "default_delay_ms": 300,
        "max_attempts": len(names),
        "hedge_budget": 0.1,
        "hedge_burst": 5,
        **route,
    }
    raw = {
        "server": {"host": "127.0.0.1", "port": 0},
        "providers": {n: {"base_url": f"http://{n}.invalid/v1"} for n in names},
        "models": models,
        "routes": {ROUTE: fast},
    }
    return Catalog(parse_config(raw)).resolve(ROUTE)


def default_policy(plan: Plan) -> Policy:
    from .config import FeedbackConfig
    from .feedback import Feedback

    return Feedback(FeedbackConfig())


class PeakEwma:
    """Finagle/Linkerd's load metric, the anchor issue 9 asks to beat: a peak-sensitive EWMA of
    latency (a sample above the average replaces it at once; otherwise it decays towards the sample
    with time constant `tau_s`), times (pending + 1)."""

    __slots__ = ("_cost", "_stamp", "pending", "tau_s")

    def __init__(self, tau_s: float = 10.0) -> None:
        self.tau_s = tau_s
        self._cost = 0.0
        self._stamp: float | None = None
        self.pending = 0

    def observe(self, rtt: float, now: float) -> None:
        if self._stamp is None or rtt > self._cost:
            self._cost = rtt
        else:
            w = math.exp(-(now - self._stamp) / self.tau_s)
            self._cost = self._cost * w + rtt * (1.0 - w)
        self._stamp = now

    def cost(self) -> float:
        return self._cost * (self.pending + 1)


def p2c_policy(plan: Plan, seed: int = 7) -> Policy:
    """`Feedback` with Finagle's order: power of two choices on peak-EWMA x (pending + 1) picks the
    leader, the rest follow by cost; delays, budget, breakers and exploration-free racing as ours."""
    from .config import FeedbackConfig
    from .feedback import Feedback, Order

    rng = random.Random(seed)

    class P2C(Feedback):
        def __init__(self) -> None:
            super().__init__(FeedbackConfig())
            self.ewma: dict[str, PeakEwma] = {}

        def _m(self, c: Candidate) -> PeakEwma:
            return self.ewma.setdefault(c.key, PeakEwma())

        def order(self, plan: Plan, now: float, *_: Any) -> Order:  # type: ignore[override]
            cands = [c for c in plan.candidates if self.breaker(c).available(now)] or list(plan.candidates)
            pick = rng.sample(cands, 2) if len(cands) >= 2 else cands
            lead = min(pick, key=lambda c: self._m(c).cost())
            rest = sorted((c for c in cands if c is not lead), key=lambda c: self._m(c).cost())
            return Order((lead, *rest))

        def on_launch(self, c: Candidate, now: float) -> None:
            super().on_launch(c, now)
            self._m(c).pending += 1

        def on_first_token(self, c: Candidate, ttft: float, now: float, *, launched_at: Any = None) -> None:
            super().on_first_token(c, ttft, now, launched_at=launched_at)
            m = self._m(c)
            m.pending -= 1
            m.observe(ttft, now)

        def on_failure(self, c: Candidate, failure: Failure, now: float, *, launched_at: Any = None) -> None:
            super().on_failure(c, failure, now, launched_at=launched_at)
            self._m(c).pending -= 1

        def on_cancelled(self, c: Candidate, elapsed: float, now: float, **kw: Any) -> None:
            super().on_cancelled(c, elapsed, now, **kw)
            m = self._m(c)
            m.pending -= 1
            m.observe(elapsed, now)  # Finagle observes a cancelled request's latency as it ends

    return P2C()


# ------------------------------------------------------------------------------------------- running


@dataclass
class Req:
    """One simulated request: what its client asked for, what the policy and the race made of it, and
    what the client saw. `dial` and `preference` are its X-GammaInfra-Cost-Quality and -Preference."""

    k: int
    arrival: float
    dial: float = 0.5
    preference: tuple[str, ...] = ()
    cands: Any = None
    race: Race | None = None
    launches: list[tuple[str, str, float]] = field(default_factory=list)  # (provider, reason, at)
    ttft: float | None = None
    winner: str | None = None
    status: int = 0
    delay: float | None = None  # the hedge delay of the first candidate at the default dial
    timer: float | None = None

    @property
    def attempts(self) -> int:
        """Upstream attempts launched (the load this request cost)."""
        return len(self.launches)


Outcome = Callable[[Req, Candidate, float], tuple[float, Failure | None]]
"""(request, candidate, launch time) -> (seconds after launch, failure or None): a provider's answer."""

Ended = Literal["answered", "failed", "cancelled"]

_ARRIVE, _ANSWER, _TIMER = 0, 1, 2


class Loop:
    """The discrete-event loop that runs requests through a policy and `Race`s, as the proxy does.

    Requests arrive; `policy.order` ranks the candidates, `delay_policy` and `request_budget` arm the
    race; each `Launch` asks `outcome` when that attempt's first token (or failure) comes; and every
    attempt's end is reported to the policy exactly as the proxy reports it (first token, failure, or
    cancelled with its elapsed time and whether it lost). One loop serves the scenario runs here
    (`simulate`) and the scripted feedback tests (`tests/unit/test_feedback.py`), so the two cannot
    drift apart; what a test wants to record it records in the no-op hooks (`ordered`, `launching`,
    `ended`), which change nothing the policy sees.

    Events at the same instant run in the order they were scheduled, so a run is a pure function of
    its inputs. `now` carries over from one `serve` to the next.
    """

    def __init__(self, plan: Plan, policy: Policy, outcome: Outcome) -> None:
        self.plan = plan
        self.fb = policy
        self.outcome = outcome
        self.now = 0.0
        self._heap: list[tuple[float, int, int, Req, int, Failure | None]] = []
        self._seq = 0

    def serve(self, reqs: Sequence[Req]) -> None:
        """Run `reqs` (each arriving at its `arrival`) until every one has ended."""
        for r in reqs:
            self._push(r.arrival, _ARRIVE, r)
        while self._heap:
            self.now, _, kind, r, i, fail = heapq.heappop(self._heap)
            if kind == _ARRIVE:
                self._arrive(r)
            elif kind == _TIMER:
                assert r.race is not None
                r.timer = None
                self._apply(r, r.race.on_timer(self.now))
            else:
                self._answer(r, i, fail)

    # ---------------------------------------------------------------- hooks (record; change nothing)

    def ordered(self, r: Req) -> None:
        """`r.cands` was just ordered; its race is not armed yet."""

    def launching(self, r: Req, attempt: int, c: Candidate) -> None:
        """Attempt `attempt` on `c` starts now; the policy has not heard of it yet."""

    def ended(self, r: Req, attempt: int, elapsed: float, how: Ended) -> None:
        """Attempt `attempt` ended `elapsed` s after launch, `how`; the policy has not heard of it yet."""

    # ---------------------------------------------------------------------------------- the loop

    def _push(self, t: float, kind: int, r: Req, i: int = -1, fail: Failure | None = None) -> None:
        heapq.heappush(self._heap, (t, self._seq, kind, r, i, fail))
        self._seq += 1

    def _arrive(self, r: Req) -> None:
        fb, plan, now = self.fb, self.plan, self.now
        try:
            r.cands = fb.order(plan, now, r.preference)
        except NoCandidates as e:
            r.status = e.as_api_error().status
            return
        self.ordered(r)
        delays = fb.delay_policy(plan, r.cands, now, r.dial)
        budget = None
        if delays is not None:
            budget = fb.request_budget(plan.route, r.cands)  # once per request, as the proxy
            r.delay = delays.base_delay(0)
        r.race = Race(len(r.cands), max_attempts=plan.route.max_attempts, delays=delays, budget=budget)
        self._apply(r, r.race.start(now))

    def _answer(self, r: Req, i: int, fail: Failure | None) -> None:
        race, now = r.race, self.now
        assert race is not None
        att = race.attempts[i]
        if att.state.value != "running":
            return  # cancelled earlier: its connection is closed, the answer never arrives
        c, elapsed = r.cands[i], now - att.launched_at
        if fail is None:
            self.ended(r, i, elapsed, "answered")
            self.fb.on_first_token(c, elapsed, now, launched_at=att.launched_at)
            self._apply(r, race.on_first_token(i, now))
        else:
            self.ended(r, i, elapsed, "failed")
            self.fb.on_failure(c, fail, now, launched_at=att.launched_at)
            self._apply(r, race.on_failure(i, fail, now))

    def _apply(self, r: Req, actions: list[Any]) -> None:
        race, now = r.race, self.now
        assert race is not None
        for act in actions:
            if isinstance(act, Launch):
                c = r.cands[act.candidate]
                self.launching(r, act.attempt, c)
                r.launches.append((c.provider.name, act.reason, now))
                self.fb.on_launch(c, now)
                after, fail = self.outcome(r, c, now)
                self._push(now + after, _ANSWER, r, act.attempt, fail)
            elif isinstance(act, Cancel):
                for i in act.attempts:
                    at = race.attempts[i].launched_at
                    self.ended(r, i, now - at, "cancelled")
                    self.fb.on_cancelled(r.cands[i], now - at, now, lost=act.reason == "lost", launched_at=at)
            elif isinstance(act, Commit):
                r.winner = r.cands[act.attempt].provider.name
                r.ttft = now - r.arrival
                r.status = 200
            elif isinstance(act, Reject):
                r.status = 400
            elif isinstance(act, GiveUp):
                r.status = act.status
        dl = race.deadline()
        if dl is not None and dl != r.timer:
            r.timer = dl
            self._push(dl, _TIMER, r)


@dataclass
class Run:
    """One simulated run: per-request results and the draws behind them."""

    scenario: Scenario
    plan: Plan
    requests: list[Req]
    luck: list[list[tuple[float, float, float]]]
    policy: Any


def draw_luck(scenario: Scenario, seed: int) -> list[list[tuple[float, float, float]]]:
    rng = random.Random(seed)
    n = int(scenario.duration * scenario.rate)
    return [[(rng.gauss(0.0, 1.0), rng.random(), rng.random()) for _ in scenario.providers] for _ in range(n)]


def simulate(
    scenario: Scenario,
    *,
    seed: int = 1,
    route: dict[str, Any] | None = None,
    policy: Callable[[Plan], Policy] = default_policy,
) -> Run:
    """Run the policy through `scenario` (requests every 1/rate s) until every request has ended."""
    plan = make_plan(scenario, route or {})
    luck = draw_luck(scenario, seed)
    provs = {p.name: p for p in scenario.providers}
    index = {p.name: i for i, p in enumerate(scenario.providers)}

    def outcome(r: Req, c: Candidate, now: float) -> tuple[float, Failure | None]:
        name = c.provider.name
        return provs[name].outcome(now, luck[r.k][index[name]])  # request k's draws, whoever launches

    loop = Loop(plan, policy(plan), outcome)
    reqs = [Req(k, k / scenario.rate) for k in range(len(luck))]
    loop.serve(reqs)
    return Run(scenario, plan, reqs, luck, loop.fb)


# ----------------------------------------------------------------------------------------- reading


def pct(xs: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of `xs`; nan when empty."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def window(run: Run, t0: float | None = None, t1: float | None = None) -> list[Req]:
    lo = run.scenario.measure_from if t0 is None else t0
    hi = run.scenario.duration if t1 is None else t1
    return [r for r in run.requests if lo <= r.arrival < hi]


def ttfts(reqs: Sequence[Req]) -> list[float]:
    """Client TTFTs; a request that got no answer counts as waiting forever (it is in the tail)."""
    return [r.ttft if r.ttft is not None else math.inf for r in reqs]


def extra_load(reqs: Sequence[Req]) -> float:
    return sum(r.attempts for r in reqs) / max(1, len(reqs)) - 1.0


def oracle(run: Run, reqs: Sequence[Req]) -> list[float]:
    """Race-all TTFT per request: every provider launched at arrival, the first answer wins."""
    out = []
    for r in reqs:
        best = math.inf
        for j, p in enumerate(run.scenario.providers):
            after, fail = p.outcome(r.arrival, run.luck[r.k][j])
            if fail is None and after < best:
                best = after
        out.append(best)
    return out


def own(run: Run, reqs: Sequence[Req], provider: str) -> list[float]:
    """What `provider` alone would have answered each request (failures count as forever)."""
    j = [p.name for p in run.scenario.providers].index(provider)
    p = run.scenario.providers[j]
    out = []
    for r in reqs:
        after, fail = p.outcome(r.arrival, run.luck[r.k][j])
        out.append(after if fail is None else math.inf)
    return out


def staggered(run: Run, reqs: Sequence[Req], d: float) -> tuple[list[float], float]:
    """(TTFTs, extra load) of a fixed stagger `d` in config order, on the same draws."""
    provs = run.scenario.providers
    out: list[float] = []
    attempts = 0
    for r in reqs:
        t = r.arrival
        best = math.inf
        for j, p in enumerate(provs):
            if t >= best:
                break
            attempts += 1
            after, fail = p.outcome(t, run.luck[r.k][j])
            if fail is None:
                best = min(best, t + after)
                t += d
            else:
                t += min(after, d)
        out.append(best - r.arrival)
    return out, attempts / max(1, len(reqs)) - 1.0


NO_STAGGER = 30.0
"""The longest stagger tried: in effect no delay hedges (errors still fail over at once)."""


def best_stagger(run: Run, reqs: Sequence[Req], load: float) -> tuple[float, list[float], float]:
    """The smallest fixed stagger whose extra load is <= `load` (bisection on a log scale):
    (d, its TTFTs, its extra load). The smaller the stagger the lower the tail, so this is the best
    fixed stagger at equal (or lower) load. When even `NO_STAGGER` costs more (failing over on errors
    in config order), that is returned."""
    lo, hi = math.log(0.001), math.log(NO_STAGGER)
    best = (NO_STAGGER, *staggered(run, reqs, NO_STAGGER))
    for _ in range(14):
        mid = (lo + hi) / 2
        d = math.exp(mid)
        xs, ld = staggered(run, reqs, d)
        if ld <= load + 1e-9:
            best = (d, xs, ld)
            hi = mid
        else:
            lo = mid
    return best


@dataclass(frozen=True)
class Row:
    scenario: str
    p50: float
    p99: float
    p999: float
    extra: float
    oracle_p99: float
    stagger_p99: float
    stagger_d: float
    stagger_extra: float

    def cells(self) -> list[str]:
        def ms(x: float) -> str:
            return "inf" if math.isinf(x) else f"{x * 1000:.0f}"

        return [
            self.scenario, ms(self.p50), ms(self.p99), ms(self.p999), f"{self.extra:.3f}",
            ms(self.oracle_p99), ms(self.stagger_p99), ms(self.stagger_d), f"{self.stagger_extra:.3f}",
        ]  # fmt: skip


HEADER = ["scenario", "p50", "p99", "p99.9", "extra", "oracle p99", "stagger p99", "stagger d", "its extra"]


def row(run: Run, t0: float | None = None, t1: float | None = None) -> Row:
    reqs = window(run, t0, t1)
    xs = ttfts(reqs)
    extra = extra_load(reqs)
    d, st, st_extra = best_stagger(run, reqs, extra)
    return Row(
        run.scenario.name, pct(xs, 0.5), pct(xs, 0.99), pct(xs, 0.999), extra,
        pct(oracle(run, reqs), 0.99), pct(st, 0.99), d, st_extra,
    )  # fmt: skip


def table(rows: Sequence[Row]) -> str:
    cells = [HEADER, *(r.cells() for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    )


def main(argv: Sequence[str] = ()) -> None:
    """Print the scenario table (TTFT in ms, extra = upstream attempts per request - 1), for this policy
    and for Finagle's P2C peak-EWMA order (`--p2c`)."""
    args = list(argv)
    p2c = "--p2c" in args
    args = [a for a in args if a != "--p2c"]
    seed = int(args[0]) if args else 1
    policy = p2c_policy if p2c else default_policy
    rows = [row(simulate(s, seed=seed, policy=policy)) for s in SCENARIOS.values()]
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])


# ------------------------------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Target:
    """One of issue 9's targets, measured on one run: `value` must be <= `limit`."""

    name: str
    value: float
    limit: float
    detail: str

    @property
    def met(self) -> bool:
        return self.value <= self.limit


def steady_target(run: Run, r: Row | None = None) -> Target:
    """Steady tails: p99 <= 1.1x the best fixed stagger at equal or lower extra load (`r`: the run's
    `row`, when already computed)."""
    r = row(run) if r is None else r
    return Target(
        "steady p99 / best fixed stagger", r.p99 / r.stagger_p99, 1.1,
        f"p99 {r.p99 * 1000:.0f} ms at extra {r.extra:.3f}; stagger {r.stagger_d * 1000:.0f} ms: "
        f"p99 {r.stagger_p99 * 1000:.0f} ms at extra {r.stagger_extra:.3f}",
    )  # fmt: skip


def slowdown_targets(run: Run, budget: float) -> tuple[Target, Target]:
    """Abrupt slowdown: over the 11 s from 1 s after the change, p99 <= 1.3x the best remaining
    provider's own p99, at <= budget + 2 % extra load."""
    assert run.scenario.change_at is not None
    reqs = window(run, run.scenario.change_at + 1.0, run.scenario.change_at + 12.0)  # as in the issue
    p99 = pct(ttfts(reqs), 0.99)
    others = [p.name for p in run.scenario.providers[1:]]
    own_p99 = min(pct(own(run, reqs, n), 0.99) for n in others)
    extra = extra_load(reqs)
    return (
        Target("slowdown p99 / best remaining own p99", p99 / own_p99, 1.3,
               f"p99 {p99 * 1000:.0f} ms vs {own_p99 * 1000:.0f} ms"),
        Target("slowdown extra load", extra, budget + 0.02, f"extra {extra:.3f}, budget {budget:.2f}"),
    )  # fmt: skip


def drift_target(run: Run) -> Target:
    """Drift: over the 11 s from 1 s after the ramp starts (the load test's window), p99 <= 1.3x the
    best provider's own p99 on the same requests (the drifting one's included: it is best at first)."""
    assert run.scenario.change_at is not None
    reqs = window(run, run.scenario.change_at + 1.0, run.scenario.change_at + 12.0)
    p99 = pct(ttfts(reqs), 0.99)
    own_p99 = min(pct(own(run, reqs, p.name), 0.99) for p in run.scenario.providers)
    return Target(
        "drift p99 / best own p99", p99 / own_p99, 1.3, f"p99 {p99 * 1000:.0f} ms vs {own_p99 * 1000:.0f} ms"
    )


def lead_time(run: Run, provider: str, after: float, span: float = 2.0, share: float = 0.9) -> float:
    """Seconds after `after` until `provider` leads (is the first candidate of) at least `share` of
    the requests arriving over the next `span` seconds; inf if it never does."""
    reqs = [r for r in run.requests if r.arrival >= after and r.cands is not None]
    for i, r in enumerate(reqs):
        nxt = [q for q in reqs[i:] if q.arrival < r.arrival + span]
        if r.arrival + span > run.scenario.duration:
            break
        if sum(q.cands[0].provider.name == provider for q in nxt) >= share * len(nxt):
            return r.arrival - after
    return math.inf


def recovery_target(run: Run) -> Target:
    """Recovery: the recovered provider leads again within 5 s."""
    assert run.scenario.change_at is not None
    t = lead_time(run, "c", run.scenario.change_at)
    return Target("recovered provider leads after (s)", t, 5.0, f"{t:.2f} s")


def all_slow_target(run: Run, budget: float) -> Target:
    """All slow: extra load <= budget + 1 % from the change on."""
    assert run.scenario.change_at is not None
    extra = extra_load(window(run, run.scenario.change_at))
    return Target("all-slow extra load", extra, budget + 0.01, f"extra {extra:.3f}, budget {budget:.2f}")
