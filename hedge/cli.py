"""`hedge serve`: run the gateway (on uvloop) from a TOML config, or the built-in demo without one."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import replace

import uvloop

from .auth import keys_from_env
from .catalog import Catalog
from .config import Config, ConfigError, load_config, parse_config
from .metrics import Metrics
from .server import bound_port, build_app, drain, start_site

log = logging.getLogger("hedge")

# After the grace period `server.drain` cancels what is left; aiohttp's cleanup then waits at most this
# long (twice) for the cancelled handlers to write their error events.
CANCEL_PHASE_S = 1.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hedge", description="OpenAI-compatible LLM gateway with a hedged fast lane"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", help="TOML config file (default: the built-in demo with simulated providers)")
    s.add_argument("--host", help="listen address (overrides [server].host)")
    s.add_argument("--port", type=int, help="listen port (overrides [server].port; 0 = any free port)")
    s.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    s.add_argument("--access-log", action="store_true", help="log one line per request (off by default)")
    s.add_argument("--log-level", default="INFO")
    return p


async def _serve(
    args: argparse.Namespace, *, reuse_port: bool = False, ready: asyncio.Event | None = None
) -> int:
    from .proxy import Proxy

    demo = []
    if args.config:
        config = load_config(args.config)
    else:
        from .demo import demo_raw_config, start_demo_providers

        demo = await start_demo_providers()
        config = parse_config(demo_raw_config({p.name: p.base_url for p in demo}))
    config = _override(config, args)
    # --workers N: every worker's /metrics renders the sum over all workers (hedge/workers.py sets this)
    mp_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") if reuse_port else None
    proxy = Proxy(
        Catalog(config),
        api_keys=keys_from_env(config.server.api_keys_env),
        metrics=Metrics(multiprocess_dir=mp_dir) if mp_dir else None,
    )
    app = build_app(proxy)
    shared = None
    if config.shared is not None:  # [shared]: pool statistics and breakers with peers through Redis
        from .sharedredis import RedisShared

        shared = RedisShared.for_proxy(config.shared, proxy)
    if args.access_log:
        logging.getLogger("aiohttp.access").setLevel(logging.INFO)
    runner = await start_site(
        app, config.server.host, config.server.port, reuse_port=reuse_port,
        shutdown_timeout=CANCEL_PHASE_S, access_log=args.access_log,
    )  # fmt: skip
    port = bound_port(runner)
    if shared is not None:
        shared.start()  # in the background: never waits for Redis
    routes = ", ".join(config.routes)
    log.info(
        "hedge listening on http://%s:%d/v1 (%s; routes: %s)",
        config.server.host, port, "demo: simulated providers" if demo else args.config, routes,
    )  # fmt: skip
    if demo:
        log.info(
            "try: curl -N http://%s:%d/v1/chat/completions -H 'Content-Type: application/json' "
            "-d '{\"model\": \"gammainfra/fast\", \"stream\": true, \"messages\": [{\"role\": \"user\", "
            "\"content\": \"Hello!\"}]}' -i",
            config.server.host, port,
        )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info(
        "shutting down: no new connections; in-flight requests get %.0f s", config.server.shutdown_grace_s
    )
    cut = await drain(runner, config.server.shutdown_grace_s)  # stop listening, wait, cancel the rest
    if cut:
        ends = proxy.shutdown_ends
        streamed = sum(ends.values())
        log.warning(
            "grace period over: %d request(s) cancelled: %d stream(s) ended with a shutting_down event, "
            "%d aborted (client not reading within %.1f s), %d already gone; %d not yet answered got a 503",
            cut, ends.get("error_event", 0), ends.get("aborted", 0), config.server.shutdown_write_timeout_s,
            ends.get("client_gone", 0), max(0, cut - streamed),
        )  # fmt: skip
    if shared is not None:
        await shared.close()  # peers forget this instance's contribution at once
    for p in demo:
        await p.stop()
    return 0


def _override(config: Config, args: argparse.Namespace) -> Config:
    server = config.server
    if args.host:
        server = replace(server, host=args.host)
    if args.port is not None:
        server = replace(server, port=args.port)
    return replace(config, server=server)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if args.cmd == "serve":
        if args.config:
            try:  # fail fast, with the key named, before forking workers
                load_config(args.config)
            except ConfigError as e:
                print(f"hedge: bad config: {e}", file=sys.stderr)
                return 2
        if args.workers > 1:
            from .workers import run_workers

            return run_workers(args, _serve)
        try:
            return uvloop.run(_serve(args))
        except ConfigError as e:
            print(f"hedge: bad config: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"hedge: cannot start: {e}", file=sys.stderr)
            return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
