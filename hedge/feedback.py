"""Feedback: what the proxy has learned decides the next race (docs/design.md, "Feedback policy").

Owns, per candidate, a `CandidateStats` (decayed TTFT histogram with censoring, error rate), an
`Evidence` (the last few ended attempts and those in flight, `policy.py`) and a `CircuitBreaker`, and per
route two buckets split from `hedge_budget` (delay hedges, exploration). It turns them into the three
decisions a request needs, all taken with an explicit `now` so fake-clock tests drive them exactly:

- **order** (`order` -> `Order`): tier first, then the route's strategy key (`strategy.py`):
  1. *the probe*: a candidate whose breaker is half-open (backoff over, probe slot free). `order` takes
     the probe slot and puts it first, because attempt 1 is the only one certain to launch; only one
     half-open candidate per request is kept, the others are left out of that request. Concurrent
     requests do not see the slot, so exactly one request probes; a cancelled probe is reported with
     `on_cancelled(lost=...)` (outrun by the hedge = failed probe, otherwise the slot is freed). The
     probe's caller gets its first hedge free of the budget (`Order.probe`, `request_budget`): the
     probed provider may have come back slow (a restart), the budget is often drained just then, and
     a refused hedge made that caller wait out the slow provider (the load test's `slowdown`: the
     worst requests after the change). Probes come at most one per backoff (>= `base_backoff_s`), so
     this adds at most one attempt per second per provider.
  2. *healthy*: breaker closed and a recent error rate (trusted from `min_samples` decayed outcomes)
     below `UNHEALTHY_ERROR_RATE`;
  3. *erroring*: the rest, still tried, last.
  For `hedge` the key is the expected TTFT given what is outstanding (`ttft`): the Kaplan-Meier median
  of the candidate's last few ended attempts *and* its attempts in flight, censored at their age. One
  rule covers what used to be four: a slowed leader's waiting attempts demote it within about three of
  its old TTFTs (no silence guard); only an identified median may lead, so a provider promoted on old
  evidence takes traffic only until its own waiting attempts say otherwise (no freshness or "current"
  groups), unless the leader is clearly degraded (a challenger's newest kept exact answer is at most
  half its median: `strategy.LEAD_MARGIN`), or its median is at least twice its own usual one (its long
  window's: a drift; the best-ranked challenger that may be faster leads on trial); and a recovered
  provider needs four fast answers to lead (no second window). With shared state the ended attempts
  are the fleet's newest (`Evidence.set_remote`, hedge/shared.py), so a slowdown or a recovery met by
  another instance's traffic counts here too.
- **exploration** (`_explore`): a healthy non-leading candidate that is unknown, has had no exact
  answer for a quarter half-life, or is promising (a fresh answer beat the leader's estimate) is raced
  *beside* the leader from the start (delay 0), so the caller gets the faster of the two and exploring
  never costs latency. It is paid from the route's exploration bucket (an eighth of `hedge_budget`),
  so delay hedges cannot starve it; a stale refresh only from a full bucket, so routine refreshes
  cannot starve the news either; news (promising, or never answered) may also use the hedge bucket
  while that is at least half full. Requests with X-GammaInfra-Preference never explore.
- **delay** (`AdaptiveDelay`): the `policy.hedge_quantile` of the running candidate's TTFT histogram,
  capped at `TAIL_FACTOR` x its current median, moved down to the knee of the tail (`policy.knee`),
  clamped, times the dial factor; **budget**
  (`request_budget`): whether a delay hedge may be spent.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .budget import HedgeBudget
from .catalog import Candidate, Plan
from .config import FeedbackConfig, RouteConfig
from .errors import NoCandidates
from .health import BreakerState, CircuitBreaker
from .policy import (
    Estimate,
    Evidence,
    RequestBudget,
    hedge_quantile,
    hedge_share,
    knee,
    latency_bucket,
    split_budget,
)
from .race import Failure, FailureKind
from .stats import CandidateStats
from .strategy import ERRORING, HEALTHY, PROBE, View, blended_price
from .strategy import get as get_strategy

__all__ = [
    "DEFAULT_EAGERNESS",
    "UNHEALTHY_ERROR_RATE",
    "AdaptiveDelay",
    "Feedback",
    "Order",
    "apply_preference",
    "blended_price",
    "dial_multiplier",
]

DEFAULT_EAGERNESS = 0.5
UNHEALTHY_ERROR_RATE = 0.5
"""A candidate failing at least this often (recently, before its first token) sorts after the healthy."""

EXPLORE_EVERY = 0.25
"""A non-leading candidate without an exact answer for this many half-lives is due to be explored."""

NEWS = 3
"""Attempts beyond the long window's median that make a lower bound count against it (`Feedback.ttft`)."""

