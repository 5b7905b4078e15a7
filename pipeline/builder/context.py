"""What a build is asked for (`BuildOptions`), what its shared steps produced (`BuildContext`), and where its
outputs go. `bitdeploy.builder.run` runs the build; `bitdeploy.builder.row` runs one (target, precision) of it; both
read these types, so neither imports the other's internals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitdeploy.converters.base import ConvertOptions, RowInputs, TargetOptions, options_class
from bitdeploy.core.devices import find as find_cpus
from bitdeploy.core.errors import BitdeployError
from bitdeploy.core.options import (
    DEFAULT_MAX_DROP_PP,
    CacheArgs,
    CalibrationArgs,
    EngineArgs,
    ExportArgs,
    GateArgs,
    SelectionArgs,
    TimingArgs,
    TrainingArgs,
)
from bitdeploy.runtimes.manifest import ModelInfo

if TYPE_CHECKING:
    import numpy as np

    from bitdeploy.benchmarks.baseline import QuickBaseline
    from bitdeploy.benchmarks.ranking import Criteria
    from bitdeploy.converters.calibration import CalibrationData, ValidationData
    from bitdeploy.converters.gate import EvalData
    from bitdeploy.core.cache import StageCache
    from bitdeploy.core.targets import Target

DEFAULT_RESOLUTION = 128  # the BiT-HyperRule's crop for small images, used when nothing says otherwise
BUILD_BATCH_SIZES = (1, 4, 8, 16)  # throughput sweep of the build's quick timing (where memory allows)
BUILD_THROUGHPUT_IMAGES = 32  # images per batch size in that sweep


@dataclass(frozen=True)
class BuildOptions:
    """What a build is asked for: the model and its outputs, one record per option group (`bitdeploy.core.options`,
    parsed by `bitdeploy.cli.groups`), and each target's own options (`target_options`, by target name)."""

    model: str
    out: Path
    resolution: int | None = None  # None: the fine-tune's or checkpoint's, else DEFAULT_RESOLUTION
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


@dataclass
class BuildContext:
    """The target-independent results every row of a build reads."""

    onnx: Path  # the folded FP32 export
    export: dict[str, Any]  # the manifest's `export` object
    data: EvalData  # the gate's inputs (validation split, or seeded random inputs)
    label_ids: np.ndarray | None  # `data`'s labels (None for random inputs)
    reference: np.ndarray  # FP32 PyTorch logits on `data`
    labels: list[str]  # class names, in logit order
    resolution: int
    model_info: ModelInfo  # the manifest's `model` record
    row_count: int
    dataset: str | None = None  # --dataset; None: the gate compares logits on random inputs
    calibration: CalibrationData | None = None  # INT8 rows only
    validation: ValidationData | None = None  # NNCF accuracy control only
    training: dict[str, Any] | None = None
    baseline: list[QuickBaseline] | None = None  # PyTorch latencies for the report's speed-up column
    scratch: list[StageCache] = field(default_factory=list)  # uncached conversions' work dirs, removed at the end


def convert_options(
    opts: BuildOptions, target: Target, precision: str, validation: ValidationData | None
) -> ConvertOptions:
    """What the converter of (target, precision) is told: the shared options, and the target's own bound to the row."""
    own = opts.options_for(target)
    arches = tuple(dict.fromkeys(c.arch for c in find_cpus(opts.gate.verify_on))) if opts.gate.verify_on else ()
    allowance = opts.gate.spec().drop_allowance  # None: agreement alone gates; accuracy control needs a drop
    drop = allowance if allowance is not None else DEFAULT_MAX_DROP_PP
    row = RowInputs(drop, validation, opts.dataset, arches)
    extras = own.for_row(precision, row) if own is not None else None
    method = opts.calibration.calib_method if opts.calibration.calib_method in target.calib_methods else None
    return ConvertOptions(
        device=opts.engine.device,
        threads=opts.engine.threads,
        calib_method=method,
        cache=opts.cache.enabled,
        cache_dir=opts.cache.dir,
        extras=extras,
    )


def quick_timing(iterations: int) -> dict[str, Any]:
    """The build's quick timing (`benchmarks.quick.quick` arguments): batch-1 latency and a batch-size sweep."""
    return {
        "iterations": iterations,
        "throughput_batches": list(BUILD_BATCH_SIZES),
        "throughput_images": BUILD_THROUGHPUT_IMAGES,
    }


def bundle_path(opts: BuildOptions, row_count: int, name: str) -> Path:
    if opts.cell:
        return Path(opts.out) / opts.cell / name
    return Path(opts.out) if row_count == 1 else Path(opts.out) / name


def report_dir(opts: BuildOptions, row_count: int) -> Path:
    out = Path(opts.out)
    return out.with_name(out.name + ".report") if row_count == 1 and not opts.cell else out / "report"
