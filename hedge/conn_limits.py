"""What a connection may hold before it sends a whole request head: a slot, a file descriptor, time.

Plain objects, no sockets (server.py wires them into aiohttp's connection handler):

* `ConnectionGate` counts open client connections of this process; past `limit` a new connection is
  refused at once (closed before anything is parsed or allocated for it), so a flood of half-open
  sockets can never run the process out of file descriptors, which would break /healthz, upstream
  connections and the log alike.
* `HeadClock` is the per-connection rule for the two phases the client controls before a handler runs:
  *idle* (connected or between requests, no byte of the next head yet: `keepalive_timeout_s`) and *head*
  (from the first byte of a head until its end: `header_timeout_s`). A slowloris that sends one byte a
  second never completes a head, so the head deadline, which later bytes do not extend, ends it.
* `raise_nofile_limit` lifts the soft RLIMIT_NOFILE to the hard limit where the OS allows, and
  `connection_cap` keeps the connection limit to half of it: the other half is for upstream
  connections (up to `max_attempts` per request), the listening socket, logs and Prometheus files.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

log = logging.getLogger("hedge.conn")


def raise_nofile_limit() -> int:
    """Raise the soft fd limit to the hard one (where allowed); return the soft limit now in force."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or want <= soft:
        return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return int(want)
    except (ValueError, OSError):
        return int(soft)


def connection_cap(configured: int, nofile_soft: int) -> int:
    """The connection limit in force: the configured one, but at most half the fd limit."""
    cap = max(1, min(configured, nofile_soft // 2))
    if cap < configured:
        log.warning(
            "server.max_connections %d is over half the fd limit (%d): using %d", configured, nofile_soft, cap
        )
    return cap


class ConnectionGate:
    """Counts the open client connections; `admit` says whether one more may be served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0  # connections admitted and not yet closed
        self.refused = 0  # connections closed at once because `open` was at the limit

    def admit(self) -> bool:
        if self.open >= self.limit:
            self.refused += 1
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1


class Phase(enum.Enum):
    IDLE = "idle"  # no byte of the next request head yet (fresh connection, or between requests)
    HEAD = "head"  # some bytes of a head, not all of it
    BUSY = "busy"  # a request is being served (its body and answer have deadlines of their own)


@dataclass(slots=True)
class HeadClock:
    """One connection's deadline before a handler runs, driven by events with the time passed in.

    `deadline` is when the connection must be closed if it is still in IDLE or HEAD (None in BUSY)."""

    idle_timeout: float
    head_timeout: float
    phase: Phase = Phase.IDLE
    deadline: float | None = None

    def on_open(self, now: float) -> None:
        self.phase = Phase.IDLE
        self.deadline = now + self.idle_timeout

    def on_bytes(self, now: float) -> None:
        """Bytes arrived while no request was being served: the head starts (the deadline is not
        pushed back by later bytes, only the first byte of a head moves IDLE to HEAD)."""
        if self.phase is Phase.IDLE:
            self.phase = Phase.HEAD
            self.deadline = now + self.head_timeout

    def on_head_done(self) -> None:
        self.phase = Phase.BUSY
        self.deadline = None

    def on_response_done(self, now: float) -> None:
        """The answer went out and the connection stays open for another request."""
        self.phase = Phase.IDLE
        self.deadline = now + self.idle_timeout

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline
