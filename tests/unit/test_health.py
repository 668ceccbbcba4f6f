"""CircuitBreaker: exact tests on a fake clock."""

from __future__ import annotations

import pytest

from hedge.health import BreakerState, CircuitBreaker


def open_breaker(b: CircuitBreaker, now: float) -> None:
    for _ in range(b.failure_threshold):
        b.on_failure(now)


def test_state_values_for_the_gauge() -> None:
    assert [int(s) for s in (BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN)] == [0, 1, 2]


def test_opens_after_threshold_consecutive_failures_and_refuses() -> None:
    b = CircuitBreaker(failure_threshold=3, base_backoff_s=1.0)
    assert b.state(0.0) is BreakerState.CLOSED
    b.on_failure(0.0)
    b.on_failure(0.0)
    assert b.state(0.0) is BreakerState.CLOSED and b.acquire(0.0)
    b.on_failure(0.0)
    assert b.state(0.0) is BreakerState.OPEN
    assert not b.available(0.5)
    assert not b.acquire(0.5)
    assert b.retry_at(0.5) == 1.0
    assert b.retry_at(-1.0) == 1.0


def test_success_resets_consecutive_count() -> None:
    b = CircuitBreaker(failure_threshold=3)
    for i in range(10):
        b.on_failure(float(i))
        b.on_failure(float(i))
        b.on_success(float(i))
    assert b.state(10.0) is BreakerState.CLOSED
    assert b.consecutive_failures == 0


def test_half_open_lets_exactly_one_probe_through() -> None:
    b = CircuitBreaker(failure_threshold=1, base_backoff_s=2.0, probe_timeout_s=30.0)
    b.on_failure(10.0)
    assert b.state(11.999) is BreakerState.OPEN
    assert b.state(12.0) is BreakerState.HALF_OPEN
    assert b.available(12.0)
    assert b.available(12.0)  # non-mutating
    assert b.acquire(12.0)
    assert not b.available(12.1)
    assert not b.acquire(12.1)
    assert not b.acquire(20.0)
    assert b.state(20.0) is BreakerState.HALF_OPEN
    assert b.retry_at(20.0) == 42.0  # when a replacement probe would be allowed


def test_probe_success_closes() -> None:
    b = CircuitBreaker(failure_threshold=1, base_backoff_s=1.0)
    b.on_failure(0.0)
    assert b.acquire(1.0)
    b.on_success(1.5)
    assert b.state(1.5) is BreakerState.CLOSED
    assert b.acquire(1.5) and b.acquire(1.5)
    assert b.retry_at(1.5) is None
    # backoff was reset: the next opening uses the base backoff again
    b.on_failure(2.0)
    assert b.retry_at(2.0) == 3.0


def test_probe_failure_doubles_backoff_up_to_cap() -> None:
    b = CircuitBreaker(failure_threshold=1, base_backoff_s=1.0, max_backoff_s=10.0)
    t = 0.0
    b.on_failure(t)
    expected = [2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    deadline = t + 1.0
    for backoff in expected:
        t = deadline
        assert not b.acquire(t - 1e-9)
        assert b.acquire(t)
        b.on_failure(t + 0.25)  # the probe fails
        assert b.state(t + 0.25) is BreakerState.OPEN
        assert b.backoff_s == backoff
        deadline = t + 0.25 + backoff
        assert b.retry_at(t + 0.25) == deadline


def test_straggler_failure_while_open_does_not_extend() -> None:
    b = CircuitBreaker(failure_threshold=2, base_backoff_s=1.0)
    open_breaker(b, 0.0)
    b.on_failure(0.5)  # an attempt that was already in flight
    assert b.retry_at(0.5) == 1.0
    assert b.backoff_s == 1.0


def test_probe_timeout_allows_another_probe() -> None:
    b = CircuitBreaker(failure_threshold=1, base_backoff_s=1.0, probe_timeout_s=5.0)
    b.on_failure(0.0)
    assert b.acquire(1.0)
    assert not b.acquire(5.999)
    assert b.acquire(6.0)  # the first probe never reported
    assert not b.acquire(6.5)
    b.on_success(7.0)
    assert b.state(7.0) is BreakerState.CLOSED


def test_retry_after_opens_at_once_and_is_honoured() -> None:
    b = CircuitBreaker(failure_threshold=5, base_backoff_s=1.0, max_backoff_s=60.0)
    b.on_failure(100.0, retry_after=120.0)  # first failure; beyond max_backoff is honoured
    assert b.state(100.0) is BreakerState.OPEN
    assert not b.acquire(219.9)
    assert b.retry_at(150.0) == 220.0
    # a success from a request already in flight does not cut the window short
    b.on_success(150.0)
    assert not b.available(219.9)
    assert b.acquire(220.0)  # probe
    b.on_success(220.5)
    assert b.state(220.5) is BreakerState.CLOSED


def test_retry_after_extends_but_never_shortens() -> None:
    b = CircuitBreaker(failure_threshold=1, base_backoff_s=10.0)
    b.on_failure(0.0)
    b.on_failure(1.0, retry_after=2.0)  # shorter than the backoff: backoff stands
    assert b.retry_at(1.0) == 10.0
    b.on_failure(2.0, retry_after=30.0)
    assert b.retry_at(2.0) == 32.0


def test_retry_after_capped_at_one_hour_and_bad_values_ignored() -> None:
    b = CircuitBreaker()
    b.on_failure(0.0, retry_after=1e9)
    assert b.retry_at(0.0) == 3600.0
    b2 = CircuitBreaker()
    for bad in (0.0, -5.0, float("nan"), float("inf")):
        b2.on_failure(0.0, retry_after=bad)
    assert b2.state(0.0) is BreakerState.CLOSED  # 4 plain failures < threshold 5


def test_retry_after_on_failed_probe_takes_the_later_deadline() -> None:
    b = CircuitBreaker(failure_threshold=1, base_backoff_s=1.0)
    b.on_failure(0.0)
    assert b.acquire(1.0)
    b.on_failure(1.0, retry_after=30.0)
    assert b.retry_at(1.0) == 31.0
    assert b.acquire(31.0)
    b.on_failure(31.0)
    assert b.retry_at(31.0) == 35.0  # backoff doubled twice: 2 then 4


def test_bad_arguments() -> None:
    for kwargs in (
        {"failure_threshold": 0},
        {"base_backoff_s": 0.0},
        {"base_backoff_s": 5.0, "max_backoff_s": 1.0},
        {"probe_timeout_s": -1.0},
    ):
        with pytest.raises(ValueError):
            CircuitBreaker(**kwargs)
