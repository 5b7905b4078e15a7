"""The toy target's runtime backend: runs `model.toy` (an ONNX graph) with ONNX Runtime on the CPU."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from bitdeploy.runtimes.base import Backend
from bitdeploy.runtimes.manifest import Manifest


class ToyBackend(Backend):
    name = "toy-engine"

    def __init__(
        self, model_path: Path, manifest: Manifest, device: str | None = None, threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        super().__init__(model_path, manifest, device or "cpu", threads)
        self.session = ort.InferenceSession(Path(model_path).read_bytes(), providers=["CPUExecutionProvider"])
        self._lock = threading.Lock()

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            out: np.ndarray = self.session.run(None, {self.session.get_inputs()[0].name: batch})[0]
        return out.copy()

    def close(self) -> None:
        self.__dict__.pop("session", None)
