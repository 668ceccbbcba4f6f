"""``python -m loadtest cpu``: the proxy's own CPU per request, steady enough to compare two commits.

The overhead benchmark (`bench.py`) answers "how far is the proxy from a bare pass-through", as a ratio
within one run; its passes move by +-5 % on a shared 2-core machine, because the client, the provider and
the pass-through share the cores. A refactor of the request path needs a narrower question answered:
"does this commit cost more CPU per request than that one". So this runs one proxy in front of the
instant simulated provider (20 content chunks, no delays), sends `--requests` streaming requests at
`--concurrency` after a warm-up, and reads the proxy process's CPU time from /proc before and after each
round: no client or provider CPU is in the figure. Run it in two checkouts, alternating, and compare the
medians.

With `--profile` the proxy runs under cProfile and the own time of each `hedge/` module per request is
printed as well (cProfile inflates call-heavy code, so those figures rank, they do not measure).
"""

from __future__ import annotations

import pstats
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import orjson

from .bench import _segment
from .client import Client, Target
from .procs import Children, cpu_seconds, free_port, read_ready_line, wait_http
from .run import PINNED_MODEL, child_env, proxy_config


@dataclass(frozen=True)
class CpuOptions:
    model: str = PINNED_MODEL
    requests: int = 6000
    concurrency: int = 32
    rounds: int = 3
    warmup: int = 300
    profile: bool = False


async def measure(opts: CpuOptions) -> dict[str, object]:
    """Proxy CPU microseconds per request, one figure per round; with `profile`, per-module own time."""
    env = child_env()
    children = Children()
    client = Client()
    work = Path(tempfile.mkdtemp(prefix="hedge-cpu-"))
    prof = work / "proxy.prof"
    rounds: list[float] = []
    try:
        prov = children.spawn(
            "provider", ["-m", "loadtest.providers", "--scenario", "instant", "--max-lifetime", "3600"],
            log_path=work / "provider.log", stdout_pipe=True, env=env,
        )  # fmt: skip
        ready = orjson.loads(await read_ready_line(prov, 20.0, work / "provider.log"))
        port = free_port()
        cfg = work / "hedge.toml"
        cfg.write_text(proxy_config({"up": ready["providers"]["up"]}, port=port))
        profiler = ["-m", "cProfile", "-o", str(prof)] if opts.profile else []
        px = children.spawn(
            "hedge", [*profiler, "-m", "hedge", "serve", "--config", str(cfg), "--port", str(port)],
            log_path=work / "hedge.log", env=env,
        )  # fmt: skip
        await wait_http(f"http://127.0.0.1:{port}/healthz", px, within=20.0, log=work / "hedge.log")
        target = Target(f"http://127.0.0.1:{port}")
        msg = [{"role": "user", "content": "Say something short."}]
        body = orjson.dumps({"model": opts.model, "stream": True, "messages": msg})
        await _segment(client, target, body, opts.warmup, opts.concurrency, None)
        for _ in range(opts.rounds):
            cpu0 = cpu_seconds(px.pid)
            await _segment(client, target, body, opts.requests, opts.concurrency, None)
            rounds.append((cpu_seconds(px.pid) - cpu0) / opts.requests * 1e6)
    finally:
        client.close()
        children.close(timeout=10.0)  # SIGTERM: the proxy drains and exits, and cProfile writes its file
    total = opts.warmup + opts.requests * opts.rounds
    modules: dict[str, float] = {}
    if opts.profile and prof.exists():
        for (path, _line, _fn), (_cc, _nc, own, _cum, _callers) in pstats.Stats(str(prof)).stats.items():  # type: ignore[attr-defined]
            if "/hedge/" in path:
                name = path.rsplit("/hedge/", 1)[1]
                modules[name] = modules.get(name, 0.0) + own / total * 1e6
    return {"rounds_us": rounds, "median_us": statistics.median(rounds), "modules_us": modules}


def render(res: dict[str, object], opts: CpuOptions) -> str:
    rounds = res["rounds_us"]
    assert isinstance(rounds, list)
    lines = [
        f"proxy CPU per request ({opts.model}, {opts.requests} streaming requests x {opts.rounds} rounds, "
        f"concurrency {opts.concurrency}): median {res['median_us']:.1f} us "
        f"(rounds: {', '.join(f'{r:.1f}' for r in rounds)})"
    ]
    modules = res["modules_us"]
    assert isinstance(modules, dict)
    if modules:
        lines.append("under cProfile, own time per request by module (ranks, does not measure):")
        for name, us in sorted(modules.items(), key=lambda kv: -kv[1])[:15]:
            lines.append(f"  {name:24s} {us:7.1f} us")
    return "\n".join(lines)
