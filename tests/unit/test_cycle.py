"""`RaceCycle` and the hedge timer, without sockets: attempts are futures the test resolves, and the
clock is a `ManualClock`, so "the delay passed" is a step the test takes.

What is checked is what the cycle owns: which attempts it launches and when, that a commit cancels the
losers' tasks, that a request ending any other way abandons every attempt, that nothing it started
outlives it, and that `record_outcome` books each attempt exactly once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hedge.attempt import AttemptResult, Call
from hedge.catalog import Candidate, Catalog
from hedge.clock import LoopTimer, ManualClock
from hedge.config import parse_config
from hedge.cycle import RaceCycle
from hedge.dialects import CHAT
from hedge.errors import ApiError
from hedge.feedback import Feedback
from hedge.metrics import Metrics
from hedge.race import Failure, FailureKind
from hedge.secrets import Scrubber

from ..conftest import eventually, raw_config

ROUTE = "gammainfra/fast"
DELAY = 0.25
FIXED = {"min_delay_ms": DELAY * 1000, "max_delay_ms": DELAY * 1000, "default_delay_ms": DELAY * 1000,
         "max_attempts": 3, "hedge_budget": 1.0, "hedge_burst": 5}  # fmt: skip


class FakeResp:
    """The open response a first token hands over: the cycle may only abort a loser's."""

    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


