"""The manifest's records of what was built and how: the model and its weights (`ModelInfo`, `WeightsInfo`,
`FineTune`), the target (`TargetInfo`, `Quantization`), the output (`OutputSpec`), and the build's own facts
(`ExportInfo`, `CalibrationInfo`, `BuildLatency`, `Provenance`).

Parts of `bitdeploy.runtimes.bundle.manifest.Manifest`; import them from there. Each `to_dict` writes its keys in the
order bitdeploy has always written them, and numbers as they were given (an integer stays one), so the JSON of a
bundle is the same bytes whether it was written from the build's values or from a manifest read back. Stdlib only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bitdeploy.runtimes.bundle.manifest_parse import FlatRecord, bad, drop_none, integer, num, number, obj, rest, text

ENGINE_PENDING = "pending"  # target.details["engine"]["status"] of a ready bundle (then "built")


@dataclass(frozen=True)
class FineTune:
    """`model.weights.fine_tuned`: the fine-tune the build ran (its stage-cache key) and what its summary said."""

    dataset: str | None = None
    cache_key: str | None = None
    val_top1: float | None = None
    steps: int | None = None
    images_per_second: float | None = None
    train_seconds: float | None = None

    SUMMARY = ("val_top1", "steps", "images_per_second", "train_seconds")  # the trainer writes all four or none

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FineTune:
        where = "model.weights.fine_tuned"
        return cls(
            dataset=text(data, "dataset", where),
            cache_key=text(data, "cache_key", where),
            val_top1=number(data, "val_top1", where),
            steps=integer(data, "steps", where),
            images_per_second=number(data, "images_per_second", where),
            train_seconds=number(data, "train_seconds", where),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dataset": self.dataset, "cache_key": self.cache_key}
        if any(getattr(self, k) is not None for k in self.SUMMARY):
            out.update({k: getattr(self, k) for k in self.SUMMARY})
        return out


@dataclass(frozen=True)
class WeightsInfo:
    """`model.weights`: where the weights came from (`kind` "none", "npz" or "checkpoint"), and the fine-tune."""

    kind: str | None = None
    source: str | None = None  # a file or URL; None for random weights
    sha256: str | None = None
    fine_tuned: FineTune | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WeightsInfo:
        fine = obj(data, "fine_tuned", "model.weights")
        return cls(
            kind=text(data, "kind", "model.weights"),
            source=text(data, "source", "model.weights"),
            sha256=text(data, "sha256", "model.weights"),
            fine_tuned=FineTune.from_dict(fine) if fine is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "source": self.source, "sha256": self.sha256}
        if self.fine_tuned is not None:
            out["fine_tuned"] = self.fine_tuned.to_dict()
        return out


@dataclass(frozen=True)
class ModelInfo:
    """The manifest's `model`: which network, how many classes, which weights."""

    name: str = ""
    num_classes: int = 0
    params: int | None = None
    resolution: int | None = None
    weights: WeightsInfo | None = None  # None: written as {} (a manifest that names no weights)
    ws_eps: float | None = None
    state_sha256: str | None = None

    KNOWN = ("name", "num_classes", "params", "resolution", "weights", "ws_eps", "state_sha256")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelInfo:
        weights = obj(data, "weights", "model")
        return cls(
            name=text(data, "name", "model", "") or "",
            num_classes=integer(data, "num_classes", "model") or 0,
            params=integer(data, "params", "model"),
            resolution=integer(data, "resolution", "model"),
            weights=WeightsInfo.from_dict(weights) if weights else None,
            ws_eps=num(data, "ws_eps", "model"),
            state_sha256=text(data, "state_sha256", "model"),
        )

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.KNOWN}
        out["weights"] = self.weights.to_dict() if self.weights is not None else {}
        return drop_none(out)


