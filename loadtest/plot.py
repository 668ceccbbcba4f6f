"""The picture of a run: TTFT distributions per mode (and TTFT over time for time-varying scenarios).

matplotlib is an optional extra (``pip install .[plot]``) and is imported only here, only when a plot
is asked for; without it the run still writes its table and JSON and says the PNG was skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

COLORS = {"direct": "#7f7f7f", "pinned": "#1f77b4", "fast": "#d62728", "oracle": "#2ca02c"}
SPAN_COLORS = ("orange", "purple", "teal", "brown")
TAIL_TICKS = (0.5, 0.9, 0.99, 0.999)
MS_TICKS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


def _ms_axis(axis: Any) -> None:
    """Plain millisecond labels (10, 20, 50, 100 ...) on a log axis instead of 2x10^1-style clutter."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    axis.set_major_locator(FixedLocator(MS_TICKS))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_run(
    samples_ms: Mapping[str, Sequence[float]],
    path: Path,
    *,
    title: str,
    timeline: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    events: Sequence[Mapping[str, Any]] = (),
    spans: Sequence[tuple[float, float, str]] = (),
    labels: Mapping[str, str] | None = None,
) -> Path | None:
    """Write the PNG; None (and nothing written) when matplotlib is not installed.

    Left: TTFT against percentile on a tail-stretching axis (x = 1 / (1 - p), log), where p99 and
    p99.9 get as much room as the median: that is where hedging acts.  Middle: the plain CDF on a log
    time axis.  Right (when a timeline is given): p50 and p99 TTFT per second, to see a slowdown,
    burst or outage arrive and the proxy react; `spans` (start, end, label) shade the scenario's
    slowdowns, bursts and outages there.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ncols = 3 if timeline else 2
    fig, axes = plt.subplots(1, ncols, figsize=(6.0 * ncols, 4.6))
    ax_p, ax_c = axes[0], axes[1]
    # direct last and dashed: with common random numbers it often lies exactly under pinned
    order = sorted(samples_ms, key=lambda m: m == "direct")
    for mode in order:
        ys = sorted(v for v in samples_ms[mode] if v > 0)
        n = len(ys)
        if not n:
            continue
        color = COLORS.get(mode)
        ps = [(i + 0.5) / n for i in range(n)]
        ls = "--" if mode == "direct" else "-"
        ax_p.plot(
            [1.0 / (1.0 - p) for p in ps],
            ys,
            label=(labels or {}).get(mode, f"{mode} (n={n})"),
            color=color,
            lw=1.6,
            ls=ls,
        )
        ax_c.plot(ys, ps, label=mode, color=color, lw=1.6, ls=ls)
    ax_p.set_xscale("log")
    ax_p.set_yscale("log")
    ax_p.set_xticks([1.0 / (1.0 - q) for q in TAIL_TICKS])
    ax_p.set_xticklabels([f"p{100 * q:g}" for q in TAIL_TICKS])
    _ms_axis(ax_p.yaxis)
    ax_p.set_xlabel("percentile")
    ax_p.set_ylabel("TTFT (ms, log)")
    ax_p.set_title("TTFT by percentile")
    ax_p.grid(True, which="both", alpha=0.3)
    ax_p.legend(loc="upper left", fontsize=8)
    ax_c.set_xscale("log")
    _ms_axis(ax_c.xaxis)
    ax_c.set_xlabel("TTFT (ms, log)")
    ax_c.set_ylabel("fraction of requests")
    ax_c.set_title("TTFT CDF")
    ax_c.grid(True, which="both", alpha=0.3)
    ax_c.legend(loc="lower right", fontsize=8)
    if timeline:
        ax_t = axes[2]
        nan = float("nan")
        for mode, rows in timeline.items():
            color = COLORS.get(mode)
            ts = [r["t"] for r in rows]
            # NaN (not a skipped point) where a second had no successful request: the line breaks there
            p50 = [r.get("ttft_p50_ms") or nan for r in rows]
            p99 = [r.get("ttft_p99_ms") or nan for r in rows]
            ax_t.plot(ts, p50, color=color, lw=1.0, ls=":")
            ax_t.plot(ts, p99, color=color, lw=1.4, label=f"{mode} p99 (dotted: p50)")
        for ev in events:
            ax_t.axvline(ev["t"], color="black", alpha=0.4, lw=0.8, ls="--")
        labelled: set[str] = set()
        for start, end, label in spans:
            ax_t.axvspan(
                start, end, color="orange", alpha=0.12, lw=0, label=None if label in labelled else label
            )
            labelled.add(label)
        ax_t.set_yscale("log")
        _ms_axis(ax_t.yaxis)
        ax_t.set_xlabel("seconds into the run")
        ax_t.set_ylabel("TTFT (ms, log)")
        ax_t.set_title("TTFT per second")
        ax_t.grid(True, which="both", alpha=0.3)
        ax_t.legend(loc="upper left", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PROVIDER_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def plot_timeline(
    points: Mapping[str, Sequence[tuple[float, float, str | None]]],
    delays_ms: Sequence[tuple[float, float]],
    path: Path,
    *,
    title: str,
    spans: Sequence[tuple[float, float, str]] = (),
) -> Path | None:
    """TTFT of every request over time, one panel per mode, colour = the provider that served it; on
    the fast lane's panel, the proxy's hedge delay (sampled from /metrics) as a line. A slowdown shows
    as the serving colour changing and the dots climbing, not as a number in a table.

    `points`: mode -> (seconds into the run, TTFT ms, serving provider or None). None (and nothing
    written) without matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    modes = [m for m in points if points[m]]
    if not modes:
        return None
    providers = sorted({p for m in modes for (_, _, p) in points[m] if p is not None})
    color = {p: PROVIDER_COLORS[i % len(PROVIDER_COLORS)] for i, p in enumerate(providers)}
    fig, axes = plt.subplots(
        len(modes), 1, figsize=(12.0, 2.4 * len(modes) + 0.8), sharex=True, squeeze=False
    )
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        for prov in [*providers, None]:
            pts = [(t, v) for (t, v, p) in points[mode] if p == prov]
            if pts:
                ax.scatter(
                    [t for t, _ in pts], [v for _, v in pts], s=4, lw=0, alpha=0.7,
                    color=color.get(prov, "#7f7f7f") if prov else "#7f7f7f",
                    label=prov or "unknown",
                )  # fmt: skip
        if mode == "fast" and delays_ms:
            ax.step([t for t, _ in delays_ms], [d for _, d in delays_ms], where="post", color="black",
                    lw=1.0, label="hedge delay")  # fmt: skip
        labelled: set[str] = set()
        for start, end, label in spans:
            ax.axvspan(
                start, end, color="orange", alpha=0.10, lw=0, label=None if label in labelled else label
            )
            labelled.add(label)
        ax.set_yscale("log")
        _ms_axis(ax.yaxis)
        ax.set_ylabel(f"{mode}\nTTFT (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", fontsize=7, markerscale=3, ncol=4)
    axes[-1, 0].set_xlabel("seconds into the run")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
