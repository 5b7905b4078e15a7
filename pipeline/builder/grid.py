"""`bitdeploy build` over a grid: models x resolutions, each (model, resolution) cell fine-tuned once with its own
BiT-HyperRule plan, then converted and gated per target x precision like any build (`bitdeploy.builder.build.build_cell`).

Every bundle of the grid is timed together at the end, in interleaved rounds, so their latencies compare. Cells are
resumable through the stage cache: `--max-hours` stops before a cell that would overrun and a rerun continues, and
`--shard I/N` builds only every N-th cell from the I-th (0-based), so N machines (an indexed Kubernetes Job, a SLURM
array) share the grid over one `--cache-dir`; a final build without `--shard` finds every step cached, times the
bundles on one machine and writes the table and report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bitdeploy.benchmarks.progress import duration_text, eta_s
from bitdeploy.benchmarks.schema import Status
from bitdeploy.builder.build import build_cell
from bitdeploy.builder.finish import BuildResult, CellBuild, finish
from bitdeploy.builder.options import BuildOptions
from bitdeploy.builder.plan import RowPlan, plan_build
from bitdeploy.builder.result import RowResult
from bitdeploy.builder.timing import time_rows
from bitdeploy.core.cache import StageCache
from bitdeploy.core.errors import BitdeployError, ResourceError, first_line, require
from bitdeploy.core.options import SelectionArgs


@dataclass(frozen=True)
class Cell:
    model: str
    resolution: int | None  # None: the checkpoint's or the default, as in a one-model build

    @property
    def name(self) -> str:
        return f"{self.model}-{self.resolution}" if self.resolution else self.model

    @property
    def title(self) -> str:
        return f"{self.model} @ {self.resolution} px" if self.resolution else self.model


def plan_cells(models: Sequence[str], resolutions: Sequence[int | None]) -> list[Cell]:
    """Every (model, resolution), model-major, duplicates dropped."""
    return list(dict.fromkeys(Cell(m, r) for m in models for r in (resolutions or [None])))


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` (0-based I, as JOB_COMPLETION_INDEX and a SLURM --array=0-(N-1) give it) -> (I, N)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise BitdeployError(f"--shard {text!r} is not I/N; give e.g. 0/4 (0-based index / shard count)") from None
    if n < 1 or not 0 <= i < n:
        raise BitdeployError(f"--shard {text}: I must be in 0..N-1 and N >= 1, e.g. 0/4 ... 3/4")
    return i, n


def shard_cells(cells: list[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """The cells shard (I, N) builds: every N-th from the I-th, so any N splits any grid."""
    return cells if shard is None else cells[shard[0] :: shard[1]]


def over_budget(elapsed: float, done: list[float], budget_s: float | None) -> bool:
    """Stop before the next cell: the budget is spent, or the next cell (at the mean so far) would overrun it."""
    if budget_s is None:
        return False
    mean = sum(done) / len(done) if done else 0.0
    return elapsed >= budget_s or elapsed + mean > budget_s


def _unbuilt(plans: list[RowPlan], status: Status) -> CellBuild:
    return CellBuild([RowResult(p, status) for p in plans], [])


def run_grid(
    opts: BuildOptions,
    cells: list[Cell],
    shard: tuple[int, int] | None = None,
    max_hours: float | None = None,
    log: Callable[[str], None] = print,
    show: Callable[[str], None] = print,
) -> BuildResult:
    """Build every cell of the grid (or this shard's), time all bundles together, then table, selection, report."""
    started = time.perf_counter()
    if max_hours is not None and max_hours <= 0:
        raise BitdeployError(f"--max-hours must be > 0 (got {max_hours:g}), e.g. 0.5")
    if (Path(opts.out) / "manifest.json").is_file():
        raise BitdeployError(f"{opts.out} is a bundle; a grid build needs a new or empty --out directory")
    plans = []
    for c in cells:  # every cell's options are checked before the first fine-tune starts
        cell_opts = replace(opts, model=c.model, resolution=c.resolution, cell=c.name)
        plans.append((c, cell_opts, plan_build(cell_opts)))
    mine = [p for p in plans if p[0] in shard_cells(cells, shard)]
    if not mine:
        show(f"shard {shard[0]}/{shard[1]} has no cell: the grid has {len(cells)}" if shard else "nothing to build")
        return BuildResult([], None, None, [], 0.0)
    require("torch", "train", "PyTorch (torch), needed to export the model")
    which = f" (shard {shard[0]}/{shard[1]}: {len(mine)} of {len(cells)} cells)" if shard else ""
    log(f"grid: {len(mine)} cells x {len(mine[0][2])} bundles{which}")
    cache = StageCache(opts.cache.dir, enabled=opts.cache.enabled, log=log)
    built: list[CellBuild] = []
    took: list[float] = []
    stopped = None
    try:
        for k, (c, cell_opts, planned) in enumerate(mine):
            elapsed = time.perf_counter() - started
            if stopped or over_budget(elapsed, took, None if max_hours is None else max_hours * 3600):
                stopped = stopped or k
                built.append(_unbuilt(planned, Status.skipped(f"--max-hours {max_hours:g} reached before this cell")))
                continue
            left = eta_s(sum(took), len(took), len(mine))
            log(
                f"grid: cell {k + 1}/{len(mine)} {c.title}, elapsed {duration_text(elapsed)}, "
                + (f"ETA {duration_text(left)}" if left is not None else "ETA -")
            )
            t0 = time.perf_counter()
            try:
                built.append(build_cell(cell_opts, planned, cache, log))
            except BitdeployError as exc:  # this cell's fine-tune or export failed: the others go on
                if isinstance(exc, ResourceError) and exc.kind != "memory":
                    raise  # a full or read-only disk stops every cell alike
                log(f"grid: {c.title} failed: {first_line(exc)}")
                built.append(_unbuilt(planned, Status.failed(first_line(exc))))
            took.append(time.perf_counter() - t0)
        if shard is None and opts.timing.report:
            time_rows([t for cell in built for t in cell.timeable], opts, log)
    finally:
        cache.close()
    note = None
    if stopped is not None:
        note = (
            f"stopped by --max-hours {max_hours:g}: {stopped} of {len(mine)} cells built; "
            "run the same command again to build the rest (finished steps come from the stage cache)"
        )
    if shard is not None:
        quiet = replace(opts, timing=replace(opts.timing, report=False), selection=SelectionArgs())
        note = (note + "; " if note else "") + (
            f"shard {shard[0]}/{shard[1]} done: cells {', '.join(c.name for c, _, _ in mine)}; when every shard "
            "is done, run the same build without --shard to time all bundles and write the table and report"
        )
        return finish(
            replace(quiet, gate=replace(opts.gate, verify_on=None)),
            built,
            list(cache.hits),
            started,
            log,
            show,
            True,
            note,
        )
    return finish(opts, built, list(cache.hits), started, log, show, True, note)
