"""The request path: run a `Race` with real upstream attempts and move the winner's bytes.

The flow is in docs/design.md, "The request path".

This module is the I/O edge. Decisions come from `race.Race` (launch/commit/cancel) and `feedback`
(order, delay, budget); here we only open connections, read until a first token, cancel, and copy bytes.

Every API (chat, Responses, legacy completions, embeddings) takes the same race path; what differs is
a `Dialect` (hedge/dialects.py: which event is a first token, which JSON body is valid, where the usage
and the stream's end are) carried by the request's `Call`. Streams after the win are copied chunk by
chunk. The only look at them is event-aligned and cheap: we forward whole SSE events (holding back a
partial event until its end arrives, so the bytes are the upstream's own, in order), look for the usage
with a substring search per chunk (to compute the cost and to strip a usage event the caller did not
ask for), and put the cost comment line at the stream's end (`dialects.end_at`: before `data: [DONE]`,
or after a Responses terminal event).

Responses state lives at one provider: the winner's response id is recorded (`affinity`), requests that
continue a response go to its owner unhedged, and GET/DELETE/cancel/input_items are passed to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .affinity import AffinityConfig, AffinityMap, owner_or_404, pin
from .apirequests import (
    ResponsesRequest,
    parse_completions_request,
    parse_embeddings_request,
    parse_response_id,
    parse_responses_request,
)
from .apisupport import API_PATHS, ApiSupport, api_url, model_apis
from .auth import KeyChecker
from .autoroute import choose_chain, classify
from .body import (
    BodyDecoder,
    check_content_type,
    check_declared_length,
    check_encoding,
    read_body,
)
from .catalog import Candidate, Catalog, Plan
from .dialects import (
    CHAT,
    COMPLETIONS,
    DIALECTS,
    DONE_MARK,
    EMBEDDINGS,
    RESPONSES,
    TOKEN,
    Dialect,
    StreamDetector,
    StreamError,
    Usage,
    end_at,
    event_cut,
    insert_cost,
    parse_json_body,
    split_events,
    take_usage,
)
from .errors import ApiError, NoCandidates, sse_error_event
from .feedback import DEFAULT_EAGERNESS, Feedback, Order
from .http_errors import error_response
from .metrics import Metrics
from .race import Cancel, Commit, Failure, FailureKind, GiveUp, Launch, Race, Reject
from .request import ChatRequest, parse_chat_request, parse_cost_quality, parse_preference
from .secrets import MIN_SECRET_LEN, REDACTED, Scrubber
from .strategy import get as get_strategy
from .upstream import Response, UpstreamClient, UpstreamError, UpstreamTimeout, make_client

log = logging.getLogger("hedge.proxy")

ERROR_BODY_LIMIT = 64 * 1024
RESPONSE_LIMIT = 64 * 1024 * 1024
PENDING_LIMIT = 1 << 20
USAGE_HINT = b'"usage"'  # in every usage marker take_usage knows (with or without a space)
LACKS_API = "lacks_api"  # the failure reason of an attempt whose provider has no such path (404/405)


@dataclass(slots=True)
class Call:
    """One request to race, whatever its API: all `_serve` needs to know about it."""

    dialect: Dialect
    body: dict[str, Any]
    stream: bool
    strip_usage: bool  # a chat-like stream: we ask for the usage event, and cut it out again
    wasted_tokens: int  # the prompt estimate a cancelled attempt is billed for
    pinned: bool = False  # state at one provider: one attempt, no hedge (Responses continuation/background)

    @property
    def api(self) -> str:
        return self.dialect.name


@dataclass(slots=True)
class AttemptResult:
    """What an attempt task returns: a first token (resp + bytes so far) or a failure."""

    failure: Failure | None = None
    resp: Response | None = None
    chunks: list[bytes] | None = None
    parsed: dict[str, Any] | None = None  # non-streaming body
    error_body: bytes = b""
    first_at: float = 0.0


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    v = headers.get("Retry-After")
    if not v:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        return None  # an HTTP-date: rare from LLM APIs; the breaker's own backoff applies


def classify_status(status: int, headers: Mapping[str, str]) -> Failure:
    """408/409/429/5xx (and 401/403/404: *our* provider key or model id is wrong, not the caller's
    request) try the next candidate; other 4xx are the caller's fault and are returned as they are."""
    reason = f"http_{status}"
    if status in (401, 403, 404, 408, 409, 429) or status >= 500 or status < 400:
        return Failure(FailureKind.RETRYABLE, reason, status, retry_after_seconds(headers))
    return Failure(FailureKind.CALLER, reason, status)


def cost_header(cost: float) -> str:
    return f"{cost:.10f}"


