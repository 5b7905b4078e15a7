"""ONNX Runtime backend (CPU by default; CUDA/TensorRT execution providers when asked for and present)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.errors import BundleError
from bitdeploy.runtimes.base import Backend

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, model_path: Path, manifest: dict[str, Any], device: str | None = None, threads: int | None = None) -> None:
        super().__init__(model_path, manifest, device or "cpu", threads)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        provider = PROVIDERS.get(str(self.device).lower())
        if provider is None:
            raise BundleError(f"unknown ONNX Runtime device {self.device!r}; choose one of: {', '.join(PROVIDERS)}")
        if provider not in ort.get_available_providers():
            raise BundleError(f"ONNX Runtime here has no {provider}; use --device cpu or install onnxruntime-gpu")
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=[provider])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BundleError(f"{model_path}: ONNX Runtime cannot load the model ({str(exc).splitlines()[0]}); rebuild the bundle") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def close(self) -> None:
        self.__dict__.pop("session", None)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["providers"] = self.session.get_providers() if "session" in self.__dict__ else []
        return info
