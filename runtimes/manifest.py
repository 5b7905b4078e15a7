"""The bundle manifest as one typed record: what `manifest.json` says, read once and checked, written by one function.

Each object of the JSON is a frozen dataclass with `from_dict` (read and type-check; a one-line BundleError names
the first bad field) and `to_dict` (the JSON it writes). The build assembles one `Manifest` and
`bitdeploy.runtimes.bundle.write_manifest` writes it; every reader uses these types.

To add a field: one dataclass field with a default (so older bundles still load), one line in `from_dict`, one in
`to_dict`; bump FORMAT_MINOR when readers of the same major may meet it.

`format_version` is `MAJOR` (an integer) or "MAJOR.MINOR": a reader refuses a major it does not know and accepts
any minor of its own major, since a minor only adds optional fields. Top-level fields bitdeploy does not know stay
in `Manifest.extra`, so `inspect --json` and a repack keep them. Version 1 bundles written before these types
(the quantization method under `calib_method`, OpenVINO's fields at the top of `target`) read the same. Stdlib only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bitdeploy.core.errors import BundleError

FORMAT = "bitdeploy-bundle"
FORMAT_MAJOR = 1  # what this bitdeploy reads
FORMAT_VERSION = 1  # what it writes
REFERENCE = "pytorch-fp32"  # what every gate and self-test compares with
BIT_MEAN = (0.5, 0.5, 0.5)  # BiT's normalisation: x/255 in [0, 1] -> [-1, 1]
BIT_STD = (0.5, 0.5, 0.5)


def parse_version(value: Any) -> tuple[int, int] | None:
    """1 -> (1, 0); "1.2" -> (1, 2); anything else -> None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value, 0
    if isinstance(value, str):
        major, _, minor = value.partition(".")
        if major.isdigit() and (minor.isdigit() or not minor):
            return int(major), int(minor or 0)
    return None


# -- reading helpers: each names the field it refuses ------------------------------------------------------------
def _bad(where: str, what: str, value: Any) -> BundleError:
    return BundleError(f"manifest {where} must be {what} (got {value!r}); rebuild the bundle")


def _object(data: Mapping[str, Any], key: str, where: str = "") -> Mapping[str, Any] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        name = f"{where}.{key}" if where else f"field {key!r}"
        raise BundleError(f"manifest {name} must be an object (got {type(value).__name__}); rebuild the bundle")
    return value


