"""What a build is asked for (`BuildOptions`: one frozen record per option group) and where its outputs go."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bitdeploy.converters.base import TargetOptions, options_class
from bitdeploy.core.errors import BitdeployError
from bitdeploy.core.options import (
    CacheArgs,
    CalibrationArgs,
    EngineArgs,
    ExportArgs,
    GateArgs,
    SelectionArgs,
    TimingArgs,
    TrainingArgs,
)

if TYPE_CHECKING:
    from bitdeploy.benchmarks.ranking import Criteria
    from bitdeploy.core.targets import Target


@dataclass(frozen=True)
class BuildOptions:
    """What a build is asked for: the model and its outputs, one record per option group (`bitdeploy.core.options`,
    parsed by `bitdeploy.cli.groups`), and each target's own options (`target_options`, by target name)."""

    model: str
    out: Path
    resolution: int | None = None  # None: the fine-tune's or checkpoint's, else catalog.DEFAULT_RESOLUTION
    seed: int = 0  # fine-tuning, the calibration draw and the evaluation subset
    export: ExportArgs = field(default_factory=ExportArgs)
    engine: EngineArgs = field(default_factory=EngineArgs)
    training: TrainingArgs = field(default_factory=TrainingArgs)
    calibration: CalibrationArgs = field(default_factory=CalibrationArgs)
    gate: GateArgs = field(default_factory=GateArgs)
    timing: TimingArgs = field(default_factory=TimingArgs)
    selection: SelectionArgs = field(default_factory=SelectionArgs)
    cache: CacheArgs = field(default_factory=CacheArgs)
    debug: bool = False
    target_options: Mapping[str, TargetOptions] = field(default_factory=dict)  # absent: that target's defaults
    cell: str | None = None  # a grid's (model, resolution) cell: its bundles go to <out>/<cell>/<target>-<precision>

    @property
    def dataset(self) -> str | None:
        """--dataset: fine-tuning, calibration (train split) and the gate (validation split) all read it."""
        return self.training.dataset

    def criteria(self) -> Criteria | None:
        """What --select and the budgets ask for (None: no selection)."""
        from bitdeploy.benchmarks.ranking import Criteria

        s = self.selection
        try:
            return Criteria.from_flags(s.select, s.latency_budget, s.min_top1, s.memory_budget)
        except ValueError as exc:
            raise BitdeployError(str(exc)) from None

    def options_for(self, target: Target) -> TargetOptions | None:
        """The target's own options as given, its defaults when none were, None for a target without options."""
        given = self.target_options.get(target.name)
        if given is not None:
            return given
        cls = options_class(target)
        return cls() if cls is not None else None

    def wants_finetune(self) -> bool:
        return self.training.wants_finetune(self.export.weights)

    def validate(self) -> None:
        """Each group's own checks, then those across groups."""
        for group in (
            self.export,
            self.engine,
            self.training,
            self.calibration,
            self.gate,
            self.timing,
            self.selection,
            self.cache,
        ):
            group.validate()
        if self.resolution is not None and self.resolution < 16:
            raise BitdeployError(f"--resolution must be >= 16 pixels (got {self.resolution})")
        if self.criteria() is not None and not self.timing.report:
            raise BitdeployError(
                "--select and the budgets rank timed bundles; drop --no-report so the build times them"
            )


def bundle_path(opts: BuildOptions, row_count: int, name: str) -> Path:
    if opts.cell:
        return Path(opts.out) / opts.cell / name
    return Path(opts.out) if row_count == 1 else Path(opts.out) / name


def report_dir(opts: BuildOptions, row_count: int) -> Path:
    out = Path(opts.out)
    return out.with_name(out.name + ".report") if row_count == 1 and not opts.cell else out / "report"
