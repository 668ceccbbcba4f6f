"""One request's race with real attempts: `RaceCycle`, in the spirit of uvicorn's `RequestResponseCycle`.

`race.Race` decides (launch, commit, cancel, give up) and never touches a task or a clock. This object
carries its decisions out for one request, and owns everything that must end with it: the race, the
attempt tasks and their results, and the feedback lane the request learns into. It is created when the
request has a plan and an order, and `close()` runs when the request ends however it ends, so no attempt
outlives its request (docs/design.md, "The request path").

- `run()` starts the race and drives it to a commit: launches (`launch`), waits on the hedge timer for
  the first attempt to end or the hedge deadline (`Timer.first`, on the injected clock), and feeds each
  ended attempt back (`on_done`). A caller error or a give-up ends it with an `ApiError`.
- `cancel(i, reason)` stops one attempt: its task is cancelled, which closes its connection, so the
  provider stops generating.
- `record_outcome` is the one place an attempt's life reaches the feedback lane and the metrics; the
  table in its docstring says which outcome updates what, so a counter can be checked against it.

No aiohttp here: the proxy turns what this returns or raises into HTTP.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable

import orjson

from .attempt import AttemptResult, Attempts, Call, for_health
from .catalog import Candidate, Plan
from .clock import Timer
from .dialects import Usage
from .errors import ApiError
from .feedback import Feedback, Order
from .metrics import Metrics
from .race import Action, Cancel, Commit, FailureKind, GiveUp, Launch, Race, Reject
from .secrets import Scrubber


class Outcome(enum.Enum):
    """What happened to an attempt, as `record_outcome` books it."""

    LAUNCHED = "launched"
    FIRST_TOKEN = "first_token"
    FAILED = "failed"
    CANCELLED = "cancelled"
    WON = "won"
    COMPLETED = "completed"


class RaceCycle:
    """One request's race: its attempts, their tasks, and the lane it learns into."""

    __slots__ = (
        "_body",
        "_by_task",
        "attempts",
        "call",
        "cands",
        "clock",
        "lane",
        "live",
        "metrics",
        "order",
        "plan",
        "race",
        "results",
        "scrub",
        "started_at",
        "t_in",
        "tasks",
        "timer",
        "winner",
    )

    def __init__(
        self,
        call: Call,
        plan: Plan,
        order: Order,
        *,
        lane: Feedback,
        eagerness: float,
        attempts: Attempts,
        metrics: Metrics,
        timer: Timer,
        clock: Callable[[], float],
        scrub: Scrubber,
        live: set[asyncio.Task[AttemptResult]],
        t_in: float,
    ) -> None:
        self.call = call
        self.plan = plan
        self.order = order
        self.lane = lane
        self.attempts = attempts
        self.metrics = metrics
        self.timer = timer
        self.clock = clock
        self.scrub = scrub
        self.live = live  # the proxy's set of live attempt tasks (leak tests look at it)
        self.t_in = t_in  # when the request arrived
        self.cands = list(order.candidates)
        self.started_at = now = clock()
        budget = None
        if call.pinned:  # one provider holds the state: one attempt, no hedge
            delays = None
            max_attempts = 1
        else:
            delays = lane.delay_policy(plan, order, now, eagerness)
            if delays is not None:
                budget = lane.request_budget(plan.route, order)
                metrics.hedge_delay.labels(plan.name).set(delays.base_delay(0))  # at the default dial
            max_attempts = plan.route.max_attempts
        self.race = Race(len(self.cands), max_attempts=max_attempts, delays=delays, budget=budget)
        self._body = call.upstream_body()
        self.tasks: dict[int, asyncio.Task[AttemptResult]] = {}
        self._by_task: dict[asyncio.Task[AttemptResult], int] = {}
        self.results: dict[int, AttemptResult] = {}
        self.winner: int | None = None

    # ------------------------------------------------------------------------------------ driving

    async def run(self) -> AttemptResult:
        """Race until an attempt commits, and return it (its open response, its bytes so far). Raises
        `ApiError` for a caller error the provider returned, or when every attempt failed."""
        actions = self.race.start(self.started_at)
        while True:
            error: ApiError | None = None
            for act in actions:
                if isinstance(act, Launch):
                    self.launch(act)
                elif isinstance(act, Cancel):
                    for i in act.attempts:
                        self.cancel(i, act.reason)
                elif isinstance(act, Commit):
                    self.winner = act.attempt
                elif isinstance(act, Reject):
                    error = provider_rejection(self.results[act.attempt], self.scrub)
                elif isinstance(act, GiveUp):
                    error = give_up_error(self.plan, self.cands, act)
            if self.race.budget_refusals:
                self.metrics.budget_refusals.labels(self.plan.name).inc(self.race.budget_refusals)
                self.race.budget_refusals = 0
            if error is not None:
                raise error
            if self.winner is not None:
                return self.results[self.winner]
            done = await self.timer.first(self.tasks.values(), self.race.deadline())
            now = self.clock()
            actions = []
            for t in done:
                actions += self.on_done(t, now)
            actions += self.race.on_timer(now)

    def launch(self, act: Launch) -> None:
        """Start attempt `act.attempt` on its candidate, as a task of its own."""
        c = self.cands[act.candidate]
        try:
            payload = orjson.dumps({**self._body, "model": c.upstream_model})
        except orjson.JSONEncodeError:  # loads takes any depth, dumps stops at 255
            raise ApiError(
                400, "The request body nests JSON deeper than 255 levels.", code="invalid_json"
            ) from None
        # booked at the race's own launch time: the lane later hears of this attempt by that time, and
        # finds it among those in flight by equality, not by a search for the nearest
        launched_at = self.race.attempts[act.attempt].launched_at
        self.record_outcome(act.attempt, Outcome.LAUNCHED, launched_at, reason=act.reason)
        t = asyncio.ensure_future(self.attempts.run(c, payload, self.call))
        self.tasks[act.attempt] = t
        self._by_task[t] = act.attempt
        self.live.add(t)
        t.add_done_callback(self.live.discard)

    def on_done(self, t: asyncio.Task[AttemptResult], now: float) -> list[Action]:
        """An attempt's task ended (a first token or a failure): book it and tell the race."""
        i = self._by_task[t]
        del self.tasks[i]
        r = self.results[i] = t.result()
        if r.failure is None:
            self.record_outcome(i, Outcome.FIRST_TOKEN, now, result=r)
            return self.race.on_first_token(i, now)
        self.record_outcome(i, Outcome.FAILED, now, result=r)
        return self.race.on_failure(i, r.failure, now)

    def cancel(self, i: int, reason: str) -> None:
        """Stop attempt i now: cancel its task (which closes its connection) and book it."""
        now = self.clock()
        t = self.tasks.pop(i, None)
        if t is not None:
            if t.done() and not t.cancelled() and i not in self.results:
                # it ended while we were being cancelled (the client left as the timer woke us): its
                # result may hold an open response nobody else will close, and the lane must hear how
                # it ended, or it would wait for news of it forever
                r0 = self.results[i] = t.result()
                self.record_outcome(i, Outcome.FIRST_TOKEN if r0.failure is None else Outcome.FAILED,
                                    now, result=r0, book=False)  # fmt: skip
            t.cancel()
        r = self.results.get(i)
        if r is not None and r.resp is not None:  # a first token in the same instant as the winner's
            r.resp.abort()
        self.record_outcome(i, Outcome.CANCELLED, now, result=r, reason=reason)

    def close(self) -> None:
        """The request ended: nothing it started may outlive it. After a commit the losers are already
        cancelled; otherwise (the client left, an error) every attempt still running is abandoned."""
        if self.winner is not None:
            return
        for act in self.race.on_client_gone(self.clock()):
            assert isinstance(act, Cancel)  # the only action a client leaving produces
            for i in act.attempts:
                self.cancel(i, "abandoned")
        for t in self.tasks.values():
            t.cancel()

    # ---------------------------------------------------------------------------------- booking

    @property
    def served_by(self) -> Candidate:
        assert self.winner is not None
        return self.cands[self.winner]

    def record_outcome(
        self,
        i: int,
        outcome: Outcome,
        now: float,
        *,
        result: AttemptResult | None = None,
        reason: str = "",
        book: bool = True,
    ) -> None:
        """Book what happened to attempt i: every feedback and metrics update of an attempt is here.

        | outcome     | feedback lane                          | metrics                                     |
        |-------------|----------------------------------------|---------------------------------------------|
        | LAUNCHED    | on_launch (in flight)                  | hedges{reason} unless the initial attempt   |
        | FIRST_TOKEN | on_first_token (TTFT)                  | upstream_ttft                               |
        | FAILED      | on_failure (health, evidence)          | attempts{failed or rejected}                |
        | CANCELLED   | on_cancelled if it had no answer yet   | attempts{cancelled or abandoned}, wasted    |
        | WON         | -                                      | attempts{won}, client_ttft                  |
        | COMPLETED   | on_complete (duration)                 | upstream_duration                           |

        `book=False` tells the lane only: an attempt that ended just as it was being cancelled is
        counted once, by its CANCELLED.
        """
        c = self.cands[i]
        launched = self.race.attempts[i].launched_at
        m = self.metrics
        api = self.call.api
        if outcome is Outcome.LAUNCHED:
            if reason != "initial":
                explored = reason == "delay" and i == 1 and self.order.explore is c
                m.hedges.labels(self.plan.name, "explore" if explored else reason).inc()
            self.lane.on_launch(c, now)
        elif outcome is Outcome.FIRST_TOKEN:
            assert result is not None
            ttft = result.first_at - launched
            self.lane.on_first_token(c, ttft, now, launched_at=launched)
            if book:
                m.upstream_ttft.labels(c.provider.name, c.upstream_model).observe(ttft)
        elif outcome is Outcome.FAILED:
            assert result is not None and result.failure is not None
            self.lane.on_failure(c, for_health(result.failure), now, launched_at=launched)
            if book:
                ended = "rejected" if result.failure.kind is FailureKind.CALLER else "failed"
                m.attempts.labels(c.provider.name, c.upstream_model, ended, api).inc()
        elif outcome is Outcome.CANCELLED:
            if result is None:
                self.lane.on_cancelled(c, now - launched, now, lost=reason == "lost", launched_at=launched)
            ended = "abandoned" if reason == "abandoned" else "cancelled"
            m.attempts.labels(c.provider.name, c.upstream_model, ended, api).inc()
            # a cancelled attempt is billed for its prompt (providers bill input once generation starts);
            # completion tokens before the first token are unknown and counted as zero
            wasted = self.call.wasted_tokens
            m.wasted_tokens.labels(c.model.name, c.provider.name, reason).inc(wasted)
            m.wasted_cost.labels(c.model.name, c.provider.name, reason).inc(c.cost_usd(wasted, 0))
        elif outcome is Outcome.WON:
            m.attempts.labels(c.provider.name, c.upstream_model, "won", api).inc()
            m.client_ttft.labels(self.plan.name).observe(now - self.t_in)
        else:  # COMPLETED
            self.lane.on_complete(c, now - launched, now)
            m.upstream_duration.labels(c.provider.name, c.upstream_model).observe(now - launched)

    def won(self) -> AttemptResult:
        """The commit is served from here on: book the win and return the winner's result."""
        assert self.winner is not None
        self.record_outcome(self.winner, Outcome.WON, self.clock())
        return self.results[self.winner]

    def completed(self) -> None:
        """The winner's body or stream ended normally."""
        assert self.winner is not None
        self.record_outcome(self.winner, Outcome.COMPLETED, self.clock())

    def charge(self, usage: Usage | None, key_id: str | None) -> float | None:
        """Book the served answer's usage (tokens, cost, the key's spend); returns its cost."""
        if usage is None:
            return None
        c = self.served_by
        cost = usage.cost_usd(c.model.input_usd_per_mtok, c.model.output_usd_per_mtok)
        m = self.metrics
        m.tokens.labels(c.model.name, c.provider.name, "prompt").inc(usage.input_tokens)
        m.tokens.labels(c.model.name, c.provider.name, "completion").inc(usage.output_tokens)
        m.cost.labels(c.model.name, c.provider.name).inc(cost)
        if key_id is not None:
            m.key_cost.labels(key_id).inc(cost)
        return cost


