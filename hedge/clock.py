"""The proxy's time: a clock to read, and the hedge timer that waits on the same clock.

Every decision of a race is taken at a time read from one injected clock (`Race`, `Feedback`, the
breakers, the affinity map). The one place the request path *waits* for time is the hedge timer: "the
first of these attempts to finish, or the hedge deadline, whichever comes first". If that wait used the
event loop's own time while the decisions used the injected clock, a test that moves the clock could
open a breaker but never fire a hedge. So the wait is a seam of its own, a `Timer`, and the two
implementations here keep wait and clock on the same time line:

- `LoopTimer` (production): the deadline is turned into a timeout on the loop, read against the clock
  the proxy uses (`time.monotonic` by default, which is the loop's clock too).
- `ManualClock` (tests, the demo's fake-time runs): time stands still until `advance()`, and a wait
  whose deadline has been reached is woken by that call. Attempts still finish in real time (they are
  real sockets); only the hedge timer and the clock reads are virtual. Finagle's `BackupRequestFilter`
  takes its timer the same way, for the same reason.

Pure asyncio: no aiohttp here (docs/design.md, "The request path").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Timer(Protocol):
    async def first(self, tasks: Collection[asyncio.Task[T]], deadline: float | None) -> set[asyncio.Task[T]]:
        """Wait until one of `tasks` is done or the clock reaches `deadline` (None: no deadline).
        Returns the tasks that are done (empty when the deadline came first). `tasks` is not empty."""
        ...


class LoopTimer:
    """The hedge timer on the event loop: the deadline becomes `asyncio.wait`'s timeout."""

    __slots__ = ("clock",)

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock

    async def first(self, tasks: Collection[asyncio.Task[T]], deadline: float | None) -> set[asyncio.Task[T]]:
        if deadline is None and len(tasks) == 1:
            # the common case (one attempt, no hedge timer): await it directly, which spares
            # asyncio.wait's per-call future and callbacks; a cancel of the caller cancels it too
            (only,) = tasks
            await only  # an attempt never raises but CancelledError
            return {only}
        timeout = None if deadline is None else max(0.0, deadline - self.clock())
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return done


class ManualClock:
    """A clock that moves only when told to, with a hedge timer on it (for tests).

    `clock()` reads the time; `advance(dt)` moves it and wakes every `first()` whose deadline it reached.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._waiters: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        """Move the clock forward by `dt` seconds and fire the hedge timers that are now due."""
        self.now += dt
        due = [(d, f) for d, f in self._waiters if d <= self.now]
        self._waiters = [(d, f) for d, f in self._waiters if d > self.now]
        for _, f in due:
            if not f.done():
                f.set_result(None)

    @property
    def waiting(self) -> int:
        """How many hedge timers are armed (a test waits for one before it moves the clock)."""
        return sum(1 for _, f in self._waiters if not f.done())

    async def first(self, tasks: Collection[asyncio.Task[T]], deadline: float | None) -> set[asyncio.Task[T]]:
        if deadline is not None and deadline <= self.now:
            return {t for t in tasks if t.done()}
        if deadline is None:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            return done
        alarm: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (deadline, alarm)
        self._waiters.append(entry)
        waited: list[asyncio.Future[Any]] = [*tasks, alarm]
        try:
            woke, _ = await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
            alarm.cancel()
        return {t for t in tasks if t in woke}
