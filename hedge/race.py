"""The hedged race as a sans-IO state machine (docs/design.md, "The request path").

The rules, step by step, are in the README's "How a request is served".

`Race` decides *when* to launch which candidate, *who* won and *what* to cancel. It never touches a
socket or a clock: the I/O layer feeds it events with the current time (`start`, `on_timer`,
`on_first_token`, `on_failure`, `on_client_gone`) and carries out the actions it returns (`Launch`,
`Cancel`, `Commit`, `Reject`, `GiveUp`). That keeps the policy exact and testable with a fake clock, and
keeps the aiohttp code a thin byte mover.

Rules:
- attempt 1 launches at `start`; candidate i is tried at most once, at most `max_attempts` in all;
- when the running attempt's hedge delay passes without a first token, the next candidate launches,
  if the hedge budget allows (a refusal stops delay-triggered launches for this request);
- when an attempt fails retryably before its first token, the next candidate launches at once
  (no budget needed: error-triggered launches replace, they do not add);
- the first token commits that attempt and cancels all others; a later first token is cancelled too;
- a caller-fault answer (4xx) cancels all others and is returned as is;
- when nothing is running and nothing can launch, the race gives up with a status that fits the failures.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from .upstream_errors import UpstreamTimeout


class DelayPolicy(Protocol):
    def delay(self, candidate: int) -> float | None:
        """Seconds to wait for `candidate`'s first token before launching the next; None = never."""
        ...


class Budget(Protocol):
    def try_spend(self) -> bool: ...


