"""`python -m loadtest overhead`: what the proxy costs per request, against baselines from the same run.

Upstream: one simulated provider with the ``instant`` profile (20-token streams, no delays), in its own
process.  Targets, measured in the same run and alternating in rounds so background noise on a shared
machine lands on all of them alike:

* ``direct``: the client straight to the provider (the floor every proxy adds to);
* ``baseline``: `loadtest.baseline_proxy`, the thinnest aiohttp pass-through (the yardstick);
* ``hedge``: ``hedge serve`` on a pinned model with one provider (so the request path runs, no hedging).

Phases: a latency phase at ``--concurrency`` (1: nothing queues, so the added TTFT is the proxy's own
time) and a throughput phase at ``--throughput-concurrency``.  For each proxy process we read
utime+stime from /proc/<pid>/stat around every measured segment (CPU ms per request) and VmHWM from
/proc/<pid>/status (peak RSS).  The load client runs in this process, apart from the proxies, and uses
the lean protocol client in `loadtest.client`; its own CPU per request is reported too, to show it is
not the bottleneck.

The targets (issue 4; README "Load test and overhead benchmark") are checked and printed as PASS/FAIL;
a FAIL does not change the exit status, since a benchmark on a shared 2-core machine is evidence, not a gate.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from . import report
from .client import Client, Target
from .procs import (
    Children,
    cpu_seconds,
    free_port,
    read_ready_line,
    self_cpu_seconds,
    status_kb,
    wait_http,
)
from .run import FAST_MODEL, PINNED_MODEL, RESULTS_DIR, UPSTREAM_MODEL, child_env, proxy_config

TARGETS = ("direct", "baseline", "hedge", "fast")
PROXIES = ("baseline", "hedge", "fast")  # fast: hedge on gammainfra/fast (one provider: no hedges fire)
MODELS = {"hedge": PINNED_MODEL, "fast": FAST_MODEL}
CPU_RATIO_TARGET = 1.5
ADDED_P50_TARGET_MS = 1.0
ADDED_P99_TARGET_MS = 5.0


@dataclass
class BenchOptions:
    concurrency: int = 1
    requests: int = 2000
    throughput_concurrency: int = 32
    throughput_requests: int = 6000
    warmup: int = 300
    rounds: int = 8
    repeat: int = 1
    targets: tuple[str, ...] = TARGETS
    out: Path | None = None
    argv: list[str] = field(default_factory=list)


@dataclass
class _Acc:
    """Accumulated figures of one target in one phase, over its rounds."""

    ttfts: list[float] = field(default_factory=list)
    totals: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    wall: float = 0.0
    proxy_cpu: float = 0.0
    provider_cpu: float = 0.0
    client_cpu: float = 0.0


async def _segment(
    client: Client, target: Target, body: bytes, n: int, concurrency: int, acc: _Acc | None
) -> None:
    """Send `n` requests with `concurrency` in flight; add to `acc` (None = warm-up)."""
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            ex = await client.fetch(target, body, time_limit=10.0)
            if acc is None:
                continue
            if ex.error is None and ex.ttft is not None and ex.total is not None:
                acc.ttfts.append(ex.ttft)
                acc.totals.append(ex.total)
            else:
                key = ex.error or "failed"
                acc.errors[key] = acc.errors.get(key, 0) + 1

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, n)))))


class _Bench:
    def __init__(
        self,
        client: Client,
        targets: dict[str, Target],
        bodies: dict[str, bytes],
        pids: dict[str, int],
        provider_pid: int,
    ) -> None:
        self.client = client
        self.targets = targets
        self.bodies = bodies
        self.pids = pids
        self.provider_pid = provider_pid

    async def phase(self, names: tuple[str, ...], n: int, concurrency: int, rounds: int) -> dict[str, _Acc]:
        """Run the phase in rounds, rotating the target order each round.

        A proxy's CPU is read once at the start and once at the end of the whole phase (it idles while
        the other targets run), so /proc's 10 ms clock-tick quantisation costs one tick per phase, not
        one per segment."""
        accs = {t: _Acc() for t in names}
        per_round = [n // rounds + (1 if i < n % rounds else 0) for i in range(rounds)]
        cpu0 = {t: cpu_seconds(pid) for t, pid in self.pids.items() if t in accs}
        for r, k in enumerate(per_round):
            order = names[r % len(names) :] + names[: r % len(names)]
            for t in order:
                acc = accs[t]
                p0 = cpu_seconds(self.provider_pid)
                s0 = self_cpu_seconds()
                w0 = time.perf_counter()
                await _segment(self.client, self.targets[t], self.bodies[t], k, concurrency, acc)
                acc.wall += time.perf_counter() - w0
                acc.client_cpu += self_cpu_seconds() - s0
                acc.provider_cpu += cpu_seconds(self.provider_pid) - p0
                acc.requests += k
        for t, c0 in cpu0.items():
            accs[t].proxy_cpu = cpu_seconds(self.pids[t]) - c0
        return accs


def _phase_summary(acc: _Acc, has_proxy: bool) -> dict[str, Any]:
    ok = len(acc.ttfts)
    n = acc.requests
    return {
        "requests": n,
        "ok": ok,
        "errors": dict(acc.errors),
        "ttft": report.distribution(acc.ttfts),
        "total": report.distribution(acc.totals),
        "wall_s": round(acc.wall, 4),
        "throughput_rps": round(n / acc.wall, 1) if acc.wall else None,
        "proxy_cpu_ms_per_req": round(acc.proxy_cpu * 1000 / n, 4) if has_proxy and n else None,
        "provider_cpu_ms_per_req": round(acc.provider_cpu * 1000 / n, 4) if n else None,
        "client_cpu_ms_per_req": round(acc.client_cpu * 1000 / n, 4) if n else None,
    }


def _derive(lat: dict[str, Any], thr: dict[str, Any]) -> dict[str, Any]:
    """Ratios against the same-run baselines and the target checks."""
    d: dict[str, Any] = {"added_ttft_ms": {}, "cpu_ratio_vs_baseline": {}, "throughput_ratio_vs_baseline": {}}
    direct = lat.get("direct")
    for t in PROXIES:
        if t in lat and direct:
            d["added_ttft_ms"][t] = {
                k: _sub(lat[t]["ttft"][f"{k}_ms"], direct["ttft"][f"{k}_ms"]) for k in ("p50", "p90", "p99")
            }
    if "hedge" in lat and "baseline" in lat:
        d["cpu_ratio_vs_baseline"]["latency_phase"] = _r(
            lat["hedge"]["proxy_cpu_ms_per_req"], lat["baseline"]["proxy_cpu_ms_per_req"]
        )
    if "hedge" in thr and "baseline" in thr:
        d["cpu_ratio_vs_baseline"]["throughput_phase"] = _r(
            thr["hedge"]["proxy_cpu_ms_per_req"], thr["baseline"]["proxy_cpu_ms_per_req"]
        )
        d["throughput_ratio_vs_baseline"] = _r(
            thr["hedge"]["throughput_rps"], thr["baseline"]["throughput_rps"]
        )
    checks = []
    for phase in ("throughput_phase", "latency_phase"):
        ratio = d["cpu_ratio_vs_baseline"].get(phase)
        if ratio is not None:
            checks.append(
                {
                    "name": f"hedge CPU/request within {CPU_RATIO_TARGET}x of the bare pass-through "
                    f"({phase.replace('_', ' ')})",
                    "value": ratio,
                    "target": f"<= {CPU_RATIO_TARGET}",
                    "pass": ratio <= CPU_RATIO_TARGET,
                }
            )
    added = d["added_ttft_ms"].get("hedge")
    if added:
        for k, lim in (("p50", ADDED_P50_TARGET_MS), ("p99", ADDED_P99_TARGET_MS)):
            v = added[k]
            if v is not None:
                checks.append(
                    {
                        "name": f"hedge added TTFT {k} at concurrency {lat['hedge'].get('concurrency')}",
                        "value": v,
                        "target": f"< {lim} ms",
                        "pass": v < lim,
                    }
                )
    d["checks"] = checks
    return d


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def _r(a: float | None, b: float | None) -> float | None:
    x = report.ratio(a, b)
    return None if x is None else round(x, 3)


def render_pass(p: dict[str, Any], opts: BenchOptions) -> str:
    lat, thr, d = p["latency"], p["throughput"], p["derived"]
    lines = [
        f"latency phase: concurrency {opts.concurrency}, {opts.requests} requests per target "
        f"in {opts.rounds} alternating rounds (ms)"
    ]
    table = [
        ["target", "ok", "errors", "ttft p50", "ttft p90", "ttft p99", "added p50", "added p99",
         "total p50", "total p99", "proxy CPU ms/req", "client CPU ms/req"],
    ]  # fmt: skip
    for t, s in lat.items():
        added = d["added_ttft_ms"].get(t, {})
        table.append(
            [
                t, str(s["ok"]), str(sum(s["errors"].values())),
                _f(s["ttft"]["p50_ms"]), _f(s["ttft"]["p90_ms"]), _f(s["ttft"]["p99_ms"]),
                _f(added.get("p50"), signed=True), _f(added.get("p99"), signed=True),
                _f(s["total"]["p50_ms"]), _f(s["total"]["p99_ms"]),
                _f(s["proxy_cpu_ms_per_req"]), _f(s["client_cpu_ms_per_req"]),
            ]
        )  # fmt: skip
    lines.append(report.render(table))
    lines.append("")
    lines.append(
        f"throughput phase: concurrency {opts.throughput_concurrency}, "
        f"{opts.throughput_requests} requests per target"
    )
    table = [["target", "req/s", "vs baseline", "proxy CPU ms/req", "vs baseline", "provider CPU ms/req",
              "client CPU ms/req", "errors"]]  # fmt: skip
    b = thr.get("baseline")
    for t, s in thr.items():
        table.append(
            [
                t, _f(s["throughput_rps"]),
                _x(report.ratio(s["throughput_rps"], b["throughput_rps"])) if b and t != "direct" else "",
                _f(s["proxy_cpu_ms_per_req"]),
                _x(report.ratio(s["proxy_cpu_ms_per_req"], b["proxy_cpu_ms_per_req"]))
                if b and t in PROXIES else "",
                _f(s["provider_cpu_ms_per_req"]), _f(s["client_cpu_ms_per_req"]),
                str(sum(s["errors"].values())),
            ]
        )  # fmt: skip
    lines.append(report.render(table))
    lines.append(
        "(client, provider and proxy share this machine's cores: req/s is bounded by their summed CPU per "
        "request, so CPU ms/req is the figure that isolates the proxy)"
    )
    return "\n".join(lines)


def _f(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    s = f"{v:+.3f}" if signed else f"{v:.3f}"
    return s if abs(v) < 100 else (f"{v:+.0f}" if signed else f"{v:.0f}")


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def render_checks(checks: list[dict[str, Any]]) -> str:
    out = []
    for c in checks:
        v = c["value"]
        shown = f"{v:.2f}x" if "CPU" in c["name"] else f"{v:+.3f} ms"
        out.append(f"  {'PASS' if c['pass'] else 'FAIL'}  {c['name']}: {shown} (target {c['target']})")
    return "\n".join(out)


async def overhead(opts: BenchOptions) -> dict[str, Any]:
    out = opts.out or RESULTS_DIR / f"overhead-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    env = child_env()
    children = Children()
    client = Client()
    passes: list[dict[str, Any]] = []
    rss: dict[str, Any] = {}
    try:
        prov_log = out / "provider.log"
        prov = children.spawn(
            "provider", ["-m", "loadtest.providers", "--scenario", "instant", "--max-lifetime", "7200"],
            log_path=prov_log, stdout_pipe=True, env=env,
        )  # fmt: skip
        ready = orjson.loads(await read_ready_line(prov, 20.0, prov_log))
        up_url = ready["providers"]["up"]
        targets: dict[str, Target] = {"direct": Target(up_url)}
        pids: dict[str, int] = {}
        if "baseline" in opts.targets:
            port = free_port()
            log = out / "baseline.log"
            bp = children.spawn(
                "baseline", ["-m", "loadtest.baseline_proxy", "--upstream", up_url, "--port", str(port)],
                log_path=log, env=env,
            )  # fmt: skip
            await wait_http(f"http://127.0.0.1:{port}/healthz", bp, within=20.0, log=log)
            targets["baseline"] = Target(f"http://127.0.0.1:{port}")
            pids["baseline"] = bp.pid
        for t in ("hedge", "fast"):  # two hedge processes: a pinned model, and the fast lane's race
            if t not in opts.targets:
                continue
            port = free_port()
            cfg = out / f"{t}.toml"
            cfg.write_text(proxy_config({"up": up_url}, port=port))
            log = out / f"{t}.log"
            hp = children.spawn(
                t, ["-m", "hedge", "serve", "--config", str(cfg), "--port", str(port)],
                log_path=log, env=env,
            )  # fmt: skip
            await wait_http(f"http://127.0.0.1:{port}/healthz", hp, within=20.0, log=log)
            targets[t] = Target(f"http://127.0.0.1:{port}")
            pids[t] = hp.pid
        names = tuple(t for t in TARGETS if t in opts.targets and t in targets)
        msg = [{"role": "user", "content": "Say something short."}]
        bodies = {
            t: orjson.dumps({"model": MODELS.get(t, UPSTREAM_MODEL), "stream": True, "messages": msg})
            for t in names
        }
        bench = _Bench(client, {t: targets[t] for t in names}, bodies, pids, ready["pid"])
        for rep in range(opts.repeat):
            print(f"overhead pass {rep + 1}/{opts.repeat}: warm-up ...", flush=True)
            for t in names:
                await _segment(client, targets[t], bodies[t], opts.warmup, opts.throughput_concurrency, None)
            print("  latency phase ...", flush=True)
            lat_acc = await bench.phase(names, opts.requests, opts.concurrency, opts.rounds)
            print("  throughput phase ...", flush=True)
            thr_acc = await bench.phase(
                names, opts.throughput_requests, opts.throughput_concurrency, max(1, opts.rounds // 2)
            )
            lat = {
                t: {**_phase_summary(a, t in pids), "concurrency": opts.concurrency}
                for t, a in lat_acc.items()
            }
            thr = {
                t: {**_phase_summary(a, t in pids), "concurrency": opts.throughput_concurrency}
                for t, a in thr_acc.items()
            }
            p = {"latency": lat, "throughput": thr, "derived": _derive(lat, thr)}
            passes.append(p)
            print()
            print(render_pass(p, opts))
            print("checks:")
            print(render_checks(p["derived"]["checks"]))
            base_added = p["derived"]["added_ttft_ms"].get("baseline")
            if base_added:
                print(
                    f"  (for scale, the bare pass-through in the same pass: added TTFT p50 "
                    f"{_f(base_added['p50'], signed=True)} ms, p99 {_f(base_added['p99'], signed=True)} ms; "
                    "p99 at concurrency 1 mostly measures scheduler noise on a shared machine)"
                )
            print()
        rss = {
            t: {"peak_rss_mb": _mb(status_kb(pid, "VmHWM")), "rss_mb": _mb(status_kb(pid, "VmRSS"))}
            for t, pid in pids.items()
        }
    finally:
        client.close()
        children.close()

    doc = {
        "tool": "python -m loadtest overhead",
        "command": opts.argv,
        "started_at": dt.datetime.now().isoformat(timespec="seconds"),
        "upstream": "simulated provider, instant profile: 20 content chunks, zero latency, own process",
        "options": {
            "concurrency": opts.concurrency, "requests": opts.requests,
            "throughput_concurrency": opts.throughput_concurrency,
            "throughput_requests": opts.throughput_requests, "warmup": opts.warmup,
            "rounds": opts.rounds, "repeat": opts.repeat, "targets": list(opts.targets),
        },
        "memory": rss,
        "passes": passes,
        "spread": _spread(passes),
        "targets": {
            "cpu_ratio_max": CPU_RATIO_TARGET,
            "added_ttft_p50_ms_max": ADDED_P50_TARGET_MS,
            "added_ttft_p99_ms_max": ADDED_P99_TARGET_MS,
        },
    }  # fmt: skip
    if rss:
        base = rss.get("baseline", {}).get("peak_rss_mb")
        parts = [f"{t} {v['peak_rss_mb']} MB" for t, v in rss.items()]
        ratio = report.ratio(rss.get("hedge", {}).get("peak_rss_mb"), base)
        print("peak RSS (VmHWM): " + ", ".join(parts) + (f" (hedge {ratio:.2f}x baseline)" if ratio else ""))
    if len(passes) > 1:
        print(render_spread(doc["spread"]))
    path = out / "overhead.json"
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    print(f"JSON: {path}")
    return doc


def _mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


_SPREAD_KEYS = {
    "hedge CPU ratio (throughput)": ("derived", "cpu_ratio_vs_baseline", "throughput_phase"),
    "hedge CPU ratio (latency)": ("derived", "cpu_ratio_vs_baseline", "latency_phase"),
    "hedge added TTFT p50 ms": ("derived", "added_ttft_ms", "hedge", "p50"),
    "hedge added TTFT p99 ms": ("derived", "added_ttft_ms", "hedge", "p99"),
    "baseline added TTFT p50 ms": ("derived", "added_ttft_ms", "baseline", "p50"),
    "hedge CPU ms/req (throughput)": ("throughput", "hedge", "proxy_cpu_ms_per_req"),
    "baseline CPU ms/req (throughput)": ("throughput", "baseline", "proxy_cpu_ms_per_req"),
    "hedge req/s": ("throughput", "hedge", "throughput_rps"),
    "baseline req/s": ("throughput", "baseline", "throughput_rps"),
}


def _dig(d: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _spread(passes: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for name, path in _SPREAD_KEYS.items():
        vals = [v for v in (_dig(p, path) for p in passes) if isinstance(v, int | float)]
        if vals:
            out[name] = {**report.spread(vals), "values": vals}
    return out


def render_spread(spread: dict[str, Any]) -> str:
    table = [["figure", "min", "median", "max"]]
    for name, s in spread.items():
        table.append([name, _f(s["min"]), _f(s["median"]), _f(s["max"])])
    return f"spread over {len(next(iter(spread.values()))['values'])} passes:\n" + report.render(table)
