"""hedge/conn_limits.py without sockets: the connection gate and the idle/head deadlines (issue 13)."""

from __future__ import annotations

import resource

from hedge.conn_limits import ConnectionGate, HeadClock, Phase, connection_cap, raise_nofile_limit


def test_gate_refuses_past_the_limit_and_reopens() -> None:
    g = ConnectionGate(2)
    assert g.admit() and g.admit()
    assert not g.admit() and g.refused == 1 and g.open == 2
    g.release()
    assert g.admit() and g.open == 2


def test_idle_then_head_deadline_is_not_extended_by_more_bytes() -> None:
    c = HeadClock(idle_timeout=15.0, head_timeout=10.0)
    c.on_open(100.0)
    assert c.phase is Phase.IDLE and c.deadline == 115.0
    c.on_bytes(105.0)  # first byte of a head
    assert c.phase is Phase.HEAD and c.deadline == 115.0
    c.on_bytes(114.0)  # a slowloris byte: the deadline stays
    assert c.deadline == 115.0 and c.expired(115.0) and not c.expired(114.9)


def test_busy_has_no_deadline_and_idle_restarts_after_the_answer() -> None:
    c = HeadClock(idle_timeout=15.0, head_timeout=10.0)
    c.on_open(0.0)
    c.on_bytes(1.0)
    c.on_head_done()
    assert c.phase is Phase.BUSY and c.deadline is None and not c.expired(1e9)
    c.on_bytes(500.0)  # body bytes while busy change nothing
    assert c.phase is Phase.BUSY
    c.on_response_done(600.0)
    assert c.phase is Phase.IDLE and c.deadline == 615.0


def test_cap_is_half_the_fd_limit() -> None:
    assert connection_cap(10_000, 1024) == 512
    assert connection_cap(100, 1024) == 100


def test_nofile_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256, hard), hard))
        got = raise_nofile_limit()
        now_soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert got == now_soft
        assert now_soft == (hard if hard != resource.RLIM_INFINITY else now_soft)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
