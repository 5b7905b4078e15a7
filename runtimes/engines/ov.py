"""OpenVINO backend: one compiled model, a pool of infer requests, precision pinned from the manifest.

An infer request is not thread-safe, so each call borrows one from a pool and returns it; threads beyond the
pool size wait. The pool holds the device's optimal number of requests (1 per stream).

The CPU plugin runs an "FP32" IR in bf16 on CPUs with bf16 units unless INFERENCE_PRECISION_HINT is f32, so the
hint is set from the precision the build validated (`target.inference_precision`; older bundles: the float part
of `target.precision_used`), never left to the device default.
"""

from __future__ import annotations

import queue
from typing import Any

import numpy as np

from bitdeploy.core.errors import BundleError, first_line, require
from bitdeploy.runtimes.bundle.manifest import TargetInfo
from bitdeploy.runtimes.engines.base import Backend

HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
_FLOAT_TYPES = {
    "f32": "f32",
    "fp32": "f32",
    "float32": "f32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "f16": "f16",
    "fp16": "f16",
    "float16": "f16",
}


def precision_hint(target: TargetInfo) -> str | None:
    """The float precision to pin: inference_precision, else the float part of precision_used ("int8+f32" -> "f32"),
    else f32 for fp32 bundles."""
    pinned = _FLOAT_TYPES.get(str(target.get("inference_precision") or "").lower())
    if pinned:
        return pinned
    used = str(target.precision_used or "").lower().replace(" ", "")
    for part in used.replace("/", "+").split("+"):
        if part in _FLOAT_TYPES:
            return _FLOAT_TYPES[part]
    return "f32" if target.precision.lower() == "fp32" else None


class OpenVinoBackend(Backend):
    device: str

    def pick_device(self, device: str | None) -> str:
        return (device or "CPU").upper()

    def open(self, hint: str | None = None, num_requests: int | None = None) -> None:
        model_path, threads, target = self.model_path, self.threads, self.manifest.target
        ov = require("openvino", "openvino", "OpenVINO (openvino)")
        self.hint = (hint or target.get("performance_hint") or "LATENCY").upper()
        if self.hint not in HINTS:
            raise BundleError(f"unknown OpenVINO performance hint {self.hint!r}; choose one of: {', '.join(HINTS)}")
        core = ov.Core()
        base = self.device.split(":")[0].split(".")[0]
        if (
            base not in ("AUTO", "MULTI", "HETERO", "BATCH")
            and self.device not in core.available_devices
            and base not in core.available_devices
        ):
            raise BundleError(
                f"OpenVINO device {self.device!r} is not available here (found: {', '.join(core.available_devices)}); pass --device CPU"
            )
        config: dict[str, Any] = {"PERFORMANCE_HINT": self.hint}
        self.precision = precision_hint(target)
        if self.precision:
            config["INFERENCE_PRECISION_HINT"] = self.precision
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(str(model_path), self.device, config)
        except Exception as exc:  # openvino raises RuntimeError with multi-line C++ context
            first = first_line(exc)
            raise BundleError(
                f"{model_path}: OpenVINO cannot compile the model on {self.device} ({first}); rebuild the bundle"
            ) from exc
        optimal = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.pool_size = max(1, num_requests or optimal)
        self._pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(self.pool_size):
            self._pool.put(self.compiled.create_infer_request())

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        request = self._pool.get()
        try:
            # share_outputs: the result views the request's own buffer, copied once here before another thread
            # reuses the request (without it OpenVINO copies every output into a dict first).
            results = request.infer({0: batch}, share_inputs=True, share_outputs=True)
            out: np.ndarray = np.array(results[0], copy=True)
        finally:
            self._pool.put(request)
        return out

    def close(self) -> None:
        self.__dict__.pop("_pool", None)
        self.__dict__.pop("compiled", None)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        compiled = self.__dict__.get("compiled")
        if compiled is not None:
            on_cpu = self.device.startswith("CPU")
            used = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() if on_cpu else self.precision
            info.update(precision_used=used, performance_hint=self.hint, infer_requests=self.pool_size)
            info["execution_devices"] = list(compiled.get_property("EXECUTION_DEVICES"))
            if on_cpu:
                info["threads"] = int(compiled.get_property("INFERENCE_NUM_THREADS"))
        return info
