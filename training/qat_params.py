"""The quantization parameters of a quantization-aware fine-tune (`bitdeploy.training.qat` writes them as JSON beside
its checkpoint, `PARAMS_FILE`; every converter reads them through `bitdeploy.converters.qat_qdq`). Torch-free.

Each quantized convolution, by layer name (`bitdeploy.converters.layers`), has a UINT8 per-tensor quantizer on its
input and on its output and per-output-channel symmetric INT8 weight scales on the 7-bit grid (`SCHEME`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.core.errors import ConversionError

PARAMS_FILE = "qat_params.json"
WEIGHT_QMAX = 63  # 7-bit weights
ACTIVATION = "uint8"
SCHEME = "weights int8 7-bit symmetric per-channel; activations uint8 per-tensor asymmetric on conv inputs and outputs"


@dataclass(frozen=True)
class TensorQuant:
    """One per-tensor affine quantizer: q = clip(round(x / scale) + zero_point, 0, 255) (uint8)."""

    scale: float
    zero_point: int

    def __post_init__(self) -> None:
        if not (np.isfinite(self.scale) and self.scale > 0) or not 0 <= self.zero_point <= 255:
            raise ConversionError(f"invalid quantizer (scale {self.scale}, zero point {self.zero_point})")

    def fake(self, x: np.ndarray) -> np.ndarray:
        q = np.clip(np.rint(x / np.float32(self.scale)) + self.zero_point, 0, 255)
        return ((q - self.zero_point) * np.float32(self.scale)).astype(np.float32)


@dataclass(frozen=True)
class ConvQuant:
    """A quantized convolution: its input, its weights' per-output-channel scales, and its output."""

    input: TensorQuant
    weight_scales: tuple[float, ...]
    output: TensorQuant | None = None

    def __post_init__(self) -> None:
        scales = np.asarray(self.weight_scales, dtype=np.float64)
        bad = scales[~(np.isfinite(scales) & (scales > 0))]
        if not scales.size or bad.size:
            raise ConversionError(f"invalid weight scales ({bad.size} of {scales.size} not finite and positive)")


@dataclass(frozen=True)
class QatParams:
    """Every quantized convolution's parameters, by layer name (`bitdeploy.converters.layers`), and the fine-tune's
    record for the manifest (steps, loss, teacher, split...)."""

    convs: Mapping[str, ConvQuant]
    weight_qmax: int = WEIGHT_QMAX
    scheme: str = SCHEME
    record: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "weight_qmax": self.weight_qmax,
            "record": dict(self.record),
            "convs": {name: asdict(q) for name, q in self.convs.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QatParams:
        def tensor(d: Mapping[str, Any] | None) -> TensorQuant | None:
            return None if d is None else TensorQuant(float(d["scale"]), int(d["zero_point"]))

        convs = {}
        for name, q in dict(data["convs"]).items():
            inp = tensor(q["input"])
            assert inp is not None
            convs[name] = ConvQuant(inp, tuple(float(s) for s in q["weight_scales"]), tensor(q.get("output")))
        return cls(
            convs, int(data.get("weight_qmax", WEIGHT_QMAX)), str(data.get("scheme", SCHEME)), data.get("record", {})
        )

    def save(self, path: Path) -> Path:
        from bitdeploy.core.fsutil import atomic_write

        atomic_write(Path(path), json.dumps(self.to_dict(), indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> QatParams:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError, ConversionError) as exc:
            raise ConversionError(
                f"{path} is not a bitdeploy QAT parameter file ({exc}); run the fine-tune again (`bitdeploy train --qat`)"
            ) from exc