TAIL_FACTOR = 3.0
"""The hedge delay never exceeds this multiple of the candidate's current median (`Feedback.ttft`)."""


def dial_multiplier(eagerness: float) -> float:
    """X-GammaInfra-Cost-Quality x (0..1) -> hedge delay multiplier 2**(1 - 2x).

    0.5 (the default) keeps the quantile, 1.0 halves it (hedge sooner: lower tail, more upstream load),
    0.25 multiplies it by 1.41, and 0 would double it but instead disables delay-triggered hedging for
    the request (`Feedback.delay_policy` returns None; errors still fail over). The budget applies at any
    dial, so an eager caller cannot spend more than the route's `hedge_budget`.
    """
    return 2.0 ** (1.0 - 2.0 * eagerness)


@dataclass(frozen=True, slots=True)
class Order:
    """`Feedback.order`'s answer: the candidates to race, best first, and the one being explored.

    `explore`, when set, is `candidates[1]`: it launches together with the first (delay 0), paid by
    the exploration already taken in `order`. Iterating, indexing and `len` go to `candidates`.
    """

    candidates: tuple[Candidate, ...]
    explore: Candidate | None = None
    probe: bool = False  # candidates[0] is a half-open breaker's probe (its hedge is free)

    def __iter__(self) -> Iterator[Candidate]:
        return iter(self.candidates)

    def __len__(self) -> int:
        return len(self.candidates)

    def __getitem__(self, i: int) -> Candidate:
        return self.candidates[i]


class AdaptiveDelay:
    """Hedge delay = `hedge_quantile(route)` of the running candidate's TTFT, clamped, times the dial.

    The quantile comes from the candidate's `CandidateStats` (exact and censored samples, forgetting
    with the configured half-life), `default_delay_ms` while it rests on fewer than `min_samples`.
    Statistics are read as of the request's start: one request sees one consistent picture.

    The long window is the right source for a tail quantile (it needs many samples) but the wrong one
    after a change: once a provider recovers from 3 s to 0.3 s, its p95 stays at 3 s until the old mass
    decays below 5 % (over four half-lives), and every stall meanwhile waits out the old delay. So the
    delay is capped at `TAIL_FACTOR` x the current median, the same evidence the order uses. A leader
    that slowed down is hedged at its old, short delay until the order moves it (within a TTFT or two):
    the order is the free remedy, hedges are the paid one, and the budget caps what they cost meanwhile.
    """

    __slots__ = (
        "_afford",
        "_cands",
        "_fb",
        "_hi",
        "_lo",
        "_memo",
        "_mult",
        "_now",
        "_q",
        "_zero_first",
        "default",
    )

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
        self._q = hedge_quantile(route)
        self._afford = hedge_share(route)
        self._lo = route.min_delay_ms / 1000
        self._hi = route.max_delay_ms / 1000
        self.default = route.default_delay_ms / 1000
        self._mult = dial_multiplier(eagerness)
        self._now = now
        self._memo: dict[int, float] = {}  # candidate -> estimate (one request, one picture)

    def _estimate(self, candidate: int) -> float:
        est = self._memo.get(candidate)
        if est is None:
            est = self._memo[candidate] = self._compute(candidate)
        return est

    def _compute(self, candidate: int) -> float:
        c = self._cands[candidate]
        est = self._fb.stats(c).ttft_quantile(self._q, self._now)
        if est is None:
            return self.default
        now, e = self._fb.ttft(c, self._now)
        if now is not None and not e.lower_bound and now * TAIL_FACTOR < est:
            est = now * TAIL_FACTOR
        return knee(self._fb.stats(c).ttft, est, self._afford, self._now)

    def delay(self, candidate: int) -> float | None:
        """Seconds to wait for `candidate`'s first token before launching the next one."""
        if candidate == 0 and self._zero_first:
            return 0.0  # the second candidate is being explored: race it from the start
        return min(self._hi, max(self._lo, self._estimate(candidate) * self._mult))

    def base_delay(self, candidate: int) -> float:
        """The delay at the default dial: the route's current delay for `candidate`, for the gauge."""
        return min(self._hi, max(self._lo, self._estimate(candidate)))


