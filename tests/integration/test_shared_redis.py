"""Shared state through a real Redis (issue 12): two proxy instances, simulated providers, 127.0.0.1.

Redis is Debian's `redis-server` (.ci/run installs it with .ci/apt-install.sh); each test starts its own on
a free loopback port with a temporary directory and no persistence. Locally the tests skip without the binary;
in CI (HEDGE_REQUIRE_REDIS=1) they must run.

The proxies are in-process; sync rounds are driven through `RedisShared.sync_once` (the loop's own step)
where a test is about *what* one round carries, so no assertion rests on a wall-clock margin. The
failure tests run the real background loops under load, and wait on conditions, not durations.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aredis
from prometheus_client.parser import text_string_to_metric_families

from hedge.health import BreakerState
from hedge.sharedredis import RedisShared
from hedge.simprovider import Behaviour, RequestRecord

from ..conftest import chat, eventually, raw_config, run_proxy, sims
from .test_shutdown import serve

REDIS = shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throw-away redis-server on 127.0.0.1; can be stopped and started again on the same port."""

    def __init__(self, tmp: Path, *extra: str, password: str | None = None) -> None:
        self.port = _free_port()
        self.dir = tmp
        self.extra = extra
        self.password = password
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        assert REDIS is not None
        log = (self.dir / "redis.log").open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.dir), "--enable-debug-command", "local", *self.extra,
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
        log.close()
        r = aredis.Redis.from_url(self.url, password=self.password)
        try:
            for _ in range(200):
                try:
                    if await r.ping():
                        return
                except (aredis.ConnectionError, OSError):
                    await asyncio.sleep(0.025)
            raise AssertionError("redis-server did not start: " + (self.dir / "redis.log").read_text())
        finally:
            await r.aclose()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)  # abrupt, like a crash: no goodbye to clients
            await self.proc.wait()
        self.proc = None


def need_redis() -> None:
    if REDIS is None:
        reason = "no `redis-server` on PATH (install it with .ci/apt-install.sh, see .ci/run)"
        if os.environ.get("HEDGE_REQUIRE_REDIS"):
            pytest.fail(reason + "; HEDGE_REQUIRE_REDIS is set")
        pytest.skip(reason)


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    need_redis()
    srv = RedisServer(tmp_path)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def shared_raw(ps: dict[str, Any], redis_url: str, **kw: Any) -> dict[str, Any]:
    shared = {"redis_url": redis_url, "key_prefix": "t:", **kw.pop("shared", {})}
    return {**raw_config({n: p.base_url for n, p in ps.items()}, **kw), "shared": shared}


def attach(px: Any, name: str) -> RedisShared:
    cfg = px.proxy.config.shared
    assert cfg is not None
    return RedisShared.for_proxy(cfg, px.proxy, instance_id=name)


async def post(http: aiohttp.ClientSession, url: str, pref: str | None = None, stream: bool = True) -> int:
    headers = {"X-GammaInfra-Preference": pref} if pref else {}
    timeout = aiohttp.ClientTimeout(total=20)  # a hang shows as a failure, not as a stuck suite
    body = chat(stream=stream)
    async with http.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout) as r:
        await r.read()
        return r.status


def cand(px: Any, provider: str) -> Any:
    [c] = {c.key: c for c in px.proxy.catalog.all_candidates() if c.provider.name == provider}.values()
    return c


# --------------------------------------------------------------------------------------------- tests


