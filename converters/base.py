"""The converter contract shared by every target (ONNX Runtime, OpenVINO, TensorRT).

A converter is a plain function, referenced as "module:function" in `bitdeploy.targets.TARGETS`:

    def convert(onnx_fp32: Path, work_dir: Path, precision: str,
                calibration: CalibrationData | None, options: dict) -> Artifact

It reads the folded FP32 ONNX export, writes its files only inside `work_dir` (an empty directory that becomes
the bundle), never mutates `options`, and raises `bitdeploy.errors.ConversionError` (one line) on failure.
`options` is a plain JSON-able dict (see `bitdeploy.build.BuildOptions.converter_options`): keys such as
`device`, `threads`, `calib_method`, `accuracy_control`, `max_accuracy_drop`, `resolution`, `fp32_model_path`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bitdeploy.converters.calibration import CalibrationData

BACKENDS = ("onnxruntime", "openvino", "tensorrt", "litert")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class Artifact:
    """What a converter produced inside its work dir.

    files: every file of the artifact, names relative to the work dir (they all go into the bundle).
    model_file: the file a runtime opens (e.g. "model.onnx", "model.xml", "model.plan").
    backend: the runtime backend name ("onnxruntime" | "openvino" | "tensorrt").
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
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {BACKENDS}")
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
        options: dict[str, Any],
    ) -> Artifact: ...
