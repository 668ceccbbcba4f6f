"""Which provider owns a response id: a bounded map, so state-bearing requests reach their provider.

A response created at one provider is unknown to every other, so `previous_response_id`, background
work and `GET/DELETE /v1/responses/{id}[...]` must go where the id was made. The proxy records each id
it hands out; this module keeps those records within a size and an age, in O(1) per operation.

Entries are kept in creation order (an `OrderedDict`), so the oldest entry is always first: eviction by
size and expiry by age both pop from the front. A lookup does not refresh an entry: its age is the
response's age, and a continuation creates a new id of its own that is recorded fresh. An id we do not
know, or no longer know, is `None`: the edge answers 404, and never guesses a provider.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class AffinityConfig:
    """Bounds of the map. 100k entries is ~20 MB; OpenAI keeps stored responses 30 days."""

    max_entries: int = 100_000
    max_age_s: float = 30 * 86400.0

    def __post_init__(self) -> None:
        if self.max_entries < 1 or self.max_age_s <= 0:
            raise ValueError("affinity bounds must be positive")


class AffinityMap(Generic[V]):
    """response id -> owner (a provider name, or whatever the caller stores), bounded by size and age."""

    __slots__ = ("_clock", "_entries", "config", "evicted_age", "evicted_size")

    def __init__(
        self, config: AffinityConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or AffinityConfig()
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self.evicted_size = 0  # entries dropped because the map was full (their ids now answer 404)
        self.evicted_age = 0  # entries dropped for age

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, response_id: str, owner: V) -> None:
        """Record a new id; an id seen again (a provider reusing one) moves to the back as new."""
        now = self._clock()
        self._expire(now)
        entries = self._entries
        entries.pop(response_id, None)
        entries[response_id] = (now, owner)
        while len(entries) > self.config.max_entries:
            entries.popitem(last=False)
            self.evicted_size += 1

    def lookup(self, response_id: str) -> V | None:
        """The owner of an id, or None when unknown or expired (an expired entry is dropped)."""
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        created, owner = entry
        if self._clock() - created > self.config.max_age_s:
            self._expire(self._clock())
            return None
        return owner

    def forget(self, response_id: str) -> V | None:
        """Drop an id (after a successful DELETE); returns its owner if it was known."""
        entry = self._entries.pop(response_id, None)
        return None if entry is None else entry[1]

    def _expire(self, now: float) -> None:
        """Pop expired entries from the front: amortised O(1), since each entry is popped once."""
        entries = self._entries
        limit = now - self.config.max_age_s
        while entries:
            created, _ = next(iter(entries.values()))
            if created >= limit:
                break
            entries.popitem(last=False)
            self.evicted_age += 1
