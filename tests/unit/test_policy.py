"""The policy's parts on their own: the evidence estimator, the one load knob, the strategy registry."""

from __future__ import annotations

import math

import pytest

from hedge.catalog import Catalog
from hedge.config import STRATEGIES, parse_config
from hedge.feedback import Feedback, Order
from hedge.policy import (
    EVIDENCE_N,
    EXPLORE_SHARE,
    MIN_EXACT,
    Estimate,
    Evidence,
    RequestBudget,
    hedge_quantile,
    hedge_share,
    knee,
    split_budget,
)
from hedge.stats import DecayingHistogram
from hedge.strategy import REGISTRY, View
from hedge.strategy import get as get_strategy

from ..conftest import raw_config

ROUTE = "gammainfra/fast"


def fb_and_plan(providers: str = "abc", **route: object) -> tuple[Feedback, object]:
    cat = Catalog(parse_config(raw_config({p: f"http://{p}.invalid/v1" for p in providers}, fast=route)))
    return Feedback(cat.config.feedback), cat.resolve(ROUTE)


# ------------------------------------------------------------------------------------ evidence


def test_estimate_is_the_median_of_exact_answers() -> None:
    ev = Evidence()
    for t, v in enumerate((0.3, 0.1, 0.2, 0.5, 0.4, 0.35, 0.25)[:EVIDENCE_N]):
        ev.launched(float(t))
        ev.answered(v, t + v)
    e = ev.estimate(10.0)
    assert e.ttft == 0.3 and not e.lower_bound and e.pending == 0 and e.ended == EVIDENCE_N


def test_waiting_attempts_raise_the_estimate_before_any_slow_answer() -> None:
    ev = Evidence()
    for k in range(EVIDENCE_N):  # answers at 0.16 .. 0.24 s
        ev.launched(k * 0.05)
        ev.answered(0.16 + 0.08 * k / (EVIDENCE_N - 1), k * 0.05 + 0.2)
    assert ev.estimate(1.0).ttft == pytest.approx(0.2)
    # the provider slows 10x at t=1: attempts keep launching every 50 ms and none answers
    launched = 0

    def at(now: float) -> Estimate:
        nonlocal launched
        while 1.0 + launched * 0.05 <= now:
            ev.launched(1.0 + launched * 0.05)
            launched += 1
        return ev.estimate(now)

    young = at(1.15)  # the waiting ones are younger than every answer: nothing to say yet
    assert young.ttft == pytest.approx(0.2) and young.pending == 4
    # from 1.25 old medians on the waiting attempts push the median up, rank by rank ...
    assert at(1.25).ttft > 0.21 and at(1.5).ttft > 0.23
    late = at(1.6)  # ... until they outnumber the answers: a lower bound, the age of the oldest
    assert late.lower_bound and late.ttft == pytest.approx(0.6)
    assert at(3.0).ttft == pytest.approx(2.0)  # and it keeps growing with their age


def test_stalls_in_flight_do_not_move_the_median() -> None:
    ev = Evidence()
    for k in range(EVIDENCE_N):
        ev.launched(float(k))
        ev.answered(0.05 + 0.01 * k, k + 0.1)
    median = ev.estimate(9.0).ttft
    ev.launched(10.0)  # stalls
    ev.launched(10.5)  # stalls too
    e = ev.estimate(12.0)
    assert not e.lower_bound and median is not None and e.ttft is not None
    assert e.ttft <= median + 0.01 + 1e-9  # at most one rank up per stall: still a median


def test_cancellations_are_censored_and_answers_match_their_launch() -> None:
    ev = Evidence()
    ev.launched(0.0)
    ev.launched(0.1)
    ev.cancelled(0.5, 0.6, launched_at=0.1)  # the younger one lost after 0.5 s
    assert ev.pending == 1
    e = ev.estimate(0.6)  # the older one has waited 0.6 s: everything is a lower bound
    assert e.lower_bound and e.ttft == pytest.approx(0.6)
    ev.answered(0.9, 0.9, launched_at=0.0)
    assert ev.pending == 0 and ev.estimate(1.0).ttft == pytest.approx(0.9)
    ev.launched(2.0)
    ev.failed(2.1)  # a failure carries no latency evidence, but ends the wait
    assert ev.pending == 0 and ev.estimate(3.0).ended == 2


