"""Route strategies as one registry of small objects (sans-IO).

A strategy says three things about a route: how to rank its candidates (`key`, on a `View` of each),
whether the race hedges on delay (and explores), and whether the candidates come from the prompt's task
class (`auto`). `Feedback.order` and the proxy ask the strategy instead of comparing strings, so a new
strategy is one class and one registry entry.

Every key starts with the health tier (`PROBE` < `HEALTHY` < `ERRORING`, see `feedback`) and ends with
the config index, so ties keep the configured order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .catalog import Candidate
from .policy import Estimate, latency_bucket

PROBE, HEALTHY, ERRORING = 0, 1, 2

LEAD_MARGIN = 0.5
"""A candidate whose median is not identified leads an identified one only when its estimate or a fresh
exact answer is at most this fraction of that median (`Fastest.rank`): the leader is clearly degraded.
So is a leader whose usual median (its long window's) is at most this fraction of its current one."""


def blended_price(c: Candidate) -> float:
    """USD per 1M tokens for a typical 3:1 input:output mix: what `cheapest` sorts by."""
    return (3 * c.model.input_usd_per_mtok + c.model.output_usd_per_mtok) / 4


@dataclass(frozen=True, slots=True)
class View:
    """What a strategy may rank a candidate by, at one instant."""

    candidate: Candidate
    index: int  # position in the configured order
    tier: int  # PROBE | HEALTHY | ERRORING
    error_rate: float  # recent failures before a first token (0 while too few outcomes)
    ttft: float | None  # expected TTFT given what is outstanding (None: unknown); see Feedback.ttft
    estimate: Estimate  # the evidence behind `ttft` (pending attempts, lower bound or median)
    last_exact: float | None = None  # the newest exact TTFT among its kept attempts (policy.Evidence)
    usual: float | None = None  # the long window's median (CandidateStats.expected_ttft): its usual TTFT


class Strategy:
    """Base: config order within each tier, the less erroring first; no hedges."""

    name: ClassVar[str] = "failover"
    hedges: ClassVar[bool] = False  # delay-triggered hedges and exploration
    classifies: ClassVar[bool] = False  # candidates chosen per request by task class (auto)
    needs_latency: ClassVar[bool] = False  # does `key` read `ttft` (spares the estimate otherwise)

    def key(self, v: View) -> tuple[float, ...]:
        return (v.tier, round(v.error_rate, 1), v.index)

    def rank(self, views: list[View]) -> list[View]:
        """The candidates best first: by `key`."""
        return sorted(views, key=self.key)


class Failover(Strategy):
    """Config order; a candidate erroring more (in 10 % steps) drops behind."""


class Auto(Strategy):
    """`gammainfra/auto`: the chain chosen for the prompt's task class, then failover along it."""

    name = "auto"
    classifies = True


class Cheapest(Strategy):
    """Lowest blended price first."""

    name = "cheapest"

    def key(self, v: View) -> tuple[float, ...]:
        return (v.tier, blended_price(v.candidate), v.index)


class Fastest(Strategy):
    """`hedge`: the lowest expected TTFT given what is outstanding leads; hedged on delay.

    Known candidates before unknown ones (those are explored instead), by the estimate divided by the
    success rate (a candidate that fails often pays for it) at the statistics' resolution; at equal
    latency, fewer attempts in flight lead (the load-aware part: equal latency, less outstanding work).

    Only an identified median may lead, not a mere lower bound ("at least t": mostly waiting or
    cancelled attempts): a leader whose waiting attempts outnumber its answers is demoted at once, and
    a challenger known only from lost races cannot take all the traffic on "at least t". A lower
    bound still ranks for the hedge slot, where it is measured on the way. One exception: a bound
    that ranks first *and* has a fresh exact answer in a faster bucket than every identified median
    (it is *promising*: it just did what the leader cannot) leads. Leading is how it is measured
    fastest, at no extra load; if the answer was luck, its own waiting attempts demote it within a
    TTFT or two. Without it, a leader slowed at a low rate keeps an identified (slow) median, its
    challengers stay bounds, and exploration paid at b/8 per request takes tens of seconds to
    identify them.

    The leader is also clearly degraded when its identified median is at least twice its own usual
    one (the long window's median, `LEAD_MARGIN`): then the first-ranked challenger whose estimate (or,
    unknown, its bound) is in a faster bucket than that median leads on trial, with no answer of its
    own required. Under a gradual drift the leader stays identified while it slows, and a challenger
    that only loses races has no recent answer at all (its long window may even have decayed to
    unknown), so it waited until the leader was 3-4x slower (`hedge.sim`'s `drift-fleet`); meanwhile
    the leader's delay, from its lagging long window, demanded more hedges than the budget paid.
    """

    name = "hedge"
    hedges = True
    needs_latency = True

    def key(self, v: View) -> tuple[float, ...]:
        if v.ttft is None:
            return (v.tier, 1, 0, 0, v.index)
        cost = v.ttft / max(0.1, 1.0 - v.error_rate)
        return (v.tier, 0, latency_bucket(cost), v.estimate.pending, v.index)

    def rank(self, views: list[View]) -> list[View]:
        out = sorted(views, key=self.key)
        if not out:
            return out
        tier = out[0].tier
        same = [v for v in out if v.tier == tier]
        ident = next((v for v in same if v.ttft is not None and not v.estimate.lower_bound), None)
        if ident is None or ident.ttft is None:
            return out
        median = ident.ttft
        faster = [v for v in same if _clearly_faster(v, median)]
        if faster:
            lead = min(faster, key=lambda v: v.last_exact or 0.0)
        elif ident.usual is not None and ident.usual <= LEAD_MARGIN * median:
            # degraded against its own usual: the best-ranked challenger that may be faster, on trial
            lead = next((v for v in same if v is not ident and _may_be_faster(v, median)), ident)
        else:
            lead = ident
        if lead is out[0]:
            return out
        out.remove(lead)
        out.insert(0, lead)
        return out


def _may_be_faster(v: View, median: float) -> bool:
    """What is known of `v` (its estimate, or the bound when it is unknown) is in a faster bucket than
    `median`: only its own waiting attempts can tell, and leading is the free way to hear them."""
    t = v.ttft if v.ttft is not None else v.estimate.ttft
    return t is not None and latency_bucket(t) < latency_bucket(median)


def _clearly_faster(v: View, median: float) -> bool:
    """`v`'s median is not identified, but its estimate (a bound, or the long window's median) or its
    fresh exact answer is at most `LEAD_MARGIN` x the identified `median`, and nothing known of it says
    it is slower now than that median."""
    if v.ttft is not None and not v.estimate.lower_bound:
        return False
    if v.ttft is not None and latency_bucket(v.ttft) >= latency_bucket(median):
        return False
    return v.last_exact is not None and v.last_exact <= LEAD_MARGIN * median


REGISTRY: dict[str, Strategy] = {s.name: s for s in (Fastest(), Failover(), Cheapest(), Auto())}
"""Strategy name (a route's `strategy`) -> the strategy; `config.STRATEGIES` lists the same names."""


def get(name: str) -> Strategy:
    """The strategy for a route's `strategy` string (validated at config load)."""
    return REGISTRY[name]
