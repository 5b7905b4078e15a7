"""The converter contract shared by every target, and the typed options a build hands a converter.

A converter is a `Converter` subclass, named "module:Class" in its target's record (`bitdeploy.core.targets`).
`bind(target, precision, options)` imports the record's class and binds it to one row; the build then calls

    bind(target, precision, options).convert(onnx_fp32, work_dir, calibration, float_layers) -> Artifact

`convert` runs the shared guard (`check_request`) and the target's own `run`, which reads the folded FP32 ONNX
export, writes its files only inside `work_dir` (an empty directory that becomes the bundle) and raises
`bitdeploy.core.errors.ConversionError` (one line) on failure. Options shared by every target are fields of
`ConvertOptions`. What only one target reads is that target's own frozen `TargetOptions` subclass (named by its
record, living beside its converter), read with `self.options.extras_for(cls)`; each of its fields declared with
`option(...)` becomes a `bitdeploy build` flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bitdeploy.core.errors import ConversionError
from bitdeploy.core.targets import PRECISIONS, Target, backend_names, get_target, import_object, load_converter
from bitdeploy.runtimes.bundle.manifest import Quantization, TargetInfo

if TYPE_CHECKING:
    from bitdeploy.converters.calibration import CalibrationData, ValidationData

NO_CALIBRATION = "--precision int8 needs calibration images; pass --dataset (INT8 is never calibrated on noise)"


@dataclass(frozen=True)
class Flag:
    """How one field of a target's options appears on `bitdeploy build`."""

    flag: str  # e.g. "--int8-scheme"
    help: str
    choices: tuple[str, ...] = ()
    precisions: tuple[str, ...] = PRECISIONS  # the rows it changes; given for a build with none of them: an error
    metavar: str | None = None
    minimum: float | None = None  # numbers: the smallest value accepted


def option(
    flag: str,
    help: str,
    default: Any,
    *,
    choices: tuple[str, ...] = (),
    precisions: tuple[str, ...] = PRECISIONS,
    metavar: str | None = None,
    minimum: float | None = None,
) -> Any:
    """A field of a `TargetOptions` class that `bitdeploy build` offers as `flag` (a bool default: an on/off flag;
    a float or int default, or `minimum`: a number; otherwise a string)."""
    return field(default=default, metadata={"flag": Flag(flag, help, choices, precisions, metavar, minimum)})


@dataclass(frozen=True)
class RowInputs:
    """What the build knows when it hands one row its target's options."""

    max_accuracy_drop: float  # the gate's allowance, in top-1 percentage points
    validation: ValidationData | None = None  # the labelled split, when some target asked for it
    dataset: str | None = None
    verify_on: tuple[str, ...] = ()  # the architectures (arm64, x86_64) of the --verify-on CPUs


@dataclass(frozen=True)
class TargetOptions:
    """Base of a target's own options: a frozen dataclass whose `option(...)` fields are build flags.

    The hooks have safe defaults; a target overrides the ones it needs."""

    @classmethod
    def flags(cls) -> list[tuple[str, Flag, Any]]:
        """(field name, flag, default) of every field that is a build flag, in declaration order."""
        return [(f.name, f.metadata["flag"], f.default) for f in fields(cls) if "flag" in f.metadata]

    def given(self) -> list[tuple[str, Flag, Any]]:
        """The flags whose value differs from the default: (field name, flag, value)."""
        return [
            (name, flag, getattr(self, name)) for name, flag, default in self.flags() if getattr(self, name) != default
        ]

    def validate(self, precisions: Sequence[str], dataset: str | None) -> None:
        """Refuse a combination the converter would refuse, before any heavy work (raise a BitdeployError)."""

    def needs_validation(self, precisions: Sequence[str]) -> bool:
        """True: the build should give `for_row` the labelled validation split as `RowInputs.validation`."""
        return False

    def for_row(self, precision: str, row: RowInputs) -> TargetOptions:
        """The options one (target, precision) row's converter is handed."""
        return self

    def gate_hint(self, precision: str) -> str | None:
        """What to try when a row of this target fails the accuracy gate, when the target knows better than
        the generic advice (e.g. "try --accuracy-control")."""
        return None

    def cache_key(self) -> dict[str, Any]:
        """What of these options changes a conversion's result (data as digests), for its cache key."""
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = getattr(value, "sha256", value) if value is not None else None
        return out


