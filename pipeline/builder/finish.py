"""The finish of a build, once its rows are built and timed: --verify-on, the selection, the table, the report,
the last line and the exit status.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitdeploy.builder import verify_on as build_verify_on
from bitdeploy.builder.options import BuildOptions, report_dir
from bitdeploy.builder.report import write_report
from bitdeploy.builder.result import RowResult
from bitdeploy.builder.table import table
from bitdeploy.builder.timing import BUILD_BATCH_SIZES, Timed
from bitdeploy.core.errors import AccuracyGateError, BitdeployError, ResourceError
from bitdeploy.core.resources import guarded

if TYPE_CHECKING:
    from bitdeploy.benchmarks.baseline import QuickBaseline
    from bitdeploy.benchmarks.ranking import Criteria, Option


@dataclass
class BuildResult:
    rows: list[RowResult]
    selected: dict[str, str] | None
    report_dir: Path | None
    cache_hits: list[str]
    seconds: float


@dataclass
class CellBuild:
    """One (model, resolution) of a build: its rows, the bundles to time, and what the report needs of it."""

    rows: list[RowResult]
    timeable: list[tuple[RowResult, Timed]]
    model_info: dict[str, Any] | None = None
    baseline: list[QuickBaseline] | None = None


def finish(
    opts: BuildOptions,
    cells: list[CellBuild],
    hits: list[str],
    started: float,
    log: Callable[[str], None],
    show: Callable[[str], None],
    grid: bool = False,
    note: str | None = None,
) -> BuildResult:
    """After the rows are built and timed: --verify-on, the selection, the table, the report, the exit status."""
    rows = [r for c in cells for r in c.rows]
    if opts.gate.verify_on:
        build_verify_on.run(rows, opts.gate.verify_on, opts.engine.threads, log)

    selected, unmet = None, None
    criteria = opts.criteria()
    if criteria is not None:
        from bitdeploy.benchmarks.ranking import SelectionError

        try:
            best, line = select(rows, criteria)
            best.selected = True
            selected = {"name": best.name, "reason": line}
        except SelectionError as exc:
            unmet = str(exc)
    show(table(rows))
    for r in rows:
        if r.search_line:
            show(f"int8 search: {r.search_line}")
        if r.qat_line:
            show(f"int8 qat: {r.qat_line}")
    if selected:
        show(f"selected: {selected['reason']}")
    _check_quiet(opts, rows, log)
    rdir = None
    if opts.timing.report and any(r.timing.p50_ms is not None for r in rows):
        rdir = report_dir(opts, 2 if grid else len(rows))
        try:
            settings = {
                "threads": opts.engine.threads,
                "max_accuracy_drop_pp": opts.gate.spec().drop_allowance,
                "min_agreement_pct": opts.gate.min_agreement,
                "gate_confidence": opts.gate.gate_confidence,  # None: the gate judged the point estimates
                "iterations": opts.timing.bench_iterations,
                "warmup": 10,
                "batch_sizes": list(BUILD_BATCH_SIZES),
                "dataset": opts.dataset,
                "scenario": "build quick timing (use `bitdeploy bench` for full runs)",
                "verified_on": {r.name: r.devices for r in rows if r.devices},  # the report's device matrix
                "selection": criteria.describe() if criteria is not None else None,
            }
            model = next((c.model_info for c in cells if c.model_info), None)
            baseline = [b for c in cells for b in c.baseline or []] or None
            with guarded(rdir.parent, "pass --out DIR", "build report"):
                html = write_report(rows, model or {}, baseline, rdir, selected, settings)
            show(f"report: {html}")
        except ResourceError:
            raise  # the disk is full or read-only: the line says which and what to do
        except Exception as exc:  # a report problem must not turn a good build into a failure
            log(
                f"warning: the build report could not be written ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            )
            rdir = None
    result = BuildResult(rows, selected, rdir, hits, time.perf_counter() - started)
    show(status_line(rows, result.seconds, hits))
    if note:
        show(note)
    if unmet is not None:
        raise BitdeployError(unmet)
    _raise_for_failures(opts, rows, grid)
    build_verify_on.raise_for_devices(rows, selected is not None)
    return result


def _check_quiet(opts: BuildOptions, rows: list[RowResult], log: Callable[[str], None]) -> None:
    """Say which rows were timed on a busy machine; with --quiet-check fail, stop before the report."""
    noisy = [r for r in rows if r.timing.disturbed]
    if noisy and opts.timing.quiet_check == "fail":
        raise BitdeployError(
            f"{len(noisy)} of {len(rows)} rows timed while the machine was busy ({noisy[0].name}: "
            f"{noisy[0].timing.disturbed[0]}); the bundles are built, no report written; rerun on a quiet machine"
        )
    for r in noisy:
        log(f"warning: {r.name}: timing disturbed: {'; '.join(r.timing.disturbed)}")
    if noisy:
        log("warning: disturbed timings are not quotable and may change --select fastest (docs/measuring.md)")


def status_line(rows: list[RowResult], seconds: float, hits: list[str]) -> str:
    """The build's last line: `done` only when every row that ran is valid (or ready for the device), else which
    rows failed."""
    counts = {h: hits.count(h) for h in dict.fromkeys(hits)}
    hit_names = [f"{h} x{n}" if n > 1 else h for h, n in counts.items()]
    cached = f" (cache hits: {', '.join(hit_names)})" if hits else ""
    failed = [r for r in rows if not r.valid and not r.status.is_skipped and not r.status.is_ready]
    ready = [r.name for r in rows if r.status.is_ready]
    device = f"; ready for the device (`bitdeploy engine` builds the engine there): {', '.join(ready)}" if ready else ""
    if not failed:
        return f"done in {seconds:.1f} s{cached}{device}"
    ran = sum(1 for r in rows if not r.status.is_skipped)
    named = ", ".join(f"{r.name} ({'failed gate' if r.status.is_failed_gate else 'error'})" for r in failed)
    return f"finished in {seconds:.1f} s{cached}: {len(failed)} of {ran} bundles failed: {named}"


def _raise_for_failures(opts: BuildOptions, rows: list[RowResult], grid: bool = False) -> None:
    built = [r for r in rows if not r.status.is_skipped]
    bad = [r for r in built if not r.valid and not r.status.is_ready]
    if opts.engine.target == "all" or grid:  # exploring: failing rows are findings, only a build with none valid fails
        if not any(r.valid or r.status.is_ready for r in rows):
            raise BitdeployError("no target produced a valid bundle; see the table above")
        return
    if not bad:
        return
    first = bad[0]
    if first.status.is_failed_gate:
        gate = first.gate
        what = (
            opts.gate.spec().shortfall(gate.top1_drop_pp, gate.agreement, gate.top1_drop_ci_pp, gate.agreement_ci)
            if gate is not None and gate.top1_drop_pp is not None
            else "outputs differ from the FP32 reference beyond tolerance"
        )
        own = first.plan.own
        hint = own.gate_hint(first.precision) if own is not None else None
        fix = f"; {hint}" if hint else "; raise --max-accuracy-drop or calibrate with more images (--calib-size)"
        if first.search_line:  # the search ran and found nothing: say what it found best
            fix = f"; INT8 search: {first.search_line.removeprefix(f'{first.name}: ')}"
        if first.qat_line:
            fix += f"; {first.qat_line}"
        raise AccuracyGateError(
            f"{first.name} failed the accuracy gate: {what}; bundle {first.bundle} is marked invalid{fix}"
        )
    raise BitdeployError(
        f"{first.name}: {first.error or first.status}"
        + (f" ({len(bad) - 1} more failed, see the table)" if len(bad) > 1 else "")
    )


def option(row: RowResult) -> Option:
    """A row as selection sees it (`benchmarks.ranking.choose`)."""
    from bitdeploy.benchmarks.ranking import Option

    return Option(
        row.name,
        row.valid,
        row.top1,
        row.timing.p50_ms,
        row.timing.p50_spread,
        row.serving_rss_mb,
        (row.accuracy or {}).get("agreement"),
        row.size_mb,
        row,
        row.exclusion,  # failed on a --verify-on CPU, or a bf16/fp16 pin no CPU computing it checked
    )


def select(rows: list[RowResult], criteria: Criteria) -> tuple[RowResult, str]:
    """The row `criteria` picks among the valid ones, and the line explaining it (raises SelectionError when none
    fits). Every valid row already passed the accuracy gate; `choose` names the valid ones it may not pick."""
    from bitdeploy.benchmarks.ranking import choose

    picked = choose([option(r) for r in rows], criteria)
    best: RowResult = picked.winner.item
    failed = [r.name for r in rows if r.status.is_failed_gate]
    notes = f"; excluded by the accuracy gate: {', '.join(failed)}" if failed else ""
    ready = [r.name for r in rows if r.status.is_ready]
    notes += f"; not timed here (engine built on the device): {', '.join(ready)}" if ready else ""
    noisy = [
        r.name
        for r in (best, picked.runner_up.item if picked.runner_up else None)
        if r is not None and r.timing.disturbed
    ]
    notes += f"; disturbed timing, not a firm ranking: {', '.join(noisy)}" if noisy else ""
    return best, picked.line + notes
