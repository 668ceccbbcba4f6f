"""Per-candidate circuit breaker: exponential backoff, a single half-open probe, and ``Retry-After``.

A provider that fails repeatedly is *cooled down* instead of being tried (and failing) on every request:
each failed attempt costs the caller a hedge slot and the provider more load while it is struggling.

States (the int values are exported as a Prometheus gauge):

* ``CLOSED`` (0): requests flow; consecutive failures are counted, any success resets the count.
* ``OPEN`` (2): after ``failure_threshold`` consecutive failures, requests are refused for a backoff
  (``base_backoff_s`` at first).
* ``HALF_OPEN`` (1): the backoff has elapsed; exactly one *probe* request is let through. Its success
  closes the breaker (and resets the backoff); its failure re-opens it with the backoff doubled (capped at
  ``max_backoff_s``). If the probe never reports (lost task, hung connection) another probe is allowed
  after ``probe_timeout_s``, so a lost report cannot wedge the breaker open forever.

``Retry-After`` (from a 429/503) opens the breaker at once, whatever the failure count, until at least
``now + retry_after``. The server told us explicitly when to come back, so it is honoured fully, even
beyond ``max_backoff_s``, up to :data:`MAX_RETRY_AFTER_S` (1 hour) to bound the damage of a bogus or
hostile header. It is also honoured against a success that arrives within that window (e.g. from a
request that was already in flight): that success resets the failure count and backoff, but the breaker
stays open until the ``Retry-After`` deadline.

The breaker is sans-IO and does not track which request was the probe. Callers that pass an attempt's
``launched_at`` let it tell the probe from a straggler: while a probe is in flight, only an attempt
launched at or after the probe slot was taken can be the probe, so a failure of one launched earlier (it
was in flight when the breaker opened) is counted but is not the probe's verdict. Without
``launched_at``, the next reported outcome (from any request) is taken as the probe's result. Any
success while OPEN also closes the breaker (outside a ``Retry-After`` window): it is direct evidence
that the provider works again.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from math import isfinite

__all__ = ["MAX_RETRY_AFTER_S", "BreakerState", "CircuitBreaker"]

MAX_RETRY_AFTER_S = 3600.0
"""Upper bound on an honoured ``Retry-After`` (seconds)."""


class BreakerState(enum.IntEnum):
    """Breaker state; the int value is exported as a Prometheus gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Circuit breaker with exponential backoff, a single half-open probe and ``Retry-After`` support.

    Every method that depends on time takes ``now`` (seconds, monotonic). ``state``, ``available`` and
    ``retry_at`` never mutate; only ``acquire`` (taking the probe slot) and the ``on_*`` reports do.
    """

    __slots__ = (
        "_backoff",
        "_failures",
        "_hold_until",
        "_open_until",
        "_probe_at",
        "base_backoff_s",
        "failure_threshold",
        "max_backoff_s",
        "on_open",
        "probe_timeout_s",
    )

    def __init__(
        self,
        failure_threshold: int = 5,
        base_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        probe_timeout_s: float = 30.0,
    ) -> None:
        if not (isinstance(failure_threshold, int) and failure_threshold >= 1):
            raise ValueError(f"failure_threshold must be an int >= 1, got {failure_threshold!r}")
        if not (isfinite(base_backoff_s) and base_backoff_s > 0):
            raise ValueError(f"base_backoff_s must be a positive number, got {base_backoff_s!r}")
        if not (isfinite(max_backoff_s) and max_backoff_s >= base_backoff_s):
            raise ValueError(
                f"max_backoff_s must be >= base_backoff_s ({base_backoff_s!r}), got {max_backoff_s!r}"
            )
        if not (isfinite(probe_timeout_s) and probe_timeout_s > 0):
            raise ValueError(f"probe_timeout_s must be a positive number, got {probe_timeout_s!r}")
        self.failure_threshold = failure_threshold
        self.base_backoff_s = float(base_backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.probe_timeout_s = float(probe_timeout_s)
        self._failures = 0  # consecutive failures
        self._backoff = self.base_backoff_s  # backoff of the current (or next) opening
        self._open_until: float | None = None  # None = CLOSED; else OPEN until then, HALF_OPEN after
        self._hold_until = float("-inf")  # Retry-After deadline, survives successes
        self._probe_at: float | None = None  # when the in-flight half-open probe was let through
        # called when a failure here opens (or extends) the breaker: shared state publishes it at once
        self.on_open: Callable[[], None] | None = None

    # -- queries (non-mutating) ----------------------------------------------------------------------
    @property
    def consecutive_failures(self) -> int:
        """Failures since the last success."""
        return self._failures

    @property
    def backoff_s(self) -> float:
        """Backoff of the current opening (or of the next one, when closed)."""
        return self._backoff

    def state(self, now: float) -> BreakerState:
        """CLOSED, OPEN, or HALF_OPEN (an OPEN breaker whose backoff has elapsed: a probe is allowed)."""
        if self._open_until is None:
            return BreakerState.CLOSED
        if now < self._open_until:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def available(self, now: float) -> bool:
        """Would a request be allowed now? (Does not take the probe slot; see :meth:`acquire`.)"""
        until = self._open_until
        if until is None:
            return True
        if now < until:
            return False
        probe = self._probe_at
        return probe is None or now - probe >= self.probe_timeout_s

    def retry_at(self, now: float) -> float | None:
        """When a request will next be allowed; ``None`` if one is allowed now.

        While a probe is in flight this is when a replacement probe would be allowed (the probe's
        report may reopen or close the breaker sooner).
        """
        if self.available(now):
            return None
        assert self._open_until is not None
        if now < self._open_until:
            return self._open_until
        assert self._probe_at is not None
        return self._probe_at + self.probe_timeout_s

    @property
    def open_until(self) -> float | None:
        """End of the current opening (None when closed); past it the breaker is half-open."""
        return self._open_until

    @property
    def hold_until(self) -> float | None:
        """End of the latest ``Retry-After`` window, or None if there never was one."""
        return self._hold_until if isfinite(self._hold_until) else None

    # -- transitions ---------------------------------------------------------------------------------
    def adopt_opening(self, until: float, hold_until: float | None, now: float) -> bool:
        """A peer instance opened this candidate's breaker until ``until`` (shared state, hedge/shared.py):
        stay away as long, so an outage seen by one instance protects all. ``hold_until``: the peer's
        ``Retry-After`` deadline, honoured here as if received here. Both are capped at
        :data:`MAX_RETRY_AFTER_S` from ``now``. Never shortens an opening; returns True if it extended one.

        The failure count and backoff stay local: after ``until`` this instance probes on its own.
        """
        cap = now + MAX_RETRY_AFTER_S
        if hold_until is not None and isfinite(hold_until) and hold_until > self._hold_until:
            self._hold_until = min(hold_until, cap)
        if not (isfinite(until) and until > now):
            return False
        until = min(until, cap)
        if self._open_until is not None and self._open_until >= until:
            return False
        self._open_until = until
        self._probe_at = None
        return True

    def acquire(self, now: float) -> bool:
        """May a request go now? In HALF_OPEN this takes the single probe slot (True once, then False
        until the probe reports or ``probe_timeout_s`` passes)."""
        until = self._open_until
        if until is None:
            return True
        if now < until:
            return False
        probe = self._probe_at
        if probe is not None and now - probe < self.probe_timeout_s:
            return False
        self._probe_at = now
        return True

    def on_success(self, now: float) -> None:
        """A request succeeded: close, reset the failure count and the backoff.

        Inside a ``Retry-After`` window the counters are reset but the breaker stays open until the
        deadline (the server asked us to stay away).
        """
        self._failures = 0
        self._backoff = self.base_backoff_s
        self._probe_at = None
        if now < self._hold_until:
            self._open_until = self._hold_until
        else:
            self._open_until = None

    def _straggler(self, launched_at: float | None) -> bool:
        """Was this attempt launched before the in-flight probe (so it cannot be the probe)?"""
        probe = self._probe_at
        return probe is not None and launched_at is not None and launched_at < probe

    def on_cancelled(self, now: float, *, lost: bool, launched_at: float | None = None) -> None:
        """An attempt was cancelled before its first token. It only matters to an in-flight probe.

        Without this a cancelled probe would never report, and the slot would stay taken (the candidate
        out of service) for ``probe_timeout_s``. ``lost``: the probe was outrun by another attempt (the
        hedge launched after the probe's own hedge delay answered first); the probe did not show that the
        provider answers in its usual time, so it counts as a failed probe (re-open, backoff doubled).
        Otherwise (the client left, another attempt's 4xx ended the race) there is no verdict: the slot
        is freed for the next request. In CLOSED or OPEN nothing changes: losing a race is no failure.
        """
        until = self._open_until
        if until is None or now < until or self._probe_at is None or self._straggler(launched_at):
            return
        if lost:
            self.on_failure(now)
        else:
            self._probe_at = None

    def on_failure(
        self, now: float, retry_after: float | None = None, *, launched_at: float | None = None
    ) -> None:
        """A request failed (before its first token). ``retry_after``: seconds from a ``Retry-After``.

        CLOSED: count it; the ``failure_threshold``-th consecutive failure opens for ``base_backoff_s``.
        HALF_OPEN (the probe failed): re-open with the backoff doubled, capped at ``max_backoff_s``.
        OPEN, or HALF_OPEN but ``launched_at`` before the probe (a straggler that was already in flight):
        no change beyond the count.
        A positive ``retry_after`` opens at once until at least ``now + min(retry_after, 1 h)``.
        """
        self._failures += 1
        until = before = self._open_until
        if until is None:
            if self._failures >= self.failure_threshold:
                self._backoff = self.base_backoff_s
                self._open_until = now + self._backoff
        elif now >= until and not self._straggler(launched_at):
            self._backoff = min(self._backoff * 2.0, self.max_backoff_s)
            self._open_until = now + self._backoff
            self._probe_at = None
        if retry_after is not None and isfinite(retry_after) and retry_after > 0.0:
            hold = now + min(float(retry_after), MAX_RETRY_AFTER_S)
            if hold > self._hold_until:
                self._hold_until = hold
            if self._open_until is None or self._open_until < hold:
                self._open_until = hold
            self._probe_at = None
        if self.on_open is not None and self._open_until is not None and self._open_until != before:
            self.on_open()