class Proxy:
    """Holds the long-lived parts (catalog, feedback, metrics, upstream client) and serves requests."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        feedback: Feedback | None = None,
        metrics: Metrics | None = None,
        upstream: UpstreamClient | None = None,
        api_keys: tuple[str, ...] = (),
        clock=time.monotonic,
    ) -> None:
        self.catalog = catalog
        self.config = catalog.config
        self.feedback = feedback or Feedback(self.config.feedback)  # streaming lane
        self.feedback_json = Feedback(self.config.feedback, health_from=self.feedback)  # non-streaming
        self.metrics = metrics or Metrics()
        if upstream is None:
            upstream = make_client(self.config.server.upstream_client)
        self.upstream = upstream
        self.keys = KeyChecker(api_keys)
        self.clock = clock
        self.scrub = Scrubber.from_providers(self.config.providers.values())
        self.inflight = 0
        self.shutting_down = False  # set by server.drain just before it cancels what is still running
        self.shutdown_ends: dict[str, int] = {}  # how streams cut by shutdown really ended (_end_at_shutdown)
        self._known_prefs = {p for p in self.config.providers} | set(self.config.models)
        self._known_prefs |= {c.endpoint for c in catalog.all_candidates()}
        self._headers: dict[str, dict[str, str]] = {}
        self._stream_keys: dict[str, bytes] = {}  # a provider's own key, looked for in its stream
        for name, p in self.config.providers.items():
            h = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
            key = p.api_key()
            if key:
                h["Authorization"] = f"Bearer {key}"
                if len(key) >= MIN_SECRET_LEN:
                    self._stream_keys[name] = key.encode()
            self._headers[name] = h
        # per provider and API, the upstream URL (built once, not per attempt)
        self._urls = {
            (name, api): api_url(p.base_url, api)
            for name, p in self.config.providers.items()
            for api in DIALECTS
        }
        self.api_support = ApiSupport.from_config(self.config, clock=clock)
        ac = self.config.apis
        self.affinity: AffinityMap[str] = AffinityMap(
            AffinityConfig(ac.affinity_max_entries, ac.affinity_max_age_s), clock=clock
        )
        self._state_client: aiohttp.ClientSession | None = None  # GET/DELETE/... /v1/responses/{id}
        self.tasks: set[asyncio.Task] = set()  # live attempt tasks, for leak tests
        m = self.metrics
        for route in self.config.routes.values():
            # every dashboard series exists from start-up, at 0, instead of "No data" until it first moves
            m.hedges.labels(route.name, "error")
            if get_strategy(route.strategy).hedges:
                m.hedge_budget.labels(route.name).set(route.hedge_budget)
                m.budget_refusals.labels(route.name)
                m.hedges.labels(route.name, "delay")
                m.hedges.labels(route.name, "explore")
        for c in catalog.all_candidates():
            for api in DIALECTS:  # per API the candidate may serve (by config and model kind)
                if self.api_support.configured(c, api):
                    m.attempts.labels(c.provider.name, c.upstream_model, "failed", api)

    def lane(self, stream: bool) -> Feedback:
        """The feedback lane for this kind of request (see `Feedback`)."""
        return self.feedback if stream else self.feedback_json

    # ------------------------------------------------------------------------------- handler

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        return await self.serve_api(request, CHAT)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/responses."""
        return await self.serve_api(request, RESPONSES)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/embeddings (never a stream)."""
        return await self.serve_api(request, EMBEDDINGS)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions (legacy, FIM)."""
        return await self.serve_api(request, COMPLETIONS)

    async def serve_api(self, request: web.Request, dialect: Dialect) -> web.StreamResponse:
        """One POST of any API. Every request is counted in hedge_requests_total, those refused
        before a route is known (auth, body, unknown model) under route "-", so that a model name
        made up by a caller never becomes a label."""
        t_in = self.clock()
        route = ["-"]  # the label, set once the model resolves
        code = "200"
        try:
            resp = await self._handle(request, dialect, t_in, route)
            code = str(resp.status)
            return resp
        except ApiError as e:
            code = str(e.status)
            raise
        except NoCandidates as e:
            code = str(e.as_api_error().status)
            raise
        except asyncio.CancelledError:
            code = "499"
            raise
        finally:
            self.metrics.requests.labels(route[0], code, dialect.name).inc()

    async def response_state(self, request: web.Request) -> web.StreamResponse:
        """GET/DELETE /v1/responses/{id}, POST .../cancel, GET .../input_items: passed to the provider
        that created the response (an id we do not know is a 404, never a guess). Counted in
        hedge_requests_total under route "-" and api "responses"."""
        code = "200"
        try:
            resp = await self._response_state(request)
            code = str(resp.status)
            return resp
        except ApiError as e:
            code = str(e.status)
            raise
        except asyncio.CancelledError:
            code = "499"
            raise
        finally:
            self.metrics.requests.labels("-", code, "responses").inc()

    async def _response_state(self, request: web.Request) -> web.StreamResponse:
        self.keys.check(request.headers.get("Authorization"))
        rid = parse_response_id(request.match_info["id"])
        rest = request.match_info.get("rest", "")
        owner = owner_or_404(self.affinity, rid)
        p = self.config.providers[owner]
        url = f"{self._urls[owner, 'responses']}/{rid}" + (f"/{rest}" if rest else "")
        if request.query_string:
            url += "?" + request.query_string
        if self._state_client is None:
            self._state_client = aiohttp.ClientSession(auto_decompress=False)
        headers = {k: v for k, v in self._headers[owner].items() if k != "Content-Type"}
        t = p.timeouts
        timeout = aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect, sock_read=t.idle)
        try:
            async with self._state_client.request(
                request.method, url, headers=headers, timeout=timeout, allow_redirects=False
            ) as up:
                status, ctype = up.status, up.content_type
                buf = bytearray()
                async for piece in up.content.iter_any():  # to the end (read(n) stops at what is there)
                    buf += piece
                    if len(buf) > RESPONSE_LIMIT:
                        raise ApiError(502, "The provider's answer is too large.", code="upstream_failed")
                body = bytes(buf)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ApiError(
                502, f"The provider holding response '{rid}' could not be reached ({type(e).__name__}).",
                code="upstream_failed",
            ) from None  # fmt: skip
        if status == 404 or (status == 200 and request.method == "DELETE"):
            self.affinity.forget(rid)  # gone there, so gone here: the id answers our own 404 from now on
        if status != 200:
            failed = Failure(FailureKind.CALLER, f"http_{status}", status)
            return self._reject(AttemptResult(failure=failed, error_body=body))
        return web.Response(
            body=body, status=200, content_type=ctype or "application/json",
            headers={"X-GammaInfra-Endpoint": f"responses@{owner}"},
        )  # fmt: skip

    async def close(self) -> None:
        """Close the upstream clients (the app's cleanup)."""
        await self.upstream.close()
        if self._state_client is not None:
            await self._state_client.close()

    def precheck(self, request: web.BaseRequest) -> tuple[str | None, str]:
        """What the head alone decides, before a byte of the body is read (and before `100 Continue`):
        the key, the media type, the content coding and the declared size. Returns (key id, coding)."""
        key_id = self.keys.check(request.headers.get("Authorization"))
        check_content_type(request.headers.get("Content-Type"))
        encoding = check_encoding(request.headers.get("Content-Encoding"))
        check_declared_length(request.headers, self.config.server.max_body_bytes)
        return key_id, encoding

    def _parse(
        self, dialect: Dialect, raw: bytes | bytearray
    ) -> tuple[Call, str, ChatRequest | None, ResponsesRequest | None]:
        """The request body -> (the call to race, the model name, the chat / Responses request)."""
        if dialect is CHAT:
            req = parse_chat_request(raw, max_messages=self.config.server.max_messages)
            call = Call(CHAT, req.body, req.stream, req.stream and not req.wants_usage,
                        req.prompt_tokens_estimate)  # fmt: skip
            return call, req.model, req, None
        if dialect is RESPONSES:
            rr = parse_responses_request(raw)
            call = Call(RESPONSES, rr.body, rr.stream, False, rr.input_tokens_estimate, rr.pinned)
            return call, rr.model, None, rr
        if dialect is EMBEDDINGS:
            er = parse_embeddings_request(raw)
            return Call(EMBEDDINGS, er.body, False, False, er.input_tokens_estimate), er.model, None, None
        cr = parse_completions_request(raw)
        call = Call(COMPLETIONS, cr.body, cr.stream, cr.stream and not cr.wants_usage,
                    cr.prompt_tokens_estimate)  # fmt: skip
        return call, cr.model, None, None

    async def _handle(
        self, request: web.Request, dialect: Dialect, t_in: float, route: list[str]
    ) -> web.StreamResponse:
        key_id, encoding = self.precheck(request)
        sc = self.config.server
        # the body is read (bounded in size, time and decoded size) and parsed before the request takes a
        # concurrency slot: a slow upload holds a connection, never a slot
        decoder = BodyDecoder(encoding, sc.max_body_bytes, sc.max_json_items)  # also bounds the JSON shape
        raw = await read_body(request.content, decoder, sc.body_timeout_s)
        call, model, req, rreq = self._parse(dialect, raw)
        del raw
        if self.inflight >= sc.max_concurrency:
            raise ApiError(
                503,
                "The gateway is at its concurrency limit; retry shortly.",
                code="overloaded",
                headers={"Retry-After": "1"},
            )
        plan = self.catalog.resolve(model)
        route[0] = plan.name
        dial = parse_cost_quality(request.headers.get("X-GammaInfra-Cost-Quality"))
        pref = parse_preference(request.headers.get("X-GammaInfra-Preference"), self._known_prefs)
        cands = self._serving(plan, call.api)
        task = None
        if req is not None:
            task = classify(req) if get_strategy(plan.strategy).classifies else None
            cands = self._fit(plan, req, dial, task, cands)
        owner_cand: Candidate | None = None
        if rreq is not None and rreq.previous_response_id is not None:
            # the parent lives at one provider: go there (never a guess; an unknown id is a 404)
            owner = owner_or_404(self.affinity, rreq.previous_response_id, "previous_response_id")
            owner_cand = pin(cands, owner, model)

        self.inflight += 1
        self.metrics.inflight_requests.inc()
        if key_id is not None:
            self.metrics.key_requests.labels(key_id).inc()
        try:
            if owner_cand is not None:
                ordered = Order((owner_cand,))
            else:
                ordered = self.lane(call.stream).order(plan, self.clock(), pref, cands)
                if call.pinned:  # background: one provider, the best one now
                    ordered = Order(ordered.candidates[:1])
            return await self._serve(request, call, plan, ordered, dial, t_in, key_id, task)
        finally:
            self.inflight -= 1
            self.metrics.inflight_requests.dec()

    def _serving(self, plan: Plan, api: str) -> tuple[Candidate, ...]:
        """The plan's candidates that serve this API; a clear error when none does."""
        cands = self.api_support.candidates(plan.candidates, api)
        if cands:
            return cands
        path = "/v1" + API_PATHS[api]
        if any(self.api_support.configured(c, api) for c in plan.candidates):
            raise ApiError(
                503,
                f"Every provider of '{plan.name}' answered recently that it has no {path}; retry later.",
                code="api_unavailable",
                headers={"Retry-After": str(max(1, round(self.api_support.lacking_ttl_s)))},
            )
        if api != "embeddings" and all(model_apis(c.model) == {"embeddings"} for c in plan.candidates):
            message = f"'{plan.name}' is an embeddings model; it is served on /v1/embeddings only."
        elif api == "embeddings":
            message = f"'{plan.name}' is not an embeddings model (or routes to none); {path} needs one."
        else:
            message = f"No provider of '{plan.name}' is configured to serve {path}."
        raise ApiError(400, message, param="model", code="model_not_supported")

    def _fit(
        self,
        plan: Plan,
        req: ChatRequest,
        dial: float | None,
        task: str | None,
        cands: tuple[Candidate, ...],
    ) -> tuple[Candidate, ...]:
        """Drop candidates that cannot take this request (max output, context window)."""
        if task is not None:
            cands = choose_chain(task, cands, DEFAULT_EAGERNESS if dial is None else dial)
        est = req.prompt_tokens_lower_bound
        fit = [
            c for c in cands
            if (req.max_tokens is None or req.max_tokens <= c.model.max_output_tokens)
            and est <= c.model.context_window
        ]  # fmt: skip
        if fit:
            return tuple(fit)
        if req.max_tokens is not None and all(req.max_tokens > c.model.max_output_tokens for c in cands):
            limit = max(c.model.max_output_tokens for c in cands)
            param = "max_completion_tokens" if "max_completion_tokens" in req.body else "max_tokens"
            raise ApiError(
                400,
                f"{param} is {req.max_tokens}, but '{plan.name}' supports at most {limit} output tokens.",
                param=param,
                code="invalid_value",
            )
        window = max(c.model.context_window for c in cands)
        raise ApiError(
            400,
            f"The prompt is at least {est} tokens (counted as characters/6), which exceeds the "
            f"{window}-token context window of '{plan.name}'.",
            param="messages",
            code="context_length_exceeded",
        )

    # ---------------------------------------------------------------------------------- race

    async def _serve(
        self,
        request: web.Request,
        call: Call,
        plan: Plan,
        order: Order,
        dial: float | None,
        t_in: float,
        key_id: str | None,
        task: str | None,
    ) -> web.StreamResponse:
        now = self.clock()
        eagerness = DEFAULT_EAGERNESS if dial is None else dial
        fb = self.lane(call.stream)
        cands = list(order.candidates)
        budget = None
        if call.pinned:  # one provider holds the state: one attempt, no hedge
            delays = None
            max_attempts = 1
        else:
            delays = fb.delay_policy(plan, order, now, eagerness)
            if delays is not None:
                budget = fb.request_budget(plan.route, order)
                # the route's delay at the default dial
                self.metrics.hedge_delay.labels(plan.name).set(delays.base_delay(0))
            max_attempts = plan.route.max_attempts
        race = Race(len(cands), max_attempts=max_attempts, delays=delays, budget=budget)

        body = call.body
        if call.strip_usage:
            body = dict(body)
            so = dict(body.get("stream_options") or {})
            so["include_usage"] = True  # we need usage for the cost; the usage event is stripped again
            body["stream_options"] = so
        tasks: dict[int, asyncio.Task[AttemptResult]] = {}
        by_task: dict[asyncio.Task[AttemptResult], int] = {}
        results: dict[int, AttemptResult] = {}
        winner: AttemptResult | None = None
        win_idx = -1
        outcome: web.StreamResponse | None = None
        t_launch0 = now
        try:
            actions = race.start(now)
            while True:
                for act in actions:
                    if isinstance(act, Launch):
                        c = cands[act.candidate]
                        if act.reason != "initial":
                            explored = act.reason == "delay" and act.attempt == 1 and order.explore is c
                            why = "explore" if explored else act.reason
                            self.metrics.hedges.labels(plan.name, why).inc()
                        try:
                            payload = orjson.dumps({**body, "model": c.upstream_model})
                        except orjson.JSONEncodeError:  # loads takes any depth, dumps stops at 255
                            raise ApiError(
                                400, "The request body nests JSON deeper than 255 levels.",
                                code="invalid_json",
                            ) from None  # fmt: skip
                        fb.on_launch(c, self.clock())
                        t = asyncio.ensure_future(self._attempt(c, payload, call))
                        tasks[act.attempt] = t
                        by_task[t] = act.attempt
                        self.tasks.add(t)
                        t.add_done_callback(self.tasks.discard)
                    elif isinstance(act, Cancel):
                        for i in act.attempts:
                            self._cancel(i, tasks, results, race, cands, act.reason, call)
                    elif isinstance(act, Commit):
                        win_idx = act.attempt
                        winner = results[act.attempt]
                    elif isinstance(act, Reject):
                        outcome = self._reject(results[act.attempt])
                    elif isinstance(act, GiveUp):
                        raise self._give_up(plan, cands, act)
                if race.budget_refusals:
                    self.metrics.budget_refusals.labels(plan.name).inc(race.budget_refusals)
                    race.budget_refusals = 0
                if winner is not None or outcome is not None:
                    break
                dl = race.deadline()
                timeout = None if dl is None else max(0.0, dl - self.clock())
                if timeout is None and len(tasks) == 1:
                    # the common case (one attempt, no hedge timer): await it directly, which spares
                    # asyncio.wait's per-call future and callbacks; a client cancel cancels it too
                    (only,) = tasks.values()
                    await only
                    done = {only}
                else:
                    done, _ = await asyncio.wait(
                        tasks.values(), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                now = self.clock()
                actions = []
                for t in done:
                    i = by_task[t]
                    del tasks[i]
                    r = t.result()
                    results[i] = r
                    c = cands[i]
                    att = race.attempts[i]
                    if r.failure is None:
                        fb.on_first_token(c, r.first_at - att.launched_at, now, launched_at=att.launched_at)
                        self.metrics.upstream_ttft.labels(c.provider.name, c.upstream_model).observe(
                            r.first_at - att.launched_at
                        )
                        actions += race.on_first_token(i, now)
                    else:
                        fb.on_failure(c, _for_health(r.failure), now, launched_at=att.launched_at)
                        ended = "rejected" if r.failure.kind is FailureKind.CALLER else "failed"
                        self._count(c, ended, call.api)
                        actions += race.on_failure(i, r.failure, now)
                actions += race.on_timer(now)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if not self.shutting_down or me is None:
                raise  # the client left: nobody to answer
            me.uncancel()  # the gateway is stopping and nothing was committed: say so, retryably
            raise ApiError(
                503, "The gateway is shutting down; retry the request.", code="shutting_down",
                headers={"Retry-After": "1"},
            ) from None  # fmt: skip
        finally:
            if winner is None:
                # client gone (or an error): nothing may outlive the request
                for act in race.on_client_gone(self.clock()):
                    assert isinstance(act, Cancel)  # the only action a client leaving produces
                    for i in act.attempts:
                        self._cancel(i, tasks, results, race, cands, "abandoned", call)
                for t in tasks.values():
                    t.cancel()
        if outcome is not None:
            return outcome
        assert winner is not None
        c = cands[win_idx]
        self._count(c, "won", call.api)
        self.metrics.client_ttft.labels(plan.name).observe(self.clock() - t_in)
        timing = (
            f"setup;dur={(t_launch0 - t_in) * 1000:.2f}, "
            f'ttft;dur={(self.clock() - t_in) * 1000:.2f};desc="{c.endpoint}", '
            f'race;desc="attempts={len(race.attempts)}"'
        )
        headers = {"X-GammaInfra-Endpoint": c.endpoint, "Server-Timing": timing}
        if task is not None:
            headers["X-GammaInfra-Task"] = task
        launched = race.attempts[win_idx].launched_at
        if call.dialect is RESPONSES:
            rid = _response_id(winner)
            if rid is not None:
                self.affinity.remember(rid, c.provider.name)
        if call.stream:
            return await self._pump(request, call, plan, c, winner, headers, key_id, launched)
        return self._finish_json(call, c, winner, headers, key_id, launched)

    def _count(self, c: Candidate, outcome: str, api: str) -> None:
        self.metrics.attempts.labels(c.provider.name, c.upstream_model, outcome, api).inc()

    def _cancel(
        self,
        i: int,
        tasks: dict[int, asyncio.Task[AttemptResult]],
        results: dict[int, AttemptResult],
        race: Race,
        cands: list[Candidate],
        reason: str,
        call: Call,
    ) -> None:
        """Stop attempt i now: cancel its task (which closes its connection) and learn from it."""
        c = cands[i]
        now = self.clock()
        att = race.attempts[i]
        fb = self.lane(call.stream)
        t = tasks.pop(i, None)
        if t is not None:
            if t.done() and not t.cancelled() and i not in results:
                # finished while we were being cancelled (the client left as asyncio.wait woke us):
                # its result may hold an open response that nobody else will ever close, and the
                # feedback must hear how it ended, or it would wait for news of it forever
                r0 = results[i] = t.result()
                if r0.failure is None:
                    fb.on_first_token(c, r0.first_at - att.launched_at, now, launched_at=att.launched_at)
                else:
                    fb.on_failure(c, _for_health(r0.failure), now, launched_at=att.launched_at)
            t.cancel()
        r = results.get(i)
        if r is not None and r.resp is not None:  # finished with a token in the same instant as the winner
            r.resp.abort()
        if r is None:
            fb.on_cancelled(c, now - att.launched_at, now, lost=reason == "lost", launched_at=att.launched_at)
        self._count(c, "abandoned" if reason == "abandoned" else "cancelled", call.api)
        # A cancelled attempt is billed for its prompt (providers bill input once generation starts);
        # completion tokens before the first token are unknown and counted as zero.
        wasted = call.wasted_tokens
        self.metrics.wasted_tokens.labels(c.model.name, c.provider.name, reason).inc(wasted)
        self.metrics.wasted_cost.labels(c.model.name, c.provider.name, reason).inc(c.cost_usd(wasted, 0))

    def _reject(self, r: AttemptResult) -> web.Response:
        """Return the provider's answer to a bad request as OpenAI error JSON (scrubbed of secrets)."""
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
        return error_response(ApiError(status, self.scrub(message), param=param, code=code, type=etype))

    def _give_up(self, plan: Plan, cands: list[Candidate], act: GiveUp) -> ApiError:
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

    # ------------------------------------------------------------------------------ attempts

    async def _attempt(self, c: Candidate, payload: bytes, call: Call) -> AttemptResult:
        """Open one upstream call and read it until its first token (or its full body). Never raises
        except CancelledError; always closes its connection unless it hands it over as the winner."""
        t = c.provider.timeouts
        resp: Response | None = None
        handed_over = False
        gauge = self.metrics.inflight_attempts.labels(c.provider.name)
        gauge.inc()
        try:
            async with asyncio.timeout(t.first_token):
                resp = await self.upstream.open(
                    self._urls[c.provider.name, call.api], self._headers[c.provider.name], payload,
                    connect_timeout=t.connect, read_timeout=t.idle,
                )  # fmt: skip
                if resp.status != 200:
                    err = await resp.read_all(ERROR_BODY_LIMIT)
                    failure = classify_status(resp.status, resp.headers)
                    if resp.status in (404, 405):
                        if self.api_support.observe(c.provider.name, call.api, resp.status, err):
                            # no such path there: skipped for a while, and this request fails over
                            failure = Failure(FailureKind.RETRYABLE, LACKS_API, resp.status)
                        elif call.pinned:
                            # the owner does not know the parent (expired, deleted): the caller's answer
                            failure = Failure(FailureKind.CALLER, failure.reason, resp.status)
                    return AttemptResult(failure=failure, error_body=err)
                if call.stream:
                    det = StreamDetector(call.dialect)
                    chunks: list[bytes] = []
                    while True:
                        chunk = await resp.read_chunk()
                        if not chunk:
                            raise StreamError("upstream stream ended before any token")
                        chunks.append(chunk)
                        if det.feed(chunk) == TOKEN:
                            break
                    handed_over = True
                    return AttemptResult(resp=resp, chunks=chunks, first_at=self.clock())
                body = await resp.read_all(RESPONSE_LIMIT)
                parsed = parse_json_body(body, call.dialect)  # only a complete, valid body wins
                resp.release()
                handed_over = True  # back in the pool: not ours to abort any more
                return AttemptResult(chunks=[body], parsed=parsed, first_at=self.clock())
        except TimeoutError:
            return AttemptResult(failure=Failure(FailureKind.RETRYABLE, "timeout"))
        except UpstreamError as e:
            return AttemptResult(failure=Failure(FailureKind.RETRYABLE, e.reason))
        except StreamError as e:
            return AttemptResult(failure=Failure(FailureKind.RETRYABLE, e.reason, 200))
        finally:
            gauge.dec()
            if resp is not None and not handed_over:
                resp.abort()

    # ------------------------------------------------------------------------------ responses

    def _account(self, c: Candidate, usage: Usage | None, key_id: str | None) -> float | None:
        if usage is None:
            return None
        cost = usage.cost_usd(c.model.input_usd_per_mtok, c.model.output_usd_per_mtok)
        m = self.metrics
        m.tokens.labels(c.model.name, c.provider.name, "prompt").inc(usage.input_tokens)
        m.tokens.labels(c.model.name, c.provider.name, "completion").inc(usage.output_tokens)
        m.cost.labels(c.model.name, c.provider.name).inc(cost)
        if key_id is not None:
            m.key_cost.labels(key_id).inc(cost)
        return cost

    def _finish_json(
        self,
        call: Call,
        c: Candidate,
        r: AttemptResult,
        headers: dict[str, str],
        key_id: str | None,
        launched: float,
    ) -> web.Response:
        assert r.parsed is not None and r.chunks is not None
        cost = self._account(c, call.dialect.usage(r.parsed), key_id)
        headers["X-GammaInfra-Cost-USD"] = cost_header(cost) if cost is not None else "unknown"
        self._completed(self.feedback_json, c, launched)
        return web.Response(body=r.chunks[0], status=200, content_type="application/json", headers=headers)

    async def _pump(
        self,
        request: web.Request,
        call: Call,
        plan: Plan,
        c: Candidate,
        r: AttemptResult,
        headers: dict[str, str],
        key_id: str | None,
        launched: float,
    ) -> web.StreamResponse:
        """Send the winner's stream: the bytes so far, then chunk by chunk as they arrive."""
        assert r.resp is not None and r.chunks is not None
        up = r.resp
        headers["X-GammaInfra-Cost-USD"] = "pending"  # exact figure: the `: X-GammaInfra-Cost-USD` line
        out = _SSEResponse(status=200, headers=headers)
        out.content_type = "text/event-stream"
        out.headers["Cache-Control"] = "no-cache"
        strip_usage = call.strip_usage
        dialect = call.dialect
        typed_end = dialect is RESPONSES  # ends at a terminal event, not at `data: [DONE]`
        usage: Usage | None = None
        saw_end = False
        pending = b""  # a partial SSE event, held until its end arrives
        held = b""  # the chunk with [DONE]: it leaves together with the end of the response
        total = c.provider.timeouts.total
        completed = False
        key = self._stream_keys.get(c.provider.name)
        try:
            await out.prepare(request)
            chunk: bytes = b"".join(r.chunks)
            async with asyncio.timeout(total):
                while True:
                    if pending:
                        chunk = pending + chunk
                        pending = b""
                    if not chunk.endswith(b"\n\n"):
                        cut = event_cut(chunk)
                        if cut == 0 and len(chunk) < PENDING_LIMIT:
                            pending = chunk
                            chunk = b""
                        elif 0 < cut < len(chunk):
                            chunk, pending = chunk[:cut], chunk[cut:]
                    if chunk:
                        if key is not None and key in chunk:
                            # the provider echoed our key into its stream: the one edit of its bytes
                            # we make for safety; one `in` per chunk otherwise (see secrets.py)
                            chunk = chunk.replace(key, REDACTED)
                        if USAGE_HINT in chunk:  # one `in` per chunk; parsed only where it is
                            chunk, u = take_usage(chunk, dialect, strip_usage)
                            if u is not None:
                                usage = u
                        if held:  # bytes after the end: unusual, but forward them in order
                            await out.write(held)
                            held = b""
                        at = end_at(chunk, dialect) if typed_end or DONE_MARK in chunk else None
                        if at is not None:
                            saw_end = True
                            cost = self._account(c, usage, key_id)
                            value = cost_header(cost) if cost is not None else "unknown"
                            held = insert_cost(chunk, at, value)
                            usage = None
                        else:
                            await out.write(chunk)
                    chunk = await up.read_chunk()
                    if not chunk:
                        break
            last = held + pending
            if not saw_end:
                self._account(c, usage, key_id)
                # `pending` is an event cut off by the end of the body: dropped, as an SSE client drops an
                # unterminated event, so the error event stays a parseable event of its own
                what = "its terminal event" if dialect is RESPONSES else "[DONE]"
                last = sse_error_event(f"The upstream stream ended before {what}.", code="stream_truncated")
            else:
                completed = True
                up.release()
            await out.write_eof(last)  # one write for the last events and the chunked terminator
        except UpstreamError as e:
            await self._end_with_error(
                out,
                f"The upstream connection failed mid-stream ({e.reason}).",
                "upstream_timeout" if isinstance(e, UpstreamTimeout) else "upstream_reset",  # idle: silent
            )
        except TimeoutError:
            await self._end_with_error(
                out, "The upstream stream exceeded its time limit.", "upstream_timeout"
            )
        except ConnectionError:
            pass  # the client left mid-stream; the finally closes the upstream connection
        except asyncio.CancelledError:
            # the client left (the write fails quietly) or a shutdown outlived its grace period
            # (server.drain): either way the stream must not end looking complete
            if self.shutting_down:
                ended = await self._end_at_shutdown(request, out)
                self.shutdown_ends[ended] = self.shutdown_ends.get(ended, 0) + 1
            else:
                await self._end_with_error(
                    out, "The gateway is shutting down; this answer is incomplete.", "shutting_down"
                )
            raise
        finally:
            if completed:
                self._completed(self.feedback, c, launched)
            else:
                up.abort()
        return out

    def _completed(self, fb: Feedback, c: Candidate, launched: float) -> None:
        """A winner's body or stream ended normally: its total duration feeds statistics and metrics."""
        now = self.clock()
        fb.on_complete(c, now - launched, now)
        self.metrics.upstream_duration.labels(c.provider.name, c.upstream_model).observe(now - launched)

    async def _end_at_shutdown(self, request: web.Request, out: web.StreamResponse) -> str:
        """End a stream cut by shutdown: the `shutting_down` event and the chunked terminator, out of our
        buffers within `shutdown_write_timeout_s`; a client that does not read them in time gets its
        connection aborted, which no HTTP client can mistake for a complete answer. Returns what
        happened: "error_event", "aborted" or "client_gone"."""
        transport = request.transport
        proto = request.protocol
        waiter = getattr(proto, "_drain_waiter", None)
        if waiter is not None and waiter.cancelled():
            # the cancel that brought us here hit aiohttp's drain, which keeps that cancelled future and
            # would hand it to the next drain: every write below would raise CancelledError at once
            proto._drain_waiter = None
        try:
            async with asyncio.timeout(self.config.server.shutdown_write_timeout_s):
                message = "The gateway is shutting down; this answer is incomplete."
                await out.write(sse_error_event(message, code="shutting_down"))
                await out.write_eof()
                # write_eof waits until the buffer is under the high-water mark, not empty; the process is
                # about to exit, and what is still in our buffer then would be lost mid-event. asyncio has
                # no "buffer empty" event, so poll (shutdown only, for a few seconds at most).
                while transport is not None and not transport.is_closing():
                    if not transport.get_write_buffer_size():
                        break
                    await asyncio.sleep(0.01)
            return "error_event"
        except TimeoutError:
            if transport is not None:
                transport.abort()
            return "aborted"
        except (ConnectionError, RuntimeError):
            return "client_gone"

    @staticmethod
    async def _end_with_error(out: web.StreamResponse, message: str, code: str) -> None:
        try:
            await out.write(sse_error_event(message, code=code))
            await out.write_eof()
        except (ConnectionError, RuntimeError):
            pass


class _SSEResponse(web.StreamResponse):
    """A stream response whose headers leave in the same transport write as its first bytes.

    The proxy only prepares a stream once it holds the winner's first token, so there is always data to
    send right away: one syscall fewer per request (aiohttp's own `Response` does the same).
    """

    _send_headers_immediately = False


def _for_health(f: Failure) -> Failure:
    """What the feedback hears of a failure: a provider without the path is not unhealthy (its breaker
    must not open for chat because it has no /v1/responses), so that counts like a caller's error."""
    return Failure(FailureKind.CALLER, f.reason, f.status) if f.reason == LACKS_API else f


def _response_id(r: AttemptResult) -> str | None:
    """The id of the response a Responses winner created: its JSON body's `id`, or for a stream the
    `response.id` of its first event that has one (`response.created`, sent before any token, so it is
    in the chunks read before the commit)."""
    if r.parsed is not None:
        rid = r.parsed.get("id")
        return rid if isinstance(rid, str) else None
    if not r.chunks:
        return None
    for _start, _end, payload in split_events(b"".join(r.chunks)):
        if payload is None or b'"response"' not in payload:
            continue
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        resp = event.get("response") if isinstance(event, dict) else None
        if isinstance(resp, dict) and isinstance(resp.get("id"), str):
            return str(resp["id"])
    return None
