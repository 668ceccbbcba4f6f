"""The thinnest possible aiohttp pass-through proxy: the yardstick for hedge's per-request cost.

    python -m loadtest.baseline_proxy --upstream http://127.0.0.1:9001 --port 8081

Read the body, POST it upstream with one shared `ClientSession`, copy the response with ``iter_any()``
into a `StreamResponse`, on uvloop, no access log.  Nothing else: no parsing, no validation, no
metrics.  The original design notes (not in the repository) put it at ~0.23 CPU-ms per 20-chunk
stream; hedge's CPU per request is judged against this proxy measured in the same run, on the same
machine, at the same moment.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import aiohttp
from aiohttp import web

SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


def build_app(upstream: str) -> web.Application:
    base = upstream.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    app = web.Application(client_max_size=64 * 1024 * 1024)

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        session = request.app[SESSION]
        async with session.post(
            base + request.path, data=body, headers={"Content-Type": "application/json"}
        ) as up:
            resp = web.StreamResponse(status=up.status)
            resp.content_type = up.content_type
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0)
        app[SESSION] = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False
        )
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", forward)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(upstream: str, host: str, port: int) -> None:
    runner = web.AppRunner(
        build_app(upstream), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
    )
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.baseline_proxy", description=__doc__.split("\n")[0])
    p.add_argument("--upstream", required=True, help="provider base URL, e.g. http://127.0.0.1:9001/v1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    args = p.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.upstream, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
