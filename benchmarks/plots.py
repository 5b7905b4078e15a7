"""The report's plots, rendered with matplotlib's Agg backend to base64 PNG (inline, no file, no URL).

Each function takes report rows (`report.table_rows`) and returns a matplotlib Figure, or None when there is
nothing to draw. matplotlib is optional: without it the report has its tables and says why it has no plots.
"""

from __future__ import annotations

import base64
import io
from typing import Any

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


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


def latency_distribution(rows: list[dict[str, Any]]) -> Any:
    rows = [r for r in rows if r["entry"].get("single_stream")]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.6))
    labels = []
    for i, r in enumerate(rows):
        ss = r["entry"]["single_stream"]
        raw = ss.get("latencies_ms")
        if raw:
            ax.boxplot([raw], positions=[i], vert=False, widths=0.6, whis=(1, 99), showfliers=True, flierprops={"markersize": 2, "alpha": 0.4})
        for key, marker in (("p50_ms", "|"), ("p90_ms", "x"), ("p99_ms", "^")):
            if ss.get(key) is not None:
                ax.plot(ss[key], i, marker, color="black", markersize=8, label=key[:3] if i == 0 else None)
        labels.append(f"{r['label']} (n={ss.get('n')})")
    ax.set_yticks(range(len(rows)), labels)
    values = [v for r in rows for v in (r["entry"]["single_stream"].get("min_ms"), r["entry"]["single_stream"].get("max_ms")) if v]
    if values and max(values) / max(min(values), 1e-9) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("batch-1 latency, ms (box: quartiles, whiskers: p1-p99)")
    ax.set_title("Single-stream latency distribution")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def throughput_vs_batch(rows: list[dict[str, Any]]) -> Any:
    rows = [r for r in rows if (r["entry"].get("offline") or {}).get("results")]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(rows):
        res = [x for x in r["entry"]["offline"]["results"] if x.get("images_per_s")]
        ax.plot([x["batch_size"] for x in res], [x["images_per_s"] for x in res], "o-", color=PALETTE[i % len(PALETTE)], label=r["label"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s")
    ax.set_title("Offline throughput against batch size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_vs_latency(rows: list[dict[str, Any]]) -> Any:
    pts = [r for r in rows if r["top1"] is not None and r["p50"]]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_title("Top-1 against batch-1 p50 latency")
    ax.set_xlabel("p50 latency, ms (lower is better)")
    ax.set_ylabel("top-1, % (higher is better)")
    if not pts:
        ax.text(0.5, 0.5, "no accuracy figures: run bench with --dataset,\nor report bundles built with an accuracy gate", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return fig
    xy = [(r["p50"], r["top1"] * 100) for r in pts]
    front = pareto_front(xy)
    for i, r in enumerate(pts):
        on = i in front
        ax.scatter(*xy[i], s=60, color=PALETTE[i % len(PALETTE)], edgecolors="black" if on else "none", zorder=3)
        ax.annotate(r["label"], xy[i], textcoords="offset points", xytext=(5, 4), fontsize=8)
        if r["selected"]:
            ax.scatter(*xy[i], s=320, facecolors="none", edgecolors="red", linewidths=2, zorder=4, label="selected")
    # The front as a staircase, carried to the slowest point so a single-point front is still drawn.
    fx = [xy[i][0] for i in front] + [max(x for x, _ in xy)]
    fy = [xy[i][1] for i in front] + [xy[front[-1]][1]]
    ax.step(fx, fy, where="post", color="black", linestyle="--", alpha=0.7, label="Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


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


def render_all(rows: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], str | None]:
    """[(title, base64 PNG)] for every plot with data, and a note when plots are missing."""
    try:
        _plt()
    except ImportError:
        return [], 'matplotlib is not installed, so this report has no plots; install it with: pip install "bitdeploy[all]"'
    figures = []
    for title, fn in (
        ("Latency distribution per bundle", latency_distribution),
        ("Throughput against batch size", throughput_vs_batch),
        ("Accuracy against latency, Pareto front marked", accuracy_vs_latency),
        ("End-to-end latency split", end_to_end_split),
    ):
        fig = fn(rows)
        if fig is not None:
            figures.append((title, to_base64_png(fig)))
    return figures, None