class FakeAttempts:
    """`Attempts.run` stand-in: each launch waits on a future the test resolves; cancels are seen."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.launched: list[str] = []
        self.pending: dict[str, asyncio.Future[AttemptResult]] = {}
        self.cancelled: list[str] = []
        self.payloads: list[bytes] = []

    async def run(self, c: Candidate, payload: bytes, call: Call) -> AttemptResult:
        name = c.provider.name
        self.launched.append(name)
        self.payloads.append(payload)
        fut = self.pending[name] = asyncio.get_running_loop().create_future()
        try:
            return await fut
        except asyncio.CancelledError:
            self.cancelled.append(name)
            raise

    def token(self, name: str) -> None:
        self.pending[name].set_result(AttemptResult(resp=FakeResp(), chunks=[b"data: x\n\n"],  # type: ignore[arg-type]
                                                    first_at=self.clock()))  # fmt: skip

    def fail(self, name: str, failure: Failure, body: bytes = b"") -> None:
        self.pending[name].set_result(AttemptResult(failure=failure, error_body=body))


class Rig:
    def __init__(self, route: dict[str, Any] | None = None, providers: tuple[str, ...] = ("a", "b", "c")):
        raw = raw_config({p: f"http://{p}.invalid/v1" for p in providers}, fast=route or FIXED)
        self.catalog = Catalog(parse_config(raw))
        self.plan = self.catalog.resolve(ROUTE)
        self.clock = ManualClock()
        self.lane = Feedback(self.catalog.config.feedback)
        self.metrics = Metrics()
        self.attempts = FakeAttempts(self.clock)
        self.live: set[asyncio.Task[AttemptResult]] = set()

    def cycle(self, *, pinned: bool = False) -> RaceCycle:
        body = {"model": ROUTE, "messages": []}
        call = Call(CHAT, body, stream=True, strip_usage=True, wasted_tokens=7, pinned=pinned)
        order = self.lane.order(self.plan, self.clock(), ("a", "b", "c"), self.plan.candidates)
        return RaceCycle(
            call, self.plan, order, lane=self.lane, eagerness=0.5, attempts=self.attempts,  # type: ignore[arg-type]
            metrics=self.metrics, timer=self.clock, clock=self.clock, scrub=Scrubber(()),
            live=self.live, t_in=self.clock(),
        )  # fmt: skip

    def count(self, provider: str, outcome: str) -> float:
        value: float = self.metrics.attempts.labels(provider, f"up-{provider}", outcome, "chat")._value.get()
        return value

    def hedges(self, reason: str) -> float:
        value: float = self.metrics.hedges.labels(ROUTE, reason)._value.get()
        return value


async def armed(rig: Rig) -> None:
    assert await eventually(lambda: rig.clock.waiting == 1)


async def test_a_hedge_launches_only_when_the_clock_passes_the_delay_and_the_first_token_commits() -> None:
    rig = Rig()
    cycle = rig.cycle()
    run = asyncio.ensure_future(cycle.run())
    await armed(rig)
    assert rig.attempts.launched == ["a"]
    rig.clock.advance(DELAY - 0.001)  # not yet
    await asyncio.sleep(0)
    assert rig.attempts.launched == ["a"] and rig.clock.waiting == 1
    rig.clock.advance(0.001)
    assert await eventually(lambda: rig.attempts.launched == ["a", "b"])
    await armed(rig)  # b's own delay, before c
    rig.attempts.token("b")
    winner = await run
    cycle.close()
    assert cycle.winner == 1 and cycle.served_by.provider.name == "b"
    assert winner.resp is not None and not winner.resp.aborted  # type: ignore[attr-defined]
    assert await eventually(lambda: rig.attempts.cancelled == ["a"])
    assert await eventually(lambda: not rig.live)  # nothing outlives the race but the winner's response
    cycle.won()
    cycle.completed()
    assert (rig.count("a", "cancelled"), rig.count("b", "won")) == (1, 1)
    assert rig.hedges("delay") == 1
    waste = rig.metrics.wasted_tokens.labels("m/a", "a", "lost")._value.get()
    assert waste == 7  # the loser is billed its prompt estimate
    ttft = rig.metrics.upstream_ttft.labels("b", "up-b")
    assert sum(b.get() for b in ttft._buckets) == 1  # one first token booked, once


async def test_every_launch_sends_the_body_with_its_own_model_and_asks_for_usage() -> None:
    rig = Rig()
    cycle = rig.cycle()
    run = asyncio.ensure_future(cycle.run())
    await armed(rig)
    rig.attempts.token("a")
    await run
    cycle.close()
    assert b'"model":"up-a"' in rig.attempts.payloads[0]
    assert b'"stream_options":{"include_usage":true}' in rig.attempts.payloads[0]


async def test_a_client_leaving_abandons_every_running_attempt() -> None:
    rig = Rig()
    cycle = rig.cycle()
    run = asyncio.ensure_future(cycle.run())
    await armed(rig)
    rig.clock.advance(DELAY)
    assert await eventually(lambda: len(rig.attempts.launched) == 2)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    cycle.close()
    assert await eventually(lambda: sorted(rig.attempts.cancelled) == ["a", "b"])
    assert await eventually(lambda: not rig.live)
    assert (rig.count("a", "abandoned"), rig.count("b", "abandoned")) == (1, 1)
    assert not any(rig.lane.in_flight().values())  # the lane heard both end


async def test_a_failure_fails_over_at_once_and_every_failure_gives_up_with_each_reason() -> None:
    rig = Rig()
    cycle = rig.cycle()
    run = asyncio.ensure_future(cycle.run())
    await armed(rig)
    for name in ("a", "b", "c"):
        assert await eventually(lambda n=name: n in rig.attempts.pending)  # type: ignore[misc]
        rig.attempts.fail(name, Failure(FailureKind.RETRYABLE, "http_503", 503))
    with pytest.raises(ApiError) as e:
        await run
    cycle.close()
    assert e.value.status == 502
    assert "m/a@a: http_503" in e.value.message and "m/c@c: http_503" in e.value.message
    assert rig.hedges("error") == 2 and rig.hedges("delay") == 0  # no clock movement: error hedges only
    assert [rig.count(p, "failed") for p in "abc"] == [1, 1, 1]
    assert await eventually(lambda: not rig.live)


async def test_a_caller_error_is_the_providers_message_scrubbed_and_nothing_else_launches() -> None:
    rig = Rig()
    cycle = rig.cycle()
    run = asyncio.ensure_future(cycle.run())
    await armed(rig)
    body = (
        b'{"error": {"message": "bad temperature", "type": "invalid_request_error", "param": "temperature"}}'
    )
    rig.attempts.fail("a", Failure(FailureKind.CALLER, "http_400", 400), body)
    with pytest.raises(ApiError) as e:
        await run
    cycle.close()
    assert (e.value.status, e.value.message, e.value.param) == (400, "bad temperature", "temperature")
    assert rig.attempts.launched == ["a"] and rig.count("a", "rejected") == 1


async def test_a_pinned_call_is_one_attempt_with_no_timer() -> None:
    rig = Rig()
    cycle = rig.cycle(pinned=True)
    run = asyncio.ensure_future(cycle.run())
    assert await eventually(lambda: rig.attempts.launched == ["a"])
    assert cycle.race.deadline() is None and rig.clock.waiting == 0
    rig.attempts.fail("a", Failure(FailureKind.RETRYABLE, "connect"))
    with pytest.raises(ApiError):
        await run  # no failover for state held at one provider
    cycle.close()
    assert rig.attempts.launched == ["a"]


async def test_manual_clock_wakes_only_the_timers_it_reached() -> None:
    clock = ManualClock()
    loop = asyncio.get_running_loop()
    t1: asyncio.Task[AttemptResult] = asyncio.ensure_future(loop.create_future())
    early = asyncio.ensure_future(clock.first([t1], clock() + 1.0))
    late = asyncio.ensure_future(clock.first([t1], clock() + 2.0))
    assert await eventually(lambda: clock.waiting == 2)
    clock.advance(1.0)
    assert await early == set() and not late.done()
    assert clock.waiting == 1
    t1.cancel()
    assert await late == {t1}  # a task ending wakes it before its deadline
    assert clock.waiting == 0
    assert await clock.first([t1], clock()) == {t1}  # a deadline already reached: no wait at all


async def test_loop_timer_returns_nothing_done_when_the_deadline_came_first() -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[AttemptResult] = loop.create_future()
    pending: asyncio.Task[AttemptResult] = asyncio.ensure_future(fut)  # type: ignore[assignment]
    timer = LoopTimer(loop.time)
    assert await timer.first([pending], loop.time() - 1.0) == set()
    fut.set_result(AttemptResult())
    assert await timer.first([pending], None) == {pending}  # one task, no deadline: awaited directly


class TickingClock(ManualClock):
    """Every read is a microsecond later than the one before, as a real clock's reads are."""

    def __call__(self) -> float:
        self.now += 1e-6
        return self.now


async def test_the_lane_hears_of_an_attempt_by_the_launch_time_the_race_gave_it() -> None:
    # the lane keeps in-flight attempts by launch time and a report names the attempt by the race's
    # launched_at: booked at another clock reading, the report would have to search for the nearest
    rig = Rig()
    rig.clock = rig.attempts.clock = TickingClock()
    cycle = rig.cycle()
    run = asyncio.ensure_future(cycle.run())
    assert await eventually(lambda: rig.attempts.launched == ["a"])
    c = cycle.cands[0]
    launched_at = cycle.race.attempts[0].launched_at
    assert rig.lane.evidence(c)._pending == [launched_at]
    rig.attempts.token("a")
    await run
    cycle.close()
    assert rig.lane.evidence(c)._pending == []
