"""The option groups of the commands, as frozen records (Polygraphy's argument groups).

Each record is what one group of flags means, checked once by `validate()`; `bitdeploy.cli.groups` declares the
flags and builds the records, `bitdeploy.builder.options.BuildOptions` composes them. They hold plain values only,
so every layer may read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bitdeploy.core.errors import BitdeployError, UsageError


def values(*records: Any, **more: Any) -> dict[str, Any]:
    """The fields of `records` (later ones win) and `more`, as keyword arguments: a record composed into another's
    constructor by field name instead of field by field."""
    out: dict[str, Any] = {}
    for record in records:
        out.update({f.name: getattr(record, f.name) for f in fields(record)})
    return {**out, **more}


KEYED = {"cache_key": "always"}
"""Field metadata of the training options: the field changes the trained weights, so it is in the fine-tune's
stage-cache key (`TrainingOptions.cache_key`)."""
KEYED_WHEN_SET = {"cache_key": "when set"}
"""Likewise, but in the key only when not the field's default: no build could set it before these records were one,
so leaving the default out keeps the keys of fine-tunes cached then valid."""


@dataclass(frozen=True)
class TrainingOptions:
    """Fine-tuning's options, each declared once: `bitdeploy train`'s training group parses into this record, the
    build's into `TrainingArgs` (this record and --finetune), and `bitdeploy.training.planner.TrainConfig` extends it
    with the run's own fields (model, output, weights, resolution, seed), so both commands hand it on by field name.
    None: the BiT-HyperRule's value."""

    # the data; the dataset and the weights are keyed by their content, which the caller identifies
    dataset: str | None = None  # SPEC; a build also calibrates (train split) and gates (val split) on it
    val_split: float | None = field(default=None, metadata=KEYED)  # datasets without their own split; None: 0.2
    # the BiT-HyperRule's overrides
    shots: int | None = field(default=None, metadata=KEYED)  # few-shot: K seeded training examples per class
    steps: int | None = field(default=None, metadata=KEYED)
    batch_size: int | None = field(default=None, metadata=KEYED)  # the global batch, split across processes
    batch_split: int = 1  # micro-batches each process's batch accumulates in: the same result, less memory
    lr: float | None = field(default=None, metadata=KEYED)  # the peak, used as is; None: 0.003 x batch_size / 512
    mixup: float | None = field(default=None, metadata=KEYED_WHEN_SET)  # alpha; None: 0.1 from 20k images, else 0
    hflip: bool = field(default=True, metadata=KEYED)
    # how the run executes
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | xla
    precision: str = field(default="fp32", metadata=KEYED_WHEN_SET)  # autocast: fp32 | bf16 | fp16 (CUDA only)
    checkpoint_every: int = 100  # steps between checkpoints (0: only at the end)
    eval_every: int = 0  # steps between validation passes (0: only at the end)
    strict: bool = False  # stop at the first unreadable image instead of skipping and counting it
    num_workers: int | None = None  # threads that decode and resize images; None: min(4, CPUs)
    progress: bool = True

    def cache_key(self) -> dict[str, Any]:
        """The options that change the trained weights, by field name (the fields marked KEYED, and those marked
        KEYED_WHEN_SET that are not their default): the fine-tune's stage-cache options. `TrainConfig` adds its
        model, resolution and seed."""
        key = {}
        for f in fields(self):
            how, value = f.metadata.get("cache_key"), getattr(self, f.name)
            if how == "always" or (how == "when set" and value != f.default):
                key[f.name] = value
        return key

    def validate(self) -> None:  # how the batch splits over processes is the planner's (it knows the world size),
        # which device has which precision the trainer's (it probes the device)
        if self.batch_split < 1:
            raise BitdeployError(f"--batch-split must be >= 1 (got {self.batch_split})")
        if self.checkpoint_every < 0 or self.eval_every < 0:
            raise BitdeployError("--checkpoint-every and --eval-every count steps and must be >= 0")


@dataclass(frozen=True)
class TrainingArgs(TrainingOptions):
    """The build's training group: the training options (its flags set the dataset, the split, the HyperRule's
    overrides and, as --train-device, the device) and whether to fine-tune on --dataset before the export."""

    finetune: bool | None = None  # None: when --dataset is given and the weights are not a trained checkpoint

    def has_training_flags(self) -> bool:
        return any(v is not None for v in (self.shots, self.steps, self.batch_size, self.lr))

    def wants_finetune(self, weights: str) -> bool:
        if self.dataset is None:
            return False
        if self.finetune is not None:
            return self.finetune
        return self.has_training_flags() or not is_checkpoint(weights)

    def validate(self) -> None:
        if self.finetune and self.dataset is None:
            raise BitdeployError("--finetune needs --dataset; pass the dataset to fine-tune on")
        if self.has_training_flags() and self.dataset is None:
            raise BitdeployError("--shots/--steps/--batch-size/--lr fine-tune the model and need --dataset")
        super().validate()


