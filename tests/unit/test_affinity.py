"""The response-id -> provider map: bounded by size and by age, with a fake clock."""

from __future__ import annotations

import pytest

from hedge.affinity import AffinityConfig, AffinityMap, owner_or_404, pin
from hedge.catalog import Catalog
from hedge.config import parse_config
from hedge.demo import demo_raw_config
from hedge.errors import ApiError


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


def test_unknown_ids_are_404_in_openai_shape() -> None:
    m: AffinityMap[str] = AffinityMap(clock=Clock())
    m.remember("resp_1", "sim-beta")
    assert owner_or_404(m, "resp_1") == "sim-beta"
    with pytest.raises(ApiError) as e:
        owner_or_404(m, "resp_2")
    assert (e.value.status, e.value.code, e.value.param) == (404, "not_found", None)
    with pytest.raises(ApiError) as e:
        owner_or_404(m, "resp_2", "previous_response_id")
    assert (e.value.code, e.value.param) == ("previous_response_not_found", "previous_response_id")
    assert b"resp_2" in e.value.body()


def test_pin_goes_to_the_owner_even_when_it_is_not_first() -> None:
    urls = {"sim-alpha": "http://x/v1", "sim-beta": "http://y/v1", "sim-gamma": "http://z/v1"}
    cat = Catalog(parse_config(demo_raw_config(urls)))
    fast = cat.resolve("gammainfra/fast").candidates
    assert fast[0].provider.name == "sim-alpha"
    assert pin(fast, "sim-beta", "gammainfra/fast").endpoint == "openai/gpt-5-mini@sim-beta"
    assert pin(fast, "sim-gamma", "gammainfra/fast").endpoint == "google/gemini-2.5-flash@sim-gamma"
    pinned = cat.resolve("anthropic/claude-haiku-4.5").candidates  # served by sim-beta only
    with pytest.raises(ApiError) as e:
        pin(pinned, "sim-alpha", "anthropic/claude-haiku-4.5")
    assert (e.value.status, e.value.code) == (400, "previous_response_provider_mismatch")
