"""One (target, precision) of a build: convert -> evaluate against the FP32 reference -> bundle; then every
bundle of the build is timed together (`time_rows`).

Every failure is caught here and recorded in the row (`failed: <reason>`), so `--target all` goes on. The row's
manifest is one typed record (`bitdeploy.runtimes.manifest.Manifest`), drafted after the conversion and completed
after the gate; `bitdeploy.runtimes.bundle.write_manifest` seals it once, after the bundle's last file. The timing
comes from running the sealed bundle, so it joins the manifest later (`bundle.amend_manifest`).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from bitdeploy.benchmarks.schema import FAILED_GATE, VALID, Status, Timing
from bitdeploy.builder import int8_search
from bitdeploy.builder.candidate import Evaluated, Timeable, try_candidate
from bitdeploy.builder.context import BuildContext, BuildOptions, bundle_path, quick_timing
from bitdeploy.builder.output import RowResult
from bitdeploy.core.cache import StageCache
from bitdeploy.core.errors import BitdeployError, ResourceError, first_line
from bitdeploy.core.fsutil import copy_files
from bitdeploy.core.resources import guarded
from bitdeploy.core.targets import Target
from bitdeploy.runtimes import selftest
from bitdeploy.runtimes.fingerprint import host_fingerprint
from bitdeploy.runtimes.manifest import BuildLatency, GateResult, InputSpec, Manifest, SelfTestSpec


def build_row(
    row: RowResult,
    target: Target,
    precision: str,
    ctx: BuildContext,
    opts: BuildOptions,
    cache: StageCache,
    log: Callable[[str], None],
) -> Timeable | None:
    """Fill `row`; never raises for a per-target problem (the status says what happened). Returns how to time the
    bundle (`time_rows`, once every row is built), or None when it cannot be timed here."""
    from bitdeploy.runtimes.bundle import bundle_writer, write_manifest

    log(f"[{row.name}] converting with {target.title}")
    try:
        found = try_candidate(target, precision, ctx, opts, cache)
        mix = None
        if _searches(found, precision, opts):
            outcome = int8_search.Search(row.name, target, ctx, opts, cache, found, log).run()
            mix, row.search_line = outcome.record, outcome.line
            log(f"[search] {outcome.line}")
            found = outcome.chosen or found
        result, artifact = found.result, found.artifact
        if result.top1 is not None and result.reference_top1 is not None:
            row.top1, row.reference_top1 = result.top1, result.reference_top1
            row.delta_pp = (result.top1 - result.reference_top1) * 100.0
            what = f"top-1 {result.top1 * 100:.2f}% vs FP32 {result.reference_top1 * 100:.2f}% ({row.delta_pp:+.2f} pp, agreement {(result.agreement or 0) * 100:.1f}%)"
        else:
            what = f"no dataset: max |logit diff| {result.max_abs_logit_diff} vs FP32 on random inputs (tolerance {result.tolerance or 0:.3g})"
        row.accuracy = result.to_dict()
        row.precision_used = artifact.target.precision_used
        row.device = str(found.described.get("device") or artifact.target.device or "")
        row.notes = list(artifact.notes)
        row.float_precision = int8_search.float_precision(artifact)
        path = bundle_path(opts, ctx.row_count, row.bundle_name)
        manifest = replace(
            found.manifest,
            valid=result.passed,
            invalid_reason=None if result.passed else _invalid_reason(result, opts, row.search_line),
            gate=result,
            int8_mix=mix,
            validated_on={**host_fingerprint(), "evaluated_with": result.evaluated_with},
        )
        with guarded(path.parent, "pass --out DIR", f"{row.name} bundle"), bundle_writer(path) as tmp:
            copy_files(found.work, tmp, artifact.files)
            manifest = replace(manifest, self_test=_write_golden(tmp, ctx, found.logits, precision, manifest.input))
            write_manifest(tmp, manifest, [*artifact.files, selftest.GOLDEN_FILE])
        row.bundle = str(path)
        row.size_mb = sum((path / f).stat().st_size for f in artifact.files) / 1e6
        row.status = VALID if result.passed else FAILED_GATE
        log(f"[{row.name}] {what}; {'valid' if result.passed else 'FAILED the gate'}; bundle {path}")
        return found.timeable
    except BitdeployError as exc:
        if isinstance(exc, ResourceError) and exc.kind != "memory":
            raise  # a full, read-only or failing disk fails every row alike: stop the build with its fix
        if opts.debug:  # the row still fails alone, but --debug shows the chain that led here
            traceback.print_exception(exc)
        row.error = first_line(exc)
        row.status = Status.failed(row.error)
        log(f"[{row.name}] failed: {row.error}")
        return None
    except Exception as exc:  # an SDK's own error type: still only this row fails
        if opts.debug:
            raise
        row.error = f"{type(exc).__name__}: {first_line(exc)}"
        row.status = Status.failed(row.error)
        log(f"[{row.name}] failed: {row.error}")
        return None


def _write_golden(
    bundle_dir: Path, ctx: BuildContext, logits: np.ndarray, precision: str, input_spec: InputSpec
) -> SelfTestSpec:
    """The bundle's self-test: a seeded subset of the validation inputs, their FP32 logits and labels."""
    data, reference, labels = ctx.data, ctx.reference, ctx.label_ids
    idx = selftest.select(data.samples, ctx.resolution)
    picked, lo = [], 0
    for x, _ in data.batches():  # gather only the chosen rows: the validation set may not fit in memory
        picked.append(x[idx[(idx >= lo) & (idx < lo + len(x))] - lo])
        lo += len(x)
    inputs = np.concatenate(picked)
    return selftest.write(
        bundle_dir,
        inputs,
        reference[idx],
        labels[idx] if labels is not None else None,
        logits[idx],
        precision,
        input_spec,
    )


