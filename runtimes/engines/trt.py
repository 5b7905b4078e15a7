"""TensorRT backend: deserialises a bundle's `model.plan` and runs it on an NVIDIA GPU.

Device memory and streams come from cuda-python (`cuda.bindings.runtime`, or the older `cuda.cudart`), which is
what `bitdeploy[tensorrt]` installs: a few MB, no torch, so the runtime stays small. Where cuda-python is
missing but a CUDA build of torch is installed (a training machine), torch's allocator and streams are used
instead; torch is imported only then, inside a function, never at module level.

Each thread gets its own execution context, CUDA stream and buffers sized for the profile's largest batch,
so `infer` is safe to call from several threads while the engine itself is shared.
"""

from __future__ import annotations

import ctypes
import importlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bitdeploy.core.errors import BundleError, MissingDependencyError, first_line
from bitdeploy.runtimes.engines.base import Backend

REBUILD = "build its engine again on this machine: `bitdeploy engine BUNDLE` (the bundle keeps model.trt.onnx)"


def parse_device(device: str | int | None) -> int:
    """'cuda:1' | '1' | 1 | None -> CUDA device index (default 0)."""
    if device is None or device == "":
        return 0
    text = str(device).strip().lower()
    if text.startswith("cuda"):
        text = text[4:].lstrip(":") or "0"
    if not text.isdigit():
        raise BundleError(f"unknown TensorRT device {device!r}; use cuda:N (e.g. cuda:0)")
    return int(text)


def check_engine_compat(
    target: Mapping[str, Any], trt_version: str, gpu_name: str, compute_capability: str
) -> str | None:
    """Why an engine built for `target` cannot run here, or None when it can.

    TensorRT engines are tied to the exact TensorRT version and to the GPU model they were built on (tactics are
    timed and compiled for that SM), so both are compared before deserialising.
    """
    built_version = str(target.get("tensorrt_version") or "")
    built_gpu = str(target.get("gpu_name") or "")
    built_cc = str(target.get("compute_capability") or "")
    if not built_version or not built_cc:
        return f"the manifest does not record the TensorRT version and GPU the engine was built for; {REBUILD}"
    if built_version != trt_version:
        return f"the engine was built with TensorRT {built_version} but TensorRT {trt_version} is installed; {REBUILD} (or install tensorrt=={built_version})"
    if built_cc != compute_capability or (built_gpu and built_gpu != gpu_name):
        return f"the engine was built for {built_gpu or 'a GPU'} (compute capability {built_cc}) but this GPU is {gpu_name} (compute capability {compute_capability}); {REBUILD}"
    return None


class CudaApi(Protocol):
    """The few CUDA runtime calls the backend needs, over cuda-python or torch."""

    name: str

    def set_device(self, index: int) -> None: ...
    def device_info(self, index: int) -> tuple[str, str]: ...  # (name, "major.minor")
    def stream(self) -> Any: ...
    def stream_handle(self, stream: Any) -> int: ...
    def sync(self, stream: Any) -> None: ...
    def malloc(self, nbytes: int) -> tuple[int, Any]: ...  # (device pointer, owner handle)
    def free(self, owner: Any) -> None: ...
    def host_buffer(self, nbytes: int) -> tuple[np.ndarray, Any]: ...  # pinned uint8 view, owner
    def free_host(self, owner: Any) -> None: ...
    def h2d(self, dst: int, src: np.ndarray, stream: Any) -> None: ...
    def d2h(self, dst: np.ndarray, src: int, stream: Any) -> None: ...
    def destroy_stream(self, stream: Any) -> None: ...


def _check(result: Any, call: str) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BundleError(f"CUDA call {call} failed ({err}); check the NVIDIA driver with nvidia-smi")
    return rest[0] if len(rest) == 1 else tuple(rest)


class CudaPythonApi:
    name = "cuda-python"

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart

    def set_device(self, index: int) -> None:
        _check(self.rt.cudaSetDevice(index), "cudaSetDevice")

    def device_info(self, index: int) -> tuple[str, str]:
        prop = _check(self.rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        return name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}"

    def stream(self) -> Any:
        return _check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def sync(self, stream: Any) -> None:
        _check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def malloc(self, nbytes: int) -> tuple[int, Any]:
        ptr = _check(self.rt.cudaMalloc(nbytes), "cudaMalloc")
        return int(ptr), ptr

    def free(self, owner: Any) -> None:
        self.rt.cudaFree(owner)

    def host_buffer(self, nbytes: int) -> tuple[np.ndarray, Any]:
        # Page-locked memory makes the async copies truly asynchronous and about twice as fast as pageable.
        ptr = _check(self.rt.cudaMallocHost(nbytes), "cudaMallocHost")
        array = np.ctypeslib.as_array(ctypes.cast(int(ptr), ctypes.POINTER(ctypes.c_uint8)), (nbytes,))
        return array, ptr

    def free_host(self, owner: Any) -> None:
        self.rt.cudaFreeHost(owner)

    def h2d(self, dst: int, src: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream), "cudaMemcpyAsync")

    def d2h(self, dst: np.ndarray, src: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream), "cudaMemcpyAsync")

    def destroy_stream(self, stream: Any) -> None:
        self.rt.cudaStreamDestroy(stream)


