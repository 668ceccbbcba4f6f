"""Every dashboard series exists from start-up at 0 (issue 9): budget refusals, hedges and failed attempts
per configured route and candidate, so panels show 0 instead of "No data" before anything happens."""

from __future__ import annotations

from hedge.catalog import Catalog
from hedge.config import parse_config
from hedge.proxy import Proxy

from ..conftest import raw_config


def test_refusal_hedge_and_failure_series_start_at_zero() -> None:
    cfg = parse_config(raw_config({"a": "http://a.invalid/v1", "b": "http://b.invalid/v1"}))
    proxy = Proxy(Catalog(cfg))
    text = proxy.metrics.render().decode()
    for route in cfg.routes.values():
        assert f'hedge_hedges_total{{reason="error",route="{route.name}"}} 0.0' in text
    hedging = [r.name for r in cfg.routes.values() if r.strategy == "hedge"]
    assert hedging
    for name in hedging:
        assert f'hedge_budget_refusals_total{{route="{name}"}} 0.0' in text
        for reason in ("delay", "explore"):
            assert f'hedge_hedges_total{{reason="{reason}",route="{name}"}} 0.0' in text
    for c in Catalog(cfg).all_candidates():
        labels = f'api="chat",model="{c.upstream_model}",outcome="failed",provider="{c.provider.name}"'
        assert f"hedge_attempts_total{{{labels}}} 0.0" in text
