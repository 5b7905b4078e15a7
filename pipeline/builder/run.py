"""`bitdeploy build`: weights [-> fine-tune] -> ONNX export -> per (target, precision): convert -> gate -> bundle.

Steps that do not depend on the target (fine-tune, export, reference logits, calibration) run once per
build and are cached by content (`bitdeploy.core.cache`). Each (target, precision) row then runs its converter
(`bitdeploy.core.targets.TARGETS`), evaluates the artifact against the FP32 PyTorch reference, times it, and
writes a bundle atomically. One row's failure never stops the others; the summary table shows them all.

Output layout: one row -> `--out` is the bundle and the report goes to `<out>.report/`; several rows ->
`<out>/<target>-<precision>/` bundles and `<out>/report/`. A bundle that fails the accuracy gate is still
written, with `"valid": false` and the reason, so it can be inspected; runtimes refuse to load it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitdeploy.benchmarks.schema import Status
from bitdeploy.builder import output as build_output
from bitdeploy.builder import verify_on as build_verify_on
from bitdeploy.builder.checks import check_options
from bitdeploy.builder.context import (
    BUILD_BATCH_SIZES,
    BUILD_THROUGHPUT_IMAGES,
    DEFAULT_RESOLUTION,
    BuildContext,
    BuildOptions,
    quick_timing,
    report_dir,
)
from bitdeploy.builder.output import RowResult
from bitdeploy.builder.row import Timeable, build_row, time_rows
from bitdeploy.core import interrupts
from bitdeploy.core.cache import StageCache
from bitdeploy.core.errors import AccuracyGateError, BitdeployError, ResourceError, require
from bitdeploy.core.resources import guarded
from bitdeploy.core.targets import TARGETS, Target, get_target
from bitdeploy.runtimes.manifest import ModelInfo, WeightsInfo

if TYPE_CHECKING:
    from bitdeploy.benchmarks.baseline import QuickBaseline


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
    timeable: list[tuple[RowResult, Timeable]]
    model_info: dict[str, Any] | None = None
    baseline: list[QuickBaseline] | None = None


def build_cell(
    opts: BuildOptions,
    planned: list[tuple[Target, str, str | None]],
    cache: StageCache,
    log: Callable[[str], None],
) -> CellBuild:
    """Fine-tune/export once, then convert, gate and write every (target, precision) row; no timing yet."""
    rows = [RowResult(t.name, p, backend=t.backend, cell=opts.cell, model=opts.model) for t, p, _ in planned]
    cell = CellBuild(rows, [])
    ctx: BuildContext | None = None
    try:
        ctx = _prepare(opts, planned, cache, log)
        cell.model_info, cell.baseline = ctx.model_info.to_dict(), ctx.baseline
        for (target, precision, skip), row in zip(planned, rows):
            interrupts.check()
            row.resolution = ctx.resolution
            if skip is not None:
                row.status = Status.skipped(skip)
                continue
            how = build_row(row, target, precision, ctx, opts, cache, log)
            if how is not None:
                cell.timeable.append((row, how))
    finally:
        for scratch in ctx.scratch if ctx is not None else []:
            scratch.close()
    return cell


def run_build(
    opts: BuildOptions, log: Callable[[str], None] = print, show: Callable[[str], None] = print
) -> BuildResult:
    """Run a build; raise BitdeployError (one line) when the build as a whole failed.

    `log` gets progress lines (stderr in the CLI); `show` gets the results: the table, the selection, the
    report path (stdout)."""
    started = time.perf_counter()
    planned = check_options(opts)
    require("torch", "train", "PyTorch (torch), needed to export the model")
    cache = StageCache(opts.cache.dir, enabled=opts.cache.enabled, log=log)
    try:
        cell = build_cell(opts, planned, cache, log)
        if opts.timing.report:
            time_rows(cell.timeable, opts, log)
    finally:
        cache.close()
    return finish(opts, [cell], list(cache.hits), started, log, show)


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
            best, line = build_output.select(rows, criteria)
            best.selected = True
            selected = {"name": best.name, "reason": line}
        except SelectionError as exc:
            unmet = str(exc)
    show(build_output.table(rows))
    for r in rows:
        if r.search_line:
            show(f"int8 search: {r.search_line}")
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
                html = build_output.write_report(rows, model or {}, baseline, rdir, selected, settings)
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
    """The build's last line: `done` only when every row that ran is valid, else which rows failed."""
    counts = {h: hits.count(h) for h in dict.fromkeys(hits)}
    hit_names = [f"{h} x{n}" if n > 1 else h for h, n in counts.items()]
    cached = f" (cache hits: {', '.join(hit_names)})" if hits else ""
    failed = [r for r in rows if not r.valid and not r.status.is_skipped]
    if not failed:
        return f"done in {seconds:.1f} s{cached}"
    ran = sum(1 for r in rows if not r.status.is_skipped)
    named = ", ".join(f"{r.name} ({'failed gate' if r.status.is_failed_gate else 'error'})" for r in failed)
    return f"finished in {seconds:.1f} s{cached}: {len(failed)} of {ran} bundles failed: {named}"


