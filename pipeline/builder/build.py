"""`bitdeploy build`: plan -> prepare (fine-tune, export, reference, calibration: once, cached) -> per row: convert
-> gate -> [INT8 search] -> bundle -> then every bundle timed together -> finish (table, selection, report).

Output layout: one row -> `--out` is the bundle and the report goes to `<out>.report/`; several rows ->
`<out>/<target>-<precision>/` bundles and `<out>/report/`. A bundle that fails the accuracy gate is still
written, with `"valid": false` and the reason, so it can be inspected; runtimes refuse to load it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bitdeploy.benchmarks.schema import Status
from bitdeploy.builder.finish import BuildResult, CellBuild, finish
from bitdeploy.builder.options import BuildOptions
from bitdeploy.builder.plan import RowPlan, plan_build
from bitdeploy.builder.prepare import BuildContext, prepare
from bitdeploy.builder.result import RowResult
from bitdeploy.builder.rows import build_row
from bitdeploy.builder.timing import time_rows
from bitdeploy.core import interrupts
from bitdeploy.core.cache import StageCache
from bitdeploy.core.errors import require


def run_build(
    opts: BuildOptions, log: Callable[[str], None] = print, show: Callable[[str], None] = print
) -> BuildResult:
    """Run a build; raise BitdeployError (one line) when the build as a whole failed.

    `log` gets progress lines (stderr in the CLI); `show` gets the results: the table, the selection, the
    report path (stdout)."""
    started = time.perf_counter()
    plans = plan_build(opts)
    require("torch", "train", "PyTorch (torch), needed to export the model")
    cache = StageCache(opts.cache.dir, enabled=opts.cache.enabled, log=log)
    try:
        cell = build_cell(opts, plans, cache, log)
        if opts.timing.report:
            time_rows(cell.timeable, opts, log)
    finally:
        cache.close()
    return finish(opts, [cell], list(cache.hits), started, log, show)


def build_cell(opts: BuildOptions, plans: list[RowPlan], cache: StageCache, log: Callable[[str], None]) -> CellBuild:
    """Fine-tune/export once, then convert, gate and write every row of one (model, resolution); no timing yet."""
    cell = CellBuild([], [])
    ctx: BuildContext | None = None
    try:
        ctx = prepare(opts, plans, cache, log)
        cell.model_info, cell.baseline = ctx.model_info.to_dict(), ctx.baseline
        for plan in ctx.plans:
            interrupts.check()
            if plan.skip is not None:
                cell.rows.append(RowResult(plan, Status.skipped(plan.skip)))
                continue
            row, timed = build_row(plan, ctx, opts, cache, log)
            cell.rows.append(row)
            if timed is not None:
                cell.timeable.append((row, timed))
    finally:
        for scratch in ctx.scratch if ctx is not None else []:
            scratch.close()
    return cell
