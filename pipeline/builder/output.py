"""What a build leaves behind: the bundle manifest, the summary table, and the report (via the bench report).

Torch-free: it only formats results that `bitdeploy.builder.run` measured.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitdeploy import __version__
from bitdeploy.benchmarks.schema import PENDING, Status
from bitdeploy.core.fsutil import remove_stale_temps, replace_dir
from bitdeploy.runtimes.fingerprint import LIBRARIES, package_versions
from bitdeploy.runtimes.manifest import Provenance

if TYPE_CHECKING:
    from bitdeploy.benchmarks.ranking import Criteria, Option


@dataclass
class RowResult:
    """One (target, precision) of a build, as the table and report show it."""

    target: str
    precision: str
    status: Status = PENDING  # valid | failed gate | failed: <reason> | skipped: <reason> (text accepted, parsed)
    backend: str | None = None
    bundle: str | None = None
    size_mb: float | None = None
    top1: float | None = None
    reference_top1: float | None = None
    delta_pp: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    latency_n: int | None = None
    images_per_s: float | None = None
    throughput_batch: int | None = None
    throughput: list[dict[str, Any]] | None = None  # [{batch_size, images_per_s, ...}] of the build's sweep
    p50_spread: list[float] | None = None  # [min, max] of the timing rounds' p50
    images_per_s_spread: list[float] | None = None
    disturbed: list[str] = field(default_factory=list)  # why the timing is not quotable (benchmarks.interference)
    precision_used: str | None = None
    device: str | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    accuracy: dict[str, Any] | None = None
    selected: bool = False
    devices: dict[str, str] = field(default_factory=dict)  # --verify-on CPU -> "pass" | "FAIL: why"
    serving_rss_mb: float | None = None  # peak RSS of a fresh runtime process serving batch 1
    cell: str | None = None  # a grid build's (model, resolution) cell, e.g. "m-r50x1-64"
    model: str | None = None
    resolution: int | None = None

    def __post_init__(self) -> None:
        given: object = self.status  # callers and old tests may pass the text a document holds
        if isinstance(given, str):
            self.status = Status.parse(given)

    @property
    def bundle_name(self) -> str:
        return f"{self.target}-{self.precision}"

    @property
    def name(self) -> str:
        return f"{self.cell}/{self.bundle_name}" if self.cell else self.bundle_name

    @property
    def valid(self) -> bool:
        return self.status.is_valid

    @property
    def passes_devices(self) -> bool:
        """Its self-test passed on every --verify-on CPU (true when none was named)."""
        return all(v == "pass" for v in self.devices.values())

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["name"], d["status"] = self.name, self.status.text
        return d


def provenance(extra: dict[str, Any] | None = None) -> Provenance:
    return Provenance(
        bitdeploy=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        versions=package_versions(LIBRARIES),
        details=extra or {},
    )


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


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
        "top-1",
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
        status += "  DISTURBED" if r.disturbed else ""
        p50 = _fmt(r.p50_ms, ".2f") + (
            f" [{r.p50_spread[0]:.2f}-{r.p50_spread[1]:.2f}]" if r.p50_ms is not None and r.p50_spread else ""
        )
        top1 = None if r.top1 is None else r.top1 * 100
        ips = _fmt(r.images_per_s, ".1f") + (
            f" (bs{r.throughput_batch})" if r.images_per_s is not None and r.throughput_batch else ""
        )
        lines.append(
            [
                *([r.model or "-", str(r.resolution or "-")] if grid else []),
                r.target,
                r.precision,
                status,
                _fmt(r.size_mb, ".2f"),
                _fmt(top1, ".2f"),
                _fmt(r.delta_pp, "+.2f"),
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


def option(row: RowResult) -> Option:
    """A row as selection sees it (`benchmarks.ranking.choose`)."""
    from bitdeploy.benchmarks.ranking import Option

    return Option(
        row.name,
        row.valid and row.passes_devices,
        row.top1,
        row.p50_ms,
        (row.p50_spread[0], row.p50_spread[1]) if row.p50_spread else None,
        row.serving_rss_mb,
        (row.accuracy or {}).get("agreement"),
        row.size_mb,
        row,
    )


def select(rows: list[RowResult], criteria: Criteria) -> tuple[RowResult, str]:
    """The row `criteria` picks among the valid ones, and the line explaining it (raises SelectionError when none
    fits). Every valid row already passed the accuracy gate."""
    from bitdeploy.benchmarks.ranking import choose

    picked = choose([option(r) for r in rows], criteria)
    best: RowResult = picked.winner.item
    failed = [r.name for r in rows if r.status.is_failed_gate]
    notes = f"; excluded by the accuracy gate: {', '.join(failed)}" if failed else ""
    elsewhere = [r.name for r in rows if r.valid and not r.passes_devices]
    notes += f"; excluded, failing on a --verify-on CPU: {', '.join(elsewhere)}" if elsewhere else ""
    noisy = [
        r.name for r in (best, picked.runner_up.item if picked.runner_up else None) if r is not None and r.disturbed
    ]
    notes += f"; disturbed timing, not a firm ranking: {', '.join(noisy)}" if noisy else ""
    return best, picked.line + notes


def select_fastest(rows: list[RowResult]) -> tuple[RowResult, str] | None:
    """`select` for the fastest valid row; None when no row can be picked."""
    from bitdeploy.benchmarks.ranking import Criteria, SelectionError

    try:
        return select(rows, Criteria("fastest"))
    except SelectionError:
        return None


def bench_entries(
    rows: list[RowResult], model: dict[str, Any], baseline: list[dict[str, Any]] | None, env: dict[str, Any]
) -> list[dict[str, Any]]:
    """Rows as `bitdeploy bench` result entries, so the bench report renders them (same schema)."""
    from bitdeploy.benchmarks.env import device_label
    from bitdeploy.benchmarks.schema import new_entry

    def timing(r: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        if r.get("p50_ms") is None:
            return None, None
        ss = {
            "n": r.get("latency_n"),
            "p50_ms": r["p50_ms"],
            "p90_ms": r.get("p90_ms"),
            "p99_ms": r.get("p99_ms"),
            "mean_ms": r.get("mean_ms"),
        }
        if r.get("p50_spread"):
            ss["spread"] = {"p50_ms": r["p50_spread"]}
        ss["images_per_s"] = 1000.0 / r["mean_ms"] if r.get("mean_ms") else None
        bs = r.get("throughput_batch")
        sweep = r.get("throughput") or [{"batch_size": bs, "images_per_s": r.get("images_per_s")}]
        off = (
            {
                "results": sweep,
                "best_images_per_s": r.get("images_per_s"),
                "best_batch_size": bs,
                "best_images_per_s_spread": r.get("images_per_s_spread"),
            }
            if r.get("images_per_s")
            else None
        )
        return ss, off

    def common(name: str | None, resolution: int | None) -> dict[str, Any]:
        """The entry's model fields: a grid row's own cell, else the build's one model."""
        return {
            "model": name or model["name"],
            "resolution": resolution or model["resolution"],
            "num_classes": model["num_classes"],
        }

    entries = []
    for b in baseline or []:  # the PyTorch baselines, one per form (benchmarks.baseline)
        from bitdeploy.benchmarks.baseline import entry_name

        ss, off = timing(b)
        describe = {"form": b["form"], "label": b["label"], "compile_s": b.get("compile_s")}
        entries.append(
            new_entry(
                name=entry_name(b["form"], b.get("model") or model["name"], b.get("resolution") or model["resolution"]),
                kind="pytorch",
                target="pytorch",
                precision="fp32",
                precision_used="f32",
                backend_device="cpu",
                device=device_label(env, "cpu"),
                status=b["status"],
                single_stream=ss,
                offline=off,
                describe=describe,
                disturbed=bool(b.get("disturbed")),
                flags=list(b.get("disturbed") or []),
                **common(b.get("model"), b.get("resolution")),
            )
        )
    for r in rows:
        ss, off = timing(r.as_dict())
        entries.append(
            new_entry(
                name=r.name,
                kind="bundle",
                bundle=r.bundle,
                target=r.backend,
                precision=r.precision,
                precision_used=r.precision_used,
                backend_device=r.device,
                device=device_label(env, r.device),
                status=r.status,
                size_mb=r.size_mb,
                single_stream=ss,
                offline=off,
                build_accuracy=r.accuracy,
                error=r.error,
                disturbed=bool(r.disturbed),
                flags=list(r.disturbed),
                **common(r.model, r.resolution),
            )
        )
        if r.serving_rss_mb is not None:
            entries[-1]["serving_memory"] = {"peak_rss_mb": r.serving_rss_mb}
    return entries


def write_report(
    rows: list[RowResult],
    model: dict[str, Any],
    baseline: list[dict[str, Any]] | None,
    rdir: Path,
    selected: dict[str, str] | None,
    settings: dict[str, Any],
) -> Path:
    """report.md / report.html / results.json through the bench report, plus build.json (this build's rows), written
    beside `rdir` and renamed into place: a failure leaves the old report or none. Returns the HTML report's path."""
    from bitdeploy.benchmarks.env import collect
    from bitdeploy.benchmarks.report_render import write_report as bench_report
    from bitdeploy.benchmarks.schema import new_document

    env = collect(settings.get("threads"))
    doc = new_document(
        bench_entries(rows, model, baseline, env), env, {"source": "bitdeploy build", **settings}, selected
    )
    summary = {
        "model": model,
        "rows": [r.as_dict() for r in rows],
        "selected": selected,
        "settings": settings,
        "baseline": baseline,
    }
    remove_stale_temps(rdir.parent, f".{rdir.name}.tmp-")
    tmp = rdir.parent / f".{rdir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        paths = bench_report(doc, tmp, selected)
        (tmp / "build.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
        replace_dir(tmp, rdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rdir / paths["html"].name
