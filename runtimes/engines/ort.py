"""ONNX Runtime backend (CPU by default; CUDA/TensorRT execution providers when asked for and present).

`InferenceSession.run` is documented as thread-safe, so one session serves every thread.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitdeploy.core.errors import BundleError, first_line, require
from bitdeploy.runtimes.engines.base import Backend

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def parse_device(device: str) -> tuple[str, dict[str, Any]]:
    """ "cpu" | "cuda" | "cuda:1" | "tensorrt:0" -> (provider name, provider options)."""
    kind, _, index = str(device).lower().partition(":")
    provider = PROVIDERS.get(kind)
    if provider is None:
        raise BundleError(f"unknown ONNX Runtime device {device!r}; choose one of: cpu, cuda[:N], tensorrt[:N]")
    if not index:
        return provider, {}
    if kind == "cpu" or not index.isdigit():
        raise BundleError(f"bad ONNX Runtime device {device!r}; use cpu, cuda:N or tensorrt:N")
    return provider, {"device_id": int(index)}


class OrtBackend(Backend):
    default_device = "cpu"

    def open(self) -> None:
        model_path, threads = self.model_path, self.threads
        ort = require("onnxruntime", "onnxruntime", "ONNX Runtime (onnxruntime)")

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # warnings about unused initializers etc. are noise for a user
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        provider, provider_opts = parse_device(str(self.device))
        if provider not in ort.get_available_providers():
            raise BundleError(f"ONNX Runtime here has no {provider}; use --device cpu or install onnxruntime-gpu")
        providers: list[Any] = [(provider, provider_opts)]
        if provider != PROVIDERS["cpu"]:
            providers.append(PROVIDERS["cpu"])  # nodes the GPU provider cannot run fall back to the CPU
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            first = first_line(exc)
            raise BundleError(
                f"{model_path}: ONNX Runtime cannot load the model ({first}); rebuild the bundle"
            ) from exc
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [self.session.get_outputs()[0].name]

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.session.run(self.output_names, {self.input_name: batch})[0]
        return out

    def close(self) -> None:
        self.__dict__.pop("session", None)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        session = self.__dict__.get("session")
        info["providers"] = session.get_providers() if session is not None else []
        info["precision_used"] = self.manifest.target.precision_used
        return info
