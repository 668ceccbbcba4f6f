"""The aiohttp application: routes, the error middleware, /v1/models, /healthz, /metrics.

The error middleware is the one place that turns anything raised into OpenAI error JSON, so no handler
can leak a traceback or an HTML error page, whatever goes wrong.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .apisupport import model_apis
from .catalog import Catalog
from .config import ServerConfig
from .conn_limits import ConnectionGate, HeadClock, Phase, connection_cap, raise_nofile_limit
from .errors import ApiError, NoCandidates
from .feedback import blended_price
from .http_errors import error_response
from .proxy import Proxy

log = logging.getLogger("hedge.server")

PROXY_KEY: web.AppKey[Proxy] = web.AppKey("proxy", Proxy)
# the tasks serving a racing POST (chat, responses, embeddings, completions): what a graceful shutdown
# waits for, then cancels
STREAMS_KEY: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("streams", set)
GUARD_KEY: web.AppKey[ConnGuard] = web.AppKey("guard")


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except (ApiError, NoCandidates) as e:
        return error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 413:
            return error_response(
                ApiError(
                    413, "The request body is larger than this gateway accepts.", code="request_too_large"
                )
            )
        if e.status == 405:
            allowed = ", ".join(sorted(getattr(e, "allowed_methods", ()) or ()))
            return error_response(
                ApiError(
                    405,
                    f"Method {request.method} is not allowed on {request.path}"
                    + (f" (use {allowed})." if allowed else "."),
                    code="method_not_allowed",
                    headers={"Allow": allowed} if allowed else None,
                )
            )
        if e.status == 404:
            return error_response(ApiError(404, f"Unknown path {request.path}.", code="not_found"))
        return error_response(ApiError(e.status, e.reason or "Request failed."))
    except Exception:
        # a bug: say so in JSON; log the type and place, never request bodies or headers
        log.exception("internal error handling %s %s", request.method, request.path)
        return error_response(
            ApiError(500, "Internal gateway error.", code="internal_error", type="server_error")
        )


CORS_EXPOSE = "X-GammaInfra-Endpoint, X-GammaInfra-Cost-USD, X-GammaInfra-Task, Server-Timing, Retry-After"


def allowed_origin(origin: str | None, allowed: tuple[str, ...]) -> str | None:
    """The value for Access-Control-Allow-Origin, or None when this origin is not allowed."""
    if not origin:
        return None
    if "*" in allowed:
        return "*"
    return origin if origin.rstrip("/") in allowed else None


def cors_middleware(allowed: tuple[str, ...]) -> Any:
    """Answer CORS preflights (OPTIONS with Access-Control-Request-Method) before routing and auth: a
    browser sends them without credentials. Only when `[server] cors_origins` is set."""

    @web.middleware
    async def cors(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            value = allowed_origin(request.headers.get("Origin"), allowed)
            if value is None:
                return error_response(
                    ApiError(403, "This origin is not allowed.", code="cors_origin_not_allowed")
                )
            req_headers = request.headers.get("Access-Control-Request-Headers", "")
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                    "Access-Control-Allow-Headers": req_headers[:2000] or "Authorization, Content-Type",
                    "Access-Control-Max-Age": "600",
                },
            )  # Access-Control-Allow-Origin and Vary: the on_response_prepare hook below
        return await handler(request)

    return cors


def cors_headers(allowed: tuple[str, ...]) -> Any:
    async def add(request: web.BaseRequest, response: web.StreamResponse) -> None:
        value = allowed_origin(request.headers.get("Origin"), allowed)
        if value is not None:
            response.headers["Access-Control-Allow-Origin"] = value
            response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE
        if value != "*":
            response.headers.add("Vary", "Origin")

    return add


def models_body(catalog: Catalog) -> bytes:
    """GET /v1/models: OpenAI's list format, with prices and limits as extra fields."""
    data: list[dict[str, Any]] = []
    for name, m in catalog.config.models.items():
        data.append(
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": name.split("/", 1)[0] if "/" in name else "gammainfra",
                "type": "model",
                "pricing": {
                    "input_usd_per_mtok": m.input_usd_per_mtok,
                    "output_usd_per_mtok": m.output_usd_per_mtok,
                },
                "context_window": m.context_window,
                "max_output_tokens": m.max_output_tokens,
                "providers": [s.provider for s in m.serve],
                "tags": list(m.tags),
            }
        )
    for name, r in catalog.config.routes.items():
        every = catalog.expand(r.candidates)
        # prices and limits describe what the route generates with: its chat-kind models when it has
        # any (an embeddings model in the route serves only /v1/embeddings; it is in "candidates")
        cands = tuple(c for c in every if "embeddings" not in model_apis(c.model)) or every
        data.append(
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "gammainfra",
                "type": "route",
                "strategy": r.strategy,
                "candidates": [c.endpoint for c in every],
                "pricing": {
                    "input_usd_per_mtok": [min(c.model.input_usd_per_mtok for c in cands),
                                           max(c.model.input_usd_per_mtok for c in cands)],
                    "output_usd_per_mtok": [min(c.model.output_usd_per_mtok for c in cands),
                                            max(c.model.output_usd_per_mtok for c in cands)],
                    "cheapest_blended_usd_per_mtok": min(blended_price(c) for c in cands),
                },
                "context_window": max(c.model.context_window for c in cands),
                "max_output_tokens": max(c.model.max_output_tokens for c in cands),
            }
        )  # fmt: skip
    return orjson.dumps({"object": "list", "data": data})