@dataclass(frozen=True)
class Quantization:
    """What an INT8 conversion did: the range-estimation method, the calibration images, and tool-specific facts."""

    method: str | None = None
    samples: int | None = None
    # Free-form by nature: each quantizer (ONNX Runtime, NNCF, TensorRT, LiteRT) records its own facts (tool,
    # scheme, op types, float scope, ...); the runtime reads none of them.
    details: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Quantization:
        method = data.get("method") or data.get("calib_method")  # v1 OpenVINO bundles wrote calib_method
        samples = data.get("samples", data.get("calibration_samples"))  # v1 LiteRT bundles: calibration_samples
        if method is not None and not isinstance(method, str):
            raise bad("target.quantization.method", "a string", method)
        if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int)):
            raise bad("target.quantization.samples", "an integer", samples)
        details = rest(data, ("method", "calib_method", "samples", "calibration_samples"))
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
    # Free-form by nature: each engine's own facts (TensorRT version, GPU and profile; OpenVINO's hint and
    # inference precision), read only by that engine's backend through `get`.
    details: Mapping[str, Any] = field(default_factory=dict)

    KNOWN = ("backend", "precision", "precision_used", "device", "quantization")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetInfo:
        quant = obj(data, "quantization", "target")
        return cls(
            backend=text(data, "backend", "target", "") or "",
            precision=text(data, "precision", "target", "fp32") or "fp32",
            precision_used=text(data, "precision_used", "target"),
            device=text(data, "device", "target"),
            quantization=Quantization.from_dict(quant) if quant is not None else None,
            details=rest(data, cls.KNOWN),
        )

    def get(self, key: str, default: Any = None) -> Any:
        """A backend-specific detail (e.g. "tensorrt_version", "inference_precision")."""
        return self.details.get(key, default)

    @property
    def engine_pending(self) -> bool:
        """A ready bundle: gated where it was built, its engine still to be built on the device (`bitdeploy
        engine`); `details["engine"]` says so and which checks ran where."""
        engine = self.details.get("engine")
        return isinstance(engine, Mapping) and engine.get("status") == ENGINE_PENDING

    def to_dict(self) -> dict[str, Any]:
        out = drop_none(
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
class OutputSpec:
    """The manifest's `output`: the tensor the model returns (logits, one per class)."""

    name: str = "logits"
    kind: str = "logits"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutputSpec:
        return cls(
            name=text(data, "name", "output", "logits") or "logits",
            kind=text(data, "kind", "output", "logits") or "logits",
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind}


@dataclass(frozen=True)
class ExportInfo(FlatRecord):
    """The manifest's `export`: the ONNX export every target was converted from, and how close it is to PyTorch."""

    opset: int | None = None
    max_abs_diff: float | None = None  # max |ONNX - PyTorch| logits on the export's check inputs
    nodes: int | None = None
    simplifier: str | None = None  # e.g. "onnxslim 0.1.98"; None: not simplified
    exporter: str | None = None
    weight_standardization: str | None = None  # "folded" into the convolution weights
    sha256: str | None = None  # of the exported model.onnx

    SECTION = "export"


@dataclass(frozen=True)
class CalibrationInfo(FlatRecord):
    """The manifest's `calibration`: the seeded draw of training images an INT8 conversion calibrated on."""

    samples: int | None = None
    method: str | None = None  # the range estimation, as the quantizer reports it (e.g. "minmax")
    seed: int | None = None
    sha256: str | None = None  # of the preprocessed samples
    source: str | None = None  # e.g. "digits:train"
    split: str | None = None

    SECTION = "calibration"


@dataclass(frozen=True)
class BuildLatency(FlatRecord):
    """The manifest's `build_latency`: the build's quick timing of the sealed bundle on the build host (not
    publishable: `bitdeploy bench` measures that), and its serving memory."""

    batch1_p50_ms: float | None = None
    batch1_p90_ms: float | None = None
    queries: int | None = None
    images_per_s: float | None = None  # at `throughput_batch`, the best batch of the sweep
    throughput_batch: int | None = None
    batch1_p50_spread_ms: tuple[float, ...] | None = None  # (min, max) of the timing rounds' p50
    serving_peak_rss_mb: float | None = None  # a fresh process serving batch 1 (`benchmarks.memory`)
    threads: int | None = None
    note: str | None = None

    SECTION = "build_latency"


@dataclass(frozen=True)
class Provenance:
    """Who made the bundle, when, with which library versions."""

    bitdeploy: str = ""
    created: str = ""
    versions: Mapping[str, str] = field(default_factory=dict)  # distribution -> version
    details: Mapping[str, Any] = field(default_factory=dict)  # fields of `provenance` this bitdeploy does not know

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Provenance:
        versions = obj(data, "versions", "provenance") or {}
        return cls(
            bitdeploy=text(data, "bitdeploy", "provenance", "") or "",
            created=text(data, "created", "provenance", "") or "",
            versions={str(k): str(v) for k, v in versions.items()},
            details=rest(data, ("bitdeploy", "created", "versions")),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"bitdeploy": self.bitdeploy, "created": self.created, "versions": dict(self.versions), **self.details}
