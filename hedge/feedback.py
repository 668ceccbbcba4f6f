"""Feedback: what the proxy has learned decides the next race (DESIGN §2).

Owns, per candidate, a `CandidateStats` (windowed TTFT/duration/error estimators) and a `CircuitBreaker`,
and per route a `HedgeBudget`. It turns them into the three decisions a request needs:

- **order**: which candidates, in which order (strategy-specific, healthy first);
- **delay**: how long to wait for the running candidate before hedging (`AdaptiveDelay`);
- **budget**: whether a delay-triggered hedge may be spent.

All methods take `now` explicitly so fake-clock tests drive them exactly.

Order, for every strategy, is by tier first, then by the strategy's key, with config order breaking ties:

1. **the probe**: a candidate whose breaker is half-open (backoff over, probe slot free). `order` takes
   the probe slot for it and puts it *first*, because attempt 1 is the only one certain to launch: a
   probe placed later might never run, and then the slot would sit taken, the candidate out of service,
   until the breaker's probe timeout. Only one half-open candidate per request is kept (the first); the
   others are left out of that request. The probe's cost is bounded: it fails over at once on an error,
   and for `hedge` the next candidate launches after the delay. Concurrent requests do not see the slot
   (`available` is false while the probe is in flight), so exactly one request probes. The proxy reports
   a cancelled probe with `on_cancelled(lost=...)`: outrun by the hedge = failed probe, otherwise no
   verdict and the slot is freed (`CircuitBreaker.on_cancelled`).
2. **healthy**: breaker closed and a recent error rate below `UNHEALTHY_ERROR_RATE`. The error rate is
   trusted only while it rests on at least `min_samples` (decayed) outcomes, so old errors are forgotten
   at the same pace as old latencies.
3. **erroring**: the rest (still tried, last).

Within a tier, `hedge` sorts by current TTFT: the larger of the median over its last few samples
(forgetting per sample, half-life `order_half_life_samples` = 2) and over the long window
(`half_life_s`), so a primary that slows down loses its place within its next few answers and keeps that
verdict until new answers say otherwise, while a speed-up has to convince the long window too
(`CandidateStats.current_ttft`); divided by the success rate so a candidate that fails often pays
for it. That holds only for candidates whose evidence is *fresh*: an exact
first-token sample within the last two half-lives. A candidate without fresh evidence (never measured,
or measured long ago) is *unknown* and sorts after the known ones, so a stale "fast" estimate cannot pull
traffic onto a provider that has since slowed down: at 100 req/s, every request would go there before
its first slow sample came back (the `all-slow` load-test scenario showed exactly that herd).
Among the known, *current* ones lead first: those whose latest first token is at most
max(1 s, 4 x their TTFT) old. When every provider slows at once, the leader's slow answers keep it
current, while a challenger known only from before the slowdown waits until a hedge shows how it
performs now (in the `all-slow` scenario this took fast's p99 from 524 ms, 12 % over pinned, to parity).
Unknown candidates are *explored* instead: at most one request per candidate per quarter half-life
(and none that carries X-GammaInfra-Preference) races it,
placed second and launched together with the best known candidate (delay 0, paid from the
hedge budget), so the caller gets the faster of the two and exploration never costs latency; at cold
start, with nothing known, the explored candidate simply leads.
That is how a provider that was slow and recovered gets measured again; it also wins fresh
samples whenever it beats the primary's tail as a hedge. Censored samples keep estimates honest: a
candidate's cancellations only ever raise its estimate. `cheapest` sorts by blended price; `failover` and
`auto` keep config (or auto's) order, the less erroring first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from .budget import HedgeBudget
from .catalog import Candidate, Plan
from .config import FeedbackConfig, RouteConfig
from .errors import ApiError
from .health import BreakerState, CircuitBreaker
from .race import Failure, FailureKind
from .stats import CandidateStats

DEFAULT_EAGERNESS = 0.5
UNHEALTHY_ERROR_RATE = 0.5
"""A candidate failing at least this often (recently, before its first token) sorts after the healthy."""

_PROBE, _HEALTHY, _ERRORING = 0, 1, 2

EXPLORE_EVERY = 0.25
"""An unknown candidate is explored (raced beside the leader) at most once per this many half-lives."""

RECOVERY_FACTOR = 3.0
"""The hedge delay never exceeds this multiple of the median of the candidate's last few answers."""

