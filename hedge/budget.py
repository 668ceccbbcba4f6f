"""Hedge budget: a token bucket that caps delay-triggered extra attempts to a fraction of requests.

Hedging on delay helps the tail only while hedges are rare. When every provider slows down at once, every
request would hedge and multiply the upstream load exactly when upstreams are struggling. As in gRPC's
retry throttling and Finagle's backup-request budget, each request deposits ``ratio`` tokens (capped at
``burst``) and each delay-triggered hedge spends one whole token; with no token the hedge is refused.
Over any run of N requests at most ``ratio * N + burst`` hedges go out.

Error-triggered launches (an attempt failed before its first token) are not budgeted: they replace a
dead attempt rather than add load.

Choices:

* The bucket starts full (``burst`` tokens), so a fresh process can hedge its first requests, except
  with ``ratio == 0``, which means "never hedge on delay": that bucket starts and stays empty.
* Tokens are kept as integers in millionths (gRPC similarly uses fixed-point milli-tokens). Float
  accumulation would drift: ten deposits of 0.1 sum to 0.9999999999999999, which would silently turn a
  10 % budget into 1-in-11. Consequently ``ratio`` is used with 6 decimal places.
"""

from __future__ import annotations

from math import isfinite

__all__ = ["HedgeBudget"]

_SCALE = 1_000_000  # token units per token


class HedgeBudget:
    """Caps delay-triggered extra attempts to ``ratio`` of requests, plus a small burst.

    ``refusals`` and ``spent`` count refused and granted hedges (exported as metrics).
    """

    __slots__ = ("_cap", "_deposit", "_units", "burst", "ratio", "refusals", "spent")

    def __init__(self, ratio: float, burst: float = 5.0) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not isfinite(ratio):
            raise ValueError(f"hedge budget ratio must be a finite number, got {ratio!r}")
        if ratio < 0:
            raise ValueError(f"hedge budget ratio must be >= 0 (0 = never hedge on delay), got {ratio!r}")
        if isinstance(burst, bool) or not isinstance(burst, int | float) or not isfinite(burst):
            raise ValueError(f"hedge budget burst must be a finite number, got {burst!r}")
        if burst < 1:
            raise ValueError(f"hedge budget burst must be >= 1 (one hedge costs one token), got {burst!r}")
        deposit = round(ratio * _SCALE)
        if ratio > 0 and deposit == 0:
            raise ValueError(f"hedge budget ratio {ratio!r} is below the resolution 1e-6; use 0 to disable")
        self.ratio = float(ratio)
        self.burst = float(burst)
        self._deposit = deposit
        self._cap = round(burst * _SCALE)
        self._units = self._cap if deposit else 0
        self.refusals = 0
        self.spent = 0

    @property
    def tokens(self) -> float:
        """Tokens currently in the bucket."""
        return self._units / _SCALE

    def on_request(self) -> None:
        """Every request deposits ``ratio`` tokens, capped at ``burst``."""
        u = self._units + self._deposit
        self._units = u if u < self._cap else self._cap

    def try_spend(self) -> bool:
        """Spend one token for a delay-triggered hedge; False (and a counted refusal) when < 1 token."""
        if self._units >= _SCALE:
            self._units -= _SCALE
            self.spent += 1
            return True
        self.refusals += 1
        return False