def test_a_median_needs_enough_exact_answers() -> None:
    ev = Evidence()
    for k in range(EVIDENCE_N - 1):  # a hedge target: loses early, once lucky
        ev.cancelled(0.04, float(k))
    ev.answered(0.05, 10.0)
    e = ev.estimate(11.0)
    assert e.lower_bound and e.ttft == pytest.approx(0.05)  # one lucky answer is not a median
    for k in range(MIN_EXACT - 1):
        ev.answered(0.08, 12.0 + k)
    e = ev.estimate(20.0)
    assert not e.lower_bound and e.ttft is not None and 0.05 <= e.ttft <= 0.08
    for k in range(EVIDENCE_N // 2 + 1):  # a majority of fresh fast answers outvotes the old ones
        ev.answered(0.01, 30.0 + k)
    assert ev.estimate(40.0).ttft == pytest.approx(0.01)


# ---------------------------------------------------------------------------------- one knob


def test_hedge_quantile_derives_from_the_budget_alone() -> None:
    fb, plan = fb_and_plan(quantile=0.9, hedge_budget=0.1)
    assert hedge_quantile(plan.route) == pytest.approx(0.95)  # demand b/2, whatever `quantile` says
    _, plan2 = fb_and_plan(quantile=0.99, hedge_budget=0.2)
    assert hedge_quantile(plan2.route) == pytest.approx(0.9)
    hedges, explore = split_budget(plan.route)
    assert hedges.ratio + explore.ratio == pytest.approx(0.1)
    assert hedges.ratio == pytest.approx(0.1 * (1 - EXPLORE_SHARE))
    # demanded (b/2) well below deposited: the bucket does not hover at empty
    assert (1 - hedge_quantile(plan.route)) / hedges.ratio <= 0.6
    _, off = fb_and_plan(hedge_budget=0.0)
    h0, e0 = split_budget(off.route)
    assert h0.tokens == 0 and e0.tokens == 0 and not h0.try_spend() and not e0.try_spend()


def test_request_budget_makes_a_paid_exploration_free_for_the_race() -> None:
    fb, plan = fb_and_plan(hedge_budget=0.1, hedge_burst=1)
    bucket = fb.budget(plan.route)
    rb = RequestBudget(bucket, prepaid=1)
    assert rb.try_spend() and bucket.spent == 0  # the exploration, paid in `order`
    assert rb.try_spend() and bucket.spent == 1  # a real hedge: from the bucket
    assert not rb.try_spend() and bucket.refusals == 1


# --------------------------------------------------------------------------------- strategies


def test_registry_covers_every_configurable_strategy() -> None:
    assert set(REGISTRY) == set(STRATEGIES)
    assert [n for n in STRATEGIES if get_strategy(n).hedges] == ["hedge"]
    assert [n for n in STRATEGIES if get_strategy(n).classifies] == ["auto"]


def test_load_aware_order_at_equal_latency_fewer_pending_leads() -> None:
    fb, plan = fb_and_plan("ab")
    a, b = plan.candidates
    for k in range(EVIDENCE_N):
        for c in (a, b):
            fb.on_launch(c, float(k))
            fb.on_first_token(c, 0.2, k + 0.2)
    for k in range(50):  # 50 in flight on a, 2 on b, all young: same latency evidence
        fb.on_launch(a, 10.0 + k * 0.001)
    for k in range(2):
        fb.on_launch(b, 10.0 + k * 0.001)
    order = fb.order(plan, 10.06)
    assert [c.provider.name for c in order] == ["b", "a"]
    view = View(a, 0, 1, 0.0, *fb.ttft(a, 10.06))
    assert view.estimate.pending == 50
    assert get_strategy("hedge").key(view) > get_strategy("hedge").key(View(b, 1, 1, 0.0, *fb.ttft(b, 10.06)))


def test_one_young_attempt_in_flight_does_not_demote_a_hedge_target() -> None:
    fb, plan = fb_and_plan("ab")
    a, b = plan.candidates
    for k in range(80):  # b: known at ~80 ms in the long window, but loses most races early
        fb.on_launch(b, k * 0.25)
        if k % 4 == 0:
            fb.on_first_token(b, 0.08, k * 0.25 + 0.08)
        else:
            fb.on_cancelled(b, 0.02, k * 0.25 + 0.02)
    fb.on_launch(b, 20.0)
    t, e = fb.ttft(b, 20.15)  # one attempt in flight for 150 ms: "at least 150 ms", but no news
    assert e.lower_bound and t == pytest.approx(0.08, rel=0.15)
    for k in range(3):  # three waiting longer than its median: that is news
        fb.on_launch(b, 20.0 + k * 0.01)
    t, e = fb.ttft(b, 20.5)
    assert e.lower_bound and t == pytest.approx(0.5)


def test_a_lower_bound_cannot_lead_an_identified_median() -> None:
    fb, plan = fb_and_plan("ab")
    a, b = plan.candidates
    for k in range(EVIDENCE_N):
        fb.on_launch(a, float(k))
        fb.on_first_token(a, 0.5, k + 0.5)
        fb.on_launch(b, float(k))
        fb.on_cancelled(b, 0.1, k + 0.1)  # b only ever lost, early: "more than 0.1 s"
    order = fb.order(plan, 10.0)
    assert [c.provider.name for c in order] == ["a", "b"]
    t, e = fb.ttft(b, 10.0)
    assert e.lower_bound and t is not None and t < 0.5


@pytest.mark.parametrize(("b_answer", "leader"), [(0.08, "b"), (0.3, "a")])
def test_a_clearly_faster_bound_leads_a_degraded_identified_median(b_answer: float, leader: str) -> None:
    """a's median is identified at 0.5 s (a slowed leader whose slow answers arrive); b is a bound
    (mostly early cancellations) whose newest kept exact answer is `b_answer`. At most half of a's
    median (LEAD_MARGIN): b leads and is measured at full rate, free; otherwise a keeps the lead."""
    fb, plan = fb_and_plan("ab")
    a, b = plan.candidates
    for k in range(EVIDENCE_N):
        fb.on_launch(a, float(k))
        fb.on_first_token(a, 0.5, k + 0.5)
        fb.on_launch(b, float(k))
        if k == EVIDENCE_N - 1:
            fb.on_first_token(b, b_answer, k + b_answer)
        else:
            fb.on_cancelled(b, 0.02, k + 0.02)
    assert fb.evidence(b).estimate(10.0).lower_bound and fb.evidence(b).last_kept_exact == b_answer
    assert fb.order(plan, 10.0)[0].provider.name == leader


@pytest.mark.parametrize(("a_now", "leader"), [(0.25, "b"), (0.15, "a")])
def test_a_leader_twice_its_usual_median_yields_to_a_challenger_on_trial(a_now: float, leader: str) -> None:
    """A drift: a's last answers put its identified median at `a_now`, its long window's (usual)
    median is 0.1 s; b is known at ~80 ms only from its long window and has no kept exact answer (its
    last seven attempts lost early), so no answer of its own makes it clearly faster. a at 2.5x its
    usual median is clearly degraded and b, whose estimate is in a faster bucket, leads on trial; a at
    1.5x keeps the lead."""
    fb, plan = fb_and_plan("ab")
    a, b = plan.candidates
    for k in range(30):
        fb.on_launch(a, k * 0.05)
        fb.on_first_token(a, 0.1, k * 0.05 + 0.1)
        fb.on_launch(b, k * 0.05)
        fb.on_first_token(b, 0.08, k * 0.05 + 0.08)
    for k in range(EVIDENCE_N):
        fb.on_launch(a, 2.0 + k * 0.3)
        fb.on_first_token(a, a_now, 2.0 + k * 0.3 + a_now)
        fb.on_launch(b, 2.0 + k * 0.3)
        fb.on_cancelled(b, 0.02, 2.0 + k * 0.3 + 0.02)
    now = 5.0
    assert not fb.evidence(a).estimate(now).lower_bound and fb.ttft(a, now)[0] == a_now
    assert fb.evidence(b).estimate(now).lower_bound and fb.evidence(b).last_kept_exact is None
    assert fb.stats(a).expected_ttft(now) == pytest.approx(0.1, rel=0.15)
    assert fb.ttft(b, now)[0] == pytest.approx(0.08, rel=0.15)
    assert fb.order(plan, now)[0].provider.name == leader


def test_a_stale_refresh_keeps_an_exploration_token_for_news() -> None:
    """Routine refreshes spend the exploration bucket only when it is full, so the token a promising
    candidate needs after a change is there."""
    fb, plan = fb_and_plan("ab", hedge_budget=0.1, hedge_burst=1)
    a, b = plan.candidates
    assert fb.budget(plan.route).try_spend()  # no help from the hedge bucket in this test
    for k in range(10):  # b: known at 0.3 s in the long window, then only early cancellations
        fb.on_launch(b, k * 0.1)
        fb.on_first_token(b, 0.3, k * 0.1 + 0.3)
    for k in range(EVIDENCE_N):
        fb.on_launch(a, float(k))
        fb.on_first_token(a, 0.2, k + 0.2)
        if k:
            fb.on_launch(b, float(k))
            fb.on_cancelled(b, 0.1, k + 0.1)
    assert fb.ttft(b, 10.0)[0] is not None  # known, not unknown (which is news and may use the reserve)
    explore = fb.explore_budget(plan.route)
    assert explore.tokens == explore.burst == 2.0
    assert fb.order(plan, 10.0).explore is b  # stale (no exact answer for 8.8 s), bucket full
    assert fb.order(plan, 10.01).explore is None  # still stale, one token left: kept
    fb.on_first_token(b, 0.15, 10.15, launched_at=10.0)  # faster than a's 0.2 s, not clearly (<= 0.1)
    o = fb.order(plan, 10.2)
    assert o[0] is a and o.explore is b and explore.tokens < 1.0  # promising: the kept token pays


def test_waiting_attempts_count_from_the_kept_answers_cohort() -> None:
    """Attempts still waiting from before the earliest kept answer was launched (another route's
    unhedged stalls at a high rate) do not demote a provider whose recent answers are fast; attempts
    launched since do (a slowdown)."""
    ev = Evidence()
    for k in range(10):
        ev.launched(k * 0.01)  # launched 0-90 ms: stalled, still waiting
    for k in range(EVIDENCE_N):
        t = 1.0 + k * 0.01
        ev.launched(t)
        ev.answered(0.05, t + 0.05, launched_at=t)
    e = ev.estimate(1.2)
    assert e.ttft == pytest.approx(0.05) and not e.lower_bound and e.pending == 10
    for k in range(10):
        ev.launched(1.2 + k * 0.01)  # launched after the kept answers: they count
    slow = ev.estimate(1.5)
    assert slow.lower_bound and slow.ttft is not None and slow.ttft > 0.2


def test_a_decayed_candidate_is_not_news_for_the_hedge_bucket() -> None:
    """A candidate that answered before but whose long window decayed below `min_samples` is unknown
    to the order, yet re-measuring it is routine: it may not drain the hedge bucket (stalls need it);
    a never-answered one (cold start) may."""
    fb, plan = fb_and_plan("ab", hedge_budget=0.1, hedge_burst=5)
    a, b = plan.candidates
    explore = fb.explore_budget(plan.route)
    while explore.try_spend():
        pass  # the exploration bucket is empty: only the hedge bucket (full, 5 tokens) could pay
    for k in range(EVIDENCE_N):
        fb.on_launch(a, float(k))
        fb.on_first_token(a, 0.2, k + 0.2)
    assert fb.ttft(b, 7.0)[0] is None and fb.order(plan, 7.0).explore is b  # never answered: news
    fb.on_first_token(b, 0.3, 7.3, launched_at=7.0)
    assert fb.ttft(b, 60.0)[0] is None  # one answer, long ago: unknown again
    hedges = fb.budget(plan.route)
    before = hedges.tokens
    assert fb.order(plan, 60.0).explore is None and hedges.tokens == before


def test_survival_inverts_the_quantile() -> None:
    h = DecayingHistogram(10.0, min_weight=3.0)
    for i in range(100):
        h.observe(0.05 * (1.0 + i / 100), 0.0)
    for q in (0.1, 0.5, 0.9, 0.97):
        v = h.quantile(q, 0.0)
        assert v is not None
        sv = h.survival(v, 0.0)
        assert sv is not None and abs(sv - (1.0 - q)) < 1e-6, (q, sv)
    assert h.survival(1e-5, 0.0) == 1.0 and h.survival(10.0, 0.0) == 0.0


def test_the_delay_moves_down_to_the_knee_of_a_gapped_tail() -> None:
    """A fast body (50-100 ms) plus 3 % stalls at 2 s: any delay in the gap demands the same 3 % of
    hedges, so the knee is the top of the body, not the 150 ms the quantile (or its cap) picked; after
    a recovery (the old slow mass above the cap) it stays put: that demand exceeds what the bucket earns."""
    h = DecayingHistogram(10.0, min_weight=3.0)
    for i in range(970):
        h.observe(0.05 * 2 ** (i / 970), 0.0)
    for _ in range(30):
        h.observe(2.0, 0.0)
    assert h.quantile(0.975, 0.0) is not None and h.quantile(0.975, 0.0) > 1.0  # among the stalls
    afford = 0.05 * (1.0 - EXPLORE_SHARE)
    d = knee(h, 0.15, afford, 0.0)
    assert 0.09 <= d <= 0.1 * h.bucket_ratio, d  # the body's top (within a bucket), not 150 ms
    demand = h.survival(d, 0.0)
    assert demand is not None and demand <= 1.1 * 0.03 + 1e-9
    recovered = DecayingHistogram(10.0, min_weight=3.0)
    for i in range(100):
        recovered.observe(3.0 if i < 60 else 0.3, 0.0)
    assert knee(recovered, 0.9, hedge_share(plan_route(0.1)), 0.0) == 0.9


def plan_route(budget: float) -> object:
    return fb_and_plan("ab", hedge_budget=budget)[1].route  # type: ignore[attr-defined]


def test_order_is_an_explicit_value() -> None:
    fb, plan = fb_and_plan("ab", hedge_budget=0.5)
    a, b = plan.candidates
    for k in range(EVIDENCE_N):
        fb.on_launch(a, float(k))
        fb.on_first_token(a, 0.1, k + 0.1)
    o = fb.order(plan, 10.0)
    assert isinstance(o, Order) and not isinstance(o, list)
    assert o.candidates == (a, b) and o.explore is b  # b is unknown: raced beside a
    assert list(o) == [a, b] and len(o) == 2 and o[1] is b
    d = fb.delay_policy(plan, o, 10.0, 0.5)
    assert d is not None and d.delay(0) == 0.0
    plain = fb.delay_policy(plan, o.candidates, 10.0, 0.5)  # a bare sequence explores nothing
    assert plain is not None and plain.delay(0) > 0.0
    assert fb.order(plan, 10.0, ("b",)).explore is None  # a caller's preference never explores
    assert math.isfinite(d.base_delay(0))
