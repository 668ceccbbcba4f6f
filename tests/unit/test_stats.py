"""DecayingHistogram / CandidateStats: exact tests on a fake clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hedge.stats import CandidateStats, DecayingHistogram

R = 10 ** (1 / 20)  # bucket width at 20 buckets per decade (the accuracy bound)


def within_bucket(est: float | None, true: float) -> bool:
    assert est is not None
    return true / R <= est <= true * R


def empirical_quantile(samples: list[float], q: float) -> float:
    """Smallest x with F(x) >= q."""
    s = sorted(samples)
    k = max(0, math.ceil(q * len(s)) - 1)
    return s[k]


def test_quantiles_of_known_samples_within_one_bucket() -> None:
    h = DecayingHistogram()
    samples = [0.01 * 1.05**i for i in range(200)]  # 10 ms .. ~170 s, some clamp into the last bucket
    samples = [s for s in samples if s <= 100]
    for s in samples:
        h.observe(s, now=5.0)
    assert h.bucket_ratio <= R
    for q in (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99):
        assert within_bucket(h.quantile(q, 5.0), empirical_quantile(samples, q)), q


def test_single_value_interpolates_inside_its_bucket() -> None:
    h = DecayingHistogram(min_weight=1.0)
    h.observe(0.3, now=0.0)
    lo, hi = h.bucket_bounds(h.bucket_index(0.3))
    assert lo <= 0.3 < hi
    assert h.quantile(0.0, 0.0) == pytest.approx(lo)
    assert h.quantile(1.0, 0.0) == pytest.approx(hi)
    assert h.quantile(0.5, 0.0) == pytest.approx(math.sqrt(lo * hi))  # log-linear interpolation


def test_values_outside_range_clamp_to_end_buckets() -> None:
    h = DecayingHistogram(min_weight=1.0)
    h.observe(1e-9, 0.0)
    h.observe(-1.0, 0.0)
    h.observe(0.0, 0.0)
    assert h.bucket_index(0.0) == 0
    assert 0.001 <= h.quantile(1.0, 0.0) <= 0.001 * R * 1.0000001
    h2 = DecayingHistogram(min_weight=1.0)
    h2.observe(1e6, 0.0)
    h2.observe(math.inf, 0.0)
    assert 120 / R <= h2.quantile(0.5, 0.0) <= 120 * 1.0000001


def test_unknown_below_min_weight() -> None:
    h = DecayingHistogram(half_life_s=10.0)  # min_weight 3
    assert h.weight(0.0) == 0.0
    assert h.quantile(0.5, 0.0) is None
    h.observe(0.1, 0.0)
    h.observe(0.1, 0.0)
    assert h.quantile(0.5, 0.0) is None
    h.observe(0.1, 0.0)
    assert within_bucket(h.quantile(0.5, 0.0), 0.1)
    # weight 3 at t=0 drops below 3 as soon as time passes: unknown again
    assert h.quantile(0.5, 1.0) is None


def test_weight_half_life_exact() -> None:
    h = DecayingHistogram(half_life_s=10.0)
    for _ in range(8):
        h.observe(0.2, now=100.0)
    assert h.weight(100.0) == pytest.approx(8.0, rel=1e-12)
    assert h.weight(110.0) == pytest.approx(4.0, rel=1e-12)
    assert h.weight(130.0) == pytest.approx(1.0, rel=1e-12)
    h.observe(0.2, now=130.0)
    assert h.weight(130.0) == pytest.approx(2.0, rel=1e-12)
    assert h.weight(140.0) == pytest.approx(1.0, rel=1e-12)


def test_weight_survives_renormalisation() -> None:
    """Over thousands of half-lives (many landmark rescalings) weights stay exact and finite."""
    h = DecayingHistogram(half_life_s=1.0, min_weight=0.0)
    t = 1e6  # large monotonic clock values must not overflow
    for _ in range(5000):
        t += 0.5
        h.observe(0.05, t)
    steady = 1.0 / (1.0 - 2**-0.5)  # geometric series of weights at 0.5 half-life spacing
    assert h.weight(t) == pytest.approx(steady, rel=1e-9)
    assert within_bucket(h.quantile(0.5, t), 0.05)
    # after a long idle period the old samples vanish completely
    h.observe(2.0, t + 1000.0)
    assert h.weight(t + 1000.0) == pytest.approx(1.0, rel=1e-9)
    assert within_bucket(h.quantile(0.0, t + 1000.0), 2.0)


def test_forgetting_follows_a_slowdown_and_a_recovery() -> None:
    h = DecayingHistogram(half_life_s=10.0)
    t = 0.0
    dt = 0.1  # 10 samples/s
    for _ in range(600):  # 60 s of 300 ms
        t += dt
        h.observe(0.3, t)
    assert within_bucket(h.quantile(0.95, t), 0.3)
    switch = t
    while t < switch + 30.0:  # 3 half-lives of 3 s
        t += dt
        h.observe(3.0, t)
        if t >= switch + 2.0:  # p95 follows within a couple of seconds
            assert within_bucket(h.quantile(0.95, t), 3.0), t - switch
    assert within_bucket(h.quantile(0.5, t), 3.0)  # even the median has moved after 3 half-lives
    switch = t
    while t < switch + 50.0:  # back to 300 ms for 5 half-lives
        t += dt
        h.observe(0.3, t)
        if t < switch + 20.0:  # 3 s samples still weigh more than 5 %: p95 still slow
            assert h.quantile(0.95, t) > 1.0
    # old 3 s mass is now below 2**-5 (3 %) of the total: p95 is back at 300 ms
    assert within_bucket(h.quantile(0.95, t), 0.3)


def test_censored_never_pulls_below_cancel_point() -> None:
    """True TTFT 2 s, always cancelled at 0.5 s: the median must not be below 0.5 s."""
    h = DecayingHistogram()
    for i in range(100):
        h.observe_censored(0.5, now=i * 0.1)
    med = h.quantile(0.5, 10.0)
    assert med is not None and 0.5 <= med <= 0.5 * R * R
    assert h.quantile(0.0, 10.0) >= 0.5
    assert h.weight(9.9) == pytest.approx(sum(2 ** (-(9.9 - i * 0.1) / 10) for i in range(100)))


def test_censored_with_real_slow_samples_keeps_real_value() -> None:
    h = DecayingHistogram()
    t = 0.0
    for i in range(400):
        t += 0.1
        if i % 5 == 0:
            h.observe(2.0, t)  # now and then the slow provider wins (or runs alone): real 2 s
        else:
            h.observe_censored(0.5, t)  # usually it loses and is cancelled at 0.5 s
        if i >= 15:  # 4 real samples: the censored ones lie clearly below them and add no weight
            assert h.quantile(0.5, t) >= 2.0 / R
    assert within_bucket(h.quantile(0.5, t), 2.0)


def test_censored_first_then_real_samples_converges_to_real_value() -> None:
    """Early censored samples park in the bucket above 0.5 s; real samples then pull it up to 2 s."""
    h = DecayingHistogram()
    t = 0.0
    for _ in range(10):
        t += 0.1
        h.observe_censored(0.5, t)
    assert h.quantile(0.5, t) < 0.6
    for i in range(200):
        t += 0.1
        if i % 4 == 0:
            h.observe(2.0, t)
        else:
            h.observe_censored(0.5, t)
    assert within_bucket(h.quantile(0.5, t), 2.0)


def test_censored_redistributes_in_proportion_above() -> None:
    h = DecayingHistogram(min_weight=0.0)
    h.observe(0.1, 0.0)  # below the cancel point: untouched
    h.observe(1.0, 0.0)
    for _ in range(3):
        h.observe(4.0, 0.0)
    h.observe_censored(0.5, 0.0)
    # mass: 0.1 -> 1, 1.0 -> 1 + 1/4, 4.0 -> 3 + 3/4; total 6
    assert h.weight(0.0) == pytest.approx(6.0)
    _, hi1 = h.bucket_bounds(h.bucket_index(1.0))
    lo4, hi4 = h.bucket_bounds(h.bucket_index(4.0))
    _, hi01 = h.bucket_bounds(h.bucket_index(0.1))
    assert h.quantile(1 / 6, 0.0) == pytest.approx(hi01)
    assert h.quantile(2.25 / 6, 0.0) == pytest.approx(hi1)
    # half-way through the 4.0 bucket's 3.75
    assert h.quantile((2.25 + 3.75 / 2) / 6, 0.0) == pytest.approx(math.sqrt(lo4 * hi4))


def test_censored_with_no_mass_above_goes_to_next_bucket() -> None:
    h = DecayingHistogram(min_weight=0.0)
    h.observe(0.2, 0.0)
    h.observe(0.5, 0.0)  # same bucket as the cancel point: not "above"
    h.observe_censored(0.5, 0.0)
    k = h.bucket_index(0.5)
    nxt_lo, nxt_hi = h.bucket_bounds(k + 1)
    assert h.quantile(1.0, 0.0) == pytest.approx(nxt_hi)
    assert h.quantile(2 / 3 + 1e-9, 0.0) == pytest.approx(nxt_lo)
    # censoring in the last bucket stays in the last bucket
    h2 = DecayingHistogram(min_weight=0.0)
    h2.observe_censored(500.0, 0.0)
    assert h2.quantile(0.5, 0.0) <= 120.0 * 1.0000001


def test_stale_mass_above_is_not_resurrected() -> None:
    """A 10 s sample from 10 half-lives ago must not absorb a fresh censored sample."""
    h = DecayingHistogram(half_life_s=1.0, min_weight=0.0)
    h.observe(10.0, 0.0)
    h.observe_censored(0.5, 10.0)
    assert h.quantile(0.5, 10.0) < 0.6


def test_quantile_is_cached_until_update() -> None:
    h = DecayingHistogram()
    for v in (0.1, 0.2, 0.3, 0.4):
        h.observe(v, 0.0)
    a = h.quantile(0.9, 0.0)
    assert h.quantile(0.9, 0.5) == a  # shape does not change with time alone
    h.observe(5.0, 0.5)
    assert h.quantile(0.9, 0.5) > a


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        DecayingHistogram(half_life_s=0)
    with pytest.raises(ValueError):
        DecayingHistogram(lo=1.0, hi=0.5)
    with pytest.raises(ValueError):
        DecayingHistogram(buckets_per_decade=0)
    h = DecayingHistogram()
    with pytest.raises(ValueError):
        h.quantile(1.5, 0.0)


@settings(max_examples=300, deadline=None)
@given(
    samples=st.lists(
        st.tuples(st.floats(0.001, 120.0), st.floats(0.0, 100.0)),  # (value, time offset)
        min_size=1,
        max_size=60,
    ),
    qs=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=10),
)
def test_quantile_monotone_and_bounded(samples: list[tuple[float, float]], qs: list[float]) -> None:
    h = DecayingHistogram(half_life_s=10.0, min_weight=0.0)
    t = 0.0
    for v, dt in samples:
        t += dt
        h.observe(v, t)
    values = [v for v, _ in samples]
    lo_bound = min(values) / R * (1 - 1e-9)
    hi_bound = max(values) * R * (1 + 1e-9)
    prev = None
    for q in sorted(qs):
        x = h.quantile(q, t)
        assert x is not None
        assert lo_bound <= x <= hi_bound
        if prev is not None:
            assert x >= prev * (1 - 1e-12)  # monotone (up to libm rounding of exp)
        prev = x


@settings(max_examples=200, deadline=None)
@given(
    samples=st.lists(st.floats(0.001, 120.0), min_size=1, max_size=40),
    cancel_at=st.floats(0.001, 120.0),
    qs=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=10),
)
def test_censored_sample_never_makes_any_quantile_faster(
    samples: list[float], cancel_at: float, qs: list[float]
) -> None:
    h = DecayingHistogram(min_weight=0.0)
    for v in samples:
        h.observe(v, 0.0)
    before = [h.quantile(q, 0.0) for q in qs]
    h.observe_censored(cancel_at, 0.0)
    after = [h.quantile(q, 0.0) for q in qs]
    for b, a in zip(before, after, strict=True):
        assert a >= b * (1 - 1e-9)
    assert h.quantile(1.0, 0.0) >= min(cancel_at, 120.0) * (1 - 1e-9)


# ---- CandidateStats -------------------------------------------------------------------------------


def test_candidate_stats_ttft_and_total() -> None:
    s = CandidateStats(half_life_s=10.0)
    assert s.last_update() is None
    assert s.expected_ttft(0.0) is None
    assert s.error_rate(0.0) == 0.0
    for i in range(5):
        s.record_first_token(0.25, now=float(i))
        s.record_total(1.5, now=float(i))
    assert within_bucket(s.expected_ttft(4.0), 0.25)
    assert within_bucket(s.ttft_quantile(0.95, 4.0), 0.25)
    assert within_bucket(s.total.quantile(0.5, 4.0), 1.5)
    s.record_censored(3.0, now=5.0)
    assert s.last_update() == 5.0
    assert s.ttft_quantile(1.0, 5.0) > 3.0
    # too few samples once they have decayed: unknown again
    assert s.expected_ttft(100.0) is None


def test_error_rate_decays() -> None:
    s = CandidateStats(half_life_s=10.0)
    for _ in range(10):
        s.record_failure(0.0)
    assert s.error_rate(0.0) == 1.0
    assert s.error_rate(50.0) == 1.0  # idle time alone does not change the ratio
    for _ in range(10):
        s.record_success(10.0)  # one half-life later: failures weigh 5
    assert s.error_rate(10.0) == pytest.approx(5 / 15)
    assert s.outcome_weight(10.0) == pytest.approx(15.0)
    assert s.outcome_weight(20.0) == pytest.approx(7.5)
    s.record_success(40.0)  # 3 half-lives later: 5/8 failures, 10/8 + 1 successes
    assert s.error_rate(40.0) == pytest.approx((5 / 8) / (5 / 8 + 10 / 8 + 1))
    assert s.last_update() == 40.0