def _str(data: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str | None:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _bad(f"{where}.{key}", "a string", value)
    return value


def _num(data: Mapping[str, Any], key: str, where: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{where}.{key}", "a number", value)
    return float(value)


def _int(data: Mapping[str, Any], key: str, where: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{where}.{key}", "an integer", value)
    return value


def _dim(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(where, "a list of integers", value)
    return value


def _dict(value: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if value is None else dict(value)


def _verified_on(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise _bad("verified_on", "a list of objects", value)
    return [dict(v) for v in value]


def _rest(data: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in known}


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


# -- the objects ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """The manifest's `input`: the tensor the model takes and how an image becomes it."""

    name: str = "input"
    shape: tuple[int | None, ...] | None = None  # NCHW; -1 or None: any size; None: a 4-D array of any size
    layout: str = "NCHW"
    dtype: str = "float32"
    color: str = "RGB"
    resize: tuple[int, int] | None = None  # (height, width)
    interpolation: str = "bilinear"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = BIT_MEAN
    std: tuple[float, ...] = BIT_STD

    @classmethod
    def square(cls, resolution: int) -> InputSpec:
        """What bitdeploy writes for a model evaluated at `resolution` pixels."""
        return cls(shape=(-1, 3, resolution, resolution), resize=(resolution, resolution))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputSpec:
        shape, resize = data.get("shape"), data.get("resize")
        if shape is not None and not isinstance(shape, (list, tuple)):
            raise _bad("input.shape", "a list", shape)
        if resize is not None and (not isinstance(resize, (list, tuple)) or len(resize) != 2):
            raise _bad("input.resize", "[height, width]", resize)
        dims = (
            None
            if shape is None
            else tuple(d if isinstance(d, int) and not isinstance(d, bool) else None for d in shape)
        )
        mean, std = data.get("mean") or BIT_MEAN, data.get("std") or BIT_STD
        return cls(
            name=_str(data, "name", "input", "input") or "input",
            shape=dims,
            layout=_str(data, "layout", "input", "NCHW") or "NCHW",
            dtype=_str(data, "dtype", "input", "float32") or "float32",
            color=_str(data, "color", "input", "RGB") or "RGB",
            resize=None if resize is None else (_dim(resize[0], "input.resize"), _dim(resize[1], "input.resize")),
            interpolation=_str(data, "interpolation", "input", "bilinear") or "bilinear",
            scale=_num(data, "scale", "input") or 1.0 / 255.0,
            mean=tuple(float(x) for x in mean),
            std=tuple(float(x) for x in std),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": None if self.shape is None else [-1 if d is None else d for d in self.shape],
            "layout": self.layout,
            "dtype": self.dtype,
            "color": self.color,
            "resize": None if self.resize is None else list(self.resize),
            "interpolation": self.interpolation,
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclass(frozen=True)
class ModelInfo:
    """The manifest's `model`: which network, how many classes, which weights."""

    name: str = ""
    num_classes: int = 0
    params: int | None = None
    resolution: int | None = None
    weights: Mapping[str, Any] = field(default_factory=dict)  # kind, source, sha256 (+ fine_tuned: the training)
    ws_eps: float | None = None
    state_sha256: str | None = None

    KNOWN = ("name", "num_classes", "params", "resolution", "weights", "ws_eps", "state_sha256")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelInfo:
        return cls(
            name=_str(data, "name", "model", "") or "",
            num_classes=_int(data, "num_classes", "model") or 0,
            params=_int(data, "params", "model"),
            resolution=_int(data, "resolution", "model"),
            weights=dict(_object(data, "weights", "model") or {}),
            ws_eps=_num(data, "ws_eps", "model"),
            state_sha256=_str(data, "state_sha256", "model"),
        )

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.KNOWN}
        out["weights"] = dict(self.weights)
        return _drop_none(out)


@dataclass(frozen=True)
class Quantization:
    """What an INT8 conversion did: the range-estimation method, the calibration images, and tool-specific facts."""

    method: str | None = None
    samples: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)  # tool, scheme, op types, float scope, ...

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Quantization:
        method = data.get("method") or data.get("calib_method")  # v1 OpenVINO bundles wrote calib_method
        samples = data.get("samples", data.get("calibration_samples"))  # v1 LiteRT bundles: calibration_samples
        if method is not None and not isinstance(method, str):
            raise _bad("target.quantization.method", "a string", method)
        if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int)):
            raise _bad("target.quantization.samples", "an integer", samples)
        details = _rest(data, ("method", "calib_method", "samples", "calibration_samples"))
        return cls(method=method, samples=samples, details=details)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "samples": self.samples, **self.details}


@dataclass(frozen=True)
class TargetInfo:
    """The manifest's `target`: which backend runs the bundle, in what precision, on what device; what only one
    backend records (engine versions, profiles, float precision pins) is in `details`."""

    backend: str = ""
    precision: str = "fp32"
    precision_used: str | None = None  # what actually computes, e.g. "int8 Conv (U8S8-7BIT) + fp32"
    device: str | None = None
    quantization: Quantization | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    KNOWN = ("backend", "precision", "precision_used", "device", "quantization")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetInfo:
        quant = _object(data, "quantization", "target")
        return cls(
            backend=_str(data, "backend", "target", "") or "",
            precision=_str(data, "precision", "target", "fp32") or "fp32",
            precision_used=_str(data, "precision_used", "target"),
            device=_str(data, "device", "target"),
            quantization=Quantization.from_dict(quant) if quant is not None else None,
            details=_rest(data, cls.KNOWN),
        )

    def get(self, key: str, default: Any = None) -> Any:
        """A backend-specific detail (e.g. "tensorrt_version", "inference_precision")."""
        return self.details.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        out = _drop_none(
            {
                "backend": self.backend,
                "precision": self.precision,
                "precision_used": self.precision_used,
                "device": self.device,
            }
        )
        if self.quantization is not None:
            out["quantization"] = self.quantization.to_dict()
        return {**out, **self.details}


@dataclass(frozen=True)
class GateResult:
    """How the artifact compared with the FP32 PyTorch model at build time: task accuracy on a labelled split
    (`kind` "accuracy": the manifest's `accuracy`) or logits on random inputs (`kind` "validation")."""

    kind: str  # "accuracy" | "validation"
    passed: bool
    samples: int
    agreement: float | None  # top-1 agreement with the reference
    max_abs_logit_diff: float | None  # None: the logits were not finite
    mean_abs_logit_diff: float | None
    reference: str = REFERENCE
    evaluated_with: str | None = None  # the engine and device that ran the artifact
    # accuracy
    top1: float | None = None
    reference_top1: float | None = None
    top1_drop_pp: float | None = None
    max_accuracy_drop_pp: float | None = None
    dataset: str | None = None
    split: str | None = None
    # validation
    inputs: str | None = None
    tolerance: float | None = None
    note: str | None = None

    @property
    def is_accuracy(self) -> bool:
        return self.kind == "accuracy"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], kind: str) -> GateResult:
        def num(key: str) -> float | None:
            return _num(data, key, kind)

        def text(key: str) -> str | None:
            return _str(data, key, kind)

        return cls(
            kind=kind,
            passed=bool(data.get("passed", False)),
            samples=_int(data, "samples", kind) or 0,
            agreement=num("agreement"),
            max_abs_logit_diff=num("max_abs_logit_diff"),
            mean_abs_logit_diff=num("mean_abs_logit_diff"),
            reference=text("reference") or REFERENCE,
            evaluated_with=text("evaluated_with"),
            top1=num("top1"),
            reference_top1=num("reference_top1"),
            top1_drop_pp=num("top1_drop_pp"),
            max_accuracy_drop_pp=num("max_accuracy_drop_pp"),
            dataset=text("dataset"),
            split=text("split"),
            inputs=text("inputs"),
            tolerance=num("tolerance"),
            note=text("note"),
        )

    def to_dict(self) -> dict[str, Any]:
        common = ["samples", "agreement", "max_abs_logit_diff", "mean_abs_logit_diff", "passed", "reference"]
        if self.is_accuracy:
            names = ["top1", "reference_top1", *common, "top1_drop_pp", "max_accuracy_drop_pp", "dataset", "split"]
        else:
            names = ["inputs", *common, "tolerance", "note"]
        out = {k: getattr(self, k) for k in names}
        if self.evaluated_with is not None:
            out["evaluated_with"] = self.evaluated_with
        return out


