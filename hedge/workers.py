"""`hedge serve --workers N`: N processes share one port, so one box uses all its cores.

The proxy is CPU-bound (docs/design.md, "Upstream client") and one Python process uses one core.
Each worker is a whole gateway (its own event loop, upstream pool, feedback statistics) listening on
the same port with SO_REUSEPORT; the kernel spreads new connections over the workers.
The parent only supervises:

* Workers are *spawned* (fresh interpreters), not forked: `prometheus_client` picks its storage when it
  is imported, so `PROMETHEUS_MULTIPROC_DIR` must be in the environment before a worker imports it, and
  a fork would inherit the parent's already-imported, single-process client (and its event-loop state).
* `/metrics` is correct across workers through prometheus-client's multiprocess mode: every worker
  writes its samples to files in one fresh temporary directory and renders the sum over all of them
  (gauges per their `multiprocess_mode`), so any worker answers for the whole box. The parent removes
  the live gauges of a worker that exited (`mark_process_dead`) and the directory at the end.
* SIGTERM / SIGINT are forwarded to every worker; each drains its streams (server.drain) and exits; the
  parent exits 0 once all have exited 0.
* A worker that dies while serving (after `RESTART_AFTER_S`) is restarted, up to `MAX_RESTARTS` times;
  one that fails at start-up (a port in use, say) stops the whole group, with its exit code.

Feedback statistics are per worker: each learns provider latencies from its own share of the traffic,
which at N workers is 1/N of it; with the default decay this still follows a provider within seconds
at any useful request rate.
With ``[shared]`` configured every worker is an instance of the shared state (hedge/sharedredis.py):
each publishes its own contribution and merges the others' through Redis, like separate replicas.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.process
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("hedge.workers")

ServeFactory = Callable[..., Coroutine[Any, Any, int]]

RESTART_AFTER_S = 5.0  # a worker that ran at least this long was serving: restart it if it dies
MAX_RESTARTS = 10
POLL_S = 0.2


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _worker(args: argparse.Namespace, factory: ServeFactory) -> None:
    """A worker's main: one gateway on the shared port (runs in a spawned interpreter)."""
    import uvloop

    from .config import ConfigError

    _configure_logging(args.log_level)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True, name="hedge-ppid").start()
    try:
        code = uvloop.run(factory(args, reuse_port=True))
    except ConfigError as e:
        print(f"hedge: bad config: {e}", file=sys.stderr)
        code = 2
    except OSError as e:
        print(f"hedge: cannot start: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:  # a terminal's Ctrl-C before the loop's own handler was installed
        code = 0
    sys.exit(code)


def _watch_parent(parent: int) -> None:
    """If the parent dies without forwarding a signal (SIGKILL), drain and exit instead of serving on
    as an orphan nobody supervises."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _listen_address(args: argparse.Namespace) -> tuple[str, int]:
    """Where the workers will listen: the same rules as a single `hedge serve` (flags over config)."""
    from .config import ServerConfig, load_config

    server = load_config(args.config).server if args.config else ServerConfig()
    host = args.host or server.host
    port = args.port if args.port is not None else server.port
    return host, port


def _reserve_port(host: str) -> tuple[socket.socket, int]:
    """Port 0 means "any free port", but N workers binding port 0 would get N different ports. So the
    parent binds one (with SO_REUSEPORT, never listening: the kernel hands connections only to
    listening sockets) and keeps it bound while the workers run, so no one else can take it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock, sock.getsockname()[1]


class _Group:
    """The running workers and what the parent knows about them."""

    def __init__(self, n: int, args: argparse.Namespace, factory: ServeFactory) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self.n = n
        self.args = args
        self.factory = factory
        self.procs: list[multiprocessing.process.BaseProcess | None] = [None] * n
        self.running: dict[int, float] = {}  # pid -> start time, until the parent has seen it exit
        self.stopping = False
        self.stop_signal = 0
        self.restarts = 0

    def start(self, i: int) -> None:
        if self.stopping:
            return
        p = self.ctx.Process(target=_worker, args=(self.args, self.factory), name=f"hedge-worker-{i}")
        p.start()
        assert p.pid is not None
        self.procs[i] = p
        self.running[p.pid] = time.monotonic()

    def signal_all(self, signum: int) -> None:
        for p in self.procs:
            if p is not None and p.pid in self.running:
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    def stop(self, signum: int) -> None:
        if not self.stopping:
            self.stopping, self.stop_signal = True, signum
        self.signal_all(signum)


def run_workers(args: argparse.Namespace, serve_coro_factory: ServeFactory) -> int:
    """Run `args.workers` gateways on one port; return the exit code for `hedge serve`."""
    from prometheus_client import multiprocess

    n = int(args.workers)
    host, port = _listen_address(args)
    reserved: socket.socket | None = None
    if port == 0:
        reserved, port = _reserve_port(host)
    args = argparse.Namespace(**{**vars(args), "port": port, "host": host})
    metrics_dir = tempfile.mkdtemp(prefix="hedge-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # inherited by the spawned workers
    log.info("starting %d workers on %s:%d", n, host, port)

    group = _Group(n, args, serve_coro_factory)

    def forward(signum: int, _frame: Any) -> None:
        if not group.stopping:
            log.info("%s: stopping %d workers", signal.Signals(signum).name, len(group.running))
        group.stop(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(n):
            group.start(i)
        return _supervise(group, lambda pid: multiprocess.mark_process_dead(pid, metrics_dir))
    finally:
        if group.running:  # an error in the parent itself: leave no orphans behind
            group.stop(signal.SIGTERM)
            for p in group.procs:
                if p is not None:
                    p.join(timeout=30)
                    if p.is_alive():
                        p.kill()
        for s, h in old.items():
            signal.signal(s, h)
        if reserved is not None:
            reserved.close()
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(group: _Group, mark_dead: Callable[[int], None]) -> int:
    """Wait for the workers; restart one that dies while serving; stop all if one cannot start."""
    codes: list[int] = []
    failed: int | None = None
    while group.running:
        for i, p in enumerate(group.procs):
            if p is None or p.pid not in group.running:
                continue
            p.join(timeout=POLL_S / group.n)
            if p.exitcode is None:
                continue
            ran = time.monotonic() - group.running.pop(p.pid)
            mark_dead(p.pid)  # its live gauges (in-flight counts) stop counting
            code = p.exitcode if p.exitcode >= 0 else 128 - p.exitcode  # killed by signal k: 128 + k
            if group.stopping:
                # killed by our own stop signal before its handler was installed: it did stop
                codes.append(0 if p.exitcode == -group.stop_signal else code)
            elif ran >= RESTART_AFTER_S and group.restarts < MAX_RESTARTS:
                group.restarts += 1
                log.warning("worker %d exited with %d after %.0f s; restarting it", p.pid, code, ran)
                group.start(i)
            else:
                log.error("worker %d exited with %d at start-up; stopping all workers", p.pid, code)
                failed = code or 1
                group.stop(signal.SIGTERM)
    return failed if failed is not None else max(codes, default=0)