OptionsT = TypeVar("OptionsT", bound=TargetOptions)


def options_class(target: Target) -> type[TargetOptions] | None:
    """The record's own build-options class (imported: the build and the CLI only, never the runtime)."""
    if not target.options:
        return None
    cls: type[TargetOptions] = import_object(target.options)
    return cls


@dataclass(frozen=True)
class ConvertOptions:
    """What every converter may read. Frozen: a converter can never change what the next one sees."""

    device: str | None = None  # deployment device; None: the target's default
    threads: int | None = None  # threads the converter's own checks compile with
    calib_method: str | None = None  # INT8 range estimation; None: the quantizer's default
    cache: bool = True  # False: neither read nor write tool caches (TensorRT's timing cache)
    cache_dir: Path | None = None  # where tool caches live; None: bitdeploy's cache root
    extras: TargetOptions | None = None  # the target's own options
    ready_only: bool = False  # the target cannot be built here: write the model its device finishes (a target
    # with `ready_modules`: TensorRT's ONNX, its engine built by `bitdeploy engine` on the device)

    def extras_for(self, kind: type[OptionsT]) -> OptionsT:
        """The target's own options, or that target's defaults when the build gave none (or another target's)."""
        return self.extras if isinstance(self.extras, kind) else kind()


def check_request(title: str, precision: str, calibration: CalibrationData | None) -> None:
    """The guards every converter starts with: a precision it has a route for, and calibration data for INT8."""
    if precision not in PRECISIONS:
        raise ConversionError(f"{title} precision must be fp32, fp16 or int8, got {precision!r}")
    if precision == "int8" and (calibration is None or len(calibration) == 0):
        raise ConversionError(NO_CALIBRATION)