def is_checkpoint(weights: str) -> bool:
    if weights in ("auto", "none"):
        return False
    p = Path(weights).expanduser()
    return (p.is_dir() and (p / "checkpoint.pt").is_file()) or p.suffix == ".pt"


@dataclass(frozen=True)
class CalibrationArgs:
    calib_size: int = 300  # INT8 calibration images from the training split
    calib_method: str | None = None  # None: the target's first

    def validate(self) -> None:
        if self.calib_size < 1:
            raise BitdeployError(f"--calib-size must be >= 1 (got {self.calib_size}); the default is 300")


INT8_FALLBACKS = ("auto", "search", "qat", "none")
DEFAULT_MAX_DROP_PP = 1.0
DEFAULT_CONFIDENCE = 0.95  # the level of the gate's intervals (converters.intervals) unless --gate-confidence


@dataclass(frozen=True)
class GateSpec:
    """What a bundle must meet on the labelled split: a top-1 drop of at most `max_drop_pp` percentage points
    and/or a top-1 agreement with FP32 of at least `min_agreement_pct` percent (MLPerf's "99 % of FP32" style).
    Neither given: the default drop allowance."""

    max_drop_pp: float | None = None
    min_agreement_pct: float | None = None
    confidence: float | None = None  # --gate-confidence: judge the intervals' bounds at this level, not the points

    @property
    def drop_allowance(self) -> float | None:
        """The top-1 drop allowed, in pp (None: only agreement gates)."""
        if self.max_drop_pp is None and self.min_agreement_pct is None:
            return DEFAULT_MAX_DROP_PP
        return self.max_drop_pp

    @property
    def level(self) -> float:
        """The level of the intervals the gate computes: --gate-confidence, else 95 %."""
        return self.confidence if self.confidence is not None else DEFAULT_CONFIDENCE

    def judged(
        self,
        drop_pp: float | None,
        agreement: float | None,
        drop_ci_pp: tuple[float, float] | None = None,
        agreement_ci: tuple[float, float] | None = None,
    ) -> tuple[float, float]:
        """(the drop in pp, the agreement in %) the gate compares: the points, or with `confidence` the bounds that
        could fail it (the drop's upper, the agreement's lower) where the intervals are known."""
        drop, agree = drop_pp or 0.0, (agreement or 0.0) * 100.0
        if self.confidence is not None:
            drop = drop_ci_pp[1] if drop_ci_pp is not None else drop
            agree = agreement_ci[0] * 100.0 if agreement_ci is not None else agree
        return drop, agree

    def passes(
        self,
        drop_pp: float,
        agreement: float | None,
        drop_ci_pp: tuple[float, float] | None = None,
        agreement_ci: tuple[float, float] | None = None,
    ) -> bool:
        drop, agree = self.judged(drop_pp, agreement, drop_ci_pp, agreement_ci)
        allowance = self.drop_allowance
        if allowance is not None and drop > allowance + 1e-9:
            return False
        return self.min_agreement_pct is None or agree >= self.min_agreement_pct - 1e-9

    def describe(self) -> str:
        """ "top-1 drop <= 1 pp and agreement >= 99.5 %" (", at the 95 % bound" with --gate-confidence)."""
        parts = [f"top-1 drop <= {self.drop_allowance:g} pp"] if self.drop_allowance is not None else []
        if self.min_agreement_pct is not None:
            parts.append(f"agreement >= {self.min_agreement_pct:g} %")
        bound = f", at the {self.confidence * 100:g} % bound" if self.confidence is not None else ""
        return " and ".join(parts) + bound

    def noise(self, drop_ci_pp: tuple[float, float] | None, agreement_ci: tuple[float, float] | None) -> str | None:
        """ "within noise: ..." when a threshold lies inside its figure's interval (another sample of images could
        turn the verdict), else None."""
        level = f"{self.level * 100:g} %"
        allowance = self.drop_allowance
        if allowance is not None and drop_ci_pp is not None and drop_ci_pp[0] <= allowance <= drop_ci_pp[1]:
            lo, hi = drop_ci_pp
            return f"within noise: the {allowance:g} pp allowance lies inside the drop's {level} interval [{lo:+.2f}, {hi:+.2f}] pp"
        need = self.min_agreement_pct
        if need is not None and agreement_ci is not None and agreement_ci[0] * 100 <= need <= agreement_ci[1] * 100:
            lo, hi = agreement_ci[0] * 100, agreement_ci[1] * 100
            return (
                f"within noise: the {need:g} % agreement minimum lies inside its {level} interval [{lo:.2f}-{hi:.2f}] %"
            )
        return None

    def shortfall(
        self,
        drop_pp: float | None,
        agreement: float | None,
        drop_ci_pp: tuple[float, float] | None = None,
        agreement_ci: tuple[float, float] | None = None,
    ) -> str:
        """What a failed result missed, for the bundle's invalid reason (with "within noise" when it is)."""
        missed = []
        allowance = self.drop_allowance
        drop, agree = self.judged(drop_pp, agreement, drop_ci_pp, agreement_ci)
        bound = self.confidence is not None
        if allowance is not None and drop > allowance + 1e-9:
            what = (
                f"top-1 drop's {self.level * 100:g} % upper bound {drop:.2f} pp"
                if bound
                else f"top-1 dropped {drop:.2f} pp"
            )
            point = f", point {drop_pp or 0:.2f} pp" if bound and drop_ci_pp is not None else ""
            missed.append(f"{what} (allowed {allowance:g} pp{point})")
        if self.min_agreement_pct is not None and agree < self.min_agreement_pct - 1e-9:
            what = (
                f"agreement's {self.level * 100:g} % lower bound {agree:.2f} %" if bound else f"agreement {agree:.2f} %"
            )
            point = f", point {(agreement or 0) * 100:.2f} %" if bound and agreement_ci is not None else ""
            missed.append(f"{what} (needed {self.min_agreement_pct:g} %{point})")
        noise = self.noise(drop_ci_pp, agreement_ci)
        return "; ".join(missed + ([noise] if missed and noise else [])) or "the logits are not finite"