def provider_rejection(r: AttemptResult, scrub: Scrubber) -> ApiError:
    """A provider's answer to a bad request, as our OpenAI error (its message scrubbed of secrets)."""
    status = r.failure.status if r.failure and r.failure.status else 400
    message = f"The provider rejected the request (HTTP {status})."
    etype, param, code = "invalid_request_error", None, None
    try:
        parsed = orjson.loads(r.error_body) if r.error_body else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        e = parsed["error"]
        message = str(e.get("message") or message)
        etype = str(e.get("type") or etype)
        param = e.get("param") if isinstance(e.get("param"), str) else None
        code = str(e["code"]) if e.get("code") is not None else None
    return ApiError(status, scrub(message), param=param, code=code, type=etype)


def give_up_error(plan: Plan, cands: list[Candidate], act: GiveUp) -> ApiError:
    """Every attempt failed: one error naming each endpoint and why, with a Retry-After for a 429."""
    parts = [f"{cands[ci].endpoint}: {f.reason}" for ci, f in act.failures]
    headers = {}
    waits = [f.retry_after for _, f in act.failures if f.retry_after is not None]
    if act.status == 429:
        headers["Retry-After"] = str(max(1, round(min(waits)))) if waits else "1"
    return ApiError(
        act.status,
        f"All {len(parts)} upstream attempts for '{plan.name}' failed: " + "; ".join(parts) + ".",
        code="upstream_failed" if act.status != 429 else "rate_limited",
        headers=headers,
    )