CURRENT_MIN_S = 1.0
CURRENT_TTFTS = 4.0
"""A candidate is *current* while its latest first token is at most max(CURRENT_MIN_S, CURRENT_TTFTS x its
TTFT) old. Current candidates lead before those whose evidence is older, so a slowdown of the leader
promotes a challenger only on evidence from after the slowdown (see the module docstring)."""


def blended_price(c: Candidate) -> float:
    """USD per 1M tokens for a typical 3:1 input:output mix: what `cheapest` sorts by."""
    return (3 * c.model.input_usd_per_mtok + c.model.output_usd_per_mtok) / 4


def dial_multiplier(eagerness: float) -> float:
    """X-GammaInfra-Cost-Quality x (0..1) -> hedge delay multiplier 2**(1 - 2x).

    0.5 (the default) keeps the quantile, 1.0 halves it (hedge sooner: lower tail, more upstream load),
    0.25 multiplies it by 1.41, and 0 would double it but instead disables delay-triggered hedging for
    the request (`Feedback.delay_policy` returns None; errors still fail over). The budget applies at any
    dial, so an eager caller cannot spend more than the route's `hedge_budget`.
    """
    return 2.0 ** (1.0 - 2.0 * eagerness)


class AdaptiveDelay:
    """Hedge delay = q-quantile of the running candidate's recent TTFT, clamped, times the dial factor.

    Capped at `RECOVERY_FACTOR` x the median of its last few answers: after a slowdown ends, the long
    window's tail keeps the old slow answers for about four half-lives, and meanwhile every stall
    of the recovered provider would wait out the old, long delay.

    The quantile comes from the candidate's `CandidateStats` (exact and censored samples, forgetting
    with the configured half-life), `default_delay_ms` while it rests on fewer than `min_samples`.
    Statistics are read as of the request's start: one request sees one consistent picture.
    """

    __slots__ = ("_cands", "_default", "_fb", "_hi", "_lo", "_mult", "_now", "_q", "_zero_first")

    def __init__(
        self,
        fb: Feedback,
        route: RouteConfig,
        candidates: Sequence[Candidate],
        now: float,
        eagerness: float = DEFAULT_EAGERNESS,
        *,
        zero_first: bool = False,
    ) -> None:
        self._fb = fb
        self._zero_first = zero_first
        self._cands = candidates
        self._q = route.quantile
        self._lo = route.min_delay_ms / 1000
        self._hi = route.max_delay_ms / 1000
        self._default = route.default_delay_ms / 1000
        self._mult = dial_multiplier(eagerness)
        self._now = now

    def _estimate(self, candidate: int) -> float:
        s = self._fb.stats(self._cands[candidate])
        est = s.ttft_quantile(self._q, self._now)
        if est is None:
            return self._default
        recent = s.recent.quantile(0.5, s.samples)
        if recent is not None and recent * RECOVERY_FACTOR < est:
            # the last answers are far faster than the long window's tail says: the candidate has
            # recovered and the old slow data has not decayed yet (that takes ~4 half-lives for a p95)
            return recent * RECOVERY_FACTOR
        return est

    def delay(self, candidate: int) -> float | None:
        """Seconds to wait for `candidate`'s first token before launching the next one."""
        if candidate == 0 and self._zero_first:
            return 0.0  # the second candidate is being explored: race it from the start
        return min(self._hi, max(self._lo, self._estimate(candidate) * self._mult))

    def base_delay(self, candidate: int) -> float:
        """The delay at the default dial: the route's current delay for `candidate`, for the gauge.

        Per-request dials are left out so the `hedge_hedge_delay_seconds` gauge shows what the route
        has learned, not which caller came last.
        """
        return min(self._hi, max(self._lo, self._estimate(candidate)))


