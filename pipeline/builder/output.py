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
from bitdeploy.benchmarks.schema import PENDING, BenchEntry, Status, Timing
from bitdeploy.core.fsutil import remove_stale_temps, replace_dir
from bitdeploy.runtimes.fingerprint import LIBRARIES, package_versions
from bitdeploy.runtimes.manifest import Provenance

if TYPE_CHECKING:
    from bitdeploy.benchmarks.baseline import QuickBaseline
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
    timing: Timing = field(default_factory=Timing)  # the build's quick figures; `disturbed` says why not quotable
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
    search_line: str | None = None  # the INT8 search's one line, when it ran
    float_precision: str = "fp32"  # what the float layers compute in (bf16/fp16: needs --verify-on to be selected)

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
    def device_checked(self) -> bool:
        """Float layers pinned to bf16/fp16 compute what this host's CPU has: such a row is offered to --select
        only after its self-test passed on --verify-on CPUs (a row in fp32 needs none)."""
        return self.float_precision == "fp32" or (bool(self.devices) and self.passes_devices)

    @property
    def passes_devices(self) -> bool:
        """Its self-test passed on every --verify-on CPU (true when none was named)."""
        return all(v == "pass" for v in self.devices.values())

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["timing"]
        d.update(self.timing.flat(), name=self.name, status=self.status.text)
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
        t = r.timing
        status += "  DISTURBED" if t.disturbed else ""
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
        row.valid and row.passes_devices and row.device_checked,
        row.top1,
        row.timing.p50_ms,
        row.timing.p50_spread,
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
    unchecked = [f"{r.name} ({r.float_precision})" for r in rows if r.valid and not r.devices and not r.device_checked]
    notes += f"; excluded until --verify-on checks their float precision: {', '.join(unchecked)}" if unchecked else ""
    noisy = [
        r.name
        for r in (best, picked.runner_up.item if picked.runner_up else None)
        if r is not None and r.timing.disturbed
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
    rows: list[RowResult], model: dict[str, Any], baseline: list[QuickBaseline] | None, env: dict[str, Any]
) -> list[BenchEntry]:
    """Rows and PyTorch baselines as `bitdeploy bench` result entries, so the bench report renders them (same schema)."""
    from bitdeploy.benchmarks.env import device_label

    name, resolution, classes = model["name"], model["resolution"], model["num_classes"]
    entries = [b.entry(classes, device_label(env, "cpu")) for b in baseline or []]
    for r in rows:
        rss = r.serving_rss_mb
        entries.append(
            BenchEntry(
                name=r.name,
                kind="bundle",
                bundle=r.bundle,
                model=r.model or name,  # a grid row's own cell, else the build's one model
                resolution=r.resolution or resolution,
                num_classes=classes,
                target=r.backend,
                precision=r.precision,
                precision_used=r.precision_used,
                backend_device=r.device,
                device=device_label(env, r.device),
                status=r.status,
                size_mb=r.size_mb,
                build_accuracy=r.accuracy,
                error=r.error,
                serving_memory={"peak_rss_mb": rss} if rss is not None else None,
                **r.timing.entry_fields(),
            )
        )
    return entries


def write_report(
    rows: list[RowResult],
    model: dict[str, Any],
    baseline: list[QuickBaseline] | None,
    rdir: Path,
    selected: dict[str, str] | None,
    settings: dict[str, Any],
) -> Path:
    """report.md / report.html / results.json through the bench report, plus build.json (this build's rows), written
    beside `rdir` and renamed into place: a failure leaves the old report or none. Returns the HTML report's path."""
    from bitdeploy.benchmarks.env import collect
    from bitdeploy.benchmarks.report_render import write_report as bench_report
    from bitdeploy.benchmarks.schema import new_document
    from bitdeploy.core.errors import BitdeployError
    from bitdeploy.runtimes.bundle import read_manifest

    env = collect(settings.get("threads"))
    mixes: list[dict[str, Any]] = []  # {"name": row, **int8_mix} per INT8 search: the report's sensitivity plot
    for r in rows:
        try:
            mix = read_manifest(Path(r.bundle)).int8_mix if r.bundle else None
        except (BitdeployError, OSError):
            mix = None  # an unreadable manifest: the report renders without its section
        if mix is not None:
            mixes.append({"name": r.name, **mix.to_dict()})
    doc = new_document(
        bench_entries(rows, model, baseline, env),
        env,
        {"source": "bitdeploy build", **settings, **({"int8_mix": mixes} if mixes else {})},
        selected,
    )
    summary = {
        "model": model,
        "rows": [r.as_dict() for r in rows],
        "selected": selected,
        "settings": settings,
        "baseline": [b.as_dict() for b in baseline] if baseline is not None else None,
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
