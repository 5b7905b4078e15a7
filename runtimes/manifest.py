"""The bundle manifest as a typed object: what `manifest.json` says, read once and checked.

`format_version` is `MAJOR` (an integer) or "MAJOR.MINOR": a reader refuses a major it does not know and accepts
any minor of its own major, since a minor only adds optional fields. Fields bitdeploy does not know stay in `raw`,
so `inspect --json` and a repack keep them. A Manifest is also a read-only mapping over that JSON, so code written
against `predictor.manifest["labels"]` keeps working; bitdeploy itself reads the typed fields. Stdlib only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from bitdeploy.errors import BundleError

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


@dataclass(frozen=True)
class TargetInfo:
    """The manifest's `target`: which backend runs the bundle, in what precision, on what device."""

    backend: str = ""
    precision: str = "fp32"
    precision_used: str | None = None  # what actually computes, e.g. "int8 Conv (U8S8-7BIT) + fp32"
    device: str | None = None
    inference_precision: str | None = None  # OpenVINO: the float precision pinned at compile time
    performance_hint: str | None = None  # OpenVINO
    details: Mapping[str, Any] = field(default_factory=dict)  # target-specific: quantization, engine and SDK versions

    KNOWN = ("backend", "precision", "precision_used", "device", "inference_precision", "performance_hint")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetInfo:
        known = {k: data[k] for k in cls.KNOWN if data.get(k) is not None}
        for k, v in known.items():
            if not isinstance(v, str):
                raise BundleError(f"manifest target.{k} must be a string (got {v!r}); rebuild the bundle")
        return cls(**known, details={k: v for k, v in data.items() if k not in cls.KNOWN})

    def get(self, key: str, default: Any = None) -> Any:
        """A target-specific detail (e.g. "tensorrt_version", "quantization")."""
        return self.details.get(key, default)

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.KNOWN if getattr(self, k) is not None}
        return {**out, **self.details}


def _mapping(data: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise BundleError(f"manifest field {key!r} must be an object (got {type(value).__name__}); rebuild the bundle")
    return dict(value)


@dataclass(frozen=True, eq=False)
class Manifest(Mapping[str, Any]):
    """A bundle's manifest. Build one with `Manifest.from_dict`; `raw` is the JSON it came from."""

    version: tuple[int, int]
    valid: bool
    invalid_reason: str | None
    model_file: str
    target: TargetInfo
    input: dict[str, Any]  # the preprocessing spec (`bitdeploy.runtimes.preprocess.input_spec`)
    labels: list[str]
    model: dict[str, Any]
    files: dict[str, str]  # relative name -> sha256
    output: dict[str, Any]
    notes: list[str]
    validated_on: dict[str, Any] | None  # the device fingerprint the build validated on
    self_test: dict[str, Any] | None  # golden-set criteria (`bitdeploy.runtimes.selftest`)
    accuracy: dict[str, Any] | None
    validation: dict[str, Any] | None
    calibration: dict[str, Any] | None
    export: dict[str, Any] | None
    build_latency: dict[str, Any] | None
    provenance: dict[str, Any] | None
    raw: Mapping[str, Any]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Type-check the fields bitdeploy reads; a one-line BundleError names the first bad one. Format and
        version are checked by `check_format` (a partial manifest, e.g. in a test, needs neither)."""
        if not isinstance(data, Mapping):
            raise BundleError("manifest must be a JSON object; rebuild the bundle")
        version = parse_version(data.get("format_version", FORMAT_VERSION)) or (FORMAT_MAJOR, 0)
        files = _mapping(data, "files") or {}
        labels = data.get("labels") or []
        notes = data.get("notes") or []
        if not isinstance(labels, list) or not isinstance(notes, list):
            raise BundleError("manifest labels and notes must be lists; rebuild the bundle")
        model_file = data.get("model_file")
        return cls(
            version=version,
            valid=bool(data.get("valid", False)),
            invalid_reason=str(data["invalid_reason"]) if data.get("invalid_reason") else None,
            model_file=model_file if isinstance(model_file, str) else "",
            target=TargetInfo.from_dict(_mapping(data, "target") or {}),
            input=_mapping(data, "input") or {},
            labels=[str(x) for x in labels],
            model=_mapping(data, "model") or {},
            files={str(k): str(v) for k, v in files.items()},
            output=_mapping(data, "output") or {},
            notes=[str(x) for x in notes],
            validated_on=_mapping(data, "validated_on"),
            self_test=_mapping(data, "self_test"),
            accuracy=_mapping(data, "accuracy"),
            validation=_mapping(data, "validation"),
            calibration=_mapping(data, "calibration"),
            export=_mapping(data, "export"),
            build_latency=_mapping(data, "build_latency"),
            provenance=_mapping(data, "provenance"),
            raw=dict(data),
        )

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON-able data (what was read, unknown fields included)."""
        return dict(self.raw)

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    @property
    def name(self) -> str:
        return str(self.model.get("name") or "")

    @property
    def num_classes(self) -> int:
        return len(self.labels) or int(self.model.get("num_classes") or 0)


def as_manifest(manifest: Manifest | Mapping[str, Any]) -> Manifest:
    """A Manifest as is; a plain mapping (a partial manifest in a test or a script) read into one."""
    return manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest)


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