class TorchCudaApi:
    name = "torch"

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.index = 0
        self._owners: dict[int, Any] = {}  # device pointer -> the uint8 tensor that owns it

    def set_device(self, index: int) -> None:
        self.index = index
        self.torch.cuda.set_device(index)

    def device_info(self, index: int) -> tuple[str, str]:
        major, minor = self.torch.cuda.get_device_capability(index)
        return self.torch.cuda.get_device_name(index), f"{major}.{minor}"

    def stream(self) -> Any:
        return self.torch.cuda.Stream(device=self.index)

    def stream_handle(self, stream: Any) -> int:
        return int(stream.cuda_stream)

    def sync(self, stream: Any) -> None:
        stream.synchronize()

    def malloc(self, nbytes: int) -> tuple[int, Any]:
        t = self.torch.empty(nbytes, dtype=self.torch.uint8, device=f"cuda:{self.index}")
        self._owners[int(t.data_ptr())] = t
        return int(t.data_ptr()), t

    def free(self, owner: Any) -> None:
        self._owners.pop(int(owner.data_ptr()), None)

    def host_buffer(self, nbytes: int) -> tuple[np.ndarray, Any]:
        t = self.torch.empty(nbytes, dtype=self.torch.uint8).pin_memory()
        return t.numpy(), t

    def free_host(self, owner: Any) -> None:
        del owner

    def h2d(self, dst: int, src: np.ndarray, stream: Any) -> None:
        with self.torch.cuda.stream(stream):
            self._owners[dst][: src.nbytes].copy_(
                self.torch.from_numpy(src.reshape(-1).view(np.uint8)), non_blocking=True
            )

    def d2h(self, dst: np.ndarray, src: int, stream: Any) -> None:
        with self.torch.cuda.stream(stream):
            self.torch.from_numpy(dst.reshape(-1).view(np.uint8)).copy_(
                self._owners[src][: dst.nbytes], non_blocking=True
            )

    def destroy_stream(self, stream: Any) -> None:
        del stream


def cuda_api() -> CudaApi:
    """cuda-python when installed (the `tensorrt` extra brings it), else a CUDA build of torch, else an error."""
    for module in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return CudaPythonApi(importlib.import_module(module))
        except ImportError:
            continue
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        return TorchCudaApi(torch)
    raise MissingDependencyError(
        "cuda-python (CUDA runtime bindings for TensorRT)", "tensorrt", "needed for device buffers and streams"
    )


def import_tensorrt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise MissingDependencyError(
            "TensorRT (the tensorrt package)", "tensorrt", "get it on a machine with an NVIDIA GPU and driver"
        ) from exc
    except OSError as exc:  # the wheel is there but its CUDA libraries are not loadable
        first = first_line(exc)
        raise MissingDependencyError("a working TensorRT", "tensorrt", f"its libraries do not load ({first})") from exc


class _ThreadState:
    """One thread's execution context, stream and buffers, sized for the profile's largest batch."""

    def __init__(self, backend: TensorRTBackend) -> None:
        api = backend.api
        api.set_device(backend.device_index)
        self.context = backend.engine.create_execution_context()
        if self.context is None:
            raise BundleError(
                f"{backend.model_path}: TensorRT could not create an execution context (out of GPU memory?); close other GPU programs"
            )
        self.stream = api.stream()
        self.owners: list[tuple[str, Any]] = []
        self.dev_in, owner = api.malloc(backend.in_bytes_max)
        self.owners.append(("dev", owner))
        self.dev_out, owner = api.malloc(backend.out_bytes_max)
        self.owners.append(("dev", owner))
        self.host_in, owner = api.host_buffer(backend.in_bytes_max)
        self.owners.append(("host", owner))
        self.host_out, owner = api.host_buffer(backend.out_bytes_max)
        self.owners.append(("host", owner))
        self.context.set_tensor_address(backend.input_name, self.dev_in)
        self.context.set_tensor_address(backend.output_name, self.dev_out)

    def release(self, api: CudaApi) -> None:
        for kind, owner in self.owners:
            (api.free if kind == "dev" else api.free_host)(owner)
        api.destroy_stream(self.stream)
        self.owners = []
        self.context = None