def build_app(proxy: Proxy) -> web.Application:
    cors = proxy.config.server.cors_origins
    middlewares = [cors_middleware(cors), error_middleware] if cors else [error_middleware]
    app = web.Application(middlewares=middlewares, client_max_size=proxy.config.server.max_body_bytes)
    if cors:
        app.on_response_prepare.append(cors_headers(cors))
    app[PROXY_KEY] = proxy
    models = models_body(proxy.catalog)

    async def list_models(request: web.Request) -> web.Response:
        proxy.keys.check(request.headers.get("Authorization"))
        return web.Response(body=models, content_type="application/json")

    health = orjson.dumps({"status": "ok", "pid": os.getpid()})  # the pid tells --workers apart

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(body=health, content_type="application/json")

    async def metrics(request: web.Request) -> web.Response:
        now = proxy.clock()  # the clock the breakers were driven with (fake in tests)
        states = proxy.feedback.circuit_states(now)
        for c in proxy.catalog.all_candidates():
            st = states.get(c.key)
            proxy.metrics.circuit_state.labels(c.provider.name, c.upstream_model).set(
                int(st) if st is not None else 0
            )
        return web.Response(
            body=proxy.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    streams: set[asyncio.Task[Any]] = set()
    app[STREAMS_KEY] = streams

    def tracked(handler: Any) -> Any:
        """A POST that races: its task is in `streams`, so a graceful shutdown waits for it."""

        async def handle(request: web.Request) -> web.StreamResponse:
            task = asyncio.current_task()  # aiohttp runs each request in a task of its own
            assert task is not None
            streams.add(task)
            try:
                return cast(web.StreamResponse, await handler(request))
            finally:
                streams.discard(task)

        return handle

    async def expect_continue(request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: say "send the body" only to a caller that may send it (key, media
        type, coding and declared size are checked first); anyone else gets the final answer now."""
        if request.headers.get("Expect", "").lower() != "100-continue":
            msg = "Only 'Expect: 100-continue' is supported."
            return error_response(ApiError(417, msg, code="expectation_failed"))
        try:
            proxy.precheck(request)
        except ApiError as e:
            resp = error_response(e)
            resp.force_close()  # the body the caller holds back will not be read
            return resp
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # as aiohttp's own handler: the real answer is still to come
        return None

    # every racing API takes the same path: head checks (also before `100 Continue`), the bounded body,
    # then the slot (Proxy.serve_api)
    for path, handler in (
        ("/v1/chat/completions", proxy.chat_completions),
        ("/v1/responses", proxy.responses),
        ("/v1/embeddings", proxy.embeddings),
        ("/v1/completions", proxy.completions),
    ):
        app.router.add_post(path, tracked(handler), expect_handler=expect_continue)
    # a stored response's state lives at its provider: passed there (Proxy.response_state)
    app.router.add_get("/v1/responses/{id}", proxy.response_state)
    app.router.add_delete("/v1/responses/{id}", proxy.response_state)
    app.router.add_post("/v1/responses/{id}/{rest:cancel}", proxy.response_state)
    app.router.add_get("/v1/responses/{id}/{rest:input_items}", proxy.response_state)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)

    async def close_upstream(app: web.Application) -> None:
        await proxy.close()

    app.on_cleanup.append(close_upstream)
    return app


class _JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering HTTP-level errors as OpenAI error JSON.

    Errors the HTTP parser finds (a header line over 8 KiB, a broken request line, bad chunked framing)
    never reach the middleware: aiohttp answers them itself with text/plain and logs a traceback at
    ERROR. A client's junk is not our error, so: JSON like every other answer, a debug log line only,
    and no echo of the offending bytes (they may hold a key)."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:
            self.logger.debug("bad HTTP request from %s: %s", request.remote, type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response")
        if status >= 500:
            err = ApiError(status, "Internal gateway error.", code="internal_error", type="server_error")
        else:
            what = type(exc).__name__ if exc is not None else "bad request"
            err = ApiError(status, f"The HTTP request is malformed ({what}).", code="bad_http_request")
        resp = error_response(err)
        resp.force_close()
        return resp


def _refused_response() -> bytes:
    """The whole answer to a connection over the limit: written once, without parsing anything."""
    body = ApiError(
        503, "The gateway is at its connection limit; retry shortly.", code="too_many_connections"
    ).body()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


REFUSED = _refused_response()


@dataclass(slots=True)
class ConnGuard:
    """What every connection of one server shares: the connection gate and the pre-handler timeouts."""

    gate: ConnectionGate
    idle_timeout: float
    head_timeout: float
    head_timeouts: int = 0  # connections closed because a request head took too long
    idle_timeouts: int = 0  # connections closed after sitting idle (before or between requests)


class _GuardedHandler(_JsonErrorHandler):
    """aiohttp's connection handler plus what a caller may hold before a handler runs (conn_limits):
    refused past the connection limit, closed when idle too long or when a head takes too long."""

    def __init__(self, manager: web.Server, *, guard: ConnGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._admitted = False
        self._clock = HeadClock(guard.idle_timeout, guard.head_timeout)
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._guard.gate.admit():
            # refuse before the parser, the handler task or any buffer exists for this connection
            tr = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
            self._manager = None  # connection_lost: nothing of aiohttp's to undo
            tr.write(REFUSED)
            tr.close()
            return
        self._admitted = True
        super().connection_made(transport)
        self._clock.on_open(self._loop.time())
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._admitted:
            self._admitted = False
            self._guard.gate.release()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        clock = self._clock
        if clock.phase is not Phase.BUSY and data:
            before = self._request_count
            clock.on_bytes(self._loop.time())
            super().data_received(data)
            if self._request_count != before:  # the parser produced a whole head
                clock.on_head_done()
            self._arm()
        else:
            super().data_received(data)

    async def _handle_request(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super()._handle_request(*args, **kwargs)
        finally:
            if not self._messages:  # no pipelined request waiting: the connection is idle now
                self._clock.on_response_done(self._loop.time())
                self._arm()

    def _arm(self) -> None:
        deadline = self._clock.deadline
        if self._timer is not None:
            if deadline is not None and self._timer.when() == deadline:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None and self.transport is not None:
            self._timer = self._loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        clock = self._clock
        if not clock.expired(self._loop.time()):
            self._arm()
            return
        if clock.phase is Phase.HEAD:
            self._guard.head_timeouts += 1
            self.logger.debug("closing a connection whose request head took over %.1f s", clock.head_timeout)
        else:
            self._guard.idle_timeouts += 1
        self.force_close()


class _JsonErrorServer(web.Server):
    guard: ConnGuard | None = None

    def __call__(self) -> RequestHandler:
        if self.guard is not None:
            return _GuardedHandler(self, loop=self._loop, guard=self.guard, **self._kwargs)
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    guard: ConnGuard | None = None

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # same layout; only the handler factory differs
        assert isinstance(server, _JsonErrorServer)
        server.guard = self.guard
        return server


async def start_site(
    app: web.Application,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    shutdown_timeout: float = 30.0,
    access_log: bool = False,
) -> web.AppRunner:
    """Start serving `app`; client disconnects cancel the handler (so abandoned races stop at once).

    `drain(runner, grace)` is the graceful shutdown (stop listening, let chat requests finish within the
    grace period, cancel the rest); `shutdown_timeout` then only bounds aiohttp's own cleanup.

    The connection limit and the idle/head timeouts come from the proxy's `[server]` config; the
    connection limit is kept under half the fd limit, which is raised first where the OS allows."""
    kwargs: dict[str, Any] = {} if access_log else {"access_log": None}
    # an app without a proxy (a test's scripted provider) gets the default limits
    sc = app[PROXY_KEY].config.server if PROXY_KEY in app else ServerConfig()
    guard = ConnGuard(
        ConnectionGate(connection_cap(sc.max_connections, raise_nofile_limit())),
        idle_timeout=sc.keepalive_timeout_s,
        head_timeout=sc.header_timeout_s,
    )
    runner = _Runner(
        app, handler_cancellation=True, shutdown_timeout=shutdown_timeout,
        # aiohttp's own idle timer: only a backstop behind ours (it also fires mid-head)
        keepalive_timeout=sc.keepalive_timeout_s + sc.header_timeout_s + 1.0,
        auto_decompress=False,  # hedge/body.py inflates request bodies, bounded while it streams
        lingering_time=2.0,  # after an early answer (413, 408): read and drop what still comes, briefly
        **kwargs,
    )  # fmt: skip
    runner.guard = guard
    app[GUARD_KEY] = guard
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return int(addr[1])
    raise RuntimeError("server is not listening")


async def drain(runner: web.AppRunner, grace: float) -> int:
    """Graceful shutdown: stop accepting, let chat requests finish within `grace` seconds, cancel the
    rest, then clean up. Returns how many requests had to be cancelled.

    aiohttp's own `cleanup()` also waits for handlers, but its timeout applies twice in a row (wait, then
    wait again after a soft cancel a streaming handler never sees), so a stream could run for twice the
    grace period. Here the wait is ours: one deadline, then a real `Task.cancel()`, which the proxy turns
    into an error event that tells the client its answer is incomplete (docs/design.md, "The request
    path")."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    for site in list(runner.sites):
        await site.stop()  # the listening socket closes: new connections are refused from here on
    if runner.server is not None:
        runner.server.pre_shutdown()  # idle keep-alive connections close; busy ones after their answer
    streams = runner.app[STREAMS_KEY]
    while streams and (left := deadline - loop.time()) > 0:
        await asyncio.wait(set(streams), timeout=left)
    cancelled = len(streams)
    if streams:
        runner.app[PROXY_KEY].shutting_down = True  # a cancelled race answers 503, a stream an error event
        for task in list(streams):
            task.cancel()
        # let them write those last words; a stream whose client does not read them is aborted in time
        write_timeout = runner.app[PROXY_KEY].config.server.shutdown_write_timeout_s
        await asyncio.wait(set(streams), timeout=write_timeout + 0.5)
    await runner.cleanup()
    return cancelled
