"""`python -m loadtest fleet`: four gateway instances, each taking a quarter of the traffic, against an
abrupt slowdown of the primary; once with each instance learning alone, once sharing through Redis.

Real sockets on 127.0.0.1 only: `hedge serve` child processes (one per instance), simulated providers
and the open-loop client in this process, and (for the shared run) a `redis-server` child on a free port
with no persistence. Request k goes to instance k mod N at ``k / rate`` whatever the answers do. The
primary's TTFT grows ``slow_factor`` times at ``change_at`` of the measured duration and stays so.

What the comparison shows: after the change, how fast the *fleet* stops sending first attempts to the
slowed primary. Alone, each instance needs its own slow answers (or its own silent attempts); shared,
one instance's evidence reaches the others within a sync interval or two. Reported: client TTFT p50/p99
before the change, in the first seconds after it (``--window``), and over the rest of the run, plus
failures. Both runs draw each request's latency from the same seeded RNG (per provider and arrival).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from hedge.simprovider import Behaviour, RequestRecord, SimProvider

from .procs import Children, free_port, wait_http
from .run import FAST_MODEL, PROMPT, child_env, parse_metrics, proxy_config
from .scenarios import ALPHA, BETA, GAMMA


@dataclass(frozen=True)
class FleetOptions:
    instances: int = 4
    rate: float = 40.0  # requests per second, over all instances
    duration: float = 16.0  # measured seconds
    warmup: float = 3.0
    change_at: float = 0.4  # fraction of the measured duration
    slow_factor: float = 8.0
    window: float = 3.0  # "just after the change": this many seconds
    sync_interval_ms: float = 250.0
    seed: int = 1
    timeout: float = 20.0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


class _Clock:
    """Measured time: None during warm-up, then seconds since the measurement started."""

    def __init__(self) -> None:
        self.t0: float | None = None

    def elapsed(self) -> float | None:
        return None if self.t0 is None else time.monotonic() - self.t0


def _provider(index: int, profile: Any, clock: _Clock, opts: FleetOptions, slows: bool) -> Any:
    slow = replace(profile, ttft_median=profile.ttft_median * opts.slow_factor)
    change = opts.change_at * opts.duration

    def behaviour(rec: RequestRecord) -> Behaviour:
        rng = random.Random((opts.seed * 1_000_003 + index) * 4_000_000_007 + rec.index)
        e = clock.elapsed()
        return (slow if slows and e is not None and e >= change else profile).sample(rng)

    return behaviour


def _spawn_redis(tmp: Path, children: Children) -> tuple[subprocess.Popen[bytes], int]:
    """Start redis-server on a free loopback port, no persistence; `children` stops it."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("fleet: no redis-server on PATH (install it with .ci/apt-install.sh, see .ci/run)")
    port = free_port()
    log = open(tmp / "redis.log", "wb")  # closed by Children.close
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    children.procs.append((proc, "redis", log))
    return proc, port


async def _redis(tmp: Path, children: Children) -> str:
    proc, port = _spawn_redis(tmp, children)
    import redis.asyncio as aredis

    r = aredis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        for _ in range(200):
            if proc.poll() is not None:
                raise SystemExit("fleet: redis-server exited at start")
            with contextlib.suppress(Exception):
                if await r.ping():
                    return f"redis://127.0.0.1:{port}/0"
            await asyncio.sleep(0.05)
    finally:
        await r.aclose()
    raise SystemExit("fleet: redis-server did not answer")