@dataclass(frozen=True)
class SelfTestSpec:
    """The manifest's `self_test`: the golden set a bundle carries and what the device must reproduce of it."""

    images: int
    min_agreement: float  # criteria: top-1 agreement with the FP32 logits
    max_rel_error: float  # criteria: max |logits - FP32| / max(1, max |FP32|)
    measured_agreement: float | None = None  # what the build host measured on the same inputs
    measured_rel_error: float | None = None
    measured_top1: float | None = None
    file: str = "golden.npz"
    stored_as: str = "float32 inputs"
    labelled: bool = False
    reference: str = REFERENCE
    rule: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SelfTestSpec:
        criteria = _object(data, "criteria", "self_test") or {}
        measured = _object(data, "measured", "self_test") or {}
        return cls(
            images=_int(data, "images", "self_test") or 0,
            min_agreement=_num(criteria, "min_agreement", "self_test.criteria") or 0.0,
            max_rel_error=_num(criteria, "max_rel_error", "self_test.criteria") or 0.0,
            measured_agreement=_num(measured, "agreement", "self_test.measured"),
            measured_rel_error=_num(measured, "max_rel_error", "self_test.measured"),
            measured_top1=_num(measured, "top1", "self_test.measured"),
            file=_str(data, "file", "self_test", "golden.npz") or "golden.npz",
            stored_as=_str(data, "stored_as", "self_test", "float32 inputs") or "float32 inputs",
            labelled=bool(data.get("labelled", False)),
            reference=_str(data, "reference", "self_test", REFERENCE) or REFERENCE,
            rule=_str(data, "rule", "self_test", "") or "",
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "images": self.images,
            "stored_as": self.stored_as,
            "reference": self.reference,
            "labelled": self.labelled,
            "measured": {
                "agreement": self.measured_agreement,
                "max_rel_error": self.measured_rel_error,
                "top1": self.measured_top1,
            },
            "criteria": {"min_agreement": self.min_agreement, "max_rel_error": self.max_rel_error},
            "rule": self.rule,
        }


