"""The toy target's runtime backend: runs `model.toy` (an ONNX graph) with ONNX Runtime on the CPU."""

from __future__ import annotations

import threading

import numpy as np

from bitdeploy.runtimes.engines.base import Backend


class ToyBackend(Backend):
    name = "toy-engine"

    default_device = "cpu"

    def open(self) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(self.model_path.read_bytes(), providers=["CPUExecutionProvider"])
        self._lock = threading.Lock()

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            out: np.ndarray = self.session.run(None, {self.session.get_inputs()[0].name: batch})[0]
        return out.copy()

    def close(self) -> None:
        self.__dict__.pop("session", None)
