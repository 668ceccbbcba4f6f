"""Shared state, the I/O edge: a background task syncs `SharedSync` through Redis (redis-py asyncio).

Every ``sync_interval_ms`` one round runs, never on the request path:

1. one pipeline: ``SET {prefix}i:{id} <contribution> PX forget_after``, ``SADD {prefix}members {id}``,
   ``PEXPIRE {prefix}members forget_after``, ``SMEMBERS {prefix}members``;
2. ``MGET`` of the peers' keys; members whose key has expired are ``SREM``-ed (they stopped);
3. the peers' contributions are merged and installed (`SharedSync.absorb`).

A breaker opening here wakes the loop at once (`CircuitBreaker.on_open`), so peers can adopt it at their
next round: an outage is shared within one sync interval, not two.

So Redis holds one key per live instance (its contribution, JSON, about 2 KB per candidate)
plus the members set; a stopped instance's key expires after ``forget_after_s`` (Redis's own clock, so
no host's clock decides it), and an instance that stops cleanly deletes its key at once.

**A faulty Redis never hurts a caller.** Requests only ever read in-memory statistics; a round is
bounded by ``timeout_ms``; a failed round leaves the last merged picture in place (it decays like any
evidence), retries with exponential backoff and jitter (up to `MAX_BACKOFF_S`), and after
``forget_after_s`` without a successful round the peers' contribution is dropped: the instance runs on
its local state alone. Redis comes back: the next round re-publishes and syncing resumes. `/metrics`
says so (`SharedMetrics`). Errors are reported by class only; the URL and password are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from .catalog import Candidate
from .config import SharedConfig
from .feedback import Feedback
from .shared import SharedSync

if TYPE_CHECKING:
    from .affinity import AffinityMap
    from .proxy import Proxy

log = logging.getLogger("hedge.shared")

MAX_BACKOFF_S = 5.0
"""Longest wait between two attempts while Redis fails (exponential from the sync interval, jittered)."""

KICK_GAP_S = 0.1
"""A breaker opening wakes the sync loop early, but rounds start at least this far apart."""

ERROR_CLASSES = ("timeout", "auth", "connection", "response", "redis", "bad_data", "mismatch", "other")
"""The `error` label's values: a fixed set, so a failure can never mint a new series."""


def error_class(e: BaseException) -> str:
    """Map an exception from a round to one of `ERROR_CLASSES` (typed errors mapped once, here)."""
    from redis import exceptions as rx

    if isinstance(e, TimeoutError | rx.TimeoutError):
        return "timeout"
    if isinstance(e, rx.AuthenticationError | rx.AuthorizationError):
        return "auth"
    if isinstance(e, rx.ConnectionError | OSError):
        return "connection"
    if isinstance(e, rx.ResponseError):
        return "response"
    if isinstance(e, rx.RedisError):
        return "redis"
    return "other"


class SharedMetrics:
    """The shared-state series, registered only when ``[shared]`` is configured.

    - shared_state_up: 1 while the latest sync round succeeded, 0 while Redis is down, slow or refusing
    - shared_sync_lag_seconds: time since the last successful round (the age of the merged picture)
    - shared_peers: peer contributions merged in the last successful round
    - shared_syncs_total: successful rounds (syncs per second = its rate)
    - shared_sync_errors_total {error}: failed rounds and skipped peer documents, by `ERROR_CLASSES`
    - shared_last_error_timestamp_seconds {error}: wall time of the latest error of each class
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.up = Gauge(
            "hedge_shared_state_up", "1 while the latest shared-state sync with Redis succeeded",
            registry=r, multiprocess_mode="livemin",
        )  # fmt: skip
        self.lag = Gauge(
            "hedge_shared_sync_lag_seconds", "Seconds since the last successful shared-state sync",
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.peers = Gauge(
            "hedge_shared_peers", "Peer instances merged in the last successful sync",
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.syncs = Counter("hedge_shared_syncs", "Successful shared-state sync rounds", registry=r)
        self.errors = Counter(
            "hedge_shared_sync_errors", "Failed sync rounds and skipped peer documents, by class",
            ("error",), registry=r,
        )  # fmt: skip
        self.last_error = Gauge(
            "hedge_shared_last_error_timestamp_seconds", "Wall time of the latest shared-state error",
            ("error",), registry=r, multiprocess_mode="max",
        )  # fmt: skip


def new_instance_id() -> str:
    """host:pid:random: unique per process, readable in redis-cli."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