@dataclass(frozen=True)
class GateArgs:
    """When a bundle is valid: its top-1 drop against FP32 here, then its self-test on each --verify-on CPU."""

    max_accuracy_drop: float | None = None  # percentage points; None: 1.0 unless --min-agreement gates alone
    min_agreement: float | None = None  # percent of top-1 agreement with FP32
    eval_limit: int | None = None
    verify_on: str | None = None  # CPU[,CPU...] (bitdeploy devices)
    int8_fallback: str = "auto"  # auto: the INT8/float mix search, then QAT | search: the mix only | qat | none
    qat_steps: int | None = None  # the quantization-aware fine-tune's steps; None: a tenth of the FP32 fine-tune's
    int8_search_budget: int = 24  # conversions + evaluations the search may spend per engine
    gate_confidence: float | None = None  # judge the intervals' bounds at this level (e.g. 0.95), not the points

    def spec(self) -> GateSpec:
        return GateSpec(self.max_accuracy_drop, self.min_agreement, self.gate_confidence)

    def validate(self) -> None:
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise BitdeployError(f"--max-accuracy-drop must be >= 0 percentage points (got {self.max_accuracy_drop})")
        if self.min_agreement is not None and not 0 < self.min_agreement <= 100:
            raise BitdeployError(f"--min-agreement is a percentage in (0, 100] (got {self.min_agreement})")
        if self.int8_fallback not in INT8_FALLBACKS:
            raise BitdeployError(
                f"--int8-fallback must be one of {', '.join(INT8_FALLBACKS)} (got {self.int8_fallback!r})"
            )
        if self.qat_steps is not None and self.qat_steps < 1:
            raise BitdeployError(f"--qat-steps must be >= 1 (got {self.qat_steps})")
        if self.int8_search_budget < 2:
            raise BitdeployError(f"--int8-search-budget must be >= 2 evaluations (got {self.int8_search_budget})")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise BitdeployError(f"--eval-limit must be >= 1 (got {self.eval_limit})")
        if self.gate_confidence is not None and not 0.5 < self.gate_confidence < 1:
            raise BitdeployError(
                f"--gate-confidence is a level between 0.5 and 1, e.g. 0.95 (got {self.gate_confidence:g})"
            )


@dataclass(frozen=True)
class ExportArgs:
    """The weights the build starts from and the ONNX export every target converts."""

    weights: str = "auto"  # auto (official, cached) | none (random init) | PATH (.npz, checkpoint.pt, training dir)
    opset: int = 17

    def validate(self) -> None:
        if not 13 <= self.opset <= 20:
            raise BitdeployError(f"--opset must be 13..20 (got {self.opset})")


