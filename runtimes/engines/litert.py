"""LiteRT (TensorFlow Lite) backend: `ai_edge_litert.interpreter.Interpreter` with the XNNPACK CPU delegate.

An interpreter is not thread-safe and is sized for one input shape, so each call borrows an interpreter from a
pool (one per concurrent caller, created on demand up to `max_interpreters`) and resizes its input to the
batch when the batch changes. Imports only numpy and ai_edge_litert (no torch, no TensorFlow).

bitdeploy's `.tflite` files take NCHW float32 like every bundle and return logits as (N, 1, 1, classes), which
keeps the graph free of batch-fixing reshapes; _infer() flattens them to (N, classes).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import numpy as np

from bitdeploy.core.errors import BundleError, first_line, require
from bitdeploy.runtimes.engines.base import Backend

DEVICES = ("cpu",)


class _Slot:
    """One interpreter and the batch size its tensors are allocated for."""

    def __init__(self, interpreter: Any) -> None:
        self.interpreter = interpreter
        self.input = interpreter.get_input_details()[0]["index"]
        self.output = interpreter.get_output_details()[0]["index"]
        self.batch = int(interpreter.get_input_details()[0]["shape"][0])
        scale, zero = interpreter.get_output_details()[0]["quantization"]
        self.dequantize = (float(scale), int(zero)) if scale else None  # an integer output (other converters)

    def run(self, batch: np.ndarray) -> np.ndarray:
        it = self.interpreter
        if batch.shape[0] != self.batch:
            it.resize_tensor_input(self.input, list(batch.shape), strict=True)
            it.allocate_tensors()
            self.batch = int(batch.shape[0])
        it.set_tensor(self.input, batch)
        it.invoke()
        out = np.array(it.get_tensor(self.output), dtype=np.float32).reshape(batch.shape[0], -1)
        if self.dequantize is not None:
            scale, zero = self.dequantize
            out = (out - zero) * scale
        return out


class LiteRtBackend(Backend):
    def pick_device(self, device: str | None) -> str:
        return (device or "cpu").lower()

    def open(self, max_interpreters: int = 4) -> None:
        if self.device not in DEVICES:
            raise BundleError(f"unknown LiteRT device {self.device!r} here; use --device cpu (XNNPACK)")
        self._litert = require("ai_edge_litert.interpreter", "litert", "LiteRT (ai-edge-litert)")
        self._model = self.model_path.read_bytes()
        self._pool: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._created = 0
        self.max_interpreters = max(1, int(max_interpreters))
        self._pool.put(self._new_slot())  # fail at load, not at the first call

    def _new_slot(self) -> _Slot:
        try:
            it = self._litert.Interpreter(model_content=self._model, num_threads=self.threads or None)
            it.allocate_tensors()
        except Exception as exc:  # the interpreter raises ValueError/RuntimeError with C++ context
            first = first_line(exc)
            raise BundleError(f"{self.model_path}: LiteRT cannot load the model ({first}); rebuild the bundle") from exc
        self._created += 1
        return _Slot(it)

    def _borrow(self) -> _Slot:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._created < self.max_interpreters:
                return self._new_slot()
        return self._pool.get()

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        slot = self._borrow()
        try:
            return slot.run(batch)
        except (ValueError, RuntimeError) as exc:
            first = first_line(exc)
            raise BundleError(f"LiteRT cannot run a batch of shape {tuple(batch.shape)} ({first})") from exc
        finally:
            self._pool.put(slot)

    def close(self) -> None:
        self.__dict__.pop("_pool", None)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(delegate="XNNPACK", interpreters=self._created, precision_used=self.manifest.target.precision_used)
        return info