class RedisShared:
    """Runs `SharedSync` against Redis on a timer. `start` never waits for Redis; `close` is bounded."""

    def __init__(
        self,
        cfg: SharedConfig,
        lanes: Mapping[str, Feedback],
        candidates: Sequence[Candidate],
        registry: CollectorRegistry,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        instance_id: str | None = None,
        affinity: AffinityMap[str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.wall = wall
        self.instance_id = instance_id or new_instance_id()
        self.sync = SharedSync(
            lanes, candidates, self.instance_id, clock=clock, wall=wall, affinity=affinity,
            affinity_window_s=cfg.forget_after_s,
        )  # fmt: skip
        self.metrics = SharedMetrics(registry)
        self.interval = cfg.sync_interval_ms / 1000
        self.timeout = cfg.timeout_ms / 1000
        self._ttl_ms = int(cfg.forget_after_s * 1000)
        self._members = cfg.key_prefix + "members"
        self._key_prefix = cfg.key_prefix + "i:"
        self._redis: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._kick = asyncio.Event()  # a local breaker opened: publish now, not at the next tick
        for fb in self.sync.lanes.values():
            for c in self.sync.candidates.values():
                fb.breaker(c).on_open = self._kick.set
        self._started = clock()
        self._last_ok: float | None = None
        self._up = False
        self._forgotten = True  # no peer contribution installed
        self.failures = 0  # consecutive failed rounds
        self.rounds = 0  # successful rounds
        self.peers = 0

    @classmethod
    def for_proxy(cls, cfg: SharedConfig, proxy: Proxy, **kw: Any) -> RedisShared:
        """Share `proxy`'s two feedback lanes, for every candidate of its catalog, on its clock."""
        return cls(
            cfg,
            {"stream": proxy.lane(True), "json": proxy.lane(False)},
            proxy.catalog.all_candidates(),
            proxy.metrics.registry,
            clock=proxy.clock,
            affinity=proxy.affinity,
            **kw,
        )

    # -------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the background sync task (returns at once; the first round runs on the loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="hedge-shared-sync")

    async def close(self) -> None:
        """Stop syncing; delete our contribution so peers forget it now (best effort, bounded)."""
        task, self._task = self._task, None
        self._stop.set()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._redis is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout):
                    pipe = self._redis.pipeline(transaction=False)
                    pipe.delete(self._key_prefix + self.instance_id)
                    pipe.srem(self._members, self.instance_id)
                    await pipe.execute()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout):
                    await self._redis.aclose()
            self._redis = None

    def _client(self) -> Any:
        if self._redis is None:
            import redis.asyncio as aredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            self._redis = aredis.Redis.from_url(
                self.cfg.redis_url,
                password=self.cfg.password(),
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 0),  # our loop retries, with backoff, off the request path
                health_check_interval=0,
                max_connections=4,
            )
        return self._redis

    # ------------------------------------------------------------------------------------ rounds

    async def _run(self) -> None:
        while not self._stop.is_set():
            started = self.clock()
            ok = await self.sync_once()
            if ok:
                delay = self.interval
            else:
                backoff = min(MAX_BACKOFF_S, self.interval * 2.0 ** min(self.failures, 16))
                delay = backoff * random.uniform(0.5, 1.0)
            # an Event, not a bare sleep: `close` ends the wait even if a cancellation got lost in a
            # round (Python 3.11's asyncio.timeout can turn a simultaneous cancel into TimeoutError)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake()
            # woken early by an opening: still at most one round per KICK_GAP_S (a 429 storm with
            # Retry-After extends an opening on every answer)
            gap = min(self.interval, KICK_GAP_S) - (self.clock() - started)
            if gap > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(gap):
                        await self._stop.wait()

    async def _wake(self) -> None:
        """Return when `close` is called, or (between failures excepted) when a breaker opened here."""
        stop = asyncio.ensure_future(self._stop.wait())
        waits = {stop}
        if not self.failures:
            waits.add(asyncio.ensure_future(self._kick.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        self._kick.clear()

    async def sync_once(self) -> bool:
        """One sync round (also the test hook). Never raises; returns whether Redis answered."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._round()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError from e  # we were being stopped: not a Redis failure
            self._failed(e)
            return False
        finally:
            now = self.clock()
            last = self._started if self._last_ok is None else self._last_ok
            self.metrics.lag.set(max(0.0, now - last))
            if not self._forgotten and now - last > self.cfg.forget_after_s:
                self.sync.absorb([], now)  # too long without news: the peers' picture is stale
                self._forgotten = True
                self.peers = 0
                self.metrics.peers.set(0)
        return True

    async def _round(self) -> None:
        r = self._client()
        blob = self.sync.publish(self.clock())
        me = self.instance_id
        pipe = r.pipeline(transaction=False)
        pipe.set(self._key_prefix + me, blob, px=self._ttl_ms)
        pipe.sadd(self._members, me)
        pipe.pexpire(self._members, self._ttl_ms)
        pipe.smembers(self._members)
        res = await pipe.execute()
        ids = sorted(m.decode("utf-8", "replace") for m in res[3])
        ids = [i for i in ids if i != me]
        blobs = await r.mget([self._key_prefix + i for i in ids]) if ids else []
        gone = [i for i, b in zip(ids, blobs, strict=True) if b is None]
        if gone:
            await r.srem(self._members, *gone)
        now = self.clock()
        out: list[tuple[int, dict[str, int]]] = []
        for _ in self.sync.absorb_steps([b for b in blobs if b is not None], now, out):
            await asyncio.sleep(0)  # let requests run between slices: the merge never stalls them
        peers, bad = out[0]
        for kind, n in bad.items():
            self.metrics.errors.labels(kind).inc(n)
            self.metrics.last_error.labels(kind).set(self.wall())
            log.warning("shared state: skipped %d peer contribution(s): %s", n, kind)
        self._forgotten = False
        self._last_ok = now
        self.failures = 0
        self.rounds += 1
        self.peers = peers
        self.metrics.syncs.inc()
        self.metrics.peers.set(peers)
        self.metrics.up.set(1)
        if not self._up:
            self._up = True
            log.info("shared state: syncing with Redis (%d peer(s))", peers)

    def _failed(self, e: BaseException) -> None:
        kind = error_class(e)
        self.failures += 1
        self.metrics.errors.labels(kind).inc()
        self.metrics.last_error.labels(kind).set(self.wall())
        self.metrics.up.set(0)
        if self._up or self.failures == 1:
            # the class and the exception type only: a message could carry the host or a credential
            log.warning(
                "shared state: Redis round failed (%s: %s); going on with local state, retrying",
                kind, type(e).__name__,
            )  # fmt: skip
        self._up = False

    @property
    def up(self) -> bool:
        return self._up