def _raise_for_failures(opts: BuildOptions, rows: list[RowResult], grid: bool = False) -> None:
    built = [r for r in rows if not r.status.is_skipped]
    bad = [r for r in built if not r.valid]
    if opts.engine.target == "all" or grid:  # exploring: failing rows are findings, only a build with none valid fails
        if not any(r.valid for r in rows):
            raise BitdeployError("no target produced a valid bundle; see the table above")
        return
    if not bad:
        return
    first = bad[0]
    if first.status.is_failed_gate:
        acc = first.accuracy or {}
        what = (
            opts.gate.spec().shortfall(acc.get("top1_drop_pp"), acc.get("agreement"))
            if acc.get("top1_drop_pp") is not None
            else "outputs differ from the FP32 reference beyond tolerance"
        )
        own = opts.options_for(get_target(first.target))
        hint = own.gate_hint(first.precision) if own is not None else None
        fix = f"; {hint}" if hint else "; raise --max-accuracy-drop or calibrate with more images (--calib-size)"
        if first.search_line:  # the search ran and found nothing: say what it found best
            fix = f"; INT8 search: {first.search_line.removeprefix(f'{first.name}: ')}"
        raise AccuracyGateError(
            f"{first.name} failed the accuracy gate: {what}; bundle {first.bundle} is marked invalid{fix}"
        )
    raise BitdeployError(
        f"{first.name}: {first.error or first.status}"
        + (f" ({len(bad) - 1} more failed, see the table)" if len(bad) > 1 else "")
    )


