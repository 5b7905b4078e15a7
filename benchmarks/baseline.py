"""The PyTorch eager FP32 baseline: the model as Google's and timm's code run it, weight standardisation
computed on every call (StdConv2d, not folded). It is the denominator of the report's speed-up column.

torch is optional: this module imports it only when a baseline is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.errors import require


class PytorchBaseline:
    """`infer(batch)` for a ResNetV2 in eval mode under `torch.inference_mode()`, on the CPU."""

    name = "pytorch"

    def __init__(self, model_name: str, num_classes: int | None, weights: str = "none", threads: int | None = None, seed: int = 0) -> None:
        torch = require("torch", "train", "PyTorch (torch), needed for the PyTorch baseline")
        from bitdeploy.training.weights import load_model

        self._torch = torch
        if threads:
            torch.set_num_threads(int(threads))
        torch.manual_seed(seed)
        loaded = load_model(model_name, weights=weights, num_classes=num_classes)
        self.model = loaded.model.eval()
        self.weights_info: dict[str, Any] = dict(loaded.weights_info)
        self.labels = loaded.labels
        self.threads = torch.get_num_threads()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            return self.model(torch.from_numpy(np.ascontiguousarray(batch))).numpy()

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "pytorch",
            "device": "cpu",
            "threads": self.threads,
            "precision_used": "f32",
            "weight_standardization": "computed every call",
            "weights": self.weights_info.get("kind"),
        }

    def close(self) -> None:
        self.__dict__.pop("model", None)


def baseline_weights(choice: str, manifest: dict[str, Any]) -> str:
    """Resolve --pytorch-baseline's value: "auto" uses the bundle's own weights when they are a local file
    (an .npz or a training checkpoint), else random weights ("none": latency only, accuracy is meaningless)."""
    if choice != "auto":
        return choice
    weights = (manifest.get("model") or {}).get("weights") or {}
    source = weights.get("source")
    if weights.get("kind") in ("npz", "checkpoint") and source and "://" not in str(source) and Path(os.fspath(source)).exists():
        return str(source)
    return "none"