@dataclass(frozen=True)
class EngineArgs:
    """The engines a build makes bundles for, at which precisions, on which device, with how many threads."""

    target: str = "onnx"  # a target name, a comma list, or "all"
    precisions: tuple[str, ...] | None = None  # None: fp32 (every precision with target "all")
    device: str | None = None
    threads: int | None = None

    def validate(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise BitdeployError(f"--threads must be >= 1 (got {self.threads})")


@dataclass(frozen=True)
class TimingArgs:
    report: bool = True  # time the bundles and write the report
    baseline: bool = True  # time the PyTorch FP32 baselines for the report's speed-up column
    bench_iterations: int = 100
    quiet_check: str = "warn"  # warn | wait | fail: a busy machine while timing (benchmarks.interference)
    progress: bool = True

    def validate(self) -> None:
        if self.quiet_check not in ("warn", "wait", "fail"):
            raise BitdeployError(f"--quiet-check {self.quiet_check!r}: choose warn, wait or fail")


@dataclass(frozen=True)
class SelectionArgs:
    """What --select and the budgets ask for."""

    select: str | None = None  # fastest | most-accurate (default: the axis the budgets leave free)
    latency_budget: float | None = None  # ms, batch-1 p50
    min_top1: float | None = None  # percent
    memory_budget: float | None = None  # MB, peak RSS of a fresh runtime process serving batch 1

    @property
    def wanted(self) -> bool:
        return any(v is not None for v in (self.select, self.latency_budget, self.min_top1, self.memory_budget))

    def validate(self) -> None:
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise BitdeployError(f"--memory-budget is in MB and must be > 0 (got {self.memory_budget})")
        if self.latency_budget is not None and self.latency_budget <= 0:
            raise BitdeployError(f"--latency-budget is in ms and must be > 0 (got {self.latency_budget})")


@dataclass(frozen=True)
class CacheArgs:
    dir: Path | None = None  # None: $BITDEPLOY_CACHE/stages or ~/.cache/bitdeploy/stages
    enabled: bool = True  # reuse and store stages

    def validate(self) -> None:
        if self.dir is not None and self.dir.exists() and not self.dir.is_dir():
            raise BitdeployError(f"--cache-dir {self.dir} is a file; pass a directory")


@dataclass(frozen=True)
class GridArgs:
    """The (model, resolution) cells of a build, and how a long grid is split and bounded."""

    models: tuple[str, ...]
    resolutions: tuple[int, ...] = ()  # empty: the fine-tune's or checkpoint's, else 128
    shard: str | None = None  # I/N
    max_hours: float | None = None

    @property
    def is_grid(self) -> bool:
        return (
            len(self.models) * max(1, len(self.resolutions)) > 1 or self.shard is not None or self.max_hours is not None
        )

    def validate(self) -> None:
        if not self.models:
            raise BitdeployError("--model: give a model name, e.g. m-r50x1")
        bad = [r for r in self.resolutions if r < 16]
        if bad:
            raise BitdeployError(f"--resolution must be >= 16 pixels (got {bad[0]})")


@dataclass(frozen=True)
class RuntimeArgs:
    """How the runtime commands open a bundle: another backend, another device, the engine's threads."""

    backend: str | None = None
    device: str | None = None
    threads: int | None = None

    def validate(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise BitdeployError(f"--threads must be >= 1 (got {self.threads})")


SCENARIOS = ("single-stream", "offline", "both")
COMPILE_TIMEOUT_S = 300.0  # seconds torch.compile of the PyTorch baseline may take


@dataclass(frozen=True)
class BenchTimingArgs:
    """What `bitdeploy bench` times and how: scenarios, queries, rounds, the quiet-machine check, what it keeps."""

    batch_sizes: tuple[int, ...] = (1, 8, 32)
    scenario: str = "both"
    iterations: int | None = None
    duration: float | None = None
    warmup: int = 20
    rounds: int = 3
    quiet_check: str = "warn"
    quiet_wait: float = 60.0
    end_to_end: bool = True
    memory: bool = True
    keep_raw: bool = True
    progress: bool = True

    def validate(self) -> None:
        if self.iterations is not None and self.duration is not None:
            raise UsageError("use either --iterations or --duration, not both")


@dataclass(frozen=True)
class AccuracyArgs:
    """`bitdeploy bench`'s accuracy: top-1/top-5 on a validation split, and agreement with a reference bundle."""

    dataset: str | None = None
    samples: int | None = None
    reference: str | None = None

    def validate(self) -> None:  # --reference without --dataset is refused by the bench itself (its API checks too)
        if self.samples is not None and self.samples < 1:
            raise BitdeployError(f"--samples must be >= 1 (got {self.samples})")


@dataclass(frozen=True)
class PyTorchBaselineArgs:
    """The PyTorch FP32 baseline of `bitdeploy bench` (weights None: not timed)."""

    compile_timeout: float  # seconds allowed for torch.compile of the baseline; 0: skip that form
    weights: str | None = None  # "auto" | "none" | PATH

    def validate(self) -> None:
        if self.compile_timeout < 0:
            raise BitdeployError(f"--compile-timeout must be >= 0 seconds (got {self.compile_timeout:g})")
