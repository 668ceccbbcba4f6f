"""The HTTP edge of the request path: from an aiohttp request to a race, and from its winner to bytes.

The flow is in docs/design.md, "The request path". Read `serve_api` top to bottom: check the head, read
and parse the body, resolve the route, order the candidates, run one `RaceCycle` (hedge/cycle.py, which
owns the race, its attempts and their booking), and answer with the winner: its JSON body, or its stream
from the first token, forwarded as whole events (`dialects.StreamForwarder` decides what to write; here
is only the I/O around it).

Every API (chat, Responses, legacy completions, embeddings) takes this one path; what differs is a
`Dialect` (hedge/dialects.py) carried by the request's `Call` (hedge/attempt.py).

Responses state lives at one provider: the winner's response id is recorded (`affinity`), requests that
continue a response go to its owner unhedged, and GET/DELETE/cancel/input_items are passed to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

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
from .attempt import RESPONSE_LIMIT, AttemptResult, Attempts, Call
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
from .clock import LoopTimer, Timer
from .cycle import RaceCycle, provider_rejection
from .dialects import (
    CHAT,
    COMPLETIONS,
    DIALECTS,
    EMBEDDINGS,
    RESPONSES,
    Dialect,
    StreamForwarder,
    cost_header,
    split_events,
)
from .errors import ApiError, NoCandidates, sse_error_event
from .feedback import DEFAULT_EAGERNESS, Feedback, Order
from .metrics import Metrics
from .race import Failure, FailureKind
from .request import ChatRequest, parse_chat_request, parse_cost_quality, parse_preference
from .secrets import MIN_SECRET_LEN, Scrubber
from .strategy import get as get_strategy
from .upstream import UpstreamClient, UpstreamError, UpstreamTimeout, make_client

log = logging.getLogger("hedge.proxy")


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
        clock: Callable[[], float] = time.monotonic,
        timer: Timer | None = None,
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
        self.timer = timer if timer is not None else LoopTimer(clock)  # the hedge timer, on `clock`
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
        gauge = self.metrics.inflight_attempts.labels
        self.attempts = Attempts(upstream, self._urls, self._headers, self.api_support, clock, gauge)
        self.tasks: set[asyncio.Task[AttemptResult]] = set()  # live attempt tasks, for leak tests
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
        """One POST of any API, top to bottom. Every request is counted in hedge_requests_total, those
        refused before a route is known (auth, body, unknown model) under route "-", so that a model name
        made up by a caller never becomes a label."""
        t_in = self.clock()
        route, code = "-", "200"
        try:
            key_id, encoding = self.precheck(request)
            sc = self.config.server
            # the body is read (bounded in size, time and decoded size) and parsed before the request
            # takes a concurrency slot: a slow upload holds a connection, never a slot
            decoder = BodyDecoder(encoding, sc.max_body_bytes, sc.max_json_items)  # bounds the JSON shape
            raw = await read_body(request.content, decoder, sc.body_timeout_s)
            call, model, req, rreq = self._parse(dialect, raw)
            del raw
            if self.inflight >= sc.max_concurrency:
                raise ApiError(
                    503, "The gateway is at its concurrency limit; retry shortly.", code="overloaded",
                    headers={"Retry-After": "1"},
                )  # fmt: skip
            plan = self.catalog.resolve(model)
            route = plan.name
            dial = parse_cost_quality(request.headers.get("X-GammaInfra-Cost-Quality"))
            pref = parse_preference(request.headers.get("X-GammaInfra-Preference"), self._known_prefs)
            cands, task = self._candidates(plan, call, req, dial)
            owner = self._owner(rreq, cands, model)
            self.inflight += 1
            self.metrics.inflight_requests.inc()
            if key_id is not None:
                self.metrics.key_requests.labels(key_id).inc()
            try:
                order = self._order(plan, call, cands, owner, pref)
                cycle = RaceCycle(
                    call, plan, order, lane=self.lane(call.stream),
                    eagerness=DEFAULT_EAGERNESS if dial is None else dial, attempts=self.attempts,
                    metrics=self.metrics, timer=self.timer, clock=self.clock, scrub=self.scrub,
                    live=self.tasks, t_in=t_in,
                )  # fmt: skip
                resp = await self._serve(request, cycle, key_id, task)
            finally:
                self.inflight -= 1
                self.metrics.inflight_requests.dec()
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
            self.metrics.requests.labels(route, code, dialect.name).inc()

    def _candidates(
        self, plan: Plan, call: Call, req: ChatRequest | None, dial: float | None
    ) -> tuple[tuple[Candidate, ...], str | None]:
        """The plan's candidates that can take this request, and the auto route's task class."""
        cands = self._serving(plan, call.api)
        if req is None:
            return cands, None
        task = classify(req) if get_strategy(plan.strategy).classifies else None
        return self._fit(plan, req, dial, task, cands), task

    def _owner(
        self, rreq: ResponsesRequest | None, cands: tuple[Candidate, ...], model: str
    ) -> Candidate | None:
        """The candidate holding the parent of a Responses continuation (never a guess: an unknown id
        is a 404), or None for a request that continues nothing."""
        if rreq is None or rreq.previous_response_id is None:
            return None
        owner = owner_or_404(self.affinity, rreq.previous_response_id, "previous_response_id")
        return pin(cands, owner, model)

    def _order(
        self,
        plan: Plan,
        call: Call,
        cands: tuple[Candidate, ...],
        owner: Candidate | None,
        pref: tuple[str, ...],
    ) -> Order:
        """Who runs first, then next: the owner of a response's state alone, else the lane's order (the
        best one alone for a background response)."""
        if owner is not None:
            return Order((owner,))
        order = self.lane(call.stream).order(plan, self.clock(), pref, cands)
        return Order(order.candidates[:1]) if call.pinned else order

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
            raise provider_rejection(AttemptResult(failure=failed, error_body=body), self.scrub)
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
        self, request: web.Request, cycle: RaceCycle, key_id: str | None, task: str | None
    ) -> web.StreamResponse:
        """Run the race, then answer with the winner: its JSON body, or its stream from the first token."""
        try:
            await cycle.run()
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
            cycle.close()  # nothing but the winner outlives the race
        winner = cycle.won()
        c = cycle.served_by
        now = self.clock()
        timing = (
            f"setup;dur={(cycle.started_at - cycle.t_in) * 1000:.2f}, "
            f'ttft;dur={(now - cycle.t_in) * 1000:.2f};desc="{c.endpoint}", '
            f'race;desc="attempts={len(cycle.race.attempts)}"'
        )
        headers = {"X-GammaInfra-Endpoint": c.endpoint, "Server-Timing": timing}
        if task is not None:
            headers["X-GammaInfra-Task"] = task
        if cycle.call.dialect is RESPONSES:
            rid = _response_id(winner)
            if rid is not None:
                self.affinity.remember(rid, c.provider.name)
        if cycle.call.stream:
            return await self._pump(request, cycle, winner, headers, key_id)
        assert winner.parsed is not None and winner.chunks is not None
        cost = cycle.charge(cycle.call.dialect.usage(winner.parsed), key_id)
        headers["X-GammaInfra-Cost-USD"] = cost_header(cost) if cost is not None else "unknown"
        cycle.completed()
        body = winner.chunks[0]
        return web.Response(body=body, status=200, content_type="application/json", headers=headers)

    async def _pump(
        self,
        request: web.Request,
        cycle: RaceCycle,
        r: AttemptResult,
        headers: dict[str, str],
        key_id: str | None,
    ) -> web.StreamResponse:
        """Send the winner's stream: the bytes so far, then chunk by chunk as they arrive, as whole
        events (`dialects.StreamForwarder` decides what to write; this is the I/O around it)."""
        assert r.resp is not None and r.chunks is not None
        up = r.resp
        c = cycle.served_by
        headers["X-GammaInfra-Cost-USD"] = "pending"  # exact figure: the `: X-GammaInfra-Cost-USD` line
        out = _SSEResponse(status=200, headers=headers)
        out.content_type = "text/event-stream"
        out.headers["Cache-Control"] = "no-cache"
        call = cycle.call
        fwd = StreamForwarder(
            call.dialect, strip_usage=call.strip_usage, key=self._stream_keys.get(c.provider.name),
            charge=lambda usage: cycle.charge(usage, key_id),
        )  # fmt: skip
        completed = False
        try:
            await out.prepare(request)
            async with asyncio.timeout(c.provider.timeouts.total):
                data = fwd.feed(b"".join(r.chunks))
                while True:
                    if data:
                        await out.write(data)
                    chunk = await up.read_chunk()
                    if not chunk:
                        break
                    data = fwd.feed(chunk)
            last = fwd.finish()
            if fwd.saw_end:
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
                cycle.completed()
            else:
                up.abort()
        return out

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
