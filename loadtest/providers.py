"""The provider runner: a scenario's simulated providers in their own process, plus a control endpoint.

    python -m loadtest.providers --scenario stalls --duration 30 --seed 1

Why a separate process: simulated providers burn CPU (every token is a timer and a write); sharing the
proxy's or the load client's event loop would distort exactly what we measure.

The runner prints one JSON line on stdout once everything listens::

    {"providers": {"alpha": "http://127.0.0.1:PORT/v1", ...}, "control": "http://127.0.0.1:PORT"}

Control endpoint (plain aiohttp, off the measured path):

* ``POST /start``: the measurement begins now; time-varying events (slowdowns, bursts, outages) are
  placed relative to this instant.  Before it, every provider runs its base profile (warm-up).
* ``GET /stats``: per provider ``requests_total``, ``disconnects_total``, ``completed_total`` and the
  same counts per load-test mode, taken from the ``user`` field the client tags each request with
  (``lt/<mode>/<seq>``): that is how upstream load per client request is attributed to a mode even
  when the proxy sits in between. ``?seqs=<mode>`` adds ``seqs``: per provider, upstream requests per
  sequence number of that mode (the extra load of a window of the run).

It exits on SIGTERM/SIGINT, when its stdin closes (the parent died), or after ``--max-lifetime``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from hedge.simprovider import Behaviour, RequestRecord, SimProvider

from .scenarios import ProviderPlan, Scenario, get, request_rng

MAX_TRACKED = 500_000  # records kept for per-mode disconnect counts; beyond this only arrivals count


def parse_tag(tag: Any) -> tuple[str, int] | None:
    """``"lt/<mode>/<seq>"`` -> (mode, seq); None for anything else."""
    if not isinstance(tag, str) or not tag.startswith("lt/"):
        return None
    _, mode, seq = [*tag.split("/", 2), "", ""][:3]
    if not mode or not seq.isdigit():
        return None
    return mode, int(seq)


@dataclass
class _ModeCounts:
    requests: int = 0
    records: list[RequestRecord] = field(default_factory=list)


class Runner:
    """The scenario's providers, their clock and their per-mode counters."""

    def __init__(
        self, scenario: Scenario, duration: float, seed: int, ports: list[int] | None = None
    ) -> None:
        self.scenario = scenario
        self.duration = duration
        self.seed = seed
        self.t0: float | None = None
        self.events: list[dict[str, Any]] = []
        self.by_mode: dict[str, dict[str, _ModeCounts]] = {}
        self._tracked = 0
        self._timeline: list[asyncio.Task[None]] = []
        self.providers: list[SimProvider] = []
        for i, plan in enumerate(scenario.providers):
            port = ports[i] if ports else 0
            self.by_mode[plan.name] = {}
            source: Any = plan.profile if scenario.name == "instant" else self._behaviour(i, plan)
            self.providers.append(
                SimProvider(plan.name, source, port=port, seed=seed + i, keep_records=False)
            )

    def elapsed(self) -> float | None:
        return None if self.t0 is None else time.monotonic() - self.t0

    def _behaviour(self, index: int, plan: ProviderPlan) -> Any:
        counts = self.by_mode[plan.name]
        nth_seen: dict[str, int] = {}

        def behaviour(record: RequestRecord) -> Behaviour:
            tag = record.body.get("user")
            parsed = parse_tag(tag)
            if parsed is None:
                mode, seq, nth = "untagged", 3_000_000_000 + record.index, 0
            else:
                mode, seq = parsed
                nth = nth_seen.get(tag, 0)
                nth_seen[tag] = nth + 1
            mc = counts.get(mode)
            if mc is None:
                mc = counts[mode] = _ModeCounts()
            mc.requests += 1
            if self._tracked < MAX_TRACKED:
                mc.records.append(record)
                self._tracked += 1
            return plan.behaviour(self.elapsed(), self.duration, request_rng(self.seed, index, seq, nth))

        return behaviour

    async def start_providers(self) -> None:
        for p in self.providers:
            await p.start()

    async def stop(self) -> None:
        for t in self._timeline:
            t.cancel()
        for p in self.providers:
            await p.stop()

    def begin(self) -> None:
        """The measurement starts now: set the clock and schedule the outages."""
        for t in self._timeline:
            t.cancel()
        self.t0 = time.monotonic()
        self.events.clear()
        for plan, prov in zip(self.scenario.providers, self.providers, strict=True):
            if plan.outage is not None:
                self._timeline.append(asyncio.ensure_future(self._outage(plan, prov)))

    async def _outage(self, plan: ProviderPlan, prov: SimProvider) -> None:
        assert plan.outage is not None and self.t0 is not None
        await asyncio.sleep(max(0.0, self.t0 + plan.outage.start * self.duration - time.monotonic()))
        await prov.refuse(drop_connections=True)
        self.events.append({"t": round(self.elapsed() or 0.0, 3), "provider": plan.name, "event": "down"})
        await asyncio.sleep(max(0.0, self.t0 + plan.outage.end * self.duration - time.monotonic()))
        await prov.resume()
        self.events.append({"t": round(self.elapsed() or 0.0, 3), "provider": plan.name, "event": "up"})

    def seqs(self, mode: str) -> dict[str, dict[int, int]]:
        """Per provider, upstream requests per client sequence number of `mode` (tracked records only):
        the extra load of a time window of that mode."""
        out: dict[str, dict[int, int]] = {}
        for p in self.providers:
            mc = self.by_mode[p.name].get(mode)
            counts: dict[int, int] = {}
            for r in mc.records if mc is not None else ():
                parsed = parse_tag(r.body.get("user"))
                if parsed is not None:
                    counts[parsed[1]] = counts.get(parsed[1], 0) + 1
            out[p.name] = counts
        return out

    def stats(self) -> dict[str, Any]:
        provs: dict[str, Any] = {}
        for p in self.providers:
            modes = {}
            for mode, mc in self.by_mode[p.name].items():
                modes[mode] = {
                    "requests": mc.requests,
                    "disconnected": sum(1 for r in mc.records if r.disconnected_at is not None),
                    "completed": sum(1 for r in mc.records if r.completed),
                }
            provs[p.name] = {
                "requests_total": p.requests_total,
                "disconnects_total": p.disconnects_total,
                "completed_total": p.completed_total,
                "by_mode": modes,
            }
        return {"elapsed": self.elapsed(), "providers": provs, "events": list(self.events)}


