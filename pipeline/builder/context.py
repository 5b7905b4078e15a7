"""What a build is asked for (`BuildOptions`), what its shared steps produced (`BuildContext`), and where its
outputs go. `bitdeploy.builder.run` runs the build; `bitdeploy.builder.row` runs one (target, precision) of it; both
read these types, so neither imports the other's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitdeploy.converters.base import ConvertOptions, RowInputs, TargetOptions, options_class
from bitdeploy.core.devices import find as find_cpus
from bitdeploy.core.errors import BitdeployError
from bitdeploy.runtimes.manifest import ModelInfo

if TYPE_CHECKING:
    import numpy as np

    from bitdeploy.benchmarks.ranking import Criteria
    from bitdeploy.converters.calibration import CalibrationData, ValidationData
    from bitdeploy.converters.gate import EvalData
    from bitdeploy.core.cache import StageCache
    from bitdeploy.core.targets import Target

DEFAULT_RESOLUTION = 128  # the BiT-HyperRule's crop for small images, used when nothing says otherwise
BUILD_BATCH_SIZES = (1, 4, 8, 16)  # throughput sweep of the build's quick timing (where memory allows)
BUILD_THROUGHPUT_IMAGES = 32  # images per batch size in that sweep


@dataclass
class BuildOptions:
    """The shared options of a build, plus each target's own (`target_options`, by target name)."""

    model: str
    out: Path
    weights: str = "auto"
    target: str = "onnx"
    precisions: list[str] | None = None  # None: fp32 (every precision with target "all")
    resolution: int | None = None
    dataset: str | None = None
    val_split: float | None = None
    shots: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    finetune: bool | None = None  # None: when --dataset is given and the weights are not a trained checkpoint
    train_device: str = "auto"
    hflip: bool = True
    calib_size: int = 300
    calib_method: str | None = None
    max_accuracy_drop: float = 1.0
    device: str | None = None
    threads: int | None = None
    select: str | None = (
        None  # fastest | most-accurate (default: the axis --latency/--memory-budget/--min-top1 leave free)
    )
    latency_budget: float | None = None  # ms, batch-1 p50
    min_top1: float | None = None  # percent
    memory_budget: float | None = None  # MB, peak RSS of a fresh runtime process serving batch 1
    verify_on: str | None = None  # CPU[,CPU...]: each valid bundle's self-test, emulated (bitdeploy devices)
    eval_limit: int | None = None
    seed: int = 0
    opset: int = 17
    cache_dir: Path | None = None
    cache: bool = True
    report: bool = True
    baseline: bool = True  # time the PyTorch FP32 baselines for the report's speed-up column
    bench_iterations: int = 100
    quiet_check: str = "warn"  # warn | wait | fail: a busy machine while timing (benchmarks.interference)
    progress: bool = True
    debug: bool = False
    target_options: dict[str, TargetOptions] = field(default_factory=dict)  # absent: that target's defaults
    cell: str | None = None  # a grid's (model, resolution) cell: its bundles go to <out>/<cell>/<target>-<precision>

    def criteria(self) -> Criteria | None:
        """What --select and the budgets ask for (None: no selection)."""
        from bitdeploy.benchmarks.ranking import Criteria

        try:
            return Criteria.from_flags(self.select, self.latency_budget, self.min_top1, self.memory_budget)
        except ValueError as exc:
            raise BitdeployError(str(exc)) from None

    def options_for(self, target: Target) -> TargetOptions | None:
        """The target's own options as given, its defaults when none were, None for a target without options."""
        given = self.target_options.get(target.name)
        if given is not None:
            return given
        cls = options_class(target)
        return cls() if cls is not None else None

    def has_training_flags(self) -> bool:
        return any(v is not None for v in (self.shots, self.steps, self.batch_size, self.lr))

    def wants_finetune(self) -> bool:
        if self.dataset is None:
            return False
        if self.finetune is not None:
            return self.finetune
        if self.has_training_flags():
            return True
        return not is_checkpoint(self.weights)


def is_checkpoint(weights: str) -> bool:
    if weights in ("auto", "none"):
        return False
    p = Path(weights).expanduser()
    return (p.is_dir() and (p / "checkpoint.pt").is_file()) or p.suffix == ".pt"


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
    baseline: list[dict[str, Any]] | None = None  # PyTorch latencies for the report's speed-up column
    scratch: list[StageCache] = field(default_factory=list)  # uncached conversions' work dirs, removed at the end


def convert_options(
    opts: BuildOptions, target: Target, precision: str, validation: ValidationData | None
) -> ConvertOptions:
    """What the converter of (target, precision) is told: the shared options, and the target's own bound to the row."""
    own = opts.options_for(target)
    arches = tuple(dict.fromkeys(c.arch for c in find_cpus(opts.verify_on))) if opts.verify_on else ()
    row = RowInputs(opts.max_accuracy_drop, validation, opts.dataset, arches)
    extras = own.for_row(precision, row) if own is not None else None
    method = opts.calib_method if opts.calib_method in target.calib_methods else None
    return ConvertOptions(
        device=opts.device,
        threads=opts.threads,
        calib_method=method,
        cache=opts.cache,
        cache_dir=opts.cache_dir,
        extras=extras,
    )


def quick_timing(iterations: int) -> dict[str, Any]:
    """The build's quick timing (`benchmarks.latency.quick` arguments): batch-1 latency and a batch-size sweep."""
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
