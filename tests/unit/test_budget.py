"""HedgeBudget: token bucket for delay-triggered hedges."""

from __future__ import annotations

import pytest

from hedge.budget import HedgeBudget


def run(budget: HedgeBudget, n: int) -> int:
    spent = 0
    for _ in range(n):
        budget.on_request()
        spent += budget.try_spend()  # every request wants a hedge
    return spent


def test_ratio_caps_hedges() -> None:
    n = 10_000
    b = HedgeBudget(0.1, burst=5.0)
    spent = run(b, n)
    assert spent <= 0.1 * n + 5
    assert spent >= 0.1 * n  # and the budget is really available (no float drift to 1-in-11)
    assert b.spent == spent
    assert b.refusals == n - spent


def test_ratio_zero_never_hedges() -> None:
    b = HedgeBudget(0.0)
    assert b.tokens == 0.0
    assert run(b, 1000) == 0
    assert b.refusals == 1000


def test_starts_full_and_caps_at_burst() -> None:
    b = HedgeBudget(0.5, burst=3.0)
    assert b.tokens == 3.0
    for _ in range(100):
        b.on_request()
    assert b.tokens == 3.0
    assert [b.try_spend() for _ in range(4)] == [True, True, True, False]
    assert b.refusals == 1
    b.on_request()
    assert not b.try_spend()
    b.on_request()
    assert b.try_spend()
    assert b.tokens == 0.0


def test_bad_arguments() -> None:
    for args in (
        (-0.1,),
        (float("nan"),),
        (float("inf"),),
        ("0.1",),
        (None,),
        (1e-9,),
        (0.1, 0.5),
        (0.1, -1),
    ):
        with pytest.raises(ValueError):
            HedgeBudget(*args)  # type: ignore[arg-type]
