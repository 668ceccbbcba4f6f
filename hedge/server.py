"""The aiohttp application: routes, the error middleware, /v1/models, /healthz, /metrics.

The error middleware is the one place that turns anything raised into OpenAI error JSON, so no handler
can leak a traceback or an HTML error page, whatever goes wrong.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .catalog import Catalog
from .errors import ApiError
from .feedback import blended_price
from .proxy import Proxy

log = logging.getLogger("hedge.server")

PROXY_KEY: web.AppKey[Proxy] = web.AppKey("proxy", Proxy)
# the tasks serving /v1/chat/completions right now: what a graceful shutdown waits for, then cancels
STREAMS_KEY: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("streams", set)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 413:
            return ApiError(
                413, "The request body is larger than this gateway accepts.", code="request_too_large"
            ).response()
        if e.status == 405:
            allowed = ", ".join(sorted(getattr(e, "allowed_methods", ()) or ()))
            return ApiError(
                405,
                f"Method {request.method} is not allowed on {request.path}"
                + (f" (use {allowed})." if allowed else "."),
                code="method_not_allowed",
                headers={"Allow": allowed} if allowed else None,
            ).response()
        if e.status == 404:
            return ApiError(404, f"Unknown path {request.path}.", code="not_found").response()
        return ApiError(e.status, e.reason or "Request failed.").response()
    except Exception:
        # a bug: say so in JSON; log the type and place, never request bodies or headers
        log.exception("internal error handling %s %s", request.method, request.path)
        return ApiError(500, "Internal gateway error.", code="internal_error", type="server_error").response()


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
        cands = catalog.expand(r.candidates)
        data.append(
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "gammainfra",
                "type": "route",
                "strategy": r.strategy,
                "candidates": [c.endpoint for c in cands],
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
    app = web.Application(middlewares=[error_middleware], client_max_size=proxy.config.server.max_body_bytes)
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

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()  # aiohttp runs each request in a task of its own
        assert task is not None
        streams.add(task)
        try:
            return await proxy.chat_completions(request)
        finally:
            streams.discard(task)

    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)

    async def close_upstream(app: web.Application) -> None:
        await proxy.upstream.close()

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
        resp = err.response()
        resp.force_close()
        return resp


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # same layout; only the handler factory differs
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
    grace period, cancel the rest); `shutdown_timeout` then only bounds aiohttp's own cleanup."""
    kwargs: dict[str, Any] = {} if access_log else {"access_log": None}
    runner = _Runner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout, **kwargs)
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
    into an error event that tells the client its answer is incomplete (DESIGN §1.6)."""
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
        await asyncio.wait(set(streams), timeout=1.0)  # let them write those last words
    await runner.cleanup()
    return cancelled
