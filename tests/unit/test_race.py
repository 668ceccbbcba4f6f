"""Exact fake-clock tests of the sans-IO race: launch times, commits, cancel sets, give-ups."""

from __future__ import annotations

import pytest

from hedge.budget import HedgeBudget
from hedge.race import (
    AttemptState,
    Cancel,
    Commit,
    Failure,
    FailureKind,
    FixedDelay,
    GiveUp,
    Launch,
    Race,
    Reject,
)

RETRY = Failure(FailureKind.RETRYABLE, "http_503", 503)
CALLER = Failure(FailureKind.CALLER, "http_400", 400)


def hedge(n: int = 3, delay: float = 0.1, max_attempts: int = 3, budget: HedgeBudget | None = None) -> Race:
    return Race(n, max_attempts=max_attempts, delays=FixedDelay(delay), budget=budget)


def test_staggered_launches_at_exact_delays() -> None:
    r = hedge(delay=0.1)
    assert r.start(0.0) == [Launch(0, 0, "initial")]
    assert r.deadline() == pytest.approx(0.1)
    assert r.on_timer(0.099) == []  # not yet
    assert r.on_timer(0.1) == [Launch(1, 1, "delay")]
    assert r.deadline() == pytest.approx(0.2)
    assert r.on_timer(0.2) == [Launch(2, 2, "delay")]
    assert r.deadline() is None  # max_attempts reached: no timer needed
    assert [a.launched_at for a in r.attempts] == [0.0, 0.1, 0.2]


def test_first_token_commits_and_cancels_all_others() -> None:
    r = hedge()
    r.start(0.0)
    r.on_timer(0.1)
    r.on_timer(0.2)
    acts = r.on_first_token(1, 0.25)
    assert acts == [Cancel((0, 2), "lost"), Commit(1)]
    assert r.winner == 1 and r.done
    assert [a.state for a in r.attempts] == [AttemptState.CANCELLED, AttemptState.WON, AttemptState.CANCELLED]
    assert r.deadline() is None
    # a second first token arriving in the same instant loses and is cancelled; nothing else happens
    r2 = hedge()
    r2.start(0.0)
    r2.on_timer(0.1)
    r2.on_first_token(0, 0.15)
    assert r2.on_first_token(1, 0.15) == []  # already cancelled by the commit


def test_win_before_any_hedge_cancels_nothing_and_stops_timer() -> None:
    r = hedge()
    r.start(0.0)
    assert r.on_first_token(0, 0.05) == [Commit(0)]
    assert r.on_timer(1.0) == []
    assert len(r.attempts) == 1


def test_error_launches_next_at_once_and_resets_the_timer() -> None:
    r = hedge(delay=0.1)
    r.start(0.0)
    assert r.on_failure(0, RETRY, 0.03) == [Launch(1, 1, "error")]
    assert r.attempts[1].launched_at == 0.03
    assert r.deadline() == pytest.approx(0.13)
    assert r.on_timer(0.13) == [Launch(2, 2, "delay")]


def test_error_while_another_runs_still_launches_next() -> None:
    r = hedge(delay=0.1)
    r.start(0.0)
    r.on_timer(0.1)  # attempts 0 and 1 running
    assert r.on_failure(0, RETRY, 0.12) == [Launch(2, 2, "error")]
    assert r.running() == (1, 2)


def test_max_attempts_caps_launches() -> None:
    r = hedge(n=5, max_attempts=2)
    r.start(0.0)
    assert r.on_timer(0.1) == [Launch(1, 1, "delay")]
    assert r.deadline() is None
    assert r.on_failure(0, RETRY, 0.2) == []  # cannot launch, attempt 1 still running
    assert r.on_failure(1, RETRY, 0.3) == [GiveUp(502, ((0, RETRY), (1, RETRY)))]
    assert r.done


def test_all_failed_statuses() -> None:
    r429 = Failure(FailureKind.RETRYABLE, "http_429", 429, 2.0)
    r = Race(2, max_attempts=2)
    r.start(0.0)
    r.on_failure(0, r429, 0.01)
    (give_up,) = r.on_failure(1, r429, 0.02)
    assert isinstance(give_up, GiveUp) and give_up.status == 429

    t = Failure(FailureKind.RETRYABLE, "timeout")
    r = Race(2, max_attempts=2)
    r.start(0.0)
    r.on_failure(0, t, 1.0)
    assert r.on_failure(1, t, 2.0)[0].status == 504

    r = Race(2, max_attempts=2)
    r.start(0.0)
    r.on_failure(0, r429, 1.0)
    assert r.on_failure(1, t, 2.0)[0].status == 502


def test_caller_error_is_returned_and_stops_everything() -> None:
    r = hedge()
    r.start(0.0)
    r.on_timer(0.1)
    assert r.on_failure(1, CALLER, 0.15) == [Cancel((0,), "rejected"), Reject(1)]
    assert r.done and r.deadline() is None
    assert r.on_timer(0.3) == []
    assert len(r.attempts) == 2


def test_client_gone_cancels_running_and_pending_launches() -> None:
    r = hedge()
    r.start(0.0)
    r.on_timer(0.1)
    assert r.on_client_gone(0.15) == [Cancel((0, 1), "abandoned")]
    assert r.deadline() is None and r.on_timer(0.2) == []
    assert all(a.state is AttemptState.ABANDONED for a in r.attempts)
    assert r.on_client_gone(0.16) == []


def test_failover_without_delays_never_hedges_on_time() -> None:
    r = Race(3, max_attempts=3, delays=None)
    r.start(0.0)
    assert r.deadline() is None
    assert r.on_timer(100.0) == []
    assert r.on_failure(0, RETRY, 1.0) == [Launch(1, 1, "error")]
    assert r.deadline() is None


def test_budget_refusal_stops_delay_hedges_but_not_error_launches() -> None:
    budget = HedgeBudget(0.0)  # no delay hedges ever
    r = hedge(budget=budget)
    r.start(0.0)
    assert r.on_timer(0.1) == []
    assert r.budget_refusals == 1
    assert r.deadline() is None
    assert r.on_failure(0, RETRY, 0.2) == [Launch(1, 1, "error")]


def test_budget_spends_one_token_per_delay_hedge() -> None:
    budget = HedgeBudget(0.5, burst=1.0)
    r = hedge(budget=budget)
    r.start(0.0)
    assert r.on_timer(0.1) == [Launch(1, 1, "delay")]
    assert r.on_timer(0.2) == []  # bucket empty now
    assert r.budget_refusals == 1


def test_single_candidate_race() -> None:
    r = hedge(n=1)
    r.start(0.0)
    assert r.deadline() is None
    assert r.on_failure(0, RETRY, 0.5) == [GiveUp(502, ((0, RETRY),))]


def test_late_events_after_done_are_ignored() -> None:
    r = hedge()
    r.start(0.0)
    r.on_timer(0.1)
    r.on_first_token(0, 0.12)
    assert r.on_failure(1, RETRY, 0.13) == []
    assert r.on_timer(0.5) == []


def test_invalid_construction() -> None:
    with pytest.raises(ValueError):
        Race(0, max_attempts=1)
    r = hedge()
    r.start(0.0)
    with pytest.raises(RuntimeError):
        r.start(0.0)
