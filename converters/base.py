"""The converter contract shared by every target, and the typed options a build hands a converter.

A converter is a plain function, named "module:function" in its target's record (`bitdeploy.targets`):

    def convert(onnx_fp32: Path, work_dir: Path, precision: str,
                calibration: CalibrationData | None, options: ConvertOptions) -> Artifact

It reads the folded FP32 ONNX export, writes its files only inside `work_dir` (an empty directory that becomes
the bundle) and raises `bitdeploy.errors.ConversionError` (one line) on failure. Options shared by every target
are fields of `ConvertOptions`; what only one target reads travels in `options.extras`, a frozen dataclass of
that target's own (`OrtOptions`, `OpenVinoOptions`, `TensorRTOptions`), read with `options.extras_for(cls)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from bitdeploy.converters.calibration import CalibrationData, ValidationData


@dataclass(frozen=True)
class OrtOptions:
    """ONNX Runtime: the INT8 integer scheme (`bitdeploy.converters.ort_convert.SCHEMES`, or "auto")."""

    int8_scheme: str = "auto"


@dataclass(frozen=True)
class OpenVinoOptions:
    """OpenVINO: the float precision to validate and pin, and NNCF's accuracy-controlled INT8."""

    inference_precision: str = "f32"
    accuracy_control: bool = False
    max_accuracy_drop: float = 1.0  # percentage points of top-1, for accuracy control
    validation: ValidationData | None = None  # the labelled split accuracy control measures on


@dataclass(frozen=True)
class TensorRTOptions:
    """TensorRT: the dynamic-batch profile ("MIN,OPT,MAX") and the builder's workspace limit."""

    batch: str | None = None
    workspace_gb: float | None = None


TargetExtras = OrtOptions | OpenVinoOptions | TensorRTOptions
E = TypeVar("E", OrtOptions, OpenVinoOptions, TensorRTOptions)


@dataclass(frozen=True)
class ConvertOptions:
    """What every converter may read. Frozen: a converter can never change what the next one sees."""

    device: str | None = None  # deployment device; None: the target's default
    threads: int | None = None  # threads the converter's own checks compile with
    calib_method: str | None = None  # INT8 range estimation; None: the quantizer's default
    cache: bool = True  # False: neither read nor write tool caches (TensorRT's timing cache)
    cache_dir: Path | None = None  # where tool caches live; None: bitdeploy's cache root
    extras: TargetExtras | None = None  # the target's own options

    def extras_for(self, kind: type[E]) -> E:
        """The target's own options, or that target's defaults when the build gave none (or another target's)."""
        return self.extras if isinstance(self.extras, kind) else kind()


@dataclass
class Artifact:
    """What a converter produced inside its work dir.

    files: every file of the artifact, names relative to the work dir (they all go into the bundle).
    model_file: the file a runtime opens (e.g. "model.onnx", "model.xml", "model.plan").
    backend: the runtime backend that loads it (a record's `backend` in `bitdeploy.targets`).
    target: manifest "target" keys: precision, precision_used, device, plus backend-specific info.
    notes: short human-readable remarks (what stayed in float, fallbacks taken) shown by build.
    eval_model_file: optional ONNX file (relative to the work dir) that ONNX Runtime can evaluate on the CPU
        when the artifact's own backend cannot run here (e.g. the TensorRT QDQ ONNX). It is evaluated instead
        of model_file only when the backend is unavailable, and the manifest says so.
    """

    files: list[str]
    model_file: str
    backend: str
    target: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    eval_model_file: str | None = None

    def __post_init__(self) -> None:
        from bitdeploy.targets import backend_names

        if self.backend not in backend_names():
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {backend_names()}")
        if self.model_file not in self.files:
            self.files = [self.model_file, *self.files]
        if self.eval_model_file is not None and self.eval_model_file not in self.files:
            self.files = [*self.files, self.eval_model_file]


class ConvertFn(Protocol):
    def __call__(
        self,
        onnx_fp32: Path,
        work_dir: Path,
        precision: str,
        calibration: CalibrationData | None,
        options: ConvertOptions,
    ) -> Artifact: ...
