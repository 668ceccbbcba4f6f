"""Which provider owns a response id: a bounded map, so state-bearing requests reach their provider.

A response created at one provider is unknown to every other, so `previous_response_id`, background
work and `GET/DELETE /v1/responses/{id}[...]` must go where the id was made. The proxy records each id
it hands out; this module keeps those records within a size and an age, in O(1) per operation.

Entries are kept in creation order (an `OrderedDict`), so the oldest entry is always first: eviction by
size and expiry by age both pop from the front. A lookup does not refresh an entry: its age is the
response's age, and a continuation creates a new id of its own that is recorded fresh. An id we do not
know, or no longer know, is `None`: the edge answers 404 (`owner_or_404`), and never guesses a
provider. `pin` picks the one candidate a continuation goes to: the plan's first at the owner.

With shared state (hedge/shared.py) the map has a second, *remote* part: the ids the peer instances
recorded (`adopt`), bounded and aged like the local part and kept apart from it, so an instance
publishes only the ids it recorded itself (`recent`) and never echoes a peer's. A lookup consults the
local part, then the remote one.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from .errors import ApiError

if TYPE_CHECKING:
    from .catalog import Candidate

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

    __slots__ = ("_clock", "_entries", "_remote", "adopted", "config", "evicted_age", "evicted_size")

    def __init__(
        self, config: AffinityConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or AffinityConfig()
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self.evicted_size = 0  # entries dropped because the map was full (their ids now answer 404)
        self.evicted_age = 0  # entries dropped for age
        # peers' ids (shared state): same bounds, never re-published; arrival order ~ creation order
        self._remote: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self.adopted = 0  # peers' ids installed here

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
        """The owner of an id, or None when unknown or expired (an expired entry is dropped). Our own
        record first, then a peer's."""
        entry = self._entries.get(response_id)
        if entry is not None:
            created, owner = entry
            if self._clock() - created <= self.config.max_age_s:
                return owner
            self._expire(self._clock())
        entry = self._remote.get(response_id)
        if entry is not None:
            created, owner = entry
            if self._clock() - created <= self.config.max_age_s:
                return owner
            del self._remote[response_id]
        return None

    def forget(self, response_id: str) -> V | None:
        """Drop an id (after a successful DELETE), ours or a peer's; returns its owner if it was known.
        A peer still holding the id in its own map keeps it (see docs/design.md, "Shared state")."""
        entry = self._entries.pop(response_id, None)
        remote = self._remote.pop(response_id, None)
        entry = entry or remote
        return None if entry is None else entry[1]

    # -- shared state (hedge/shared.py) ------------------------------------------------------------

    def recent(self, since: float, limit: int) -> list[tuple[str, float, V]]:
        """The ids recorded *here* at or after ``since`` (clock time), the newest ``limit`` of them,
        oldest first, as (id, created, owner). O(returned): walks back from the newest entry."""
        out: list[tuple[str, float, V]] = []
        for rid in reversed(self._entries):
            if len(out) >= limit:
                break
            created, owner = self._entries[rid]
            if created < since:
                break
            out.append((rid, created, owner))
        out.reverse()
        return out

    def adopt(self, response_id: str, owner: V, created: float) -> bool:
        """Install a peer's record (``created`` on this clock). An id already known here, or too old,
        is left alone; the remote part is bounded like the local one. Returns whether it was added."""
        if response_id in self._entries or response_id in self._remote:
            return False
        now = self._clock()
        created = min(created, now)  # a peer's clock ahead of ours: created now, not later
        if now - created > self.config.max_age_s:
            return False
        remote = self._remote
        remote[response_id] = (created, owner)
        self.adopted += 1
        while len(remote) > self.config.max_entries:
            remote.popitem(last=False)
        limit = now - self.config.max_age_s
        while remote and next(iter(remote.values()))[0] < limit:
            remote.popitem(last=False)
        return True

    @property
    def remote_size(self) -> int:
        """Peers' ids held here."""
        return len(self._remote)

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


def owner_or_404(owners: AffinityMap[str], response_id: str, param: str | None = None) -> str:
    """The provider that holds `response_id`, or the 404 the caller gets: never a guess, since asking
    another provider would only earn its own 404 (or worse, a different response with the same id)."""
    owner = owners.lookup(response_id)
    if owner is None:
        what = "Previous response" if param == "previous_response_id" else "Response"
        raise ApiError(
            404,
            f"{what} with id '{response_id[:128]}' not found. The gateway knows the responses it created "
            "recently; an older one, or one made elsewhere, cannot be reached through it.",
            param=param,
            code="previous_response_not_found" if param == "previous_response_id" else "not_found",
        )
    return owner


def pin(candidates: Iterable[Candidate], owner: str, model: str) -> Candidate:
    """The one candidate a stateful request goes to: the first of the plan at the owning provider."""
    for c in candidates:
        if c.provider.name == owner:
            return c
    raise ApiError(
        400,
        f"The previous response was created by provider '{owner}', which does not serve '{model}'. "
        "Continue it with a model that provider serves, or start a new response.",
        param="previous_response_id",
        code="previous_response_provider_mismatch",
    )
