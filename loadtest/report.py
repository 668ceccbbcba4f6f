"""Percentiles, per-mode summaries and the printed tables.

Pure functions over plain lists and dicts so they can be unit-tested without running anything, and so
the JSON written by a run is exactly what the table was computed from.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0, 99.9)


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100) of already sorted values, interpolating linearly between ranks.

    This is the usual "type 7" estimator (numpy's default): exact at the sample points, monotone in p.
    With n samples, percentiles above ``100 * (1 - 1/n)`` rest on the single largest sample, which is
    why summaries also carry the count.  None for no data.
    """
    n = len(sorted_values)
    if n == 0:
        return None
    if not 0.0 <= p <= 100.0 or math.isnan(p):
        raise ValueError(f"percentile must be within [0, 100], got {p}")
    if n == 1:
        return float(sorted_values[0])
    rank = (n - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac)


def pkey(p: float) -> str:
    """50 -> "p50", 99.9 -> "p99.9": the JSON key of a percentile."""
    return f"p{p:g}"


def distribution(values: Iterable[float], ps: Sequence[float] = PERCENTILES) -> dict[str, Any]:
    """Count, mean, min, max and the percentiles of `values` (seconds in, milliseconds out)."""
    xs = sorted(values)
    out: dict[str, Any] = {"n": len(xs)}
    if not xs:
        out.update({"mean_ms": None, "min_ms": None, "max_ms": None})
        out.update({pkey(p) + "_ms": None for p in ps})
        return out
    out["mean_ms"] = _ms(sum(xs) / len(xs))
    out["min_ms"] = _ms(xs[0])
    out["max_ms"] = _ms(xs[-1])
    for p in ps:
        out[pkey(p) + "_ms"] = _ms(percentile(xs, p))
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def summarize_mode(
    ttfts: Sequence[float],
    totals: Sequence[float],
    errors: Iterable[str],
    *,
    sent: int,
    upstream_requests: int | None = None,
    upstream_disconnects: int | None = None,
    endpoints: Iterable[str | None] = (),
) -> dict[str, Any]:
    """One mode's figures: latency distributions of the successful requests, error counts by reason,
    and the upstream load it caused per client request."""
    err = Counter(errors)
    n_err = sum(err.values())
    wins = Counter(e for e in endpoints if e)
    out: dict[str, Any] = {
        "sent": sent,
        "ok": len(ttfts),
        "errors": n_err,
        "error_rate": round(n_err / sent, 5) if sent else None,
        "errors_by_reason": dict(sorted(err.items())),
        "ttft": distribution(ttfts),
        "total": distribution(totals),
        "upstream_requests": upstream_requests,
        "upstream_per_request": (
            round(upstream_requests / sent, 4) if upstream_requests is not None and sent else None
        ),
        "upstream_disconnects": upstream_disconnects,
        "served_by": dict(sorted(wins.items())),
    }
    return out


def fmt_ms(v: float | None) -> str:
    """Milliseconds with about three significant digits; seconds from 1 s up."""
    if v is None:
        return "-"
    if v >= 999.5:
        return f"{v / 1000:.2f}s"
    if v >= 99.95:
        return f"{v:.0f}"
    if v >= 9.995:
        return f"{v:.1f}"
    return f"{v:.2f}"


def format_table(rows: Mapping[str, Mapping[str, Any]], ps: Sequence[float] = PERCENTILES) -> str:
    """The run table: one row per mode, TTFT and total-time percentiles in ms, errors, upstream load."""
    pcols = [pkey(p) for p in ps]
    header = (
        ["mode", "sent", "errors"]
        + [f"ttft {c}" for c in pcols]
        + [f"total {c}" for c in pcols]
        + ["upstream/req"]
    )
    table: list[list[str]] = [header]
    for mode, r in rows.items():
        err = r.get("errors", 0)
        rate = r.get("error_rate")
        err_s = f"{err}" if not err else f"{err} ({100 * (rate or 0):.1f}%)"
        up = r.get("upstream_per_request")
        table.append(
            [mode, str(r.get("sent", 0)), err_s]
            + [fmt_ms(r["ttft"].get(c + "_ms")) for c in pcols]
            + [fmt_ms(r["total"].get(c + "_ms")) for c in pcols]
            + ["-" if up is None else f"{up:.2f}"]
        )
    return render(table)


def render(table: Sequence[Sequence[str]]) -> str:
    """Left-align the first column, right-align the rest; a rule under the header."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for k, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """min / median / max of repeated measurements (how noisy a figure was)."""
    xs = sorted(values)
    return {"min": xs[0] if xs else None, "median": percentile(xs, 50.0), "max": xs[-1] if xs else None}


def nearest_rank(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100) by nearest rank, as the simulator (`hedge.sim.pct`) reads it: an
    actual value, so a failed request counted as ``inf`` stays in the tail instead of making it nan."""
    if not values:
        return None
    xs = sorted(values)
    return xs[min(len(xs) - 1, max(0, math.ceil(p / 100.0 * len(xs)) - 1))]


def after_change(
    ttfts: Sequence[float], own: Mapping[str, Sequence[float]], attempts: Sequence[int]
) -> dict[str, Any]:
    """Issue 9's slowdown measure over one window of requests: the mode's p99 TTFT (failures count as
    ``inf``), each provider's *own* p99 on the same requests (what it alone would have answered), the
    ratio to the best of those, and the extra load (upstream attempts per request - 1)."""
    p99 = nearest_rank(ttfts, 99.0)
    owns = {name: nearest_rank(xs, 99.0) for name, xs in own.items()}
    finite = {k: v for k, v in owns.items() if v is not None}
    best = min(finite, key=lambda k: finite[k]) if finite else None
    best_p99 = finite[best] if best is not None else None
    return {
        "n": len(ttfts),
        "p99_ms": _ms(p99) if p99 is not None and math.isfinite(p99) else None,
        "p99_inf": p99 is not None and not math.isfinite(p99),
        "own_p99_ms": {k: _ms(v) if v is not None and math.isfinite(v) else None for k, v in owns.items()},
        "best": best,
        "ratio": None if p99 is None or best_p99 is None or not best_p99 else p99 / best_p99,
        "extra_load": round(sum(attempts) / len(attempts) - 1.0, 4) if attempts else None,
    }


def lead_time(
    points: Sequence[tuple[float, str | None]],
    provider: str,
    after: float,
    span: float = 2.0,
    share: float = 0.9,
) -> float | None:
    """Seconds after `after` until `provider` serves at least `share` of the requests sent over the next
    `span` seconds ((send time, serving provider) points); None if it never does within the run."""
    pts = sorted((t, who) for t, who in points if t >= after)
    end = pts[-1][0] if pts else after
    for i, (t, _) in enumerate(pts):
        if t + span > end:
            break
        nxt = [who for u, who in pts[i:] if u < t + span]
        if sum(who == provider for who in nxt) >= share * len(nxt):
            return t - after
    return None
