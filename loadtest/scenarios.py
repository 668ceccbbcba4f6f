"""Named latency scenarios: which simulated providers exist and how each behaves over the run.

A scenario is declarative (profiles plus timed events), so the same object drives the provider runner
(`loadtest.providers`), describes itself in the report, and can be unit-tested at chosen instants.

Time-varying events are placed as *fractions of the measured duration*, so ``--duration 10`` and
``--duration 120`` show the same story.  Before the measurement starts (warm-up), every provider has
its base profile.

Common random numbers: a request's behaviour is drawn from an RNG seeded by (run seed, provider,
client sequence number, n-th arrival of that request at that provider), never from a shared stream.
Every mode sends its k-th request at the same scheduled moment, so request k meets the *same* stall or
error at provider P in ``direct``, ``pinned``, ``fast`` and ``oracle``: the modes are compared on
identical luck, not just on the same distribution.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from hedge.simprovider import Behaviour, LatencyProfile

__all__ = ["SCENARIOS", "ErrorBursts", "ProviderPlan", "Ramp", "Scenario", "Window", "get", "request_rng"]


@dataclass(frozen=True)
class Window:
    """[start, end) as fractions of the measured duration."""

    start: float
    end: float

    def contains(self, elapsed: float | None, duration: float) -> bool:
        return elapsed is not None and self.start * duration <= elapsed < self.end * duration

    def describe(self, duration: float) -> str:
        return f"{self.start * duration:g}-{self.end * duration:g} s"


@dataclass(frozen=True)
class ErrorBursts:
    """Every ``period_s`` (from ``offset_s``), for ``length_s``, a share ``prob`` of requests fail."""

    period_s: float
    length_s: float
    prob: float
    status: int
    offset_s: float = 0.0
    retry_after: float | None = None

    def active(self, elapsed: float | None) -> bool:
        if elapsed is None or elapsed < self.offset_s:
            return False
        return (elapsed - self.offset_s) % self.period_s < self.length_s


@dataclass(frozen=True)
class Ramp:
    """A gradual TTFT change: the factor grows geometrically from 1 to ``top`` across ``window`` and
    stays at ``top`` after it (the simulator's `drift`: no instant at which the change is news)."""

    window: Window
    top: float

    def factor(self, elapsed: float | None, duration: float) -> float:
        if elapsed is None:
            return 1.0
        start, end = self.window.start * duration, self.window.end * duration
        if elapsed < start:
            return 1.0
        span = end - start
        return self.top if span <= 0 else self.top ** min(1.0, (elapsed - start) / span)


@dataclass(frozen=True)
class ProviderPlan:
    """One simulated provider: a base latency profile plus optional slowdown (a step, or a `ramp`),
    error bursts, outage."""

    name: str
    profile: LatencyProfile
    slow_window: Window | None = None
    slow_factor: float = 1.0
    bursts: ErrorBursts | None = None
    outage: Window | None = None
    more_slow_windows: tuple[Window, ...] = ()  # further windows with the same slow_factor (flapping)
    ramp: Ramp | None = None  # a gradual TTFT change (drift), on top of any step

    def slow_at(self, elapsed: float | None, duration: float) -> bool:
        windows = (self.slow_window, *self.more_slow_windows)
        return any(w is not None and w.contains(elapsed, duration) for w in windows)

    def ttft_factor(self, elapsed: float | None, duration: float) -> float:
        """The multiple of the base TTFT a request arriving ``elapsed`` s in meets (1 in warm-up)."""
        f = self.slow_factor if self.slow_at(elapsed, duration) else 1.0
        return f * (1.0 if self.ramp is None else self.ramp.factor(elapsed, duration))

    def behaviour(self, elapsed: float | None, duration: float, rng: random.Random) -> Behaviour:
        """What a request arriving ``elapsed`` seconds into the measurement gets (None = warm-up)."""
        burst_draw = rng.random()  # drawn unconditionally so later draws line up across modes
        b = self.bursts
        if b is not None and b.active(elapsed) and burst_draw < b.prob:
            headers = self.profile.sample_ttft(rng) * self.profile.headers_delay
            return Behaviour(status=b.status, headers_delay=headers, retry_after=b.retry_after)
        prof = self.profile
        f = self.ttft_factor(elapsed, duration)
        if f != 1.0:
            prof = replace(prof, ttft_median=prof.ttft_median * f)
        return prof.sample(rng)

    def own_ttft(self, elapsed: float, duration: float, rng: random.Random) -> float:
        """The TTFT this provider alone gives the request with these draws (inf: it fails or refuses):
        the "own p99" reference of the load test's after-the-change measure."""
        if self.outage is not None and self.outage.contains(elapsed, duration):
            return float("inf")
        b = self.behaviour(elapsed, duration, rng)
        return float("inf") if b.status != 200 else max(b.ttft, b.headers_delay)

    def describe(self, duration: float) -> str:
        p = self.profile
        parts = [f"TTFT median {p.ttft_median * 1000:g} ms (lognormal sigma {p.ttft_sigma:g})"]
        parts.append(f"{p.tokens} tokens every {p.token_gap * 1000:g} ms")
        if p.stall_prob:
            parts.append(f"{p.stall_prob:.0%} of requests stall {p.stall_ttft:g} s")
        if p.error_prob:
            parts.append(f"{p.error_prob:.0%} HTTP {p.error_status}")
        if self.slow_window is not None or self.more_slow_windows:
            ws = [w for w in (self.slow_window, *self.more_slow_windows) if w is not None]
            parts.append(f"TTFT x{self.slow_factor:g} during {', '.join(w.describe(duration) for w in ws)}")
        if self.ramp is not None:
            r = self.ramp
            parts.append(f"TTFT ramps x1 -> x{r.top:g} over {r.window.describe(duration)}, then stays")
        if self.bursts is not None:
            b = self.bursts
            parts.append(
                f"bursts of HTTP {b.status} ({b.prob:.0%} of requests, {b.length_s:g} s every "
                f"{b.period_s:g} s from {b.offset_s:g} s"
                + (f", Retry-After {b.retry_after:g}" if b.retry_after is not None else "")
                + ")"
            )
        if self.outage is not None:
            parts.append(f"refuses connections during {self.outage.describe(duration)}")
        return "; ".join(parts)


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    providers: tuple[ProviderPlan, ...]
    change_at: float | None = None  # when the story turns (fraction of the run): the measure's anchor

    @property
    def primary(self) -> str:
        """The provider `direct` mode calls and the pinned model tries first."""
        return self.providers[0].name

    def describe(self, duration: float) -> dict[str, str]:
        return {p.name: p.describe(duration) for p in self.providers}


def request_rng(seed: int, provider_index: int, seq: int, nth: int) -> random.Random:
    """The RNG for one request's behaviour at one provider (see "common random numbers" above)."""
    return random.Random(((seed * 1_000_003 + provider_index) * 4_000_000_007 + seq) * 17 + nth)


# Base profiles: a fast primary and two slower backups, 20-token streams at 100 tokens/s.
ALPHA = LatencyProfile(ttft_median=0.050, ttft_sigma=0.25, headers_delay=0.3, token_gap=0.010, tokens=20)
BETA = LatencyProfile(ttft_median=0.080, ttft_sigma=0.30, headers_delay=0.3, token_gap=0.010, tokens=20)
GAMMA = LatencyProfile(ttft_median=0.110, ttft_sigma=0.30, headers_delay=0.3, token_gap=0.010, tokens=20)
MIDDLE = Window(0.30, 0.60)


def _trio(alpha: ProviderPlan | None = None, **others: ProviderPlan) -> tuple[ProviderPlan, ...]:
    return (
        alpha or ProviderPlan("alpha", ALPHA),
        others.get("beta") or ProviderPlan("beta", BETA),
        others.get("gamma") or ProviderPlan("gamma", GAMMA),
    )


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("steady", "three healthy providers, no faults", _trio()),
        Scenario(
            "stalls",
            "heavy tail on the primary: 4% of its requests stall 2 s before the first token",
            _trio(ProviderPlan("alpha", replace(ALPHA, stall_prob=0.04, stall_ttft=2.0))),
        ),
        Scenario(
            "degrade",
            "the primary's TTFT grows 8x in the middle of the run, then recovers",
            _trio(ProviderPlan("alpha", ALPHA, slow_window=MIDDLE, slow_factor=8.0)),
        ),
        Scenario(
            "errors",
            "bursts of 429 (with Retry-After) on the primary and of 503 on the first backup",
            _trio(
                ProviderPlan(
                    "alpha",
                    replace(ALPHA, error_prob=0.01, error_status=502),
                    bursts=ErrorBursts(period_s=5.0, length_s=1.5, prob=0.7, status=429, retry_after=1.0),
                ),
                beta=ProviderPlan(
                    "beta",
                    BETA,
                    bursts=ErrorBursts(period_s=5.0, length_s=1.0, prob=0.5, status=503, offset_s=2.5),
                ),
            ),
        ),
        Scenario(
            "outage",
            "the primary refuses connections (and drops open ones) in the middle of the run",
            _trio(ProviderPlan("alpha", ALPHA, outage=MIDDLE)),
        ),
        Scenario(
            "slowdown",
            "the primary goes 10x slower for good at 40 %, after a restart (connections refused 1 %)",
            _trio(
                ProviderPlan(
                    "alpha", ALPHA, slow_window=Window(0.41, 1.0), slow_factor=10.0, outage=Window(0.40, 0.41)
                )
            ),
            change_at=0.40,
        ),
        Scenario(
            "drift",
            "the primary's TTFT drifts up 5x (50 -> 250 ms) between 30 % and 70 % of the run, then stays",
            _trio(ProviderPlan("alpha", ALPHA, ramp=Ramp(Window(0.30, 0.70), 5.0))),
            change_at=0.30,
        ),
        Scenario(
            "flapping",
            "the primary is 10x slower in every other tenth of the run",
            _trio(
                ProviderPlan(
                    "alpha",
                    ALPHA,
                    slow_factor=10.0,
                    more_slow_windows=tuple(Window(k / 10, (k + 1) / 10) for k in (1, 3, 5, 7, 9)),
                )
            ),
        ),
        Scenario(
            "recovery",
            "gamma, the fastest (25 ms), is 40x slower for the first half, then recovers",
            _trio(
                gamma=ProviderPlan(
                    "gamma", replace(GAMMA, ttft_median=0.025), slow_window=Window(0.0, 0.5), slow_factor=40.0
                )
            ),
            change_at=0.5,
        ),
        Scenario(
            "erroring",
            "the primary fails 30 % of its requests with HTTP 503",
            _trio(ProviderPlan("alpha", replace(ALPHA, error_prob=0.3, error_status=503))),
        ),
        Scenario(
            "all-slow",
            "every provider's TTFT grows 6x at once in the middle of the run (the budget's case)",
            (
                ProviderPlan("alpha", ALPHA, slow_window=MIDDLE, slow_factor=6.0),
                ProviderPlan("beta", BETA, slow_window=MIDDLE, slow_factor=6.0),
                ProviderPlan("gamma", GAMMA, slow_window=MIDDLE, slow_factor=6.0),
            ),
        ),
    )
}

# Not a load scenario: the zero-latency upstream of the overhead benchmark.
INSTANT = Scenario(
    "instant",
    "one zero-latency provider, 20-token streams",
    (ProviderPlan("up", LatencyProfile(ttft_median=0.0, ttft_sigma=0.0, headers_delay=0.0, token_gap=0.0)),),
)


def get(name: str) -> Scenario:
    if name == INSTANT.name:
        return INSTANT
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}") from None