def _searches(found: Evaluated, precision: str, opts: BuildOptions) -> bool:
    """Whether a row's uniform INT8 failed a labelled gate that the INT8 search may make it pass."""
    r = found.result
    return precision == "int8" and not r.passed and r.is_accuracy and opts.gate.int8_fallback == "auto"


def _invalid_reason(result: GateResult, opts: BuildOptions, search: str | None = None) -> str:
    if result.top1_drop_pp is not None:
        why = f"accuracy gate vs FP32 PyTorch: {opts.gate.spec().shortfall(result.top1_drop_pp, result.agreement)}"
        return f"{why}; {search}" if search else why
    return (
        f"validation: max |logit diff| {result.max_abs_logit_diff} vs FP32 PyTorch exceeds {result.tolerance or 0:.3g}"
    )


def time_rows(todo: list[tuple[RowResult, Timeable]], opts: BuildOptions, log: Callable[[str], None]) -> None:
    """Time every built bundle together, in interleaved rounds of rotating order, so slow drift of the machine
    hits every row alike; then each valid bundle's serving memory in a fresh process, one at a time. Fill the
    rows' figures and add them to each sealed bundle's manifest (`build_latency`, files re-verified)."""
    from bitdeploy.benchmarks.latency import DEFAULT_ROUNDS
    from bitdeploy.benchmarks.quick import QuickTimer, quick_interleaved
    from bitdeploy.runtimes.base import Backend, open_backend
    from bitdeploy.runtimes.bundle import amend_manifest, read_manifest

    if not todo:
        return
    if opts.timing.quiet_check == "wait":
        from bitdeploy.benchmarks.interference import QUIET_WAIT_S, wait_for_quiet

        wait_for_quiet(QUIET_WAIT_S)
    log(f"timing {len(todo)} bundles in {DEFAULT_ROUNDS} interleaved rounds: batch 1 and a batch-size sweep")
    opened: list[tuple[RowResult, Path, Manifest, Backend]] = []
    try:
        for row, how in todo:
            path = Path(row.bundle or "")
            manifest = read_manifest(path)
            try:
                backend = open_backend(
                    row.backend or "",
                    path / manifest.model_file,
                    manifest,
                    device=how.device,
                    threads=opts.engine.threads,
                )
            except Exception as exc:  # an SDK's own error type: the row keeps its gate result, without a timing
                log(f"warning: [{row.name}] not timed: {type(exc).__name__}: {first_line(exc)}")
                continue
            opened.append((row, path, manifest, backend))
        sizes = {row.name: how.resolution for row, how in todo}
        timers = [
            QuickTimer(b, (3, sizes[row.name], sizes[row.name]), **quick_timing(opts.timing.bench_iterations))
            for row, _, _, b in opened
        ]
        results = quick_interleaved(timers)
    finally:
        for *_, backend in opened:
            backend.close()
    for (row, path, _, _), timing in zip(opened, results):
        row.timing = Timing.from_quick(timing)
        if row.valid:
            row.serving_rss_mb = _serving_memory(row, path, opts, log)
        t = row.timing
        build_latency = BuildLatency(
            batch1_p50_ms=t.p50_ms,
            batch1_p90_ms=t.p90_ms,
            queries=t.n,
            images_per_s=t.images_per_s,
            throughput_batch=t.throughput_batch,
            batch1_p50_spread_ms=t.p50_spread,
            serving_peak_rss_mb=row.serving_rss_mb,
            threads=opts.engine.threads,
            note="quick build-time figure; use `bitdeploy bench` for publishable numbers",
        )
        with guarded(path.parent, "pass --out DIR", f"{row.name} bundle"):
            amend_manifest(path, build_latency=build_latency)


def _serving_memory(row: RowResult, path: Path, opts: BuildOptions, log: Callable[[str], None]) -> float | None:
    """Peak RSS of a fresh runtime process loading the bundle and serving batch 1 (`benchmarks.memory`)."""
    from bitdeploy.benchmarks.memory import serving_memory

    try:
        return float(serving_memory(path, threads=opts.engine.threads)["peak_rss_mb"])
    except BitdeployError as exc:
        log(f"warning: [{row.name}] serving memory not measured: {first_line(exc)}")
        return None