async def run_fleet(opts: FleetOptions, shared: bool) -> dict[str, Any]:
    """One run; returns the summary row."""
    clock = _Clock()
    profiles = (("alpha", ALPHA, True), ("beta", BETA, False), ("gamma", GAMMA, False))
    provs = [SimProvider(n, _provider(i, p, clock, opts, s), seed=i) for i, (n, p, s) in enumerate(profiles)]
    for p in provs:
        p.keep_records = False
        await p.start()
    tmp = Path(tempfile.mkdtemp(prefix="hedge-fleet-"))
    children = Children()
    samples: list[tuple[float, float | None, int]] = []  # (sent at, ttft, status)
    counters: dict[str, float] = {}
    try:
        shared_toml = ""
        if shared:
            url = await _redis(tmp, children)
            shared_toml = (
                f'\n[shared]\nredis_url = "{url}"\nsync_interval_ms = {opts.sync_interval_ms!r}\n'
                'key_prefix = "fleet:"\n'
            )
        urls = []
        for i in range(opts.instances):
            port = free_port()
            cfg = tmp / f"hedge-{i}.toml"
            cfg.write_text(proxy_config({p.name: p.base_url for p in provs}, port=port) + shared_toml)
            log = tmp / f"hedge-{i}.log"
            proc = children.spawn(
                f"hedge-{i}", ["-m", "hedge", "serve", "--config", str(cfg)], log_path=log, env=child_env()
            )
            urls.append(f"http://127.0.0.1:{port}")
            await wait_http(urls[-1] + "/healthz", proc, log=log)

        body = {"model": FAST_MODEL, "stream": True, "messages": PROMPT}
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(
            connector=conn, timeout=aiohttp.ClientTimeout(total=opts.timeout)
        ) as http:

            async def one(k: int, measured: bool) -> None:
                t = time.monotonic()
                sent = clock.elapsed() if measured else None
                ttft, status = None, 0
                try:
                    async with http.post(urls[k % len(urls)] + "/v1/chat/completions", json=body) as r:
                        status = r.status
                        if r.status == 200 and await r.content.readany():
                            ttft = time.monotonic() - t
                        await r.read()
                except (aiohttp.ClientError, TimeoutError):
                    status = -1
                if sent is not None:
                    samples.append((sent, ttft, status))

            tasks: set[asyncio.Task[None]] = set()

            async def phase(seconds: float, measured: bool, k0: int) -> int:
                start = time.monotonic()
                n = int(seconds * opts.rate)
                for j in range(n):
                    delay = start + j / opts.rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    t = asyncio.create_task(one(k0 + j, measured))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                return k0 + n

            k = await phase(opts.warmup, False, 0)
            clock.t0 = time.monotonic()
            await phase(opts.duration, True, k)
            if tasks:
                await asyncio.wait(tasks, timeout=opts.timeout)
            for u in urls:  # the proxies' own counts over the whole run (warm-up included)
                async with http.get(u + "/metrics") as r:
                    m = parse_metrics(await r.text())
                for key, v in m.items():
                    name = key.partition("{")[0]
                    counters[name] = counters.get(name, 0.0) + v
    finally:
        children.close()
        for p in provs:
            await p.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    change = opts.change_at * opts.duration
    ok = [(t, x) for t, x, s in samples if s == 200 and x is not None]
    before = [x for t, x in ok if t < change]
    just_after = [x for t, x in ok if change <= t < change + opts.window]
    after = [x for t, x in ok if t >= change]
    return {
        "mode": "shared" if shared else "alone",
        "requests": len(samples),
        "failed": sum(1 for _, x, s in samples if s != 200 or x is None),
        "before_p50_ms": pct(before, 0.5) * 1000,
        "before_p99_ms": pct(before, 0.99) * 1000,
        "window_p50_ms": pct(just_after, 0.5) * 1000,
        "window_p99_ms": pct(just_after, 0.99) * 1000,
        "after_p50_ms": pct(after, 0.5) * 1000,
        "after_p99_ms": pct(after, 0.99) * 1000,
        "hedges": counters.get("hedge_hedges_total", 0.0),
        "budget_refusals": counters.get("hedge_budget_refusals_total", 0.0),
    }


def render(opts: FleetOptions, rows: list[dict[str, Any]]) -> str:
    w = f"{opts.window:g} s after"
    lines = [
        f"fleet: {opts.instances} instances x {opts.rate / opts.instances:g} req/s, primary TTFT "
        f"x{opts.slow_factor:g} at {opts.change_at * opts.duration:g} s of {opts.duration:g} s, "
        f"sync every {opts.sync_interval_ms:g} ms (client TTFT, ms)",
        f"| mode | requests | failed | p50 before | p99 before | p50 {w} | p99 {w} | p50 after | p99 after "
        "| hedges | budget refusals |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['requests']} | {r['failed']} | {r['before_p50_ms']:.0f} | "
            f"{r['before_p99_ms']:.0f} | {r['window_p50_ms']:.0f} | {r['window_p99_ms']:.0f} | "
            f"{r['after_p50_ms']:.0f} | {r['after_p99_ms']:.0f} | {r['hedges']:.0f} | "
            f"{r['budget_refusals']:.0f} |"
        )
    return "\n".join(lines)


async def main_async(opts: FleetOptions) -> str:
    rows = [await run_fleet(opts, shared=False), await run_fleet(opts, shared=True)]
    return render(opts, rows)