async def test_an_outage_hit_by_a_keeps_b_off_the_provider(
    redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with sims(("p1", Behaviour(status=503)), ("p2", Behaviour(ttft=0.01, tokens=2))) as ps:
        raw = shared_raw(
            ps, redis_server.url, fast={"strategy": "failover"},
            feedback={"failure_threshold": 3, "base_backoff_s": 30.0, "max_backoff_s": 30.0},
        )  # fmt: skip
        async with run_proxy(raw) as a, run_proxy(raw) as b:
            sa, sb = attach(a, "A"), attach(b, "B")
            try:
                assert await sa.sync_once() and await sb.sync_once()
                # A meets the outage: p1 answers 503, each request fails over to p2, the 3rd opens p1
                for _ in range(3):
                    assert await post(http, a.url) == 200
                now = a.proxy.clock()
                assert a.proxy.feedback.breaker(cand(a, "p1")).state(now) is BreakerState.OPEN
                assert b.proxy.feedback.breaker(cand(b, "p1")).state(now) is BreakerState.CLOSED

                # one sync interval: A's round publishes, B's round merges
                assert await sa.sync_once() and await sb.sync_once()
                assert b.proxy.feedback.breaker(cand(b, "p1")).state(b.proxy.clock()) is BreakerState.OPEN
                hits = ps["p1"].requests_total
                for stream in (True, False, True, False):  # both lanes: one breaker per provider
                    assert await post(http, b.url, stream=stream) == 200
                assert ps["p1"].requests_total == hits  # B's requests stayed off p1, from the first one
                text = await (await http.get(b.url + "/metrics")).text()
                assert 'hedge_circuit_state{model="up-p1",provider="p1"} 2.0' in text
            finally:
                await sa.close()
                await sb.close()


async def test_an_opening_is_published_at_once_not_at_the_next_tick(
    redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """A's loop runs with a 60 s interval: only the opening itself can make it publish within the
    test; B adopts the opening at its next round (one sync interval), before any further request."""
    async with sims(("p1", Behaviour(status=503)), ("p2", Behaviour(ttft=0.01, tokens=2))) as ps:
        raw = shared_raw(
            ps, redis_server.url, fast={"strategy": "failover"},
            feedback={"failure_threshold": 3, "base_backoff_s": 30.0, "max_backoff_s": 30.0},
            shared={"sync_interval_ms": 60_000, "forget_after_s": 600},
        )  # fmt: skip
        async with run_proxy(raw) as a, run_proxy(raw) as b:
            sa, sb = attach(a, "A"), attach(b, "B")
            sa.start()
            try:
                assert await eventually(lambda: sa.rounds == 1, timeout=5.0)
                for _ in range(3):
                    assert await post(http, a.url) == 200
                assert await eventually(lambda: sa.rounds == 2, timeout=5.0)  # woken by the opening
                assert await sb.sync_once()
                assert b.proxy.feedback.breaker(cand(b, "p1")).state(b.proxy.clock()) is BreakerState.OPEN
                hits = ps["p1"].requests_total
                assert await post(http, b.url) == 200
                assert ps["p1"].requests_total == hits
            finally:
                await sa.close()
                await sb.close()


async def test_a_slowdown_learned_from_as_traffic_reorders_b(
    redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    slow = {"p1": False}

    def p1(rec: RequestRecord) -> Behaviour:
        return Behaviour(ttft=0.3 if slow["p1"] else 0.01, tokens=2)

    async with sims(("p1", p1), ("p2", Behaviour(ttft=0.05, tokens=2))) as ps:
        # one attempt per request: every sample is an exact TTFT of the provider the request went to
        raw = shared_raw(ps, redis_server.url, fast={"max_attempts": 1})
        async with run_proxy(raw) as a, run_proxy(raw) as b:
            sa, sb = attach(a, "A"), attach(b, "B")
            plan = b.proxy.catalog.resolve("gammainfra/fast")
            try:
                # both instances learn both providers: p1 fast (10 ms), p2 slower (50 ms)
                for px in (a, b):
                    codes = await asyncio.gather(
                        *(post(http, px.url, pref) for pref in ["p1"] * 4 + ["p2"] * 4)
                    )
                    assert codes == [200] * 8
                assert await sa.sync_once() and await sb.sync_once()
                assert b.proxy.feedback.order(plan, b.proxy.clock())[0].provider.name == "p1"

                # p1 slows down to 300 ms; only A's traffic sees it
                slow["p1"] = True
                codes = await asyncio.gather(*(post(http, a.url, pref) for pref in ["p1"] * 10 + ["p2"] * 3))
                assert codes == [200] * 13
                # without a sync B knows nothing of it: p1 still leads there
                assert b.proxy.feedback.order(plan, b.proxy.clock())[0].provider.name == "p1"

                assert await sa.sync_once() and await sb.sync_once()
                order = b.proxy.feedback.order(plan, b.proxy.clock())
                assert order[0].provider.name == "p2"
                hits1, hits2 = ps["p1"].requests_total, ps["p2"].requests_total
                assert await post(http, b.url) == 200
                assert (ps["p1"].requests_total, ps["p2"].requests_total) == (hits1, hits2 + 1)
            finally:
                await sa.close()
                await sb.close()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def test_a_redis_that_stops_slows_or_restarts_never_fails_a_request(
    redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with sims(("p1", Behaviour(ttft=0.005, tokens=2)), ("p2", Behaviour(ttft=0.01, tokens=2))) as ps:
        raw = shared_raw(
            ps, redis_server.url,
            shared={"sync_interval_ms": 20, "timeout_ms": 150, "forget_after_s": 60},
        )  # fmt: skip
        async with run_proxy(raw) as a, run_proxy(raw) as b:
            sa, sb = attach(a, "A"), attach(b, "B")
            sa.start()
            sb.start()
            codes: dict[str, list[int]] = {"a": [], "b": []}
            stop = asyncio.Event()

            async def load(name: str, url: str) -> None:
                while not stop.is_set():
                    codes[name].append(await post(http, url, stream=len(codes[name]) % 3 != 0))

            loaders = [asyncio.create_task(load(n, px.url)) for n, px in (("a", a), ("b", b)) for _ in (0, 1)]
            try:
                assert await eventually(lambda: sa.peers == 1 and sb.peers == 1, timeout=10.0)

                # slow: Redis blocks for 1 s; every round in that time times out
                slow_client = aredis.Redis.from_url(redis_server.url)
                sleeper = asyncio.create_task(slow_client.execute_command("DEBUG", "SLEEP", "1"))
                assert await eventually(lambda: not sa.up and not sb.up, timeout=5.0)
                await sleeper
                await slow_client.aclose()
                text = await (await http.get(a.url + "/metrics")).text()
                assert metric(text, "hedge_shared_sync_errors_total", error="timeout") >= 1
                assert await eventually(lambda: sa.up and sb.up, timeout=10.0)

                # down: killed mid-load; both instances go on serving from their local state
                await redis_server.stop()
                assert await eventually(lambda: not sa.up and not sb.up, timeout=5.0)
                served = len(codes["a"]), len(codes["b"])
                assert await eventually(
                    lambda: len(codes["a"]) >= served[0] + 20 and len(codes["b"]) >= served[1] + 20,
                    timeout=20.0,
                )
                assert not sa.up and not sb.up  # all of that was served with Redis down
                text = await (await http.get(b.url + "/metrics")).text()
                assert metric(text, "hedge_shared_state_up") == 0.0
                assert metric(text, "hedge_shared_sync_errors_total", error="connection") >= 1
                assert metric(text, "hedge_shared_sync_lag_seconds") > 0.0

                # back: syncing resumes by itself (backoff <= 5 s), peers found again
                rounds = sa.rounds, sb.rounds
                await redis_server.start()
                assert await eventually(
                    lambda: sa.rounds > rounds[0] and sb.rounds > rounds[1] and sa.peers == sb.peers == 1,
                    timeout=20.0,
                )
                text = await (await http.get(a.url + "/metrics")).text()
                assert metric(text, "hedge_shared_state_up") == 1.0
                assert metric(text, "hedge_shared_peers") == 1.0
                # no credentials or URL in what /metrics says
                assert f"127.0.0.1:{redis_server.port}" not in text
            finally:
                stop.set()
                await asyncio.gather(*loaders)
                await sa.close()
                await sb.close()
    assert codes["a"] and codes["b"]
    assert set(codes["a"]) == {200} and set(codes["b"]) == {200}, "a request failed"


async def test_a_stopped_instance_is_forgotten(
    redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with sims(("p1", Behaviour(ttft=0.01, tokens=2)), ("p2", Behaviour(ttft=0.05, tokens=2))) as ps:
        raw = shared_raw(ps, redis_server.url, shared={"forget_after_s": 1.0, "sync_interval_ms": 100})
        async with run_proxy(raw) as a, run_proxy(raw) as b, run_proxy(raw) as c:
            sa, sb, sc = attach(a, "A"), attach(b, "B"), attach(c, "C")
            try:
                for _ in range(4):
                    assert await post(http, b.url, "p1") == 200
                    assert await post(http, c.url, "p2") == 200
                for s in (sb, sc, sa):
                    assert await s.sync_once()
                assert sa.peers == 2
                stats = a.proxy.feedback.stats
                assert stats(cand(a, "p1")).ttft.weight(a.proxy.clock()) > 3.5
                assert stats(cand(a, "p2")).ttft.weight(a.proxy.clock()) > 3.5

                await sb.close()  # a clean stop deletes its contribution: forgotten at the next round
                assert await sa.sync_once() and sa.peers == 1
                assert stats(cand(a, "p1")).ttft.weight(a.proxy.clock()) == 0.0

                # C vanishes without a goodbye (a crash): its key expires after forget_after_s
                assert sc._redis is not None
                await sc._redis.aclose()
                sc._redis = None

                async def forgotten() -> bool:
                    await sa.sync_once()
                    return sa.peers == 0

                for _ in range(100):
                    if await forgotten():
                        break
                    await asyncio.sleep(0.05)
                assert sa.peers == 0
                assert stats(cand(a, "p2")).ttft.weight(a.proxy.clock()) == 0.0
                r = aredis.Redis.from_url(redis_server.url)
                try:
                    assert await r.smembers("t:members") == {b"A"}
                finally:
                    await r.aclose()
            finally:
                await sa.close()
                await sc.close()


async def test_workers_share_through_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    """`hedge serve --workers 2` with [shared]: each worker is an instance with its own contribution."""
    async with sims(("a", Behaviour(tokens=2))) as ps:
        cfg = shared_raw(ps, redis_server.url, shared={"sync_interval_ms": 50})
        r = aredis.Redis.from_url(redis_server.url)
        try:
            with serve(cfg, tmp_path, "--workers", "2") as gw:
                await gw.wait_listening(count=2)

                async def members() -> set[bytes]:
                    return set(await r.smembers("t:members"))

                for _ in range(200):
                    if len(await members()) == 2:
                        break
                    await asyncio.sleep(0.05)
                ids = await members()
                assert len(ids) == 2, gw.log()
                pids = {i.decode().split(":")[1] for i in ids}
                assert len(pids) == 2  # two processes, two contributions
                gw.signal(signal.SIGTERM)
                assert await gw.wait_exit(30) == 0
            assert await members() == set()  # clean stops delete their contributions
        finally:
            await r.aclose()


async def test_the_password_comes_from_the_environment_and_never_shows(
    tmp_path: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    need_redis()
    secret = "s3cret-fleet-pw-123"
    srv = RedisServer(tmp_path, "--requirepass", secret, password=secret)
    await srv.start()
    try:
        async with sims(("p1", Behaviour(ttft=0.01, tokens=2))) as ps:
            monkeypatch.setenv("HEDGE_TEST_REDIS_PW", secret)
            monkeypatch.setenv("HEDGE_TEST_REDIS_BAD", "not-the-password")
            good = shared_raw(ps, srv.url, shared={"password_env": "HEDGE_TEST_REDIS_PW"})
            bad = shared_raw(ps, srv.url, shared={"password_env": "HEDGE_TEST_REDIS_BAD"})
            async with run_proxy(good) as a, run_proxy(bad) as b:
                sa, sb = attach(a, "A"), attach(b, "B")
                try:
                    assert await sa.sync_once()
                    assert not await sb.sync_once()  # wrong password: an error, not a crash
                    assert await post(http, b.url) == 200  # and B serves on
                    text = await (await http.get(b.url + "/metrics")).text()
                    assert metric(text, "hedge_shared_sync_errors_total", error="auth") == 1.0
                    assert metric(text, "hedge_shared_state_up") == 0.0
                    for where in (text, caplog.text):
                        assert secret not in where and "not-the-password" not in where
                finally:
                    await sa.close()
                    await sb.close()
    finally:
        await srv.stop()


async def test_the_fleet_load_scenario_runs_end_to_end() -> None:
    """`python -m loadtest fleet`, tiny: two instances sharing through a redis-server it starts itself."""
    need_redis()
    from loadtest.fleet import FleetOptions, render, run_fleet

    opts = FleetOptions(instances=2, rate=20.0, duration=1.5, warmup=0.5, window=0.5)
    row = await run_fleet(opts, shared=True)
    assert row["mode"] == "shared" and row["requests"] == 30 and row["failed"] == 0
    assert row["before_p50_ms"] > 0 and row["after_p99_ms"] >= row["after_p50_ms"]
    assert "| shared | 30 | 0 |" in render(opts, [row])


async def test_a_response_made_through_a_is_continued_and_read_through_b(
    redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """Responses API affinity is shared: after one sync, B sends a continuation of a response A created
    to its owning provider (though another would answer sooner), and B's GET of it reaches the owner."""
    async with sims(("p1", Behaviour(tokens=2)), ("p2", Behaviour(ttft=5.0, tokens=2))) as ps:
        raw = shared_raw(ps, redis_server.url)
        async with run_proxy(raw) as a, run_proxy(raw) as b:
            sa, sb = attach(a, "A"), attach(b, "B")
            timeout = aiohttp.ClientTimeout(total=20)
            try:
                body = {"model": "gammainfra/fast", "input": "hi", "stream": False}
                async with http.post(a.url + "/v1/responses", json=body, timeout=timeout) as r:
                    assert r.status == 200
                    rid = (await r.json())["id"]
                assert a.proxy.affinity.lookup(rid) == "p1" and b.proxy.affinity.lookup(rid) is None
                async with http.get(b.url + f"/v1/responses/{rid}", timeout=timeout) as r:
                    assert r.status == 404  # before the sync, B cannot know it
                # one sync interval: A's round publishes, B's round installs A's ids
                assert await sa.sync_once() and await sb.sync_once()
                assert b.proxy.affinity.lookup(rid) == "p1" and b.proxy.affinity.remote_size == 1
                # now p1 is the slow one: an unpinned request would go to p2, the continuation may not
                ps["p1"].behaviour = Behaviour(ttft=0.3, tokens=2)
                ps["p2"].behaviour = Behaviour(tokens=2)
                p2_before = len(ps["p2"].records)
                more = {**body, "input": "more", "previous_response_id": rid}
                async with http.post(b.url + "/v1/responses", json=more, timeout=timeout) as r:
                    assert r.status == 200
                    assert r.headers["X-GammaInfra-Endpoint"].endswith("@p1")
                    second = await r.json()
                assert second["previous_response_id"] == rid
                assert ps["p1"].records[-1].body["previous_response_id"] == rid
                assert len(ps["p2"].records) == p2_before  # never raced
                async with http.get(b.url + f"/v1/responses/{rid}", timeout=timeout) as r:
                    assert r.status == 200 and (await r.json())["id"] == rid
                # B's own new id is B's to publish, and A learns it at the next sync
                assert await sb.sync_once() and await sa.sync_once()
                assert a.proxy.affinity.lookup(second["id"]) == "p1"
            finally:
                await sa.close()
                await sb.close()
