"""The build's summary table: one line per target x precision (per model and resolution in a grid), as
Ultralytics prints it."""

from __future__ import annotations

from bitdeploy.benchmarks.report import interval
from bitdeploy.builder.result import RowResult


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _level(rows: list[RowResult]) -> str:
    """ " [95% CI]" for the top-1 header when the rows' intervals share one level ("" when none has one)."""
    levels = {r.confidence for r in rows if r.top1_ci is not None and r.confidence is not None}
    if not levels:
        return ""
    return f" [{next(iter(levels)) * 100:g}% CI]" if len(levels) == 1 else " [CI]"


def table(rows: list[RowResult]) -> str:
    """The Ultralytics-style summary: one line per target x precision (per model and resolution in a grid)."""
    cpus = list(dict.fromkeys(c for r in rows for c in r.devices))  # --verify-on: one column per CPU
    grid = any(r.cell for r in rows)
    memory = any(r.serving_rss_mb is not None for r in rows)
    header = [
        *(["model", "px"] if grid else []),
        "target",
        "precision",
        "status",
        "size MB",
        f"top-1{_level(rows)}",
        "Δ top-1 pp",
        "p50 ms (bs1)",
        "images/s",
        *(["peak RSS MB"] if memory else []),
        *cpus,
    ]
    left = 5 if grid else 3  # left-aligned text columns
    lines = [header]
    for r in rows:
        text = r.status.text
        status = (text if len(text) <= 64 else text[:63] + "…") + ("  <- selected" if r.selected else "")
        t = r.timing
        status += "  DISTURBED" if t.disturbed else ""
        status += "  within noise" if r.noise else ""
        p50 = _fmt(t.p50_ms, ".2f") + (
            f" [{t.p50_spread[0]:.2f}-{t.p50_spread[1]:.2f}]" if t.p50_ms is not None and t.p50_spread else ""
        )
        top1 = None if r.top1 is None else r.top1 * 100
        ips = _fmt(t.images_per_s, ".1f") + (
            f" (bs{t.throughput_batch})" if t.images_per_s is not None and t.throughput_batch else ""
        )
        lines.append(
            [
                *([r.model or "-", str(r.resolution or "-")] if grid else []),
                r.target,
                r.precision_label,
                status,
                _fmt(r.size_mb, ".2f"),
                _fmt(top1, ".2f") + (interval(r.top1_ci, 100) if top1 is not None else ""),
                _fmt(r.delta_pp, "+.2f") + (interval(r.delta_ci_pp, signed=True) if r.delta_pp is not None else ""),
                p50,
                ips,
                *([_fmt(r.serving_rss_mb, ".0f")] if memory else []),
                *(r.devices[c].split(":")[0] if c in r.devices else "-" for c in cpus),
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = []
    for j, line in enumerate(lines):
        out.append(
            "  ".join(
                str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths))
            ).rstrip()
        )
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
