"""`hedge serve --workers 2`: histograms, gauges and a worker that dies, as /metrics shows them.

test_workers.py shows that one counter sums over the workers. Here the other kinds, as prometheus-client's
multiprocess mode combines them (see hedge/workers.py):

* histograms add up bucket by bucket (each worker has its share; the rendered one has all);
* `hedge_inflight_requests` / `_attempts` are *live* sums: streams held open are counted once each,
  whichever worker holds them, and a worker that dies takes its own out of the sum;
* `hedge_circuit_state` is a *live* max: a breaker open in a dead worker must not stay "open" on the
  dashboard forever once the live workers' breakers have closed;
* counters and histograms of a dead worker stay (Prometheus would read a drop as a counter reset);
* the parent restarts a worker that dies after `RESTART_AFTER_S`, and the new one serves.

Real processes: the parent and its two workers (`python -m hedge serve`), simulated providers on
127.0.0.1. Which worker holds what is read from the per-process sample files in the metrics directory.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from hedge.simprovider import Behaviour
from hedge.workers import RESTART_AFTER_S

from ..conftest import chat, eventually, raw_config, sims
from .test_metrics import Exposition
from .test_shutdown import ServeProcess, serve

URL = "/v1/chat/completions"
N = 24  # streamed requests for the histograms
OK = Behaviour(tokens=3)
NEVER = Behaviour(ttft=60.0)  # no first token within the test: the request stays in flight
MAX_TRIES = 40  # bounded retries for "both workers got one" (kernel hash: 1/2 each time)


def per_process(metrics_dir: Path, pattern: str, name: str, **labels: str) -> dict[int, float]:
    """One sample's value in each process's own file (e.g. pattern "gauge_livesum_*.db").

    Values add up over the files of one process that the pattern matches: a metric lives in one file
    per process (its type and mode name the file), so a pattern matching two of a process's files
    (say "gauge_*max_*.db": gauge_max_<pid> holds hedge_hedge_budget_ratio, gauge_livemax_<pid> the
    breaker states) must not let the one globbed last stand for the process."""
    out: dict[int, float] = {}
    for i, f in enumerate(metrics_dir.glob(pattern)):
        pid = int(f.stem.rsplit("_", 1)[1])
        one = metrics_dir.parent / f"one-{os.getpid()}-{pid}-{i}-{f.stem}"
        one.mkdir()
        shutil.copy(f, one / f.name)
        reg = CollectorRegistry()
        MultiProcessCollector(reg, path=str(one))
        out[pid] = out.get(pid, 0.0) + sum(
            s.value
            for m in reg.collect()
            for s in m.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )
        shutil.rmtree(one)
    return out


async def scrape(http: aiohttp.ClientSession, gw: ServeProcess) -> Exposition:
    async with http.get(gw.url + "/metrics") as r:
        assert r.status == 200
        return Exposition(await r.text())


async def scrapes(http: aiohttp.ClientSession, gw: ServeProcess, n: int = 16) -> list[Exposition]:
    """n scrapes on n new connections: both workers answer some of them."""
    return [await scrape(http, gw) for _ in range(n)]


async def pid_of_a_new_connection(http: aiohttp.ClientSession, gw: ServeProcess) -> int:
    async with http.get(gw.url + "/healthz") as r:
        return int((await r.json())["pid"])


def buckets(m: Exposition, name: str, **labels: str) -> list[tuple[float, float]]:
    out = [(float(lab["le"]), v) for lab, v in m.series(name + "_bucket") if lab.items() >= labels.items()]
    return sorted(out)


def check_histogram(m: Exposition, name: str, count: int, **labels: str) -> None:
    """A whole histogram: cumulative buckets, +Inf = count = the expected number of observations."""
    bs = buckets(m, name, **labels)
    assert bs, name
    values = [v for _, v in bs]
    assert values == sorted(values), (name, bs)  # cumulative
    assert bs[-1] == (float("inf"), count)
    assert m(name + "_count", **labels) == count
    assert m(name + "_sum", **labels) > 0


async def test_two_workers_histograms_gauges_and_a_worker_that_dies(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    loop = asyncio.get_running_loop()
    async with sims(("a", OK), ("s", NEVER)) as ps:
        a, s = ps["a"], ps["s"]
        feedback = {"failure_threshold": 1, "base_backoff_s": 0.5, "max_backoff_s": 0.5}
        cfg = raw_config({"a": a.base_url, "s": s.base_url}, feedback=feedback)
        with serve(cfg, tmp_path, "--workers", "2", env={"TMPDIR": str(tmp)}) as gw:
            await gw.wait_listening(count=2)
            listening_at = loop.time()
            [metrics_dir] = tmp.glob("hedge-metrics-*")
            conn = aiohttp.TCPConnector(force_close=True, limit=0)  # a new connection per request
            async with aiohttp.ClientSession(connector=conn) as http:
                sent = 0

                async def call(model: str = "m/a") -> int:
                    nonlocal sent
                    sent += 1
                    async with http.post(gw.url + URL, json=chat(model)) as r:
                        await r.read()
                        return r.status

                # 1. histograms: N streamed answers, split over the workers, rendered as one
                assert [await call() for _ in range(N)] == [200] * N
                assert await eventually(lambda: len(a.records) == N)
                for _ in range(100):  # a worker counts a request just after its last byte left
                    ok = (await scrape(http, gw))("hedge_requests_total", route="m/a", code="200", api="chat")
                    if ok == N:
                        break
                    await asyncio.sleep(0.05)
                for m in await scrapes(http, gw):
                    check_histogram(m, "hedge_client_ttft_seconds", N, route="m/a")
                    check_histogram(m, "hedge_upstream_ttft_seconds", N, provider="a", model="up-a")
                    check_histogram(m, "hedge_upstream_duration_seconds", N, provider="a", model="up-a")
                ttft_by_pid = per_process(
                    metrics_dir, "histogram_*.db", "hedge_client_ttft_seconds_count", route="m/a"
                )
                assert len(ttft_by_pid) == 2 and all(v > 0 for v in ttft_by_pid.values()), ttft_by_pid
                assert sum(ttft_by_pid.values()) == N

                # 2. live-sum gauges: requests held in flight (s never answers), until both workers
                # hold at least one
                waiting: list[asyncio.Task[aiohttp.ClientResponse]] = []

                def inflight_by_pid() -> dict[int, float]:
                    return per_process(metrics_dir, "gauge_livesum_*.db", "hedge_inflight_requests")

                for _ in range(MAX_TRIES):
                    waiting.append(asyncio.ensure_future(http.post(gw.url + URL, json=chat("m/s"))))
                    sent += 1
                    assert await eventually(lambda: len(s.records) == len(waiting), timeout=10)
                    if await eventually(lambda: sum(inflight_by_pid().values()) == len(waiting)):
                        if len([v for v in inflight_by_pid().values() if v > 0]) == 2:
                            break
                held = len(waiting)
                by_pid = inflight_by_pid()
                assert sorted(by_pid.values()) != [0, held] and sum(by_pid.values()) == held, by_pid
                for m in await scrapes(http, gw):
                    assert m("hedge_inflight_requests") == held
                    assert m("hedge_inflight_attempts", provider="s") == held

                # 3. breakers: a fails and both workers' breakers for it open (threshold 1)
                a.behaviour = Behaviour(status=503)
                for _ in range(MAX_TRIES):
                    assert await call() in (502, 503)
                    failed = per_process(
                        metrics_dir, "counter_*.db", "hedge_attempts_total", provider="a", outcome="failed"
                    )
                    if len([v for v in failed.values() if v > 0]) == 2:
                        break

                # not closed (open, or half-open once the 0.5 s backoff has passed on a slow machine),
                # whichever worker answers; each wrote its own state into its file
                def states_by_pid() -> dict[int, float]:
                    return per_process(metrics_dir, "gauge_livemax_*.db", "hedge_circuit_state", provider="a")

                for m in await scrapes(http, gw):
                    assert m("hedge_circuit_state", provider="a", model="up-a") in (1, 2)
                # a worker writes its file only when it answers a scrape, and the kernel picks which
                # worker does: scrape on (bounded) until each has written since its failure
                for _ in range(MAX_TRIES):
                    states = states_by_pid()
                    if len(states) == 2 and all(v in (1, 2) for v in states.values()):
                        break
                    m = await scrape(http, gw)
                    assert m("hedge_circuit_state", provider="a", model="up-a") in (1, 2)

                # 4. one worker dies (SIGKILL: no goodbye) once it counts as serving, holding streams
                await asyncio.sleep(max(0.0, listening_at + RESTART_AFTER_S + 0.2 - loop.time()))
                victim = next(pid for pid, v in by_pid.items() if v > 0)
                lost, kept = int(by_pid[victim]), held - int(by_pid[victim])
                assert states.get(victim, 0) in (1, 2), states  # the victim's last word: not closed
                os.kill(victim, signal.SIGKILL)
                # its streams' upstream connections die with it (the provider sees them go)
                gone = lambda: sum(rec.disconnected_at is not None for rec in s.records) == lost  # noqa: E731
                assert await eventually(gone, timeout=10)
                # the parent marks it dead and starts another worker in its place
                survivor = next(pid for pid in by_pid if pid != victim)
                new: set[int] = set()
                for _ in range(400):
                    pid = await pid_of_a_new_connection(http, gw)
                    assert pid != victim
                    if pid != survivor:
                        new.add(pid)
                        break
                    await asyncio.sleep(0.05)
                assert new, gw.log()
                assert "restarting it" in gw.log()
                for m in await scrapes(http, gw):
                    assert m("hedge_inflight_requests") == kept  # the dead worker's share is gone
                    assert m("hedge_inflight_attempts", provider="s") == kept
                    # its counters and histograms stay: nothing looks like a counter reset
                    assert m("hedge_client_ttft_seconds_count", route="m/a") == N
                    assert m("hedge_upstream_ttft_seconds_count", provider="a", model="up-a") == N

                # 5. a recovers; after the backoff each live worker's probe closes its breaker (the new
                # worker never saw a failure). The dead worker's "open" must not linger in the max.
                a.behaviour = OK
                await asyncio.sleep(0.6)  # the workers' real clocks: past the 0.5 s backoff
                assert [await call() for _ in range(16)] == [200] * 16
                # each worker writes its breaker states when it answers a scrape: once both live
                # workers have, the max is 0, and stays 0
                state = [(await scrape(http, gw))("hedge_circuit_state", provider="a", model="up-a")]
                while state[-1] != 0 and len(state) < MAX_TRIES:
                    state.append((await scrape(http, gw))("hedge_circuit_state", provider="a", model="up-a"))
                assert state[-1] == 0, state
                for m in await scrapes(http, gw):
                    assert m("hedge_circuit_state", provider="a", model="up-a") == 0
                    total = sum(v for _, v in m.series("hedge_requests_total"))
                    # every request answered so far, the dead worker's included (held ones: not yet)
                    assert total == sent - held
                for t in waiting:
                    t.cancel()
                await asyncio.gather(*waiting, return_exceptions=True)

            gw.signal(signal.SIGTERM)
            assert await gw.wait_exit(timeout=20) == 0, gw.log()
        assert not metrics_dir.exists()