@dataclass
class Artifact:
    """What a converter produced inside its work dir.

    files: every file of the artifact, names relative to the work dir (they all go into the bundle).
    model_file: the file a runtime opens (e.g. "model.onnx", "model.xml", "model.plan").
    target: the manifest's `target` record: backend (a record's `backend` in `bitdeploy.core.targets`), precision,
        precision_used, device, quantization, plus backend-specific details.
    notes: short human-readable remarks (what stayed in float, fallbacks taken) shown by build.
    eval_model_file: optional ONNX file (relative to the work dir) that ONNX Runtime can evaluate on the CPU
        when the artifact's own backend cannot run here (e.g. the TensorRT QDQ ONNX). It is evaluated instead
        of model_file only when the backend is unavailable, and the manifest says so.
    """

    files: list[str]
    model_file: str
    target: TargetInfo
    notes: list[str] = field(default_factory=list)
    eval_model_file: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in backend_names():
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {backend_names()}")
        if self.model_file not in self.files:
            self.files = [self.model_file, *self.files]
        if self.eval_model_file is not None and self.eval_model_file not in self.files:
            self.files = [*self.files, self.eval_model_file]

    @property
    def backend(self) -> str:
        return self.target.backend

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, for the stage cache."""
        return {
            "files": list(self.files),
            "model_file": self.model_file,
            "target": self.target.to_dict(),
            "notes": list(self.notes),
            "eval_model_file": self.eval_model_file,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Artifact:
        target = dict(data["target"])
        target.setdefault("backend", data.get("backend", ""))  # cached before the backend moved into the target
        return cls(
            files=list(data["files"]),
            model_file=data["model_file"],
            target=TargetInfo.from_dict(target),
            notes=list(data.get("notes") or []),
            eval_model_file=data.get("eval_model_file"),
        )


@dataclass(frozen=True)
class Uniform:
    """The uniform INT8 conversion an INT8 search candidate is reverted from."""

    onnx_fp32: Path  # the FP32 export it was converted from
    work: Path  # its work dir
    artifact: Artifact
    calibration: CalibrationData | None = None  # only where what the uniform conversion kept may not be enough


@dataclass(frozen=True)
class QatModel:
    """A quantization-aware fine-tune, ready for any engine (`bitdeploy.training.qat` makes it; the build's `qat`
    stage holds it): one explicitly quantized model whose every scale and zero point the fine-tune fixed."""

    qdq: Path  # the Q/DQ ONNX every engine reads (`bitdeploy.converters.qat_qdq.write_qdq`)
    onnx_fp32: Path  # the fine-tuned model's folded FP32 export the Q/DQ were written into
    params: Path  # its `QatParams` JSON (scales and zero points by layer, and the fine-tune's record)
    checkpoint: Path | None = None  # the fine-tuned float BiT checkpoint, for converters that start from PyTorch


class Converter:
    """A target's converter bound to its record and one row's precision and options.

    A target subclasses it and implements `run`; its record names the subclass ("module:Class")."""

    def __init__(self, target: Target, precision: str, options: ConvertOptions | None = None) -> None:
        self.target = target
        self.precision = precision
        self.options = options if options is not None else ConvertOptions()

    def convert(
        self,
        onnx_fp32: Path,
        work_dir: Path,
        calibration: CalibrationData | None = None,
        float_layers: tuple[str, ...] = (),
    ) -> Artifact:
        """Convert the FP32 export into `work_dir`; INT8 keeps `float_layers` (`bitdeploy.converters.layers`) in
        float as well. The shared guard runs first, so nothing is written for a request no target accepts."""
        check_request(self.target.title, self.precision, calibration)
        return self.run(Path(onnx_fp32), Path(work_dir), calibration, tuple(float_layers))

    def run(
        self, onnx_fp32: Path, work_dir: Path, calibration: CalibrationData | None, float_layers: tuple[str, ...]
    ) -> Artifact:
        """The target's conversion, after `check_request` (each target implements it)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement run()")

    @property
    def reverts(self) -> bool:
        """Whether the INT8 search can make its candidates with `revert` (else it converts each one)."""
        return self.precision == "int8" and type(self).revert is not Converter.revert

    def revert(self, uniform: Uniform, work_dir: Path, float_layers: tuple[str, ...]) -> Artifact:
        """The INT8 search's candidate: the `uniform` INT8 model with the convolutions of `float_layers` back in
        float, written to `work_dir` without calibrating again (a target with such a route implements it)."""
        raise NotImplementedError(f"{type(self).__name__} has no revert route")

    @property
    def takes_qat(self) -> bool:
        """Whether this target can make its INT8 bundle from a quantization-aware fine-tune (`from_qat`)."""
        return self.precision == "int8" and type(self).from_qat is not Converter.from_qat

    def from_qat(self, qat: QatModel, work_dir: Path) -> Artifact:
        """The row's INT8 bundle from a quantization-aware fine-tune, written to `work_dir` without calibrating:
        every quantization parameter is the fine-tune's (a target with such a route implements it)."""
        raise NotImplementedError(f"{type(self).__name__} has no route for a quantization-aware fine-tune")

    def float_layers(self, model_path: Path) -> list[str]:
        """The convolutions a model file of this target leaves in float, read from the file (with `revert`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot read its float layers back")

    def target_info(
        self,
        used: str,
        device: str | None,
        quantization: Quantization | None = None,
        details: dict[str, Any] | None = None,
    ) -> TargetInfo:
        """The manifest's `target` record: backend from the record, precision from this row (the one place it is
        set), `used` what actually computes."""
        return TargetInfo(self.target.backend, self.precision, used, device, quantization, dict(details or {}))


def bind(target: Target | str, precision: str, options: ConvertOptions | None = None) -> Converter:
    """The record's converter class (imported by its "module:Class" string), bound to one row."""
    record = get_target(target) if isinstance(target, str) else target
    cls = load_converter(record)
    if not (isinstance(cls, type) and issubclass(cls, Converter)):
        raise TypeError(f"{record.converter} is not a bitdeploy.converters.base.Converter subclass")
    return cls(record, precision, options)


def reverted(uniform: Artifact, float_layers: list[str], info: dict[str, Any]) -> Artifact:
    """A reverted candidate's Artifact: the uniform one's files and target, with `float_layers` (read from the
    written file) as the quantization's float layers and what the revert did recorded beside them."""
    from dataclasses import replace

    q = uniform.target.quantization or Quantization()
    details = {**q.details, "float_layers": float_layers, "reverted": info}
    target = replace(uniform.target, quantization=replace(q, details=details))
    note = f"INT8 search: {len(info.get('reverted_layers', []))} layers reverted to float in the uniform INT8 model"
    return Artifact(list(uniform.files), uniform.model_file, target, [*uniform.notes, note], uniform.eval_model_file)
