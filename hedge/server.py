"""The aiohttp application: routes, the error middleware, /v1/models, /healthz, /metrics.

The error middleware is the one place that turns anything raised into OpenAI error JSON, so no handler
can leak a traceback or an HTML error page, whatever goes wrong.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from aiohttp import web

from .catalog import Catalog
from .errors import ApiError
from .feedback import blended_price
from .proxy import Proxy

log = logging.getLogger("hedge.server")

PROXY_KEY: web.AppKey[Proxy] = web.AppKey("proxy", Proxy)


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

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    async def metrics(request: web.Request) -> web.Response:
        now = time.monotonic()
        states = proxy.feedback.circuit_states(now)
        for c in proxy.catalog.all_candidates():
            st = states.get(c.key)
            proxy.metrics.circuit_state.labels(c.provider.name, c.upstream_model).set(
                int(st) if st is not None else 0
            )
        return web.Response(
            body=proxy.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    app.router.add_post("/v1/chat/completions", proxy.chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)

    async def close_upstream(app: web.Application) -> None:
        await proxy.upstream.close()

    app.on_cleanup.append(close_upstream)
    return app


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

    `runner.cleanup()` is the graceful shutdown: stop listening, let handlers run up to
    `shutdown_timeout`, then cancel what is left."""
    kwargs: dict[str, Any] = {} if access_log else {"access_log": None}
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout, **kwargs)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return int(addr[1])
    raise RuntimeError("server is not listening")
