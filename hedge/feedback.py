"""Feedback: what the proxy has learned decides the next race (DESIGN §2).

Owns, per candidate, a `CandidateStats` (windowed TTFT/duration/error estimators) and a `CircuitBreaker`,
and per route a `HedgeBudget`. It turns them into the three decisions a request needs:

- **order**: which candidates, in which order (strategy-specific, healthy first);
- **delay**: how long to wait for the running candidate before hedging (`AdaptiveDelay`);
- **budget**: whether a delay-triggered hedge may be spent.

All methods take `now` explicitly so fake-clock tests drive them exactly.

Ordering for `hedge` is by expected TTFT (the decayed median). A candidate whose samples have decayed
away is *unknown* and sorts first ("optimism under uncertainty"): that is how a provider that was slow
and recovered gets measured again, at the cost of one possibly-slow primary per forgetting window; the
hedge behind it bounds that cost to the hedge delay. Ties (e.g. at cold start) keep config order.
"""

from __future__ import annotations

from collections.abc import Sequence

from .budget import HedgeBudget
from .catalog import Candidate, Plan
from .config import FeedbackConfig, RouteConfig
from .errors import ApiError
from .health import BreakerState, CircuitBreaker
from .race import Failure, FailureKind
from .stats import CandidateStats

DEFAULT_EAGERNESS = 0.5


def blended_price(c: Candidate) -> float:
    """USD per 1M tokens for a typical 3:1 input:output mix: what `cheapest` sorts by."""
    return (3 * c.model.input_usd_per_mtok + c.model.output_usd_per_mtok) / 4


class AdaptiveDelay:
    """Hedge delay = q-quantile of the running candidate's recent TTFT, clamped, times the dial factor.

    The dial (X-GammaInfra-Cost-Quality, 0..1, default 0.5) maps to a multiplier 2**(1 - 2x): 0.5 keeps
    the quantile, 1.0 halves it (more eager, more load), 0.25 multiplies it by 1.41; 0 disables
    delay-triggered hedging for the request (errors still fail over).
    """

    __slots__ = ("_cands", "_default", "_fb", "_hi", "_lo", "_mult", "_now", "_q")

    def __init__(
        self,
        fb: Feedback,
        route: RouteConfig,
        candidates: Sequence[Candidate],
        now: float,
        eagerness: float = DEFAULT_EAGERNESS,
    ) -> None:
        self._fb = fb
        self._cands = candidates
        self._q = route.quantile
        self._lo = route.min_delay_ms / 1000
        self._hi = route.max_delay_ms / 1000
        self._default = route.default_delay_ms / 1000
        self._mult = 2.0 ** (1.0 - 2.0 * eagerness)
        self._now = now

    def delay(self, candidate: int) -> float | None:
        est = self._fb.stats(self._cands[candidate]).ttft_quantile(self._q, self._now)
        base = self._default if est is None else est
        return min(self._hi, max(self._lo, base * self._mult))


class Feedback:
    def __init__(self, cfg: FeedbackConfig) -> None:
        self.cfg = cfg
        self._stats: dict[str, CandidateStats] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._budgets: dict[str, HedgeBudget] = {}

    # ----------------------------------------------------------------------------------- state

    def stats(self, c: Candidate) -> CandidateStats:
        s = self._stats.get(c.key)
        if s is None:
            s = self._stats[c.key] = CandidateStats(
                half_life_s=self.cfg.half_life_s, min_weight=self.cfg.min_samples
            )
        return s

    def breaker(self, c: Candidate) -> CircuitBreaker:
        b = self._breakers.get(c.key)
        if b is None:
            b = self._breakers[c.key] = CircuitBreaker(
                failure_threshold=self.cfg.failure_threshold,
                base_backoff_s=self.cfg.base_backoff_s,
                max_backoff_s=self.cfg.max_backoff_s,
            )
        return b

    def budget(self, route: RouteConfig) -> HedgeBudget:
        b = self._budgets.get(route.name)
        if b is None:
            b = self._budgets[route.name] = HedgeBudget(route.hedge_budget, burst=route.hedge_burst)
        return b

    def circuit_states(self, now: float) -> dict[str, BreakerState]:
        return {k: b.state(now) for k, b in self._breakers.items()}

    # ------------------------------------------------------------------------------- decisions

    def order(
        self, plan: Plan, now: float, preference: Sequence[str] = (), candidates: Sequence[Candidate] = ()
    ) -> list[Candidate]:
        """The candidates to race, best first; raises 503 when every one is cooling down."""
        cands = list(candidates or plan.candidates)
        available = [c for c in cands if self.breaker(c).available(now)]
        if not available:
            waits = [self.breaker(c).retry_at(now) for c in cands]
            retry = min((w - now for w in waits if w is not None), default=1.0)
            raise ApiError(
                503,
                f"Every provider for '{plan.name}' is cooling down after repeated failures; retry shortly.",
                code="providers_unavailable",
                headers={"Retry-After": str(max(1, round(retry)))},
            )
        index = {c.endpoint: i for i, c in enumerate(cands)}
        strategy = plan.strategy
        if strategy == "hedge":

            def key(c: Candidate) -> tuple[float, ...]:
                s = self.stats(c)
                est = s.expected_ttft(now)
                penalty = 1.0 / max(0.1, 1.0 - s.error_rate(now))
                return ((est or 0.0) * penalty, index[c.endpoint])

        elif strategy == "cheapest":

            def key(c: Candidate) -> tuple[float, ...]:
                return (blended_price(c), index[c.endpoint])

        else:  # failover / auto: config (or auto's) order, the less erroring first

            def key(c: Candidate) -> tuple[float, ...]:
                return (round(self.stats(c).error_rate(now), 1), index[c.endpoint])

        available.sort(key=key)
        if preference:
            available = apply_preference(available, preference)
        return available

    def delay_policy(
        self, plan: Plan, candidates: Sequence[Candidate], now: float, eagerness: float
    ) -> AdaptiveDelay | None:
        if plan.strategy != "hedge" or eagerness <= 0.0:
            return None
        return AdaptiveDelay(self, plan.route, candidates, now, eagerness)

    # ---------------------------------------------------------------------------------- events

    def on_first_token(self, c: Candidate, ttft: float, now: float) -> None:
        s = self.stats(c)
        s.record_first_token(ttft, now)
        s.record_success(now)
        self.breaker(c).on_success(now)

    def on_failure(self, c: Candidate, failure: Failure, now: float) -> None:
        if failure.kind is FailureKind.CALLER:
            return  # the request was bad, the provider was fine
        self.stats(c).record_failure(now)
        self.breaker(c).on_failure(now, failure.retry_after)

    def on_cancelled(self, c: Candidate, elapsed: float, now: float) -> None:
        """A loser or abandoned attempt: we only know its TTFT exceeded `elapsed` (censored)."""
        self.stats(c).record_censored(elapsed, now)

    def on_complete(self, c: Candidate, duration: float, now: float) -> None:
        self.stats(c).record_total(duration, now)


def apply_preference(cands: list[Candidate], preference: Sequence[str]) -> list[Candidate]:
    """Move candidates named by X-GammaInfra-Preference (provider, model or model@provider) first."""
    chosen: list[Candidate] = []
    for p in preference:
        for c in cands:
            if c not in chosen and p in (c.provider.name, c.model.name, c.endpoint):
                chosen.append(c)
    return chosen + [c for c in cands if c not in chosen]
