"""One row of a build: convert -> gate against the FP32 reference -> [INT8 search] -> bundle. Timing comes later,
for every row together (`bitdeploy.builder.timing.time_rows`).

Every failure is caught here and recorded in the row's status (`failed: <reason>`), so `--target all` goes on.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import replace

from bitdeploy.benchmarks.schema import FAILED_GATE, VALID, Status
from bitdeploy.builder import bundle, qat
from bitdeploy.builder.convert import convert
from bitdeploy.builder.gate import Evaluated, evaluate
from bitdeploy.builder.options import BuildOptions, bundle_path
from bitdeploy.builder.plan import RowPlan
from bitdeploy.builder.prepare import BuildContext
from bitdeploy.builder.result import RowResult
from bitdeploy.builder.search import Search
from bitdeploy.builder.timing import Timed
from bitdeploy.core.cache import StageCache
from bitdeploy.core.errors import BitdeployError, ResourceError, first_line
from bitdeploy.runtimes.bundle.manifest import GateResult

READY = Status.ready("engine is built on the device")
PENDING_REASON = "engine pending: gated here; build its TensorRT engine on the device with `bitdeploy engine BUNDLE`"


def build_row(
    plan: RowPlan, ctx: BuildContext, opts: BuildOptions, cache: StageCache, log: Callable[[str], None]
) -> tuple[RowResult, Timed | None]:
    """The row's result; never raises for a per-target problem (the status says what happened). Also returns how
    to time the bundle once every row is built, or None when it cannot be timed here."""
    row = RowResult(plan)
    log(f"[{row.name}] converting with {plan.target.title}")
    try:
        found = evaluate(plan, ctx, opts, *convert(plan, ctx, cache))
        mix = None
        searched = _searches(found, opts)
        if searched:
            outcome = Search(plan, ctx, opts, cache, found, log).run()
            mix, row.search_line = outcome.record, outcome.line
            log(f"[search] {outcome.line}")
            if outcome.chosen is not None:  # judged on the report's images, which its self-test is drawn from
                found, ctx = outcome.chosen, outcome.ctx or ctx
        if _escalates(found, opts):
            uniform = found
            found, ctx, row.qat_line = _fine_tune(plan, (ctx, opts, cache, log), found, searched)
            mix = mix if found is uniform else None  # the bundle is the fine-tune's; the search's line stays the row's
        result = found.result
        path = bundle_path(opts, ctx.row_count, plan.bundle_name)
        pending = found.artifact.target.engine_pending
        lines = "; ".join(x for x in (row.search_line, row.qat_line) if x) or None
        reason = None if result.passed else _invalid_reason(result, opts, lines)
        valid = result.passed and not pending
        reason = PENDING_REASON if result.passed and pending else reason
        verdict = replace(found.manifest, valid=valid, invalid_reason=reason, gate=result, int8_mix=mix)
        row.manifest = bundle.write(path, found.work, found.artifact, verdict, found.logits, ctx)
        row.bundle = str(path)
        row.size_mb = sum((path / f).stat().st_size for f in found.artifact.files) / 1e6
        row.status = (READY if pending else VALID) if result.passed else FAILED_GATE
        verdict_text = ("ready for the device" if pending else "valid") if result.passed else "FAILED the gate"
        log(f"[{row.name}] {_what(result)}; {verdict_text}; bundle {path}")
        timed = Timed(row.name, path / row.manifest.model_file, row.manifest, found.device, ctx.resolution)
        return row, timed if found.runs_here else None
    except BitdeployError as exc:
        if isinstance(exc, ResourceError) and exc.kind != "memory":
            raise  # a full, read-only or failing disk fails every row alike: stop the build with its fix
        if opts.debug:  # the row still fails alone, but --debug shows the chain that led here
            traceback.print_exception(exc)
        row.status = Status.failed(first_line(exc))
    except Exception as exc:  # an SDK's own error type: still only this row fails
        if opts.debug:
            raise
        row.status = Status.failed(f"{type(exc).__name__}: {first_line(exc)}")
    log(f"[{row.name}] failed: {row.error}")
    return row, None


def _what(result: GateResult) -> str:
    if result.top1 is not None and result.reference_top1 is not None:
        from bitdeploy.benchmarks.report import interval

        delta = (result.top1 - result.reference_top1) * 100.0
        drop = result.top1_drop_ci_pp
        delta_ci = interval((-drop[1], -drop[0]), signed=True) if drop is not None else ""
        agreement = result.agreement_ci
        noise = f"; {result.noise}" if result.noise else ""
        return (
            f"top-1 {result.top1 * 100:.2f}%{interval(result.top1_ci, 100)} vs FP32 "
            f"{result.reference_top1 * 100:.2f}% ({delta:+.2f} pp{delta_ci}, agreement "
            f"{(result.agreement or 0) * 100:.1f}%{interval(agreement, 100)}){noise}"
        )
    return f"no dataset: max |logit diff| {result.max_abs_logit_diff} vs FP32 on random inputs (tolerance {result.tolerance or 0:.3g})"


def _escalates(found: Evaluated, opts: BuildOptions) -> bool:
    """Whether a row's INT8 (uniform, or the search's answer) failed a labelled gate that quantization-aware
    fine-tuning may make it pass (`--int8-fallback qat`, or `auto` once the search found no mix)."""
    return _int8_failed(found) and opts.gate.int8_fallback in ("auto", "qat")


def _fine_tune(
    plan: RowPlan,
    build: tuple[BuildContext, BuildOptions, StageCache, Callable[[str], None]],
    found: Evaluated,
    searched: bool,
) -> tuple[Evaluated, BuildContext, str]:
    """The row's QAT candidate and the images it was judged on, or (when the build cannot fine-tune) the row as
    it was; and the fine-tune's one line."""
    ctx, opts, cache, log = build
    try:
        tuned, judged_on = qat.row(plan, ctx, opts, cache, searched, log)
    except qat.NoQat as exc:
        log(f"[qat] {plan.name}: {exc}")
        return found, ctx, f"{plan.name}: no quantization-aware fine-tune: {exc}"
    line = f"{plan.name}: {qat.line(tuned, judged_on)}"
    log(f"[qat] {line}")
    return tuned, judged_on, line


def _searches(found: Evaluated, opts: BuildOptions) -> bool:
    """Whether a row's uniform INT8 failed a labelled gate that the INT8 search may make it pass."""
    return _int8_failed(found) and opts.gate.int8_fallback in ("auto", "search")


def _int8_failed(found: Evaluated) -> bool:
    r = found.result
    return found.artifact.target.precision == "int8" and not r.passed and r.is_accuracy


def _invalid_reason(result: GateResult, opts: BuildOptions, search: str | None = None) -> str:
    if result.top1_drop_pp is not None:
        missed = opts.gate.spec().shortfall(
            result.top1_drop_pp, result.agreement, result.top1_drop_ci_pp, result.agreement_ci
        )
        why = f"accuracy gate vs FP32 PyTorch: {missed}"
        return f"{why}; {search}" if search else why
    return (
        f"validation: max |logit diff| {result.max_abs_logit_diff} vs FP32 PyTorch exceeds {result.tolerance or 0:.3g}"
    )
