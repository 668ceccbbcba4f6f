"""The hedge policy's evidence and its one load knob (sans-IO; every method takes `now`).

Three rules replace the old stack of special cases (silence guard, current/fresh groups, recovery cap,
two windows):

1. **In-flight attempts are evidence.** Per candidate, `Evidence` keeps its last `EVIDENCE_N` ended
   attempts (an exact TTFT, or "more than t" for one cancelled after t) *and* the launch times of the
   attempts still waiting. At decision time an attempt that has
   waited t counts as a censored observation "TTFT > t", and the estimate is the Kaplan-Meier median
   over all of them. A provider that slowed 10x therefore looks slow once a few of its waiting
   attempts are older than its old median, one to two of its old TTFTs after the change, before any
   slow answer comes back and however many pre-change answers trickle in. A stall on a few % of
   requests is one waiting attempt among many answers, and moves the median by at most one rank.
2. **Load-aware order** (`strategy.Fastest`): rank by that estimate, which already conditions on what
   is outstanding; at equal latency (same histogram bucket) the candidate with fewer attempts in
   flight leads, as in Finagle's peak-EWMA x (pending + 1) balancer. Unlike Finagle, pending attempts
   raise the cost only through the evidence they carry: an LLM API is not a single-server queue, and
   a pending count alone would push traffic off the fastest provider in a steady state.
3. **One knob for load** (`hedge_quantile`, `split_budget`): the route's `hedge_budget` b is split
   into 7b/8 for delay hedges and b/8 for exploration, and the hedge delay sits at the 1 - b/2
   quantile, so delay hedges are *demanded* at b/2 per request against 7b/8 deposited. The bucket
   then rarely runs dry in a steady state (no coin-flip tails), and exploration has its own share
   that hedges cannot starve.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from math import log
from typing import Protocol

from .budget import HedgeBudget
from .config import RouteConfig

EVIDENCE_N = 7
"""Ended attempts kept per candidate: few enough that four fresh answers outvote the old ones (a
recovered provider leads again after four fast answers, which exploration collects within a few
requests), enough that two or three stalls among them cannot demote a leader."""

MIN_EXACT = 4
"""A median is identified only when it rests on at least this many exact answers (a majority of the
kept attempts). A hedge target loses most races early, and one lucky answer among four early
cancellations would otherwise pass for its median."""

PENDING_MAX = 32
"""At most this many of the oldest waiting attempts enter an estimate (the young ones barely matter)."""

HEDGE_DEMAND = 0.5
"""Delay hedges are aimed at this share of the budget (the delay's quantile is 1 - HEDGE_DEMAND x b)."""

EXPLORE_SHARE = 0.125
"""This share of the budget is kept for exploration; delay hedges get the rest."""

KNEE_SLACK = 0.1
"""The hedge delay moves down to the shortest delay that demands at most this much more (relatively)
than the quantile's delay (`knee`): where the TTFT distribution is flat, a shorter delay is free."""

EXPLORE_BURST = 2.0
"""Exploration tokens that can accumulate: two back-to-back explorations confirm a promising answer."""

Ended = tuple[float, float, int]
"""An ended attempt: (when it ended, seconds, 0 = exact TTFT | 1 = censored: "more than seconds")."""

_BUCKET = log(10.0) / 20.0  # the statistics' resolution (20 buckets per decade): "equal latency"


def hedge_quantile(route: RouteConfig) -> float:
    """The quantile of the running candidate's TTFT at which it is hedged: max(quantile, 1 - b/2).

    The budget b bounds how often a hedge may be *paid*; a delay at a lower quantile would *demand*
    hedges at 1 - quantile per request, and whenever that approaches the deposit rate the bucket
    hovers at empty and whichever stall comes next is refused (a coin-flip tail). Deriving the
    quantile from the budget, as Finagle's BackupRequestFilter derives it from `maxExtraLoad`, keeps
    demand at half the budget; `quantile` can only make hedging rarer.
    """
    if route.hedge_budget <= 0.0:
        return route.quantile  # no delay hedges at all; the delay only shows in the gauge
    return 1.0 - HEDGE_DEMAND * route.hedge_budget


def hedge_share(route: RouteConfig) -> float:
    """Delay hedges per request that the hedge bucket earns: the budget less the exploration share."""
    return route.hedge_budget * (1.0 - EXPLORE_SHARE)


class _Tail(Protocol):
    def survival(self, value: float, now: float) -> float | None: ...
    def quantile(self, q: float, now: float) -> float | None: ...


def knee(tail: _Tail, delay: float, afford: float, now: float) -> float:
    """The shortest delay whose hedge demand (the share of TTFTs above it) is at most `KNEE_SLACK`
    more than `delay`'s, and at most `afford` (what the bucket earns per request); `delay` if none.

    The quantile 1 - b/2 says how *often* to hedge, not how long to wait: when the TTFT distribution
    has a gap (a fast body plus stalls at seconds), every delay in the gap demands the same hedges
    (the stalls), and the quantile, or the `TAIL_FACTOR` cap, can sit anywhere in it. A stall then
    waits out that delay for nothing: with 3 % stalls and b = 0.05 the delay sat at 3x the median,
    and p99 was 1.2-1.3x the best fixed stagger at equal load. Sliding down to the knee of the tail
    buys the same hedges sooner. It never moves the delay below where demand would outgrow the
    bucket (after a recovery the long window's old mass lies above the cap: there it stays put).
    """
    demand = tail.survival(delay, now)
    if demand is None or demand <= 0.0:
        return delay
    target = min((1.0 + KNEE_SLACK) * demand, afford)
    if target <= demand:
        return delay
    shorter = tail.quantile(1.0 - target, now)
    return shorter if shorter is not None and shorter < delay else delay


def split_budget(route: RouteConfig) -> tuple[HedgeBudget, HedgeBudget]:
    """(hedge bucket, exploration bucket) for a route: 7/8 and 1/8 of `hedge_budget` per request."""
    b = route.hedge_budget
    hedges = HedgeBudget(hedge_share(route), burst=route.hedge_burst)
    explore = HedgeBudget(b * EXPLORE_SHARE if b * EXPLORE_SHARE >= 1e-6 else 0.0, burst=EXPLORE_BURST)
    return hedges, explore


def latency_bucket(seconds: float) -> int:
    """Log bucket of a latency (about 12 % wide): two estimates in one bucket are "equal latency"."""
    return int(log(max(seconds, 1e-6)) / _BUCKET)


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a candidate's evidence says at one instant.

    `ttft`: the Kaplan-Meier median. `lower_bound` is True when it is not identified: when fewer than
    half of the observations ended by the largest one (mostly waiting or cancelled), `ttft` is that
    largest time, a lower bound; when it rests on fewer than `MIN_EXACT` exact answers, it is the
    median but not to be trusted alone. `pending`: attempts in flight. `ended`: ended attempts kept.
    """

    ttft: float | None
    lower_bound: bool
    pending: int
    ended: int


class Evidence:
    """The last `EVIDENCE_N` ended attempts of one candidate plus the launch times of those in flight.

    Ended attempts count per attempt, not per second, so the evidence neither goes stale with idle time
    nor drowns in a high request rate; what is in flight joins it only at decision time (`estimate`).
    Reports name the attempt by its launch time; without one, the launch time is inferred from the
    elapsed time, and the closest waiting attempt is taken (which one is immaterial to the estimate).

    With shared state (hedge/shared.py) the ended attempts are the fleet's: the peers' newest ones
    (`set_remote`) join ours, and the window keeps the newest `n` of both by end time, so a slowdown
    that another instance's traffic met counts here as if this instance had met it. Only ended
    attempts travel; what is in flight is known where it was launched.
    """

    __slots__ = (
        "_cache",
        "_exact",
        "_last_kept",
        "_local",
        "_local_exact",
        "_n",
        "_pending",
        "_remote",
        "_remote_exact",
        "_since",
        "_sorted",
        "last_launch",
    )

    def __init__(self, n: int = EVIDENCE_N) -> None:
        self._n = n
        # this instance's ended attempts: (ended at, seconds, 0 = exact | 1 = censored), oldest first
        self._local: deque[Ended] = deque(maxlen=n)
        # the peers' newest n (shared state, `set_remote`), oldest first; empty without [shared]
        self._remote: list[Ended] = []
        # the window (the newest n of both) as (seconds, censored), sorted: exact before censored at
        # equal times; rebuilt per end, not per estimate
        self._sorted: list[tuple[float, int]] = []
        self._exact = 0  # exact answers among them
        self._last_kept: float | None = None  # the TTFT of the newest exact answer among them
        self._cache: Estimate | None = None  # the estimate while nothing is in flight (it is then timeless)
        self._pending: list[float] = []  # launch times, oldest first
        self._since = -math.inf  # the earliest launch among the kept attempts, once there are n
        self.last_launch: float | None = None
        self._local_exact: tuple[float, float] | None = None  # (arrived at, TTFT) of our latest answer
        self._remote_exact: tuple[float, float] | None = None  # the same, the peers' latest

    @property
    def last_exact_at(self) -> float | None:
        """When the latest exact answer arrived, here or (shared state) at a peer."""
        x = self._latest_exact()
        return None if x is None else x[0]

    @property
    def last_exact(self) -> float | None:
        """The latest exact TTFT, here or (shared state) at a peer."""
        x = self._latest_exact()
        return None if x is None else x[1]

    def _latest_exact(self) -> tuple[float, float] | None:
        mine, peers = self._local_exact, self._remote_exact
        if peers is None or (mine is not None and mine[0] >= peers[0]):
            return mine
        return peers

    @property
    def pending(self) -> int:
        return len(self._pending)

    def launched(self, now: float) -> None:
        self._pending.append(now)
        self.last_launch = now

    def _end(self, at: float, seconds: float, censored: int) -> None:
        self._local.append((at, seconds, censored))
        self._window()

    def _window(self) -> None:
        """The kept attempts: the newest `n` ended ones, ours and (shared state) the peers', by end time."""
        window = heapq.nlargest(self._n, chain(self._local, self._remote)) if self._remote else self._local
        # one pass (this runs on every ended attempt, on the request path): the sorted (seconds,
        # censored) pairs, the earliest launch, the exact count and the newest exact answer's TTFT
        pairs: list[tuple[float, int]] = []
        since = math.inf
        exact = 0
        newest: tuple[float, float] | None = None  # (ended at, seconds), the latest exact by end time
        for at, s, c in window:
            pairs.append((s, c))
            if at - s < since:
                since = at - s
            if not c:
                exact += 1
                if newest is None or (at, s) > newest:
                    newest = (at, s)
        pairs.sort()
        self._sorted = pairs
        self._since = since if len(pairs) >= self._n else -math.inf
        self._exact = exact
        self._last_kept = None if newest is None else newest[1]
        self._cache = None

    @property
    def last_kept_exact(self) -> float | None:
        """The TTFT of the newest exact answer among the kept attempts (None without one): what this
        candidate last did, however long ago, as long as fewer than `n` attempts ended since."""
        return self._last_kept

    # -- shared state (hedge/shared.py) ---------------------------------------------------------------
    def local_ended(self) -> list[Ended]:
        """Our own kept attempts (ended at, seconds, censored), oldest first: what this instance publishes."""
        return list(self._local)

    def local_exact(self) -> tuple[float, float] | None:
        """(arrived at, TTFT) of this instance's latest exact answer, kept or not: what it publishes
        beside its kept attempts, since an answer can outlive the window (n cancellations after it)."""
        return self._local_exact

    def set_remote(self, ended: Iterable[Ended], exact: tuple[float, float] | None = None) -> None:
        """Replace the peers' ended attempts (their end times on this instance's clock) and their latest
        exact answer (`exact`, which may predate their kept attempts). The window then holds the newest
        `n` attempts of the whole fleet, as if one instance had served all the traffic (the peers' ones
        late by at most a sync interval); in-flight attempts stay local."""
        newest = heapq.nlargest(self._n, ended)
        newest.reverse()
        self._remote = newest
        kept = [(at, s) for at, s, c in newest if not c]
        latest = kept[-1] if kept else None
        if exact is not None and (latest is None or exact[0] > latest[0]):
            latest = exact
        self._remote_exact = latest
        self._window()

    def forget(self) -> None:
        """Drop this instance's ended attempts (its breaker opened: they predate the outage). What is
        in flight stays, and so do the peers' (shared state), which are newer or their own news."""
        self._local.clear()
        self._local_exact = None
        self._window()

    def _take(self, launched_at: float) -> None:
        p = self._pending
        if not p:
            return
        try:
            p.remove(launched_at)  # the usual case: reported with its exact launch time
        except ValueError:
            del p[min(range(len(p)), key=lambda i: abs(p[i] - launched_at))]

    def answered(self, ttft: float, now: float, launched_at: float | None = None) -> None:
        """A first token after `ttft` s: an exact observation."""
        self._take(now - ttft if launched_at is None else launched_at)
        self._end(now, ttft, 0)
        self._local_exact = (now, ttft)

    def cancelled(self, elapsed: float, now: float, launched_at: float | None = None) -> None:
        """Cancelled after `elapsed` s without a first token: TTFT > elapsed (censored)."""
        self._take(now - elapsed if launched_at is None else launched_at)
        self._end(now, elapsed, 1)

    def failed(self, now: float, launched_at: float | None = None) -> None:
        """Failed before a first token: no latency evidence (the error rate is kept elsewhere)."""
        self._take(now if launched_at is None else launched_at)

    def estimate(self, now: float) -> Estimate:
        """Kaplan-Meier median of the ended attempts plus the waiting ones (censored at their age).

        The waiting ones count from the earliest launch among the kept attempts on: one cohort. An
        attempt launched before that, still waiting, has siblings that ended and left the window, so
        it would count alone: at 100 req/s, the ~8 attempts another route's unhedged 2 s stalls (4 %)
        keep in flight outnumbered the 7 kept answers and demoted the fastest provider (the load
        test's `stalls` with `pinned` beside `fast`). After a slowdown every new launch is in the
        cohort (the kept answers are older), so the slowdown still shows within a TTFT or two."""
        pending = self._pending
        if not pending and self._cache is not None:
            return self._cache
        ended = len(self._sorted)
        exact = self._exact
        if pending and pending[0] < self._since:
            pending = [t for t in pending if t >= self._since]  # the kept attempts' cohort (`estimate`)
        if pending:
            # exact before censored at equal times: a censored one at t was still at risk at t
            obs = sorted(self._sorted + [(now - t, 1) for t in pending[:PENDING_MAX]])
        else:
            obs = self._sorted
        if not obs:
            return Estimate(None, False, 0, 0)
        est = self._km(obs, exact, ended)
        if not pending:
            self._cache = est
        return est

    def beyond(self, t: float, now: float) -> int:
        """Ended or waiting attempts known to take longer than `t` (censored or exact above it)."""
        n = sum(1 for v, _ in self._sorted if v > t)
        return n + sum(1 for launched in self._pending if now - launched > t and launched >= self._since)

    def _km(self, obs: list[tuple[float, int]], exact: int, ended: int) -> Estimate:
        at_risk = len(obs)
        survival = 1.0
        for t, censored in obs:
            if not censored:
                survival *= 1.0 - 1.0 / at_risk
                if survival <= 0.5:  # identified, if it rests on enough exact answers
                    return Estimate(t, exact < MIN_EXACT, len(self._pending), ended)
            at_risk -= 1
        return Estimate(obs[-1][0], True, len(self._pending), ended)


class RequestBudget:
    """One request's view of the hedge bucket: an exploration chosen by `order` was paid for there
    (from the exploration bucket), so the race's first delay launch of that request is free."""

    __slots__ = ("_bucket", "_prepaid")

    def __init__(self, bucket: HedgeBudget, prepaid: int = 0) -> None:
        self._bucket = bucket
        self._prepaid = prepaid

    def try_spend(self) -> bool:
        if self._prepaid > 0:
            self._prepaid -= 1
            return True
        return self._bucket.try_spend()
