"""A fake `tensorrt` module and CUDA API for the CPU tests of the TensorRT backend and build orchestration.

The fake checks our calls, not TensorRT: host memory poses as device memory (so buffer sizes, offsets and copies
are really exercised), and the "engine" takes (N, 3, 4, 4) float32 (profile min 1, opt 2, max 4) and returns
(N, 10) logits = the first 10 input values of each row times 2 (`fake_logits`).
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitdeploy.runtimes.engines import trt as trt_rt

# What the fake engine inspector reports when a test gives no layer JSON: one FP16 convolution.
DEFAULT_LAYERS: dict[str, Any] = {
    "Layers": [
        {
            "Name": "conv",
            "LayerType": "CaskConvolution",
            "Inputs": [{"Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
        }
    ]
}
SAMPLE_SHAPE = (3, 4, 4)  # the fake engine's input, per row
NUM_CLASSES = 10


def fake_logits(x: np.ndarray) -> np.ndarray:
    """What the fake engine computes for an (N, 3, 4, 4) float32 batch."""
    return (np.asarray(x, np.float32).reshape(len(x), -1)[:, :NUM_CLASSES] * 2).astype(np.float32)


class FakeCuda:
    """Host memory posing as device memory, so buffer sizes, offsets and copies are really exercised."""

    name = "fake-cuda"

    def __init__(self) -> None:
        self.mem: dict[int, np.ndarray] = {}
        self.freed: list[int] = []
        self.next = 0x1000

    def set_device(self, index: int) -> None:
        pass

    def device_info(self, index: int) -> tuple[str, str]:
        return "NVIDIA Fake GPU", "8.9"

    def stream(self) -> object:
        return object()

    def stream_handle(self, stream: object) -> int:
        return id(stream)

    def sync(self, stream: object) -> None:
        pass

    def malloc(self, nbytes: int) -> tuple[int, int]:
        self.next += 0x1000
        self.mem[self.next] = np.zeros(nbytes, np.uint8)
        return self.next, self.next

    def free(self, owner: int) -> None:
        self.freed.append(owner)

    def host_buffer(self, nbytes: int) -> tuple[np.ndarray, None]:
        return np.zeros(nbytes, np.uint8), None

    def free_host(self, owner: object) -> None:
        pass

    def h2d(self, dst: int, src: np.ndarray, stream: object) -> None:
        self.mem[dst][: src.nbytes] = src.reshape(-1).view(np.uint8)

    def d2h(self, dst: np.ndarray, src: int, stream: object) -> None:
        dst[:] = self.mem[src][: dst.nbytes]

    def destroy_stream(self, stream: object) -> None:
        pass


def fake_tensorrt(cuda: FakeCuda, strongly_typed: bool = True, layer_json: dict[str, Any] | None = None) -> Any:
    log: dict[str, Any] = {"flags": [], "contexts": 0, "cache_in": None}
    ns = types.SimpleNamespace
    m = types.ModuleType("tensorrt")
    m.__version__ = "10.9.0"  # type: ignore[attr-defined]

    class ILogger:
        Severity = ns(ERROR=1, INTERNAL_ERROR=0, WARNING=2)

        def __init__(self) -> None:
            pass

    m.ILogger = ILogger  # type: ignore[attr-defined]
    m.Logger = type("Logger", (), {"WARNING": 2, "ERROR": 1, "__init__": lambda self, sev=None: None})  # type: ignore[attr-defined]
    m.NetworkDefinitionCreationFlag = ns(STRONGLY_TYPED=1) if strongly_typed else ns(EXPLICIT_BATCH=0)  # type: ignore[attr-defined]
    m.MemoryPoolType = ns(WORKSPACE="workspace")  # type: ignore[attr-defined]
    m.ProfilingVerbosity = ns(DETAILED="detailed")  # type: ignore[attr-defined]
    m.BuilderFlag = ns(FP16="FP16", INT8="INT8")  # type: ignore[attr-defined]
    m.LayerInformationFormat = ns(JSON="json")  # type: ignore[attr-defined]
    m.TensorIOMode = ns(INPUT="in", OUTPUT="out")  # type: ignore[attr-defined]
    m.nptype = lambda dtype: np.float32  # type: ignore[attr-defined]

    class Cache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return self.data + b"+timed"

    class Config:
        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            log["workspace"] = size

        def set_flag(self, flag: str) -> None:
            log["flags"].append(flag)

        def add_optimization_profile(self, profile: Any) -> None:
            log["profile"] = profile.shapes

        def create_timing_cache(self, data: bytes) -> Cache:
            log["cache_in"] = data
            return Cache(data)

        def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> None:
            self.cache = cache

        def get_timing_cache(self) -> Cache:
            return self.cache

    class Profile:
        def set_shape(self, name: str, lo: tuple[int, ...], opt: tuple[int, ...], hi: tuple[int, ...]) -> None:
            self.shapes = (name, lo, opt, hi)

    class Network:
        num_inputs = 1

        def get_input(self, i: int) -> Any:
            return ns(name="input", shape=(-1, 3, 32, 32))

    class Made:
        """What the real constructors take (the logger; the parser also the network) and the fakes ignore."""

        def __init__(self, *args: Any) -> None:
            pass

    class Builder(Made):
        def create_network(self, flags: int) -> Network:
            log["network_flags"] = flags
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            return b"PLAN"

    class OnnxParser(Made):
        num_errors = 0

        def parse_from_file(self, path: str) -> bool:
            log["parsed"] = path
            return Path(path).is_file()

    class Context:
        def __init__(self) -> None:
            log["contexts"] += 1
            self.addr: dict[str, int] = {}
            self.shape: tuple[int, ...] = ()

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
            self.shape = tuple(shape)

        def set_tensor_address(self, name: str, ptr: int) -> None:
            self.addr[name] = ptr

        def execute_async_v3(self, stream: int) -> bool:
            n = self.shape[0]
            x = cuda.mem[self.addr["input"]][: n * 3 * 4 * 4 * 4].view(np.float32).reshape(n, -1)
            cuda.mem[self.addr["logits"]][: n * 10 * 4] = (x[:, :10] * 2).astype(np.float32).reshape(-1).view(np.uint8)
            return True

    class Inspector:
        execution_context = None

        def get_engine_information(self, fmt: str) -> str:
            return json.dumps(layer_json or DEFAULT_LAYERS)

    class Engine:
        num_io_tensors = 2
        num_layers = 5

        def create_execution_context(self) -> Context:
            return Context()

        def create_engine_inspector(self) -> Inspector:
            return Inspector()

        def get_tensor_name(self, i: int) -> str:
            return ["input", "logits"][i]

        def get_tensor_mode(self, name: str) -> str:
            return "in" if name == "input" else "out"

        def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
            return [(1, 3, 4, 4), (2, 3, 4, 4), (4, 3, 4, 4)]

        def get_tensor_dtype(self, name: str) -> str:
            return "float"

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (-1, 10)

    class Runtime(Made):
        def deserialize_cuda_engine(self, plan: bytes) -> Engine:
            log["deserialized"] = plan
            return Engine()

    m.Builder, m.OnnxParser, m.Runtime = Builder, OnnxParser, Runtime  # type: ignore[attr-defined]
    m.log = log  # type: ignore[attr-defined]
    return m


def install(
    monkeypatch: pytest.MonkeyPatch, strongly_typed: bool = True, layer_json: dict[str, Any] | None = None
) -> tuple[Any, FakeCuda]:
    """Make `bitdeploy.runtimes.engines.trt` (and through it the TensorRT converter) use a fresh fake TensorRT and CUDA."""
    cuda = FakeCuda()
    trt = fake_tensorrt(cuda, strongly_typed, layer_json)
    monkeypatch.setattr(trt_rt, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_rt, "cuda_api", lambda: cuda)
    return trt, cuda
