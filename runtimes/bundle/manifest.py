"""The bundle manifest as one typed record: what `manifest.json` says, read once and checked, written by one function.

Each object of the JSON is a frozen dataclass with `from_dict` (read and type-check; a one-line BundleError names
the first bad field) and `to_dict` (the JSON it writes): `Manifest` here, its parts in `manifest_specs` (input,
gate, self-test) and `manifest_records` (model, weights, target, output, export, calibration, build timing,
provenance); import any of them from this module. The build assembles one `Manifest` and
`bitdeploy.runtimes.bundle.write_manifest` seals it; every reader uses these types.

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
from bitdeploy.runtimes.bundle.manifest_mix import Int8Mix
from bitdeploy.runtimes.bundle.manifest_parse import bad, obj, rest
from bitdeploy.runtimes.bundle.manifest_records import (
    BuildLatency,
    CalibrationInfo,
    ExportInfo,
    FineTune,
    ModelInfo,
    OutputSpec,
    Provenance,
    Quantization,
    TargetInfo,
    WeightsInfo,
)
from bitdeploy.runtimes.bundle.manifest_specs import BIT_MEAN, BIT_STD, REFERENCE, GateResult, InputSpec, SelfTestSpec

__all__ = [
    "BIT_MEAN",
    "BIT_STD",
    "FORMAT",
    "FORMAT_MAJOR",
    "FORMAT_VERSION",
    "REFERENCE",
    "BuildLatency",
    "CalibrationInfo",
    "ExportInfo",
    "FineTune",
    "GateResult",
    "InputSpec",
    "Int8Mix",
    "Manifest",
    "ModelInfo",
    "OutputSpec",
    "Provenance",
    "Quantization",
    "SelfTestSpec",
    "TargetInfo",
    "WeightsInfo",
    "check_format",
    "parse_version",
]

FORMAT = "bitdeploy-bundle"
FORMAT_MAJOR = 1  # what this bitdeploy reads
FORMAT_VERSION = 1  # what it writes


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


def _verified_on(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise bad("verified_on", "a list of objects", value)
    return [dict(v) for v in value]


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
    output: OutputSpec = field(default_factory=OutputSpec)
    notes: list[str] = field(default_factory=list)
    gate: GateResult | None = None  # written as `accuracy` or `validation`, after its kind
    export: ExportInfo | None = None
    calibration: CalibrationInfo | None = None  # INT8 only
    build_latency: BuildLatency | None = None  # added after the seal (`bundle.amend_manifest`)
    int8_mix: Int8Mix | None = None  # INT8 bundles the search made (`manifest_mix`)
    # The next two are device reports that other modules write and read by key, stored as they are: the build
    # host's fingerprint (`runtimes.bundle.fingerprint.host_fingerprint`, read by `device_class`), and one report per
    # emulated CPU of `build --verify-on` (added after the seal; its `emulated` part is the emulation guest's).
    validated_on: dict[str, Any] | None = None
    verified_on: list[dict[str, Any]] | None = None
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
        "int8_mix",
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
        accuracy, validation = obj(data, "accuracy"), obj(data, "validation")
        gate = (
            GateResult.from_dict(accuracy, "accuracy")
            if accuracy is not None
            else GateResult.from_dict(validation, "validation")
            if validation is not None
            else None
        )
        self_test, provenance = obj(data, "self_test"), obj(data, "provenance")
        export, calibration, latency = obj(data, "export"), obj(data, "calibration"), obj(data, "build_latency")
        validated_on = obj(data, "validated_on")
        return cls(
            valid=bool(data.get("valid", False)),
            invalid_reason=str(data["invalid_reason"]) if data.get("invalid_reason") else None,
            model_file=model_file if isinstance(model_file, str) else "",
            target=TargetInfo.from_dict(obj(data, "target") or {}),
            input=InputSpec.from_dict(obj(data, "input") or {}),
            labels=[str(x) for x in labels],
            model=ModelInfo.from_dict(obj(data, "model") or {}),
            files={str(k): str(v) for k, v in (obj(data, "files") or {}).items()},
            output=OutputSpec.from_dict(obj(data, "output") or {}),
            notes=[str(x) for x in notes],
            gate=gate,
            export=ExportInfo.from_dict(export) if export is not None else None,
            calibration=CalibrationInfo.from_dict(calibration) if calibration is not None else None,
            build_latency=BuildLatency.from_dict(latency) if latency is not None else None,
            int8_mix=Int8Mix.from_dict(mix) if (mix := obj(data, "int8_mix")) is not None else None,
            validated_on=dict(validated_on) if validated_on is not None else None,
            verified_on=_verified_on(data.get("verified_on")),
            self_test=SelfTestSpec.from_dict(self_test) if self_test is not None else None,
            provenance=Provenance.from_dict(provenance) if provenance is not None else None,
            version=version,
            extra=rest(data, cls.KNOWN),
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
            "output": self.output.to_dict(),
            "labels": list(self.labels),
            "export": None if self.export is None else self.export.to_dict(),
            "accuracy": self.gate.to_dict() if self.gate is not None and self.gate.is_accuracy else None,
            "validation": self.gate.to_dict() if self.gate is not None and not self.gate.is_accuracy else None,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "notes": list(self.notes),
            "provenance": None if self.provenance is None else self.provenance.to_dict(),
            "build_latency": None if self.build_latency is None else self.build_latency.to_dict(),
            **({} if self.int8_mix is None else {"int8_mix": self.int8_mix.to_dict()}),
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
