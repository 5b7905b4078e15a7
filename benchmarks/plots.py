"""The report's plots, rendered with matplotlib's Agg backend to base64 PNG (inline, no file, no URL).

Each function takes report rows (`report.table_rows`) and returns a matplotlib Figure, or None when there is
nothing to draw. matplotlib is optional: without it the report has its tables and says why it has no plots.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

# matplotlib's tab10, then its lighter tab20 partners: a --target all report has 12+ rows, each needs its own colour.
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#c7c7c7",
    "#dbdb8d",
    "#9edae5",
)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower latency, higher accuracy), by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _plain_log_axis(axis: Any, set_scale: Any) -> None:
    """A log scale labelled in plain numbers (1, 2, 5, 10, 20, ...), without crowded minor-tick labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    set_scale("log")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    # ScalarFormatter rounds ticks below 1 (0.2, 0.5) to "0"; %g keeps every tick its own value.
    axis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
    axis.set_minor_formatter(NullFormatter())


def _span_limits(lo: float, hi: float, log_ratio: float) -> tuple[float, float, bool]:
    """(low, high, log) around [lo, hi]: a log axis when hi / lo exceeds `log_ratio`, else a linear one with margins."""
    log = hi / max(lo, 1e-9) > log_ratio
    return (
        (lo / 1.25, hi * 1.25, True)
        if log
        else (max(0.0, lo - 0.08 * (hi - lo) - 0.02 * hi), hi + 0.08 * (hi - lo) + 0.02 * hi, False)
    )


def latency_axis_limits(rows: list[dict[str, Any]]) -> tuple[float, float, bool]:
    """(low, high, log) for a latency panel: from below the fastest p1 to above the slowest p99 of these rows
    only, so no other row squashes their boxes; a log axis when they span more than 20x."""
    lows, highs = [], []
    for r in rows:
        ss = r["entry"]["single_stream"]
        raw = ss.get("latencies_ms")
        lows.append(float(np.percentile(raw, 1)) if raw else ss.get("min_ms") or ss["p50_ms"])
        highs.append(ss.get("p99_ms") or ss["p50_ms"])
    return _span_limits(min(lows), max(highs), 20.0)


def _latency_panel(ax: Any, rows: list[dict[str, Any]], title: str, legend: bool) -> None:
    for i, r in enumerate(rows):
        ss = r["entry"]["single_stream"]
        raw = ss.get("latencies_ms")
        if raw:
            ax.boxplot([raw], positions=[i], vert=False, widths=0.6, whis=(1, 99), showfliers=False)
        for key, marker in (("p50_ms", "|"), ("p90_ms", "x"), ("p99_ms", "^")):
            if ss.get(key) is not None:
                ax.plot(ss[key], i, marker, color="black", markersize=8, label=key[:3] if i == 0 and legend else None)
    ax.set_yticks(
        range(len(rows)),
        [
            f"{r['label']} (n={r['entry']['single_stream'].get('n')})" + (" DISTURBED" if r.get("disturbed") else "")
            for r in rows
        ],
    )
    lo, hi, log = latency_axis_limits(rows)
    if log:
        _plain_log_axis(ax.xaxis, ax.set_xscale)
    ax.set_xlim(lo, hi)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def latency_distribution(rows: list[dict[str, Any]]) -> Any:
    """Deployed bundles on their own axis (top), the PyTorch baselines on a second one (bottom): the baselines
    are several times slower and would squash every bundle's box against the axis."""
    rows = [r for r in rows if r["entry"].get("single_stream") and r["entry"]["single_stream"].get("p50_ms")]
    if not rows:
        return None
    groups = [
        g
        for g in (
            [r for r in rows if r["entry"].get("kind") != "pytorch"],
            [r for r in rows if r["entry"].get("kind") == "pytorch"],
        )
        if g
    ]
    plt = _plt()
    heights = [0.6 * len(g) + 0.9 for g in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, sum(heights) + 1.0), height_ratios=heights, squeeze=False)
    titles = (
        ("Deployed bundles", "PyTorch FP32 baselines (own axis)")
        if len(groups) == 2
        else (("Deployed bundles",) if groups[0][0]["entry"].get("kind") != "pytorch" else ("PyTorch FP32 baselines",))
    )
    for k, (ax, group, title) in enumerate(zip(axes[:, 0], groups, titles)):
        _latency_panel(ax, group, title, legend=k == 0)
    axes[0, 0].legend(loc="lower right", fontsize=8)
    axes[-1, 0].set_xlabel("batch-1 latency, ms (box: quartiles, whiskers: p1-p99)")
    fig.suptitle("Single-stream latency distribution")
    fig.tight_layout()
    return fig


def throughput_vs_batch(rows: list[dict[str, Any]]) -> Any:
    rows = [r for r in rows if (r["entry"].get("offline") or {}).get("results")]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, r in enumerate(rows):
        res = sorted(
            (x for x in r["entry"]["offline"]["results"] if x.get("images_per_s")), key=lambda x: x["batch_size"]
        )
        style = "s--" if r["entry"].get("kind") == "pytorch" else "o-"  # baselines dashed
        ys = [x["images_per_s"] for x in res]
        spreads = [x.get("images_per_s_spread") or [y, y] for x, y in zip(res, ys)]
        xs = [x["batch_size"] for x in res]
        colour = PALETTE[i % len(PALETTE)]
        alpha = 0.45 if r.get("disturbed") else 1.0
        ax.plot(
            xs, ys, style, color=colour, alpha=alpha, label=r["label"] + (" (DISTURBED)" if r.get("disturbed") else "")
        )
        low = [y - lo for y, (lo, _) in zip(ys, spreads)]
        high = [hi - y for y, (_, hi) in zip(ys, spreads)]
        ax.errorbar(xs, ys, yerr=[low, high], fmt="none", ecolor=colour, alpha=alpha, capsize=3)
    ax.set_xscale("log", base=2)
    sizes = sorted({x["batch_size"] for r in rows for x in r["entry"]["offline"]["results"]})
    ax.set_xticks(sizes, [str(b) for b in sizes])
    _plain_log_axis(
        ax.yaxis, ax.set_yscale
    )  # baselines and INT8 bundles differ by 10x or more: each line keeps its shape
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s (log)")
    ax.set_title("Offline throughput against batch size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


# The front figure's encoding: marker shape = target (backend), fill = precision, colour = (model, resolution).
def end_to_end_split(rows: list[dict[str, Any]]) -> Any:
    rows = [r for r in rows if (r["entry"].get("end_to_end") or {}).get("mean_ms")]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.6))
    for i, r in enumerate(rows):
        e2e = r["entry"]["end_to_end"]
        pre, inf = e2e.get("preprocess_mean_ms") or 0.0, e2e.get("infer_mean_ms") or 0.0
        ax.barh(i, pre, color="#ff7f0e", label="decode + preprocess" if i == 0 else None)
        ax.barh(i, inf, left=pre, color="#1f77b4", label="infer" if i == 0 else None)
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows])
    ax.set_xlabel("mean ms per image, batch 1")
    ax.set_title("End-to-end latency: decode + preprocess + infer")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def to_base64_png(fig: Any) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")
