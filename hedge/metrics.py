"""Prometheus metrics (README "Observability"; docs/design.md, "Map of the package").

One `Metrics` object per process owns its own `CollectorRegistry` (tests build many proxies in one process,
so nothing goes into the global registry). Labelled children are looked up once per candidate and cached,
because `labels()` costs a dict lookup and a lock on every call and the hot path has no time for that.

Names (all prefixed `hedge_`):
- upstream_ttft_seconds / upstream_duration_seconds {provider, model}: histograms per candidate
- attempts_total {provider, model, outcome, api}: outcome = won | cancelled | failed | abandoned |
  rejected; api as for requests_total
- hedges_total {route, reason}: extra launches, reason = delay | error
- hedge_budget_ratio {route}: the configured hedge_budget, so dashboards draw the real line
- budget_refusals_total {route}; hedge_delay_seconds {route}: the route's current hedge delay for its
  primary at the default dial (set by every hedged request; a caller's Cost-Quality dial is left out)
- client_ttft_seconds {route}: what the caller saw (request in -> first byte of the answer out)
- requests_total {route, code, api}: api = chat | responses | completions | embeddings
- inflight_requests; inflight_attempts {provider}
- tokens_total {model, provider, kind}; cost_usd_total {model, provider}
- wasted_tokens_total, wasted_cost_usd_total {model, provider, reason}: cancelled attempts; reason =
  lost (a hedge race loser: the price of hedging) | abandoned (the client left) | rejected (another
  attempt's 4xx ended the race)
- circuit_state {provider, model}: 0 closed, 1 half-open, 2 open
- key_requests_total {key_id}; key_cost_usd_total {key_id}: per gateway key (a short hash, never the key)
"""

from __future__ import annotations

import functools

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# 5 ms .. 60 s, roughly x1.5-2 per step: fine where hedge delays live (25 ms - 3 s), coarse in the tail.
TTFT_BUCKETS = (
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
)  # fmt: skip
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, *, multiprocess_dir: str | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._multiprocess_dir = multiprocess_dir
        r = self.registry
        pm = ("provider", "model")
        self.upstream_ttft = Histogram(
            "hedge_upstream_ttft_seconds", "Upstream time to first content token per candidate", pm,
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_duration = Histogram(
            "hedge_upstream_duration_seconds", "Upstream attempt duration (completed attempts)", pm,
            buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.attempts = Counter(
            "hedge_attempts", "Upstream attempts by outcome and API", (*pm, "outcome", "api"), registry=r
        )
        self.hedges = Counter("hedge_hedges", "Extra attempts launched", ("route", "reason"), registry=r)
        self.budget_refusals = Counter(
            "hedge_budget_refusals", "Delay hedges refused by the hedge budget", ("route",), registry=r
        )
        self.hedge_delay = Gauge(
            "hedge_hedge_delay_seconds", "Current hedge delay of the route's primary", ("route",),
            registry=r, multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.hedge_budget = Gauge(
            "hedge_hedge_budget_ratio", "Configured hedge budget per route (delay hedges per request)",
            ("route",), registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.client_ttft = Histogram(
            "hedge_client_ttft_seconds", "Client-visible time to first token per route", ("route",),
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "hedge_requests", "Requests by route, status and API", ("route", "code", "api"), registry=r
        )
        self.inflight_requests = Gauge(
            "hedge_inflight_requests", "Requests in flight", registry=r, multiprocess_mode="livesum"
        )
        self.inflight_attempts = Gauge(
            "hedge_inflight_attempts", "Upstream attempts in flight", ("provider",), registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.tokens = Counter(
            "hedge_tokens", "Tokens billed by served responses", ("model", "provider", "kind"), registry=r
        )
        self.cost = Counter(
            "hedge_cost_usd", "Cost of served responses (USD)", ("model", "provider"), registry=r
        )
        self.wasted_tokens = Counter(
            "hedge_wasted_tokens", "Estimated tokens billed by cancelled attempts",
            ("model", "provider", "reason"), registry=r,
        )  # fmt: skip
        self.wasted_cost = Counter(
            "hedge_wasted_cost_usd", "Estimated cost of cancelled attempts (USD)",
            ("model", "provider", "reason"), registry=r,
        )  # fmt: skip
        self.circuit_state = Gauge(
            "hedge_circuit_state", "Breaker state: 0 closed, 1 half-open, 2 open", pm, registry=r,
            multiprocess_mode="livemax",  # a dead worker's last state must not stick (test_workers_metrics)
        )  # fmt: skip
        self.key_requests = Counter("hedge_key_requests", "Requests per gateway key", ("key_id",), registry=r)
        self.key_cost = Counter("hedge_key_cost_usd", "Spend per gateway key (USD)", ("key_id",), registry=r)

        for m in (
            self.upstream_ttft, self.upstream_duration, self.attempts, self.hedges, self.budget_refusals,
            self.hedge_delay, self.hedge_budget, self.client_ttft, self.requests, self.inflight_attempts,
            self.tokens, self.cost,
            self.wasted_tokens, self.wasted_cost, self.circuit_state, self.key_requests, self.key_cost,
        ):  # fmt: skip
            # `labels()` validates and locks on every call (~2.5 us); label sets here are few and never
            # removed, so memoising the children makes each hot-path observation a dict hit.
            m.labels = functools.lru_cache(maxsize=4096)(m.labels)  # type: ignore[method-assign,assignment]

    def render(self) -> bytes:
        if self._multiprocess_dir:
            reg = CollectorRegistry()
            MultiProcessCollector(reg, path=self._multiprocess_dir)
            return generate_latest(reg)
        return generate_latest(self.registry)
