"""The aiohttp upstream client (`server.upstream_client = "aiohttp"`) when the caller abandons a request.

The lean client's abort path is covered by test_e2e_race.py and the soak tests; this is the same promise
for the alternative client: when the caller hangs up, mid-race or mid-stream, every upstream connection
is closed (the provider sees the disconnect, and the connection is not parked in the pool with an unread
body), and no task or file descriptor outlives the requests. Real servers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any

import aiohttp

from hedge.aiohttp_client import AiohttpUpstream
from hedge.simprovider import Behaviour, RequestRecord, SimProvider

from ..conftest import chat, eventually, raw_config, run_proxy, sims
from ..system.test_soak import back_to_baseline, open_fds

URL = "/v1/chat/completions"
ROUNDS = 8
LONG_STREAM = Behaviour(ttft=0.0, token_gap=0.05, tokens=400)  # 20 s if nobody stopped it
NEVER = Behaviour(ttft=30.0)  # no first token within the test


def gone(rec: RequestRecord) -> Callable[[], bool]:
    return lambda: rec.disconnected_at is not None


def seen_by_all(providers: list[SimProvider], n: int) -> Callable[[], bool]:
    return lambda: all(len(p.records) == n for p in providers)


def aiohttp_config(providers: dict[str, str], fast: dict[str, Any] | None = None) -> dict[str, Any]:
    raw = raw_config(providers, fast=fast)
    raw["server"]["upstream_client"] = "aiohttp"
    return raw


async def test_abandoned_streams_close_their_upstream_connections() -> None:
    async with sims(("a", LONG_STREAM)) as ps:
        a = ps["a"]
        async with run_proxy(aiohttp_config({"a": a.base_url})) as px:
            up = px.proxy.upstream
            assert isinstance(up, AiohttpUpstream)
            async with aiohttp.ClientSession() as http:
                gc.collect()
                tasks0, fds0 = len(asyncio.all_tasks()), open_fds()
                for i in range(ROUNDS):
                    r = await http.post(px.url + URL, json=chat("m/a"))
                    assert r.status == 200
                    assert await r.content.readany()  # committed: the stream is flowing
                    assert up.busy_connections() == 1
                    r.close()  # the caller hangs up mid-stream
                    rec = a.records[i]
                    assert await eventually(gone(rec), timeout=5)
                    assert not rec.completed
                    # closed, not pooled: a connection with an unread body cannot be reused
                    assert await eventually(lambda: up.busy_connections() == 0 and up.pool_size() == 0)
                    assert await eventually(lambda: a.open_connections() == 0)
                assert await eventually(lambda: not px.proxy.tasks and px.proxy.inflight == 0)
                tasks, fds = await back_to_baseline(tasks0, fds0)
                assert tasks <= tasks0 and fds <= fds0, (tasks0, tasks, fds0, fds)
    assert a.requests_total == ROUNDS


async def test_abandoned_races_close_every_attempt() -> None:
    async with sims(("a", NEVER), ("b", NEVER)) as ps:
        raw = aiohttp_config({n: p.base_url for n, p in ps.items()}, fast={"default_delay_ms": 20})
        async with run_proxy(raw) as px:
            up = px.proxy.upstream
            async with aiohttp.ClientSession() as http:
                gc.collect()
                tasks0, fds0 = len(asyncio.all_tasks()), open_fds()
                for i in range(ROUNDS):
                    req = asyncio.ensure_future(http.post(px.url + URL, json=chat()))
                    # both attempts are waiting on their providers: the hedge went out
                    assert await eventually(seen_by_all(list(ps.values()), i + 1))
                    assert await eventually(lambda: up.busy_connections() == 2)
                    req.cancel()  # the caller hangs up before any token
                    for p in ps.values():
                        rec = p.records[i]
                        assert await eventually(gone(rec), timeout=5)
                    assert await eventually(lambda: up.busy_connections() == 0 and up.pool_size() == 0)
                    assert await eventually(lambda: not px.proxy.tasks and px.proxy.inflight == 0)
                tasks, fds = await back_to_baseline(tasks0, fds0)
                assert tasks <= tasks0 and fds <= fds0, (tasks0, tasks, fds0, fds)
            abandoned = px.proxy.metrics.attempts.labels("a", "up-a", "abandoned", "chat")._value.get()
    assert abandoned == ROUNDS