class Feedback:
    """Per-candidate statistics, evidence and breakers, per-route budgets, and the decisions made from them.

    The proxy keeps two of these *lanes*, one for streaming and one for non-streaming requests,
    because their "first token" means different things (the first content event vs the whole body).
    Health is one thing per provider, so the non-streaming lane shares the streaming lane's breakers
    and budgets (`health_from`).
    """

    def __init__(self, cfg: FeedbackConfig, *, health_from: Feedback | None = None) -> None:
        self.cfg = cfg
        self._stats: dict[str, CandidateStats] = {}
        self._evidence: dict[str, Evidence] = {}
        self._breakers: dict[str, CircuitBreaker] = {} if health_from is None else health_from._breakers
        self._budgets: dict[str, tuple[HedgeBudget, HedgeBudget]] = (
            {} if health_from is None else health_from._budgets
        )

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

    def evidence(self, c: Candidate) -> Evidence:
        e = self._evidence.get(c.key)
        if e is None:
            e = self._evidence[c.key] = Evidence()
        return e

    def breaker(self, c: Candidate) -> CircuitBreaker:
        b = self._breakers.get(c.key)
        if b is None:
            b = self._breakers[c.key] = CircuitBreaker(
                failure_threshold=self.cfg.failure_threshold,
                base_backoff_s=self.cfg.base_backoff_s,
                max_backoff_s=self.cfg.max_backoff_s,
            )
        return b

    def _buckets(self, route: RouteConfig) -> tuple[HedgeBudget, HedgeBudget]:
        b = self._budgets.get(route.name)
        if b is None:
            b = self._budgets[route.name] = split_budget(route)
        return b

    def budget(self, route: RouteConfig) -> HedgeBudget:
        """The route's delay-hedge bucket (7/8 of `hedge_budget`; `spent`/`refusals` are its counters)."""
        return self._buckets(route)[0]

    def explore_budget(self, route: RouteConfig) -> HedgeBudget:
        """The route's exploration bucket (1/8 of `hedge_budget`)."""
        return self._buckets(route)[1]

    def in_flight(self) -> dict[str, int]:
        """Attempts launched and not yet reported ended, per candidate key (0 when all is told)."""
        return {k: e.pending for k, e in self._evidence.items()}

    def circuit_states(self, now: float) -> dict[str, BreakerState]:
        return {k: b.state(now) for k, b in self._breakers.items()}

    def error_rate(self, c: Candidate, now: float) -> float:
        """Recent failure rate before the first token; 0 while it rests on < `min_samples` outcomes."""
        s = self.stats(c)
        if s.outcome_weight(now) < self.cfg.min_samples:
            return 0.0
        return s.error_rate(now)

    def ttft(self, c: Candidate, now: float) -> tuple[float | None, Estimate]:
        """Expected TTFT given what is outstanding (None: unknown), and the evidence behind it.

        The Kaplan-Meier median of the last few ended attempts plus those in flight (`Evidence`). When
        that median is not identified (mostly waiting or cancelled attempts, or too few exact answers),
        the long window's median stands in for it (without one the candidate is unknown), unless at
        least `NEWS` of the kept attempts took longer than that median: then the bound is news (a
        slowdown) and counts. A hedge target loses most races early and has one attempt in flight now
        and then; that one attempt's age is no reason to rank it behind a slower backup.
        """
        e = self.evidence(c).estimate(now)
        if e.ttft is None or not e.lower_bound:
            return e.ttft, e
        long = self.stats(c).expected_ttft(now)
        if long is None:
            return None, e  # "at least t" and nothing else: unknown (explored, not ranked)
        if long < e.ttft and self.evidence(c).beyond(long, now) >= NEWS:
            return e.ttft, e
        return long, e

    # ------------------------------------------------------------------------------- decisions

    def order(
        self, plan: Plan, now: float, preference: Sequence[str] = (), candidates: Sequence[Candidate] = ()
    ) -> Order:
        """The candidates to race, best first (see the module docstring); `NoCandidates` (with the wait
        until the first breaker lets a probe through) when all are cooling down.

        Not a pure query: it takes a half-open candidate's probe slot when that leads, and the
        exploration token when it explores, so call it once per request and race what it returns.
        """
        cands = list(candidates or plan.candidates)
        available = [c for c in cands if self.breaker(c).available(now)]
        if not available:
            waits = [self.breaker(c).retry_at(now) for c in cands]
            retry = min((w - now for w in waits if w is not None), default=1.0)
            raise NoCandidates(plan.name, retry)
        strategy = get_strategy(plan.strategy)
        index = {c.endpoint: i for i, c in enumerate(cands)}
        probing = {c.key for c in available if self.breaker(c).state(now) is not BreakerState.CLOSED}
        views: dict[str, View] = {}
        for c in available:
            rate = self.error_rate(c, now)
            tier = PROBE if c.key in probing else ERRORING if rate >= UNHEALTHY_ERROR_RATE else HEALTHY
            ttft, est = self.ttft(c, now) if strategy.needs_latency else (None, _NO_ESTIMATE)
            usual = self.stats(c).expected_ttft(now) if strategy.needs_latency else None
            last = self.evidence(c).last_kept_exact
            views[c.key] = View(c, index[c.endpoint], tier, rate, ttft, est, last, usual)
        available = [v.candidate for v in strategy.rank([views[c.key] for c in available])]
        explore = None
        if strategy.hedges and not preference and len(available) > 1 and available[0].key not in probing:
            # (never beside a probe: an explored attempt that outran it would fail the probe)
            explore = self._explore(plan.route, available, views, now)
            if explore is not None:
                available.remove(explore)
                available.insert(1, explore)
        if preference:
            available = apply_preference(available, preference)
        out: list[Candidate] = []
        for c in available:
            # a half-open candidate goes only as attempt 1, the one launch that is certain
            if c.key in probing and (out or not self.breaker(c).acquire(now)):
                continue
            out.append(c)
        if explore is not None and (len(out) < 2 or out[1] is not explore):
            explore = None  # unreachable in practice (the leader is never the one left out)
        return Order(tuple(out), explore, probe=bool(out) and out[0].key in probing)

    def _explore(
        self, route: RouteConfig, ordered: list[Candidate], views: dict[str, View], now: float
    ) -> Candidate | None:
        """The candidate this request should measure beside the leader, if any, with its token taken.

        Due: healthy, not the leader, and unknown, or promising (its latest exact answer is in a faster
        latency bucket than the leader's estimate, it arrived within the last `EXPLORE_EVERY`
        half-lives, and its own median is not identified: confirm it now), or without an exact answer for
        `EXPLORE_EVERY` half-lives; in that order. None while the leader itself is unknown (cold start:
        it is being measured as it serves). Paid from the exploration bucket, a stale one only when
        that is full (one token is kept for the news a change brings: at 10 req/s the next one is 8 s
        away); news (promising, or unknown and never answered), when that is empty, from the hedge
        bucket while it is at least half full. An unknown candidate that did answer before (its long
        window decayed: a third provider rarely launched) is not news and, like a stale one, can wait:
        what stalls need is not spent on routine refreshes (it was ~2 % of requests in steady state).
        """
        lead = views[ordered[0].key]
        if lead.ttft is None:
            return None  # nothing known yet: the leader is itself being measured, at no extra cost
        lead_b = latency_bucket(lead.ttft)
        stale_s = self.cfg.half_life_s * EXPLORE_EVERY
        best: tuple[float, ...] | None = None
        pick: Candidate | None = None
        for c in ordered[1:]:
            v = views[c.key]
            if v.tier != HEALTHY:
                continue
            ev = self.evidence(c)
            # an attempt cancelled early says little: staleness counts from the latest exact answer
            last = -math.inf if ev.last_exact_at is None else ev.last_exact_at
            if v.ttft is None:
                rank: tuple[float, ...] = (0, v.index)
            elif (
                v.estimate.lower_bound  # its own answers do not say otherwise yet
                and ev.last_exact is not None
                and now - last < stale_s  # fresh news, not an old lucky answer
                and latency_bucket(ev.last_exact) < lead_b
            ):
                rank = (1, ev.last_exact / lead.ttft)  # the more promising first
            elif now - last >= stale_s:
                rank = (2, last)
            else:
                continue
            if best is None or rank < best:
                best, pick = rank, c
        if pick is None or best is None:
            return None
        hedges, explores = self._buckets(route)
        if explores.tokens >= (1.0 if best[0] < 2 else explores.burst):
            explores.try_spend()  # a routine (stale) refresh only from a full bucket: one is kept for news
            return pick
        news = best[0] == 1 or (best[0] == 0 and self.evidence(pick).last_exact_at is None)
        if news and hedges.tokens >= hedges.burst / 2 and hedges.tokens >= 1.0:
            hedges.try_spend()  # news, and the hedge bucket has room: do not wait
            return pick
        return None

    def delay_policy(
        self, plan: Plan, candidates: Order | Sequence[Candidate], now: float, eagerness: float
    ) -> AdaptiveDelay | None:
        """The hedge delays for one request; None (no delay-triggered hedges) unless the strategy hedges
        and x > 0. When `order` chose a candidate to explore, the second attempt launches at once."""
        if not get_strategy(plan.strategy).hedges or eagerness <= 0.0:
            return None
        if isinstance(candidates, Order):
            explore, cands = candidates.explore is not None, candidates.candidates
        else:
            explore, cands = False, tuple(candidates)
        return AdaptiveDelay(self, plan.route, cands, now, eagerness, zero_first=explore)

    def request_budget(self, route: RouteConfig, order: Order | None = None) -> RequestBudget:
        """One request's hedge budget: deposits its share in both buckets; an exploration that `order`
        already paid for makes the race's first delay launch free."""
        hedges, explores = self._buckets(route)
        hedges.on_request()
        explores.on_request()
        if order is None:
            return RequestBudget(hedges)
        return RequestBudget(hedges, prepaid=int(order.explore is not None or order.probe))

    # ---------------------------------------------------------------------------------- events

    def on_launch(self, c: Candidate, now: float) -> None:
        """An attempt on `c` started: it is evidence from now on (see `Evidence`)."""
        self.evidence(c).launched(now)

    def on_first_token(
        self, c: Candidate, ttft: float, now: float, *, launched_at: float | None = None
    ) -> None:
        """An attempt produced its first token `ttft` s after launch: an exact sample and a success."""
        s = self.stats(c)
        s.record_first_token(ttft, now)
        s.record_success(now)
        self.evidence(c).answered(ttft, now, launched_at)
        self.breaker(c).on_success(now)

    def on_failure(
        self, c: Candidate, failure: Failure, now: float, *, launched_at: float | None = None
    ) -> None:
        """An attempt failed before its first token (the caller's 4xx is not the provider's failure).

        `launched_at` lets the breaker tell its half-open probe from a straggler launched before it.
        """
        self.evidence(c).failed(now, launched_at)
        if failure.kind is FailureKind.CALLER:
            return  # the request was bad, the provider was fine
        self.stats(c).record_failure(now)
        breaker = self.breaker(c)
        was_closed = breaker.state(now) is BreakerState.CLOSED
        breaker.on_failure(now, failure.retry_after, launched_at=launched_at)
        if was_closed and breaker.state(now) is not BreakerState.CLOSED:
            # it went down (a restart, an overload): what it answered before says little about what
            # comes back, and old fast answers would let it lead again the moment its probe succeeds
            self.evidence(c).forget()

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
        self.evidence(c).cancelled(elapsed, now, launched_at)
        self.stats(c).record_censored(elapsed, now)
        self.breaker(c).on_cancelled(now, lost=lost, launched_at=launched_at)

    def on_complete(self, c: Candidate, duration: float, now: float) -> None:
        """The winner's stream (or body) completed after `duration` s."""
        self.stats(c).record_total(duration, now)


_NO_ESTIMATE = Estimate(None, False, 0, 0)


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
