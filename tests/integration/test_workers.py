"""`hedge serve --workers 2` (issue 6): two processes on one port, one set of metrics.

Every request opens a new connection (the kernel's SO_REUSEPORT hash spreads connections, not requests),
so both workers get a share; each answers `/metrics` with the sum over both, which the test checks
against the per-process sample files in the metrics directory the parent created (and must remove).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from hedge.simprovider import Behaviour

from ..conftest import chat, raw_config, sims
from .test_shutdown import serve

N = 40


def requests_total(text: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "hedge_requests_total":
                total += s.value
    return total


def per_process_requests(metrics_dir: Path) -> dict[int, float]:
    """hedge_requests_total from each worker's own counter file (counter_<pid>.db)."""
    out: dict[int, float] = {}
    for f in metrics_dir.glob("counter_*.db"):
        pid = int(f.stem.split("_")[1])
        one = metrics_dir.parent / f"one-{pid}"
        one.mkdir()
        shutil.copy(f, one / f.name)
        reg = CollectorRegistry()
        MultiProcessCollector(reg, path=str(one))
        out[pid] = sum(s.value for m in reg.collect() for s in m.samples if s.name == "hedge_requests_total")
    return out


async def test_two_workers_share_the_port_and_the_metrics(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    async with sims(("a", Behaviour(tokens=3))) as ps:
        ps["a"].keep_records = False
        cfg = raw_config({"a": ps["a"].base_url})
        with serve(cfg, tmp_path, "--workers", "2", env={"TMPDIR": str(tmp)}) as gw:
            await gw.wait_listening(count=2)
            [metrics_dir] = tmp.glob("hedge-metrics-*")  # the parent's fresh multiprocess directory

            # a new connection per request, so the kernel balances them over the workers
            conn = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=conn) as http:

                async def one(i: int) -> None:
                    body = chat("m/a", stream=i % 2 == 0)
                    async with http.post(gw.url + "/v1/chat/completions", json=body) as r:
                        assert r.status == 200, await r.text()
                        await r.read()

                for k in range(0, N, 8):
                    await asyncio.gather(*(one(i) for i in range(k, min(N, k + 8))))

                # a worker counts a request just after its last byte left: let the counters catch up
                for _ in range(100):
                    async with http.get(gw.url + "/metrics") as r:
                        if requests_total(await r.text()) == N:
                            break
                    await asyncio.sleep(0.05)
                pids: set[int] = set()
                totals: list[float] = []
                for _ in range(24):
                    async with http.get(gw.url + "/healthz") as r:
                        pids.add((await r.json())["pid"])
                    async with http.get(gw.url + "/metrics") as r:
                        assert r.status == 200
                        totals.append(requests_total(await r.text()))
            assert len(pids) == 2, pids  # both workers answer on the shared port
            assert totals == [N] * len(totals)  # whichever worker answers, it counts all N

            per_pid = per_process_requests(metrics_dir)
            assert set(per_pid) == pids, (per_pid, pids)
            assert sum(per_pid.values()) == N
            assert all(v > 0 for v in per_pid.values()), per_pid  # both served chat requests

            gw.signal(signal.SIGTERM)
            assert await gw.wait_exit(timeout=20) == 0, gw.log()
        assert not metrics_dir.exists()  # the parent removed its temporary directory
        assert ps["a"].requests_total == N


async def test_workers_stop_when_one_cannot_start(tmp_path: Path) -> None:
    """A start-up failure (the port is taken by a socket without SO_REUSEPORT) stops the group with a
    non-zero exit instead of leaving half a gateway running."""
    import socket

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        async with sims(("a", Behaviour())) as ps:
            cfg = raw_config({"a": ps["a"].base_url})
            # the later --port wins over the free one ServeProcess passes
            with serve(cfg, tmp_path, "--workers", "2", "--port", str(port)) as gw:
                assert await gw.wait_exit(timeout=30) == 1, gw.log()
    finally:
        blocker.close()