class TensorRTBackend(Backend):
    def pick_device(self, device: str | None) -> str:
        return device or self.manifest.target.device or "cuda:0"

    def open(self) -> None:
        model_path, target = self.model_path, self.manifest.target
        trt = import_tensorrt()
        self.trt = trt
        self.device_index = parse_device(str(self.device))
        self.api = cuda_api()
        try:
            self.api.set_device(self.device_index)
            gpu_name, cc = self.api.device_info(self.device_index)
        except Exception as exc:  # cuda-python reports through BundleError, torch through RuntimeError
            first = first_line(exc)
            raise BundleError(
                f"no usable NVIDIA GPU cuda:{self.device_index} ({first}); TensorRT bundles need one, pass --device cuda:N"
            ) from exc
        reason = check_engine_compat(target.details, str(trt.__version__), gpu_name, cc)
        if reason:
            raise BundleError(f"{model_path}: {reason}")
        self.gpu_name, self.compute_capability = gpu_name, cc
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(model_path).read_bytes())
        if self.engine is None:
            raise BundleError(f"{model_path}: TensorRT could not deserialise the engine; {REBUILD}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BundleError(
                f"{model_path}: expected one input and one output, found {inputs} and {outputs}; {REBUILD}"
            )
        self.input_name, self.output_name = inputs[0], outputs[0]
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self.sample_shape = tuple(int(d) for d in hi[1:])
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        out_shape = self.engine.get_tensor_shape(self.output_name)
        self.num_classes = int(out_shape[-1])
        self.in_bytes_max = self.max_batch * int(np.prod(self.sample_shape)) * self.in_dtype.itemsize
        self.out_bytes_max = self.max_batch * self.num_classes * self.out_dtype.itemsize
        self._local = threading.local()
        self._states: list[_ThreadState] = []
        self._lock = threading.Lock()

    def _state(self) -> _ThreadState:
        state = getattr(self._local, "state", None)
        if state is None:
            if "engine" not in self.__dict__:
                raise BundleError("the TensorRT backend is closed; load the bundle again")
            state = _ThreadState(self)
            self._local.state = state
            with self._lock:
                self._states.append(state)
        return state

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        # Backend.infer has checked the batch against the manifest; the engine's own profile is checked here.
        if tuple(batch.shape[1:]) != self.sample_shape:
            raise BundleError(
                f"input must be (N, {', '.join(map(str, self.sample_shape))}) for this TensorRT engine, got {tuple(batch.shape)}; {REBUILD}"
            )
        # Larger batches than the optimisation profile allows are run in chunks of the profile's maximum.
        chunks = [batch[i : i + self.max_batch] for i in range(0, len(batch), self.max_batch)]
        return np.concatenate([self._run(c) for c in chunks])

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        n = len(chunk)
        pad = max(0, self.min_batch - n)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *self.sample_shape), chunk.dtype)])
        state = self._state()
        data = np.ascontiguousarray(chunk, dtype=self.in_dtype)
        host_in = state.host_in[: data.nbytes]
        host_in[:] = data.reshape(-1).view(np.uint8)
        out_bytes = len(data) * self.num_classes * self.out_dtype.itemsize
        host_out = state.host_out[:out_bytes]
        api = self.api
        state.context.set_input_shape(self.input_name, tuple(data.shape))
        api.h2d(state.dev_in, host_in, state.stream)
        if not state.context.execute_async_v3(api.stream_handle(state.stream)):
            raise BundleError(
                f"{self.model_path}: TensorRT execution failed; run with --debug and check the GPU with nvidia-smi"
            )
        api.d2h(host_out, state.dev_out, state.stream)
        api.sync(state.stream)
        logits = host_out.view(self.out_dtype).reshape(len(data), self.num_classes).astype(np.float32)
        return logits[:n]

    def close(self) -> None:
        with self._lock:
            states, self._states = self._states, []
        for state in states:
            state.release(self.api)
        self._local = threading.local()
        for key in ("engine", "runtime"):
            self.__dict__.pop(key, None)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        target = self.manifest.target
        info.update(
            {
                "tensorrt": str(self.trt.__version__),
                "gpu": self.gpu_name,
                "compute_capability": self.compute_capability,
                "cuda_api": self.api.name,
                "profile": {"min": self.min_batch, "max": self.max_batch},
                "precision_used": target.precision_used,
            }
        )
        return info
