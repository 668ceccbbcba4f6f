"""The response-id -> provider map: bounded by size and by age, with a fake clock."""

from __future__ import annotations

import pytest

from hedge.affinity import AffinityConfig, AffinityMap


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_remember_lookup_forget() -> None:
    m: AffinityMap[str] = AffinityMap(clock=Clock())
    assert m.lookup("resp_x") is None  # unknown: the edge turns this into a 404
    m.remember("resp_1", "sim-alpha")
    m.remember("resp_2", "sim-beta")
    assert (m.lookup("resp_1"), m.lookup("resp_2"), len(m)) == ("sim-alpha", "sim-beta", 2)
    assert m.forget("resp_1") == "sim-alpha"
    assert m.lookup("resp_1") is None and m.forget("resp_1") is None and len(m) == 1


def test_eviction_by_size_drops_the_oldest() -> None:
    clock = Clock()
    m: AffinityMap[str] = AffinityMap(AffinityConfig(max_entries=3, max_age_s=60), clock)
    for i in range(5):
        clock.t += 1
        m.remember(f"r{i}", f"p{i}")
    assert len(m) == 3 and m.evicted_size == 2
    assert [m.lookup(f"r{i}") for i in range(5)] == [None, None, "p2", "p3", "p4"]
    m.lookup("r2")  # a lookup does not refresh: r2 is still the oldest
    m.remember("r5", "p5")
    assert m.lookup("r2") is None and m.lookup("r3") == "p3"
    m.remember("r3", "q3")  # the same id again: moves to the back with its new owner
    m.remember("r6", "p6")
    assert m.lookup("r4") is None and m.lookup("r3") == "q3"


def test_eviction_by_age() -> None:
    clock = Clock()
    m: AffinityMap[str] = AffinityMap(AffinityConfig(max_entries=100, max_age_s=10), clock)
    m.remember("old", "a")
    clock.t += 6
    m.remember("young", "b")
    clock.t += 4  # old is exactly 10 s old: still known
    assert m.lookup("old") == "a"
    clock.t += 0.5
    assert m.lookup("old") is None and m.evicted_age == 1 and len(m) == 1
    assert m.lookup("young") == "b"
    clock.t += 100
    m.remember("new", "c")  # expiry also runs on insert, so an idle map does not hold stale ids
    assert len(m) == 1 and m.evicted_age == 2


def test_expiry_pops_only_from_the_front() -> None:
    """Amortised O(1): 10 000 inserts under a tight age bound keep the map small and exact."""
    clock = Clock()
    m: AffinityMap[int] = AffinityMap(AffinityConfig(max_entries=1_000_000, max_age_s=5), clock)
    for i in range(10_000):
        clock.t += 0.01
        m.remember(f"r{i}", i)
    assert len(m) == 501  # the ids of the last 5 s (500 steps) plus the one exactly at the bound
    assert m.evicted_age == 10_000 - 501


@pytest.mark.parametrize(("n", "age"), [(0, 1.0), (10, 0.0), (-1, 5.0)])
def test_config_bounds_must_be_positive(n: int, age: float) -> None:
    with pytest.raises(ValueError):
        AffinityConfig(max_entries=n, max_age_s=age)
