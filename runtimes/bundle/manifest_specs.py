"""The manifest's specs and checks: the input a model takes (`InputSpec`), how the build's gate compared it with the
FP32 reference (`GateResult`) and the golden set a bundle carries to check itself on a device (`SelfTestSpec`).

Parts of `bitdeploy.runtimes.bundle.manifest.Manifest`; import them from there. Stdlib only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bitdeploy.core.options import GateSpec
from bitdeploy.runtimes.bundle.manifest_parse import bad, dim, integer, num, numbers, obj, text

REFERENCE = "pytorch-fp32"  # what every gate and self-test compares with
BIT_MEAN = (0.5, 0.5, 0.5)  # BiT's normalisation: x/255 in [0, 1] -> [-1, 1]
BIT_STD = (0.5, 0.5, 0.5)


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
            raise bad("input.shape", "a list", shape)
        if resize is not None and (not isinstance(resize, (list, tuple)) or len(resize) != 2):
            raise bad("input.resize", "[height, width]", resize)
        dims = (
            None
            if shape is None
            else tuple(d if isinstance(d, int) and not isinstance(d, bool) else None for d in shape)
        )
        mean, std = data.get("mean") or BIT_MEAN, data.get("std") or BIT_STD
        return cls(
            name=text(data, "name", "input", "input") or "input",
            shape=dims,
            layout=text(data, "layout", "input", "NCHW") or "NCHW",
            dtype=text(data, "dtype", "input", "float32") or "float32",
            color=text(data, "color", "input", "RGB") or "RGB",
            resize=None if resize is None else (dim(resize[0], "input.resize"), dim(resize[1], "input.resize")),
            interpolation=text(data, "interpolation", "input", "bilinear") or "bilinear",
            scale=num(data, "scale", "input") or 1.0 / 255.0,
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
    max_accuracy_drop_pp: float | None = None  # None: only agreement gates
    min_agreement_pct: float | None = None  # --min-agreement, when given
    dataset: str | None = None
    split: str | None = None
    # validation
    inputs: str | None = None
    tolerance: float | None = None
    note: str | None = None
    # accuracy: each figure's interval at `confidence` (converters.intervals), None in manifests from before them
    top1_ci: tuple[float, float] | None = None  # Wilson
    reference_top1_ci: tuple[float, float] | None = None  # Wilson
    top1_drop_ci_pp: tuple[float, float] | None = None  # Newcombe's paired (method 10), from `discordant`
    agreement_ci: tuple[float, float] | None = None  # Wilson
    discordant: tuple[int, int] | None = None  # (FP32 right and the artifact wrong, FP32 wrong and the artifact right)
    confidence: float | None = None  # the intervals' level
    gate_confidence: float | None = None  # --gate-confidence: the gate judged the bounds at this level

    INTERVALS = ("top1_ci", "reference_top1_ci", "top1_drop_ci_pp", "agreement_ci")

    @property
    def is_accuracy(self) -> bool:
        return self.kind == "accuracy"

    def spec(self) -> GateSpec:
        """The gate this result was judged by."""
        return GateSpec(self.max_accuracy_drop_pp, self.min_agreement_pct, self.gate_confidence)

    @property
    def noise(self) -> str | None:
        """ "within noise: ..." when the gate's threshold lies inside its figure's interval, else None."""
        return self.spec().noise(self.top1_drop_ci_pp, self.agreement_ci) if self.is_accuracy else None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], kind: str) -> GateResult:
        def figure(key: str) -> float | None:
            return num(data, key, kind)

        def words(key: str) -> str | None:
            return text(data, key, kind)

        return cls(
            kind=kind,
            passed=bool(data.get("passed", False)),
            samples=integer(data, "samples", kind) or 0,
            agreement=figure("agreement"),
            max_abs_logit_diff=figure("max_abs_logit_diff"),
            mean_abs_logit_diff=figure("mean_abs_logit_diff"),
            reference=words("reference") or REFERENCE,
            evaluated_with=words("evaluated_with"),
            top1=figure("top1"),
            reference_top1=figure("reference_top1"),
            top1_drop_pp=figure("top1_drop_pp"),
            max_accuracy_drop_pp=figure("max_accuracy_drop_pp"),
            min_agreement_pct=figure("min_agreement_pct"),
            dataset=words("dataset"),
            split=words("split"),
            inputs=words("inputs"),
            tolerance=figure("tolerance"),
            note=words("note"),
            **{key: _pair(data, key, kind) for key in cls.INTERVALS},
            discordant=_counts(data, "discordant", kind),
            confidence=figure("confidence"),
            gate_confidence=figure("gate_confidence"),
        )

    def to_dict(self) -> dict[str, Any]:
        common = ["samples", "agreement", "max_abs_logit_diff", "mean_abs_logit_diff", "passed", "reference"]
        if self.is_accuracy:
            names = ["top1", "reference_top1", *common, "top1_drop_pp", "max_accuracy_drop_pp", "dataset", "split"]
        else:
            names = ["inputs", *common, "tolerance", "note"]
        out = {k: getattr(self, k) for k in names}
        if self.min_agreement_pct is not None:
            out["min_agreement_pct"] = self.min_agreement_pct
        if self.evaluated_with is not None:
            out["evaluated_with"] = self.evaluated_with
        for key in (*self.INTERVALS, "discordant", "confidence", "gate_confidence"):
            value = getattr(self, key)
            if value is not None:  # absent from manifests written before them, so a rewrite keeps their bytes
                out[key] = list(value) if isinstance(value, tuple) else value
        return out


def _pair(data: Mapping[str, Any], key: str, where: str) -> tuple[float, float] | None:
    """An interval: [low, high]."""
    value = numbers(data, key, where)
    if value is None:
        return None
    if len(value) != 2 or value[0] > value[1]:
        raise bad(f"{where}.{key}", "[low, high]", list(value))
    return float(value[0]), float(value[1])


def _counts(data: Mapping[str, Any], key: str, where: str) -> tuple[int, int] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2 or not all(type(v) is int and v >= 0 for v in value):
        raise bad(f"{where}.{key}", "[b, c], two counts", value)
    return value[0], value[1]


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
        criteria = obj(data, "criteria", "self_test") or {}
        measured = obj(data, "measured", "self_test") or {}
        return cls(
            images=integer(data, "images", "self_test") or 0,
            min_agreement=num(criteria, "min_agreement", "self_test.criteria") or 0.0,
            max_rel_error=num(criteria, "max_rel_error", "self_test.criteria") or 0.0,
            measured_agreement=num(measured, "agreement", "self_test.measured"),
            measured_rel_error=num(measured, "max_rel_error", "self_test.measured"),
            measured_top1=num(measured, "top1", "self_test.measured"),
            file=text(data, "file", "self_test", "golden.npz") or "golden.npz",
            stored_as=text(data, "stored_as", "self_test", "float32 inputs") or "float32 inputs",
            labelled=bool(data.get("labelled", False)),
            reference=text(data, "reference", "self_test", REFERENCE) or REFERENCE,
            rule=text(data, "rule", "self_test", "") or "",
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