class FixedDelay:
    """A constant hedge delay (the issue-2 policy; adaptive policies live in `policy.py`)."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds

    def delay(self, candidate: int) -> float | None:
        return self.seconds


class FailureKind(enum.Enum):
    RETRYABLE = "retryable"  # connect error, timeout, 408/409/429/5xx, broken stream: try the next one
    CALLER = "caller"  # the request itself is bad (400, 413, 422 ...): return it, launch nothing more


@dataclass(frozen=True, slots=True)
class Failure:
    kind: FailureKind
    reason: str  # short word for errors and metrics: connect, timeout, http_503, malformed, ...
    status: int | None = None
    retry_after: float | None = None


class AttemptState(enum.Enum):
    RUNNING = "running"
    WON = "won"
    CANCELLED = "cancelled"
    FAILED = "failed"
    ABANDONED = "abandoned"
    REJECTED = "rejected"  # returned the caller's 4xx


@dataclass(slots=True)
class Attempt:
    index: int
    candidate: int
    launched_at: float
    reason: str
    state: AttemptState = AttemptState.RUNNING
    ended_at: float | None = None
    failure: Failure | None = None


# ---------------------------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Launch:
    attempt: int
    candidate: int
    reason: str  # initial | delay | error


@dataclass(frozen=True, slots=True)
class Cancel:
    attempts: tuple[int, ...]
    reason: str  # lost | abandoned | rejected


@dataclass(frozen=True, slots=True)
class Commit:
    attempt: int


@dataclass(frozen=True, slots=True)
class Reject:
    attempt: int


@dataclass(frozen=True, slots=True)
class GiveUp:
    status: int
    failures: tuple[tuple[int, Failure], ...]  # (candidate, failure)


Action = Launch | Cancel | Commit | Reject | GiveUp


class Race:
    """One request's race across an ordered list of candidates."""

    __slots__ = (
        "_budget",
        "_deadline",
        "_delays",
        "_max_attempts",
        "_n",
        "attempts",
        "budget_refusals",
        "done",
        "winner",
    )

    def __init__(
        self,
        n_candidates: int,
        *,
        max_attempts: int,
        delays: DelayPolicy | None = None,
        budget: Budget | None = None,
    ) -> None:
        if n_candidates < 1:
            raise ValueError("a race needs at least one candidate")
        self._n = n_candidates
        self._max_attempts = max(1, min(max_attempts, n_candidates))
        self._delays = delays
        self._budget = budget
        self._deadline: float | None = None
        self.attempts: list[Attempt] = []
        self.winner: int | None = None
        self.done = False
        self.budget_refusals = 0

    # ------------------------------------------------------------------------------------- queries

    def deadline(self) -> float | None:
        """When the I/O layer must call `on_timer` next (None: no timer needed)."""
        return None if self.done else self._deadline

    def running(self) -> tuple[int, ...]:
        return tuple(a.index for a in self.attempts if a.state is AttemptState.RUNNING)

    def _can_launch(self) -> bool:
        return len(self.attempts) < self._max_attempts

    # -------------------------------------------------------------------------------------- events

    def start(self, now: float) -> list[Action]:
        if self.attempts:
            raise RuntimeError("race already started")
        return [self._launch(now, "initial")]

    def on_timer(self, now: float) -> list[Action]:
        if self.done or self._deadline is None or now < self._deadline:
            return []
        self._deadline = None
        if not self._can_launch():
            return []
        if self._budget is not None and not self._budget.try_spend():
            self.budget_refusals += 1
            return []
        return [self._launch(now, "delay")]

    def on_first_token(self, attempt: int, now: float) -> list[Action]:
        a = self.attempts[attempt]
        if a.state is not AttemptState.RUNNING:
            return []
        if self.done:  # another attempt already won in the same instant
            self._end(a, AttemptState.CANCELLED, now)
            return [Cancel((attempt,), "lost")]
        self._end(a, AttemptState.WON, now)
        self.winner = attempt
        self.done = True
        losers = self._end_running(AttemptState.CANCELLED, now)
        out: list[Action] = []
        if losers:
            out.append(Cancel(losers, "lost"))
        out.append(Commit(attempt))
        return out

    def on_failure(self, attempt: int, failure: Failure, now: float) -> list[Action]:
        a = self.attempts[attempt]
        if a.state is not AttemptState.RUNNING:
            return []
        a.failure = failure
        if self.done:
            self._end(a, AttemptState.FAILED, now)
            return []
        if failure.kind is FailureKind.CALLER:
            self._end(a, AttemptState.REJECTED, now)
            self.done = True
            others = self._end_running(AttemptState.CANCELLED, now)
            out: list[Action] = [Cancel(others, "rejected")] if others else []
            return [*out, Reject(attempt)]
        self._end(a, AttemptState.FAILED, now)
        if self._can_launch():
            return [self._launch(now, "error")]
        if self.running():
            return []
        self.done = True
        return [GiveUp(self._give_up_status(), self._failures())]

    def on_client_gone(self, now: float) -> list[Action]:
        if self.done and self.winner is None and not self.running():
            return []
        self.done = True
        gone = self._end_running(AttemptState.ABANDONED, now)
        return [Cancel(gone, "abandoned")] if gone else []

    # ------------------------------------------------------------------------------------- helpers

    def _launch(self, now: float, reason: str) -> Launch:
        index = len(self.attempts)
        self.attempts.append(Attempt(index=index, candidate=index, launched_at=now, reason=reason))
        delay = self._delays.delay(index) if self._delays is not None else None
        self._deadline = None if delay is None or not self._can_launch() else now + delay
        return Launch(attempt=index, candidate=index, reason=reason)

    @staticmethod
    def _end(a: Attempt, state: AttemptState, now: float) -> None:
        a.state = state
        a.ended_at = now

    def _end_running(self, state: AttemptState, now: float) -> tuple[int, ...]:
        ended = []
        for a in self.attempts:
            if a.state is AttemptState.RUNNING:
                self._end(a, state, now)
                ended.append(a.index)
        return tuple(ended)

    def _failures(self) -> tuple[tuple[int, Failure], ...]:
        return tuple((a.candidate, a.failure) for a in self.attempts if a.failure is not None)

    def _give_up_status(self) -> int:
        reasons = [a.failure for a in self.attempts if a.failure is not None]
        if reasons and all(f.status == 429 for f in reasons):
            return 429
        if reasons and all(f.reason == UpstreamTimeout.reason for f in reasons):
            return 504
        return 502