@dataclass(frozen=True)
class Provenance:
    """Who made the bundle, when, with which library versions."""

    bitdeploy: str = ""
    created: str = ""
    versions: Mapping[str, str] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Provenance:
        versions = _object(data, "versions", "provenance") or {}
        return cls(
            bitdeploy=_str(data, "bitdeploy", "provenance", "") or "",
            created=_str(data, "created", "provenance", "") or "",
            versions={str(k): str(v) for k, v in versions.items()},
            details=_rest(data, ("bitdeploy", "created", "versions")),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"bitdeploy": self.bitdeploy, "created": self.created, "versions": dict(self.versions), **self.details}


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest. Read one with `Manifest.from_dict`; build one with the constructor."""

    valid: bool = False
    invalid_reason: str | None = None
    model_file: str = ""
    target: TargetInfo = field(default_factory=TargetInfo)
    input: InputSpec = field(default_factory=InputSpec)
    labels: list[str] = field(default_factory=list)
    model: ModelInfo = field(default_factory=ModelInfo)
    files: Mapping[str, str] = field(default_factory=dict)  # relative name -> sha256
    output: Mapping[str, Any] = field(default_factory=lambda: {"name": "logits", "kind": "logits"})
    notes: list[str] = field(default_factory=list)
    gate: GateResult | None = None  # written as `accuracy` or `validation`, after its kind
    export: Mapping[str, Any] | None = None  # the ONNX export: opset, nodes, max |diff| vs PyTorch, ...
    calibration: Mapping[str, Any] | None = None  # the INT8 calibration draw: samples, seed, sha256, source
    build_latency: Mapping[str, Any] | None = None
    validated_on: dict[str, Any] | None = None  # the device fingerprint the build validated on
    verified_on: list[dict[str, Any]] | None = None  # emulated CPUs the self-test ran on (build --verify-on)
    self_test: SelfTestSpec | None = None
    provenance: Provenance | None = None
    version: tuple[int, int] = (FORMAT_VERSION, 0)
    extra: Mapping[str, Any] = field(default_factory=dict)  # fields this bitdeploy does not know, kept as read

    KNOWN = (
        "format",
        "format_version",
        "valid",
        "invalid_reason",
        "model_file",
        "target",
        "input",
        "labels",
        "model",
        "files",
        "output",
        "notes",
        "accuracy",
        "validation",
        "export",
        "calibration",
        "build_latency",
        "validated_on",
        "verified_on",
        "self_test",
        "provenance",
    )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Type-check every field; a one-line BundleError names the first bad one. Format and version are checked by
        `check_format` (a partial manifest, e.g. in a test, needs neither)."""
        if not isinstance(data, Mapping):
            raise BundleError("manifest must be a JSON object; rebuild the bundle")
        version = parse_version(data.get("format_version", FORMAT_VERSION)) or (FORMAT_MAJOR, 0)
        labels, notes = data.get("labels") or [], data.get("notes") or []
        if not isinstance(labels, list) or not isinstance(notes, list):
            raise BundleError("manifest labels and notes must be lists; rebuild the bundle")
        model_file = data.get("model_file")
        accuracy, validation = _object(data, "accuracy"), _object(data, "validation")
        gate = (
            GateResult.from_dict(accuracy, "accuracy")
            if accuracy is not None
            else GateResult.from_dict(validation, "validation")
            if validation is not None
            else None
        )
        self_test, provenance = _object(data, "self_test"), _object(data, "provenance")
        return cls(
            valid=bool(data.get("valid", False)),
            invalid_reason=str(data["invalid_reason"]) if data.get("invalid_reason") else None,
            model_file=model_file if isinstance(model_file, str) else "",
            target=TargetInfo.from_dict(_object(data, "target") or {}),
            input=InputSpec.from_dict(_object(data, "input") or {}),
            labels=[str(x) for x in labels],
            model=ModelInfo.from_dict(_object(data, "model") or {}),
            files={str(k): str(v) for k, v in (_object(data, "files") or {}).items()},
            output=dict(_object(data, "output") or {"name": "logits", "kind": "logits"}),
            notes=[str(x) for x in notes],
            gate=gate,
            export=_object(data, "export"),
            calibration=_object(data, "calibration"),
            build_latency=_object(data, "build_latency"),
            validated_on=_dict(_object(data, "validated_on")),
            verified_on=_verified_on(data.get("verified_on")),
            self_test=SelfTestSpec.from_dict(self_test) if self_test is not None else None,
            provenance=Provenance.from_dict(provenance) if provenance is not None else None,
            version=version,
            extra=_rest(data, cls.KNOWN),
        )

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON-able data, in the order `manifest.json` lists it (unknown fields last)."""
        major, minor = self.version
        return {
            "format": FORMAT,
            "format_version": major if minor == 0 else f"{major}.{minor}",
            "valid": self.valid,
            "invalid_reason": self.invalid_reason,
            "model": self.model.to_dict(),
            "target": self.target.to_dict(),
            "model_file": self.model_file,
            "input": self.input.to_dict(),
            "output": dict(self.output),
            "labels": list(self.labels),
            "export": None if self.export is None else dict(self.export),
            "accuracy": self.gate.to_dict() if self.gate is not None and self.gate.is_accuracy else None,
            "validation": self.gate.to_dict() if self.gate is not None and not self.gate.is_accuracy else None,
            "calibration": None if self.calibration is None else dict(self.calibration),
            "notes": list(self.notes),
            "provenance": None if self.provenance is None else self.provenance.to_dict(),
            "build_latency": None if self.build_latency is None else dict(self.build_latency),
            "validated_on": None if self.validated_on is None else dict(self.validated_on),
            "verified_on": None if self.verified_on is None else [dict(v) for v in self.verified_on],
            "self_test": None if self.self_test is None else self.self_test.to_dict(),
            "files": dict(self.files),
            **self.extra,
        }

    @property
    def accuracy(self) -> GateResult | None:
        """The gate's result when it measured task accuracy (a labelled split), else None."""
        return self.gate if self.gate is not None and self.gate.is_accuracy else None

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def num_classes(self) -> int:
        return len(self.labels) or self.model.num_classes


def check_format(data: Any, where: str) -> None:
    """Refuse a document that is not a bitdeploy manifest, or one of an unknown major version."""
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise BundleError(f"{where}: not a {FORMAT} manifest; rebuild the bundle")
    raw = data.get("format_version")
    version = parse_version(raw)
    if version is None or version[0] != FORMAT_MAJOR:
        raise BundleError(
            f"{where}: unknown bundle format version {raw!r} (this bitdeploy reads {FORMAT_MAJOR}.x); upgrade bitdeploy or rebuild the bundle"
        )