class Ordered(list[Candidate]):
    """`Feedback.order`'s answer: the candidates, and whether the second one is there to be explored."""

    explore_second: bool = False


class Feedback:
    """Per-candidate statistics and breakers, per-route budgets, and the decisions made from them.

    The proxy keeps two of these *lanes*, one for streaming and one for non-streaming requests,
    because their "first token" means different things (the first content event vs the whole body):
    mixed in one histogram, long bodies would inflate the streams' hedge delay and distort the order.
    Health is one thing per provider, so the non-streaming lane shares the streaming lane's breakers
    and budgets (`health_from`).
    """

    def __init__(self, cfg: FeedbackConfig, *, health_from: Feedback | None = None) -> None:
        self.cfg = cfg
        self._stats: dict[str, CandidateStats] = {}
        self._breakers: dict[str, CircuitBreaker] = {} if health_from is None else health_from._breakers
        self._budgets: dict[str, HedgeBudget] = {} if health_from is None else health_from._budgets
        self._last_exact: dict[str, float] = {}  # candidate key -> time of its latest first token
        self._inflight: dict[str, int] = {}  # candidate key -> attempts launched and not yet ended
        self._waiting_since: dict[str, float] = {}  # candidate key -> no news from it since (while in flight)
        self._explored: dict[str, float] = {}  # candidate key -> when a request last explored it

    # ----------------------------------------------------------------------------------- state

    def stats(self, c: Candidate) -> CandidateStats:
        s = self._stats.get(c.key)
        if s is None:
            s = self._stats[c.key] = CandidateStats(
                half_life_s=self.cfg.half_life_s,
                min_weight=self.cfg.min_samples,
                recent_half_life_samples=self.cfg.order_half_life_samples,
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

    def last_first_token(self, c: Candidate) -> float | None:
        """When `c` last produced a first token (what makes its estimate fresh); None if never."""
        return self._last_exact.get(c.key)

    def saw_first_token(self, c: Candidate, at: float) -> None:
        """A peer instance saw a first token from `c` at `at` (shared state, hedge/shared.py): the
        fleet's evidence is as fresh as its newest sample. Never moves the time back."""
        if at > self._last_exact.get(c.key, -math.inf):
            self._last_exact[c.key] = at

    def error_rate(self, c: Candidate, now: float) -> float:
        """Recent failure rate before the first token; 0 while it rests on < `min_samples` outcomes."""
        s = self.stats(c)
        if s.outcome_weight(now) < self.cfg.min_samples:
            return 0.0
        return s.error_rate(now)

    # ------------------------------------------------------------------------------- decisions

    def order(
        self, plan: Plan, now: float, preference: Sequence[str] = (), candidates: Sequence[Candidate] = ()
    ) -> list[Candidate]:
        """The candidates to race, best first (see the module docstring); 503 when all are cooling down.

        Not a pure query: when a half-open candidate leads, this takes its probe slot, so call it once
        per request and launch the first candidate it returns.
        """
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
        probing = {c.key for c in available if self.breaker(c).state(now) is not BreakerState.CLOSED}
        rates = {c.key: self.error_rate(c, now) for c in available}

        def tier(c: Candidate) -> int:
            if c.key in probing:
                return _PROBE
            return _ERRORING if rates[c.key] >= UNHEALTHY_ERROR_RATE else _HEALTHY

        strategy = plan.strategy
        explore: Candidate | None = None
        if strategy == "hedge":
            fresh_s = 2.0 * self.cfg.half_life_s
            known: dict[str, float | None] = {}
            age: dict[str, float] = {}  # since the candidate's latest first token
            for c in available:
                age[c.key] = now - self._last_exact.get(c.key, -math.inf)
                known[c.key] = None if age[c.key] > fresh_s else self.stats(c).current_ttft(now)
            silent = {c.key for c in available if self.silent(c, now, plan.route)}

            def current(c: Candidate) -> bool:
                est = known[c.key]
                return est is not None and age[c.key] <= max(CURRENT_MIN_S, CURRENT_TTFTS * est)

            def key(c: Candidate) -> tuple[float, ...]:
                est = known[c.key]
                if est is None or c.key in silent:
                    return (tier(c), 1, math.inf, index[c.endpoint])
                group = 0 if current(c) else 1
                return (tier(c), group, est / max(0.1, 1.0 - rates[c.key]), index[c.endpoint])

        elif strategy == "cheapest":

            def key(c: Candidate) -> tuple[float, ...]:
                return (tier(c), blended_price(c), index[c.endpoint])

        else:  # failover / auto: config (or auto's) order, the less erroring first

            def key(c: Candidate) -> tuple[float, ...]:
                return (tier(c), round(rates[c.key], 1), index[c.endpoint])

        available.sort(key=key)
        if strategy == "hedge" and not preference:  # the caller's own order gets no extra attempts
            explore = self._pick_explore(available, known, silent, tier, now)
        if explore is not None:
            self._explored[explore.key] = now
            # explore by racing, not by leading: right behind the leader, launched with it (delay 0,
            # see AdaptiveDelay), so the caller gets the faster of the two and never waits on a
            # guess; at cold start, with nothing known, the explored candidate simply leads
            rest = [c for c in available if c is not explore]
            first = rest[0] if rest else None
            keep_first = first is not None and (
                tier(first) == _PROBE or (known[first.key] is not None and first.key not in silent)
            )  # a probe, or a known leader, keeps its place; the explored one races beside it
            available = [rest[0], explore, *rest[1:]] if keep_first else [explore, *rest]
        if preference:
            available = apply_preference(available, preference)
        out = Ordered()
        for c in available:
            # a half-open candidate goes only as attempt 1, the one launch that is certain
            if c.key in probing and (out or not self.breaker(c).acquire(now)):
                continue
            out.append(c)
        out.explore_second = explore is not None and len(out) > 1 and out[1] is explore
        return out

    def _pick_explore(
        self,
        ordered: list[Candidate],
        known: dict[str, float | None],
        silent: set[str],
        tier: Callable[[Candidate], int],
        now: float,
    ) -> Candidate | None:
        """The candidate this request should measure, if any (at most one per EXPLORE_EVERY half-lives
        each): one with no fresh evidence, or one whose last few answers beat the leader's estimate
        while its long window still remembers it slower (a provider that recovered: racing it is how
        its long window learns, where it would otherwise wait for old data to decay)."""
        lead = ordered[0] if ordered and known[ordered[0].key] is not None else None
        lead_est = known[lead.key] if lead is not None else None
        for c in ordered:
            if c is lead or tier(c) != _HEALTHY or c.key in silent:
                continue
            if now - self._explored.get(c.key, -math.inf) < self.cfg.half_life_s * EXPLORE_EVERY:
                continue
            if known[c.key] is None:
                return c
            recent = self.stats(c).recent_ttft()
            if lead_est is not None and recent is not None and recent < lead_est:
                return c
        return None

    def delay_policy(
        self, plan: Plan, candidates: Sequence[Candidate], now: float, eagerness: float
    ) -> AdaptiveDelay | None:
        """The hedge delays for one request; None (no delay-triggered hedges) unless hedging and x > 0.

        When `order` put a candidate to explore second, the second attempt launches at once (delay 0;
        it still spends a hedge-budget token, so exploration is bounded by the budget too)."""
        if plan.strategy != "hedge" or eagerness <= 0.0:
            return None
        zero_first = bool(getattr(candidates, "explore_second", False))
        return AdaptiveDelay(self, plan.route, candidates, now, eagerness, zero_first=zero_first)

    def silent(self, c: Candidate, now: float, route: RouteConfig) -> bool:
        """No news from `c` for longer than its own 90th-percentile TTFT while attempts wait on it.

        The earliest sign that a provider slowed down: its unanswered attempts age before any slow
        answer can come back. A silent candidate cannot lead (it sorts with the unknown, after the
        known ones), so a slowdown moves traffic within one p90 instead of after the slow answers,
        and a provider promoted on old evidence takes only what arrives in that window before it is
        silent in turn. O(1): one timestamp per candidate, set by launches and cleared by news.
        """
        since = self._waiting_since.get(c.key)
        if since is None:
            return False
        limit = self.stats(c).ttft_quantile(0.9, now)
        return now - since > (route.default_delay_ms / 1000 if limit is None else limit)

    # ---------------------------------------------------------------------------------- events

    def on_launch(self, c: Candidate, now: float) -> None:
        """An attempt on `c` started: if nothing else was waiting on `c`, the wait starts now."""
        k = c.key
        n = self._inflight.get(k, 0)
        self._inflight[k] = n + 1
        if n == 0:
            self._waiting_since[k] = now

    def _ended(self, c: Candidate, now: float, news: bool) -> None:
        k = c.key
        n = self._inflight.get(k, 0) - 1
        if n <= 0:
            self._inflight[k] = 0
            self._waiting_since.pop(k, None)
        else:
            self._inflight[k] = n
            if news:  # an answer (or a failure) arrived: the others have waited only since now
                self._waiting_since[k] = now

    def on_first_token(self, c: Candidate, ttft: float, now: float) -> None:
        """An attempt produced its first token `ttft` s after launch: an exact sample and a success."""
        s = self.stats(c)
        s.record_first_token(ttft, now)
        s.record_success(now)
        self._last_exact[c.key] = now
        self._ended(c, now, news=True)
        self.breaker(c).on_success(now)

    def on_failure(
        self, c: Candidate, failure: Failure, now: float, *, launched_at: float | None = None
    ) -> None:
        """An attempt failed before its first token (the caller's 4xx is not the provider's failure).

        `launched_at` lets the breaker tell its half-open probe from a straggler launched before it.
        """
        self._ended(c, now, news=True)
        if failure.kind is FailureKind.CALLER:
            return  # the request was bad, the provider was fine
        self.stats(c).record_failure(now)
        self.breaker(c).on_failure(now, failure.retry_after, launched_at=launched_at)

    def on_cancelled(
        self,
        c: Candidate,
        elapsed: float,
        now: float,
        *,
        lost: bool = False,
        launched_at: float | None = None,
    ) -> None:
        """A loser or abandoned attempt: we only know its TTFT exceeded `elapsed` (censored).

        `lost`: it was cancelled because another attempt got the first token (not because the client
        left or another attempt's 4xx ended the race); only a half-open probe's breaker cares, and
        `launched_at` tells it whether this attempt can be its probe.
        """
        self._ended(c, now, news=False)
        self.stats(c).record_censored(elapsed, now)
        self.breaker(c).on_cancelled(now, lost=lost, launched_at=launched_at)

    def on_complete(self, c: Candidate, duration: float, now: float) -> None:
        """The winner's stream (or body) completed after `duration` s."""
        self.stats(c).record_total(duration, now)


def apply_preference(cands: list[Candidate], preference: Sequence[str]) -> list[Candidate]:
    """Move candidates named by X-GammaInfra-Preference (provider, model or model@provider) first.

    Preferred candidates keep the preference's order (ties among one name keep the learned order);
    the rest follow in the learned order. A preferred candidate that is cooling down is not resurrected.
    """
    chosen: list[Candidate] = []
    for p in preference:
        for c in cands:
            if c not in chosen and p in (c.provider.name, c.model.name, c.endpoint):
                chosen.append(c)
    return chosen + [c for c in cands if c not in chosen]
