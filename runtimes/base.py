"""The backend contract and its registry.

A backend runs one model file: `infer(batch)` takes preprocessed NCHW float32 and returns float32 logits
that the caller owns. Backends import their SDK lazily, inside `__init__`, so `bitdeploy.runtimes` imports
with only numpy and Pillow installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.errors import BitdeployError

# backend name -> ("module:Class", pip extra, import name checked by available())
REGISTRY: dict[str, tuple[str, str, str]] = {
    "onnxruntime": ("bitdeploy.runtimes.ort:OrtBackend", "onnxruntime", "onnxruntime"),
    "openvino": ("bitdeploy.runtimes.ov:OpenVinoBackend", "openvino", "openvino"),
    "tensorrt": ("bitdeploy.runtimes.trt:TensorRTBackend", "tensorrt", "tensorrt"),
    "litert": ("bitdeploy.runtimes.litert:LiteRtBackend", "litert", "ai_edge_litert"),
}


class Backend(ABC):
    """One loaded model. Subclasses build their session in __init__ and free it in close()."""

    name: str = ""

    def __init__(self, model_path: Path, manifest: dict[str, Any], device: str | None = None, threads: int | None = None) -> None:
        self.model_path = Path(model_path)
        self.manifest = manifest
        self.device = device
        self.threads = threads

    @abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """NCHW float32 -> (N, classes) float32 logits. Must be safe to call from several threads."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the session; the backend is unusable afterwards."""

    def describe(self) -> dict[str, Any]:
        """What actually runs (device, precision, threads), for benchmarks and manifests."""
        return {"backend": self.name, "device": self.device, "threads": self.threads}

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def backend_available(name: str) -> bool:
    return name in REGISTRY and importlib.util.find_spec(REGISTRY[name][2]) is not None


def backend_class(name: str) -> type[Backend]:
    """Import a backend class by registry name; a missing SDK becomes a one-line MissingDependencyError."""
    from bitdeploy.errors import MissingDependencyError

    if name not in REGISTRY:
        raise BitdeployError(f"unknown backend {name!r}; choose one of: {', '.join(REGISTRY)}")
    target, extra, module = REGISTRY[name]
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"the {name} runtime ({module})", extra)
    mod_name, cls_name = target.split(":")
    cls: type[Backend] = getattr(importlib.import_module(mod_name), cls_name)
    return cls


def open_backend(name: str, model_path: Path, manifest: dict[str, Any], device: str | None = None, threads: int | None = None) -> Backend:
    return backend_class(name)(model_path, manifest, device=device, threads=threads)