def _prepare(
    opts: BuildOptions, planned: list[tuple[Target, str, str | None]], cache: StageCache, log: Callable[[str], None]
) -> BuildContext:
    """Target-independent steps: dataset, weights/fine-tune, export, reference logits, calibration."""
    from bitdeploy.builder import stages as build_stages
    from bitdeploy.converters import gate
    from bitdeploy.converters.calibration import ValidationData
    from bitdeploy.core.catalog import WS_EPS, count_params

    splits = None
    if opts.dataset is not None:
        from bitdeploy.training.datasets import load_dataset

        splits = load_dataset(
            opts.dataset, val_split=opts.training.val_split, seed=opts.seed, shots=opts.training.shots
        )
        log(
            f"dataset {opts.dataset}: {len(splits.train)} train / {len(splits.val)} val images, {len(splits.classes)} classes"
        )
    state = build_stages.resolve_model(opts, splits, cache, log)
    loaded = state.loaded
    resolution = int(opts.resolution or loaded.resolution or DEFAULT_RESOLUTION)
    onnx_path, export_info = build_stages.export(state, resolution, opts.export.opset, cache)
    log(
        f"ONNX export: {export_info.get('nodes')} nodes, max |diff| vs PyTorch {export_info.get('max_abs_diff', 0):.2e}"
    )

    if splits is not None:
        data = gate.from_image_set(splits.val, resolution, opts.gate.eval_limit, opts.seed, f"{opts.dataset}:val")
    else:
        data = gate.random_inputs(resolution)
    label_ids = data.labels()
    reference = build_stages.reference(state, data, build_stages.data_identity(opts), cache)
    calib = None
    if splits is not None and any(p == "int8" and skip is None for _, p, skip in planned):
        calib = build_stages.calibration(opts, splits, resolution, cache)
    validation = None
    if _wants_validation(opts, planned) and splits is not None and label_ids is not None:
        import numpy as np

        validation = ValidationData.from_arrays(np.concatenate([x for x, _ in data.batches()]), label_ids)

    weights = {k: loaded.weights_info.get(k) for k in ("kind", "source", "sha256")}
    if state.training:
        weights["fine_tuned"] = state.training
    model_info = ModelInfo(
        name=opts.model,
        num_classes=loaded.num_classes,
        params=count_params(loaded.variant, loaded.num_classes),
        resolution=resolution,
        weights=WeightsInfo.from_dict(weights),
        ws_eps=WS_EPS,
        state_sha256=state.state_sha256,
    )
    building = sum(1 for _, _, s in planned if s is None)
    return BuildContext(
        onnx=onnx_path,
        export={
            k: export_info.get(k)
            for k in ("opset", "max_abs_diff", "nodes", "simplifier", "exporter", "weight_standardization", "sha256")
        },
        data=data,
        label_ids=label_ids,
        reference=reference,
        labels=state.labels,
        resolution=resolution,
        model_info=model_info,
        row_count=len(planned),
        dataset=opts.dataset,
        calibration=calib,
        validation=validation,
        training=state.training,
        baseline=_baseline_latency(loaded.model, resolution, opts, log) if building > 1 else None,
    )


def _wants_validation(opts: BuildOptions, planned: list[tuple[Target, str, str | None]]) -> bool:
    """Some target's options ask for the labelled validation split (OpenVINO's accuracy control)."""
    for name in dict.fromkeys(t.name for t, _, skip in planned if skip is None):
        own = opts.options_for(get_target(name))
        precisions = [p for t, p, skip in planned if t.name == name and skip is None]
        if own is not None and own.needs_validation(precisions):
            return True
    return False


def _baseline_latency(
    model: Any, resolution: int, opts: BuildOptions, log: Callable[[str], None]
) -> list[QuickBaseline] | None:
    """The PyTorch FP32 baselines (`benchmarks.baseline.FORMS`: eager with Google's standardisation, eager folded,
    torch.compile of the folded model), timed briefly for the report's speed-up column of multi-bundle builds,
    before any row opens an engine session. Skipped when the report is off."""
    if not opts.timing.report or not opts.timing.baseline:
        return None
    import torch

    from bitdeploy.benchmarks.baseline import QuickBaseline, measure_forms

    # Fewer queries and images than a bundle gets: the eager forms are slow, and this is a denominator, not a row to rank.
    timing = {
        "kind": "quick",
        "kwargs": {
            **quick_timing(max(5, opts.timing.bench_iterations // 10)),
            "warmup": 2,
            "throughput_images": BUILD_THROUGHPUT_IMAGES // 2,
        },
    }
    threads = torch.get_num_threads()
    try:
        if opts.engine.threads:
            torch.set_num_threads(opts.engine.threads)
        results = measure_forms(model, (3, resolution, resolution), timing, log=log)
    finally:
        torch.set_num_threads(threads)
    out = [QuickBaseline.from_result(r, opts.model, resolution) for r in results]
    for b in out:
        took = f" (compiled in {b.compile_s:.1f} s)" if b.compile_s else ""
        p50 = b.timing.p50_ms
        log(f"PyTorch baseline {b.form}: " + (f"p50 {p50:.2f} ms{took}" if p50 is not None else b.status.text))
    return out


__all__ = ["TARGETS", "BuildOptions", "BuildResult", "run_build"]
