"""Command line: ``python -m loadtest {run,overhead,cpu,client,config,scenarios,fleet,abuse}``.

python -m loadtest run --scenario stalls --duration 20 --rate 100
python -m loadtest run --scenario degrade --concurrency 16
python -m loadtest overhead --concurrency 1 --requests 2000
python -m loadtest cpu --requests 6000 --rounds 3 [--model gammainfra/fast] [--profile]
python -m loadtest client --requests 4000 --concurrency 32
python -m loadtest scenarios
python -m loadtest fleet --duration 16 --rate 40
python -m loadtest abuse [--only zip-bomb,slowloris] [--scale 0.1]
"""

from __future__ import annotations

import argparse
import signal
import sys
from asyncio import CancelledError
from pathlib import Path
from typing import Any

from . import scenarios
from .procs import ChildError


def _kv(items: list[str], flag: str) -> dict[str, Any]:
    """``key=value`` pairs; values parse as int, float, true/false, or stay strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag}: expected KEY=VALUE, got {item!r}")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            for conv in (int, float):
                try:
                    value = conv(raw)
                    break
                except ValueError:
                    pass
        out[key] = value
    return out


def _modes(text: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in allowed]
    if bad or not modes:
        raise SystemExit(f"{flag}: choose from {', '.join(allowed)} (got {text!r})")
    return modes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest", description="Load tests and the overhead benchmark."
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="drive a latency scenario through every mode side by side")
    r.add_argument("--scenario", default="stalls", choices=sorted(scenarios.SCENARIOS))
    r.add_argument("--duration", type=float, default=30.0, help="measured seconds (default 30)")
    shape = r.add_mutually_exclusive_group()
    shape.add_argument("--rate", type=float, help="open loop: requests per second per mode (default 100)")
    shape.add_argument("--concurrency", type=int, help="closed loop: requests in flight per mode")
    r.add_argument("--modes", default="direct,pinned,fast,oracle", help="comma-separated subset")
    r.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before (default 2)")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--timeout", type=float, default=20.0, help="per-request time limit (s)")
    r.add_argument("--out", type=Path, help="output directory (default loadtest/results/run-...)")
    r.add_argument("--no-plot", action="store_true", help="skip the PNG")
    r.add_argument("--quiet", action="store_true", help="no progress line")
    r.add_argument("--target", help="an already running proxy (http://host:port) instead of starting one")
    r.add_argument("--provider-ports", help="fixed provider ports (comma-separated), e.g. for --target")
    r.add_argument("--pinned-model", default="lt/chat")
    r.add_argument("--fast-model", default="gammainfra/fast")
    r.add_argument("--route", action="append", default=[], metavar="KEY=VALUE", help="fast-route override")
    r.add_argument("--feedback", action="append", default=[], metavar="KEY=VALUE", help="[feedback] override")
    r.add_argument("--max-inflight", type=int, default=5000, help="per-mode cap on requests in flight")

    o = sub.add_parser("overhead", help="CPU and latency cost of the proxy against a bare pass-through")
    o.add_argument("--concurrency", type=int, default=1, help="latency phase concurrency (default 1)")
    o.add_argument("--requests", type=int, default=2000, help="latency phase requests per target")
    o.add_argument("--throughput-concurrency", type=int, default=32)
    o.add_argument(
        "--throughput-requests", type=int, default=6000, help="throughput phase requests per target"
    )
    o.add_argument("--warmup", type=int, default=300, help="unmeasured requests per target first")
    o.add_argument("--rounds", type=int, default=8, help="targets alternate in this many rounds per phase")
    o.add_argument("--repeat", type=int, default=1, help="repeat the whole benchmark, report the spread")
    o.add_argument("--targets", default="direct,baseline,hedge,fast")
    o.add_argument("--out", type=Path)

    u = sub.add_parser("cpu", help="the proxy's own CPU per request, to compare two commits")
    u.add_argument("--model", default="lt/chat", help="lt/chat (pinned) or gammainfra/fast (the race)")
    u.add_argument("--requests", type=int, default=6000, help="streaming requests per round")
    u.add_argument("--concurrency", type=int, default=32)
    u.add_argument("--rounds", type=int, default=3)
    u.add_argument("--warmup", type=int, default=300)
    u.add_argument("--profile", action="store_true", help="run the proxy under cProfile, rank modules")

    k = sub.add_parser("client", help="upstream clients alone: receive-path CPU, fast vs aiohttp")
    k.add_argument("--requests", type=int, default=4000, help="client phase requests per client")
    k.add_argument("--concurrency", type=int, default=32)
    k.add_argument("--rounds", type=int, default=4, help="the clients alternate in this many rounds")
    k.add_argument("--streams", type=int, default=50, help="responses recorded for the parse phase")

    c = sub.add_parser("config", help="print the proxy TOML a run would use (for --target setups)")
    c.add_argument("--scenario", default="stalls", choices=sorted(scenarios.SCENARIOS))
    c.add_argument("--provider-ports", required=True, help="comma-separated, one per provider")
    c.add_argument("--port", type=int, default=8080)

    sub.add_parser("scenarios", help="list the scenarios")

    f = sub.add_parser("fleet", help="4 instances, a quarter of the traffic each, alone vs sharing via Redis")
    f.add_argument("--instances", type=int, default=4)
    f.add_argument("--rate", type=float, default=40.0, help="requests per second over all instances")
    f.add_argument("--duration", type=float, default=16.0, help="measured seconds per run (default 16)")
    f.add_argument("--warmup", type=float, default=3.0)
    f.add_argument("--slow-factor", type=float, default=8.0, help="the primary's TTFT multiplier")
    f.add_argument("--window", type=float, default=3.0, help="seconds just after the change to report")
    f.add_argument("--sync-interval-ms", type=float, default=250.0)
    f.add_argument("--seed", type=int, default=1)

    a = sub.add_parser("abuse", help="issue 13's hostile-client attacks at full size, with their cost")
    a.add_argument("--only", help="comma-separated attacks (default: all)")
    a.add_argument("--scale", type=float, default=1.0, help="multiply every attack's count/size by this")
    a.add_argument("--out", type=Path, default=Path("loadtest/results/abuse"), help="logs and configs")
    return p


def _ports(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"--provider-ports: expected comma-separated integers, got {text!r}") from None


def _run_async(coro: Any) -> Any:
    """Run on uvloop.  SIGTERM cancels the run like Ctrl-C does, so its `finally` blocks stop every
    child process (which also die with us through PR_SET_PDEATHSIG if we are killed outright)."""
    import asyncio

    import uvloop

    async def guarded() -> Any:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await coro

    return uvloop.run(guarded())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.cmd == "scenarios":
        for s in scenarios.SCENARIOS.values():
            print(f"{s.name:9} {s.summary}")
            for name, desc in s.describe(30.0).items():
                print(f"{'':9}   {name}: {desc}")
        return 0
    if args.cmd == "abuse":
        from . import abuse

        names = list(abuse.ATTACKS) if not args.only else [n.strip() for n in args.only.split(",")]
        bad = [n for n in names if n not in abuse.ATTACKS]
        if bad:
            raise SystemExit(f"--only: choose from {', '.join(abuse.ATTACKS)} (got {', '.join(bad)})")
        return int(_run_async(abuse.main(names, args.out, args.scale)))
    if args.cmd == "config":
        from .run import proxy_config

        sc = scenarios.get(args.scenario)
        ports = _ports(args.provider_ports) or []
        if len(ports) != len(sc.providers):
            raise SystemExit(f"--provider-ports: {sc.name} has {len(sc.providers)} providers")
        urls = {p.name: f"http://127.0.0.1:{port}/v1" for p, port in zip(sc.providers, ports, strict=True)}
        print(proxy_config(urls, port=args.port), end="")
        return 0
    try:
        if args.cmd == "run":
            from .run import MODES, RunOptions, run

            opts = RunOptions(
                scenario=args.scenario,
                duration=args.duration,
                rate=None if args.concurrency else (args.rate or 100.0),
                concurrency=args.concurrency,
                modes=_modes(args.modes, MODES, "--modes"),
                warmup=args.warmup,
                seed=args.seed,
                timeout=args.timeout,
                out=args.out,
                plot=not args.no_plot,
                target=args.target,
                provider_ports=_ports(args.provider_ports),
                pinned_model=args.pinned_model,
                fast_model=args.fast_model,
                route=_kv(args.route, "--route"),
                feedback=_kv(args.feedback, "--feedback"),
                max_inflight=args.max_inflight,
                progress=not args.quiet,
                argv=["python", "-m", "loadtest", *argv],
            )
            if not 0 < opts.duration <= 3600:
                raise SystemExit("--duration must be within (0, 3600] seconds")
            if opts.rate is not None and not 0 < opts.rate <= 10000:
                raise SystemExit("--rate must be within (0, 10000]")
            if opts.concurrency is not None and not 0 < opts.concurrency <= 4096:
                raise SystemExit("--concurrency must be within [1, 4096]")
            _run_async(run(opts))
        elif args.cmd == "fleet":
            from .fleet import FleetOptions, main_async

            fopts = FleetOptions(
                instances=args.instances, rate=args.rate, duration=args.duration, warmup=args.warmup,
                slow_factor=args.slow_factor, window=args.window,
                sync_interval_ms=args.sync_interval_ms, seed=args.seed,
            )  # fmt: skip
            if not (1 <= fopts.instances <= 16 and 0 < fopts.rate <= 2000 and 0 < fopts.duration <= 600):
                raise SystemExit("fleet: --instances 1..16, --rate (0, 2000], --duration (0, 600]")
            print(_run_async(main_async(fopts)))
        elif args.cmd == "overhead":
            from .bench import TARGETS, BenchOptions, overhead

            bopts = BenchOptions(
                concurrency=args.concurrency,
                requests=args.requests,
                throughput_concurrency=args.throughput_concurrency,
                throughput_requests=args.throughput_requests,
                warmup=args.warmup,
                rounds=max(1, args.rounds),
                repeat=max(1, args.repeat),
                targets=_modes(args.targets, TARGETS, "--targets"),
                out=args.out,
                argv=["python", "-m", "loadtest", *argv],
            )
            if bopts.requests > 1_000_000 or bopts.throughput_requests > 1_000_000:
                raise SystemExit("request counts are capped at 1,000,000 per phase")
            _run_async(overhead(bopts))
        elif args.cmd == "cpu":
            from .cpu import CpuOptions, measure
            from .cpu import render as render_cpu

            if not 0 < args.requests <= 1_000_000 or not 0 < args.concurrency <= 1024 or args.warmup < 0:
                raise SystemExit("--requests within [1, 1000000], --concurrency within [1, 1024]")
            copts = CpuOptions(
                model=args.model, requests=args.requests, concurrency=args.concurrency,
                rounds=max(1, args.rounds), warmup=args.warmup, profile=args.profile,
            )  # fmt: skip
            print(render_cpu(_run_async(measure(copts)), copts))
        elif args.cmd == "client":
            from .clientbench import render
            from .clientbench import run as client_bench

            if not 0 < args.requests <= 1_000_000 or not 0 < args.concurrency <= 1024:
                raise SystemExit("--requests must be within [1, 1000000], --concurrency within [1, 1024]")
            if not 0 < args.streams <= 10_000:
                raise SystemExit("--streams must be within [1, 10000]")
            rounds = max(1, args.rounds)
            res = _run_async(client_bench(args.requests, args.concurrency, rounds, args.streams))
            print(render(res, args.concurrency))
    except (KeyboardInterrupt, CancelledError):
        print("\ninterrupted; child processes stopped", file=sys.stderr)
        return 130
    except ChildError as e:
        print(f"loadtest: a child process failed to start: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