def _control_app(runner: Runner) -> web.Application:
    async def start(request: web.Request) -> web.Response:
        runner.begin()
        return web.json_response({"ok": True})

    async def stats(request: web.Request) -> web.Response:
        doc = runner.stats()
        mode = request.query.get("seqs")
        if mode:
            doc["seqs"] = runner.seqs(mode)
        return web.Response(
            body=orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS), content_type="application/json"
        )

    app = web.Application()
    app.router.add_post("/start", start)
    app.router.add_get("/stats", stats)
    return app


async def _stdin_closed() -> None:
    """Resolve when stdin reaches EOF: our parent (the load-test tool) is gone."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (OSError, ValueError):  # stdin is not a pipe (run by hand from a terminal): never fires
        await asyncio.Event().wait()
    while await reader.read(4096):
        pass


async def serve(args: argparse.Namespace) -> int:
    scenario = get(args.scenario)
    ports = [int(p) for p in args.ports.split(",")] if args.ports else None
    if ports is not None and len(ports) != len(scenario.providers):
        print(f"--ports needs {len(scenario.providers)} ports for {scenario.name}", file=sys.stderr)
        return 2
    runner = Runner(scenario, args.duration, args.seed, ports)
    ctl = web.AppRunner(_control_app(runner), access_log=None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watchers: list[asyncio.Task[Any]] = []
    try:
        await runner.start_providers()
        await ctl.setup()
        site = web.TCPSite(ctl, args.host, 0)
        await site.start()
        ctl_port = ctl.addresses[0][1]
        ready = {
            "providers": {p.name: p.base_url for p in runner.providers},
            "control": f"http://{args.host}:{ctl_port}",
            "pid": os.getpid(),
        }
        sys.stdout.write(orjson.dumps(ready).decode() + "\n")
        sys.stdout.flush()
        watchers = [
            asyncio.ensure_future(stop.wait()),
            asyncio.ensure_future(_stdin_closed()),
            asyncio.ensure_future(asyncio.sleep(args.max_lifetime)),
        ]
        await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in watchers:
            w.cancel()
        await runner.stop()
        await ctl.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.providers", description=__doc__.split("\n")[0])
    p.add_argument("--scenario", default="steady")
    p.add_argument("--duration", type=float, default=30.0, help="measured duration the timeline spans (s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--ports", help="comma-separated fixed ports, one per provider (default: ephemeral)")
    p.add_argument("--max-lifetime", type=float, default=3600.0, help="exit after this many seconds")
    args = p.parse_args(argv)
    import uvloop

    return uvloop.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
