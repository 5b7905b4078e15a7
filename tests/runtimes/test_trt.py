"""TensorRT target and runtime.

Building and running engines needs TensorRT and an NVIDIA GPU; those tests skip with that reason here. What can
be checked without them is: the refusal of engines built for another TensorRT version or GPU (before any
deserialisation), the engine-inspector parsing for TensorRT 10 and 11 schemas, the profile/device parsing,
the timing-cache naming, and the one-line errors where TensorRT is missing.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitdeploy.converters import trt_engine
from bitdeploy.converters.base import ConvertOptions, bind
from bitdeploy.converters.trt_engine import TensorRTOptions
from bitdeploy.core.errors import BitdeployError, BundleError, ConversionError, MissingDependencyError
from bitdeploy.runtimes.bundle.manifest import Manifest, TargetInfo
from bitdeploy.runtimes.engines import trt as trt_rt
from tests.experiments import script
from tests.runtimes import fake_tensorrt
from tests.runtimes.fake_tensorrt import FakeCuda

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def _gpu() -> bool:
    if not HAVE_TRT:
        return False
    try:
        api = trt_rt.cuda_api()
        api.set_device(0)
        return True
    except Exception:
        return False


NEEDS_GPU = pytest.mark.skipif(
    not _gpu(), reason='needs TensorRT and an NVIDIA GPU: pip install "bitdeploy[tensorrt]" on a machine with one'
)
NO_TRT = pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here; this checks the error where it is missing")

TARGET = {
    "backend": "tensorrt",
    "tensorrt_version": "10.3.0",
    "gpu_name": "NVIDIA A100-SXM4-80GB",
    "compute_capability": "8.0",
}


def test_engine_compat_same_build_machine_is_accepted() -> None:
    assert trt_rt.check_engine_compat(TARGET, "10.3.0", "NVIDIA A100-SXM4-80GB", "8.0") is None


@pytest.mark.parametrize(
    ("version", "gpu", "cc", "expect"),
    [
        (
            "10.5.0",
            "NVIDIA A100-SXM4-80GB",
            "8.0",
            r"built with TensorRT 10\.3\.0 but TensorRT 10\.5\.0 is installed; build its engine again on this machine: `bitdeploy engine BUNDLE`",
        ),
        (
            "10.3.0",
            "NVIDIA H100 80GB HBM3",
            "9.0",
            r"built for NVIDIA A100-SXM4-80GB \(compute capability 8\.0\) but this GPU is NVIDIA H100 80GB HBM3 \(compute capability 9\.0\); build its engine again on this machine: `bitdeploy engine",
        ),
        ("10.3.0", "NVIDIA A100-PCIE-40GB", "8.0", r"but this GPU is NVIDIA A100-PCIE-40GB"),
    ],
)
def test_engine_compat_other_version_or_gpu_is_refused(version: str, gpu: str, cc: str, expect: str) -> None:
    reason = trt_rt.check_engine_compat(TARGET, version, gpu, cc)
    assert reason is not None and "\n" not in reason
    import re

    assert re.search(expect, reason), reason


def test_engine_compat_needs_the_build_facts() -> None:
    assert "does not record the TensorRT version" in (trt_rt.check_engine_compat({}, "10.3.0", "X", "8.0") or "")


class _FakeApi:
    name = "fake"

    def __init__(self, gpu: str, cc: str) -> None:
        self.gpu, self.cc = gpu, cc

    def set_device(self, index: int) -> None:
        pass

    def device_info(self, index: int) -> tuple[str, str]:
        return self.gpu, self.cc


def test_backend_refuses_a_foreign_engine_before_deserialising(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    class Runtime:
        def __init__(self, logger: Any) -> None:
            calls.append("Runtime")

    fake = types.SimpleNamespace(__version__="10.7.0", Runtime=Runtime, Logger=types.SimpleNamespace(WARNING=2))
    monkeypatch.setattr(trt_rt, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_rt, "cuda_api", lambda: _FakeApi("NVIDIA L4", "8.9"))
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not an engine")
    manifest = Manifest(target=TargetInfo.from_dict(TARGET))
    with pytest.raises(
        BundleError,
        match=r"model\.plan: the engine was built with TensorRT 10\.3\.0 but TensorRT 10\.7\.0 is installed; build its engine again",
    ):
        trt_rt.TensorRTBackend(plan, manifest)
    manifest = Manifest(target=TargetInfo.from_dict({**TARGET, "tensorrt_version": "10.7.0"}))
    with pytest.raises(
        BundleError, match=r"built for NVIDIA A100-SXM4-80GB \(compute capability 8\.0\) but this GPU is NVIDIA L4"
    ):
        trt_rt.TensorRTBackend(plan, manifest)
    assert calls == []  # refused from the manifest alone


def test_device_parsing() -> None:
    assert [trt_rt.parse_device(d) for d in (None, "", "cuda", "cuda:1", "2", 3)] == [0, 0, 0, 1, 2, 3]
    with pytest.raises(BundleError, match=r"unknown TensorRT device 'gpu0'; use cuda:N"):
        trt_rt.parse_device("gpu0")


def test_profile_parsing() -> None:
    assert trt_engine.parse_profile(None) == trt_engine.DEFAULT_PROFILE
    assert trt_engine.parse_profile("1,8,32") == (1, 8, 32)
    assert trt_engine.parse_profile([2, 4, 8]) == (2, 4, 8)
    assert trt_engine.parse_profile("16") == (1, 16, 16)
    for bad in ("1,2", "8,4,2", "0,1,1", "a,b,c"):
        with pytest.raises(ConversionError, match=r"--batch"):
            trt_engine.parse_profile(bad)


TRT10_JSON = {
    "Layers": [
        {
            "Name": "Reformatting CopyNode for Input Tensor 0",
            "LayerType": "Reformat",
            "Inputs": [{"Format/Datatype": "Row major linear FP32 format"}],
        },
        {
            "Name": "conv1",
            "LayerType": "CaskConvolution",
            "Inputs": [{"Name": "x", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
            "Outputs": [{"Format/Datatype": "Row major linear FP32 format"}],
        },
        {
            "Name": "conv2",
            "LayerType": "CaskConvolution",
            "Inputs": [{"Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
        },
        {
            "Name": "norm",
            "LayerType": "Normalization",
            "Inputs": [{"Format/Datatype": "Row major linear FP32 format"}, {"Format/Datatype": "Int32"}],
        },
        {"Name": "shape", "LayerType": "Shuffle", "Inputs": [{"Format/Datatype": "Row major linear FP32 format"}]},
    ],
    "Bindings": ["input", "logits"],
}
TRT11_JSON = {
    "Layers": [
        {
            "Name": "conv1",
            "LayerType": "CaskConvolution",
            "Inputs": [{"Name": "x", "DataType": "Int8", "Format": "kCHW32"}],
        },
        {
            "Name": "conv2",
            "LayerType": "CaskConvolution",
            "Inputs": [{"Name": "y", "DataType": "Int8", "Format": "kCHW32"}],
        },
        {
            "Name": "gn",
            "LayerType": "Normalization",
            "Inputs": [{"Name": "z", "DataType": "Float", "Format": "kLINEAR"}],
        },
    ],
    "I/O Tensors": [{"Name": "input", "IOMode": "Input", "DataType": "Float"}],
}


def test_layer_summary_reads_tensorrt_10_and_11_inspector_json() -> None:
    s10 = trt_engine.summarize_layers(json.dumps(TRT10_JSON))
    assert s10["by_precision"] == {"int8": 1, "fp16": 1, "fp32": 1} and s10["bookkeeping_layers"] == 2
    assert s10["precision_used"] == "int8+fp16+fp32"
    s11 = trt_engine.summarize_layers(TRT11_JSON)
    assert s11["by_precision"] == {"int8": 2, "fp32": 1} and s11["precision_used"] == "int8+fp32"
    names_only = trt_engine.summarize_layers({"Layers": ["conv1", "conv2"]})
    assert names_only["precision_used"] == "unknown" and names_only["unknown_layers"] == 2


def test_silent_fp32_engine_is_refused() -> None:
    fp32_only = trt_engine.summarize_layers(
        {"Layers": [{"LayerType": "CaskConvolution", "Inputs": [{"Format/Datatype": "Row major linear FP32 format"}]}]}
    )
    with pytest.raises(ConversionError, match=r"TensorRT built no INT8 layers for --precision int8 \(it ran fp32\)"):
        trt_engine.check_realised("int8", fp32_only)
    with pytest.raises(ConversionError, match=r"no FP16 layers"):
        trt_engine.check_realised("fp16", fp32_only)
    trt_engine.check_realised("fp32", fp32_only)
    trt_engine.check_realised("int8", trt_engine.summarize_layers(TRT11_JSON))


def test_timing_cache_is_keyed_by_version_and_gpu(tmp_path: Path) -> None:
    p = trt_engine.timing_cache_path(tmp_path, "tensorrt", "10.3.0", "NVIDIA A100-SXM4-80GB", "8.0")
    assert p == tmp_path / "tensorrt" / "timing-trt10.3.0-NVIDIA-A100-SXM4-80GB-sm80.cache"
    assert trt_engine.timing_cache_path(None, "tensorrt", "10.3.0", "x", "8.0") is None


@NO_TRT
def test_missing_tensorrt_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    with pytest.raises(MissingDependencyError) as err:
        bind("trt", "fp16", ConvertOptions()).convert(tmp_path / "model.onnx", tmp_path)
    msg = str(err.value)
    assert "TensorRT" in msg and 'pip install "bitdeploy[tensorrt]"' in msg and "NVIDIA GPU" in msg and "\n" not in msg
    assert not any(tmp_path.iterdir())
    with pytest.raises(MissingDependencyError, match="TensorRT"):
        trt_rt.TensorRTBackend(tmp_path / "model.plan", Manifest(target=TargetInfo.from_dict(TARGET)))


def test_runtime_module_is_torch_free() -> None:
    import ast

    tree = ast.parse(Path(trt_rt.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top for a in n.names} | {
        (n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)
    }
    assert not names & {"torch", "onnx", "nncf", "tensorrt"}


# --- on a machine with TensorRT and an NVIDIA GPU -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from bitdeploy.converters import calibration as calib_mod
    from tests.converters.tiny_digits import RESOLUTION, tiny_digits

    t = tiny_digits()
    cal = calib_mod.from_image_set(t.train, RESOLUTION, size=128)
    built = {}
    for precision in ("fp16", "int8"):
        work = tmp_path_factory.mktemp(precision)
        art = bind(
            "trt",
            precision,
            ConvertOptions(cache_dir=tmp_path_factory.getbasetemp(), extras=TensorRTOptions(batch="1,8,64")),
        ).convert(t.onnx, work, cal)
        built[precision] = (work, art)
    return {"tiny": t, "built": built}


@NEEDS_GPU
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engine_builds_records_precision_and_passes_the_gate(tiny_engines: dict[str, Any], precision: str) -> None:
    t = tiny_engines["tiny"]
    work, art = tiny_engines["built"][precision]
    tgt = art.target
    used = tgt.precision_used or ""
    assert used.startswith("int8" if precision == "int8" else "fp16") or precision in used
    assert (
        tgt.get("tensorrt_version")
        and tgt.get("gpu_name")
        and tgt.get("compute_capability")
        and tgt.get("profile") == {"min": 1, "opt": 8, "max": 64}
    )
    backend = trt_rt.TensorRTBackend(work / art.model_file, Manifest(target=tgt))
    try:
        logits = backend.infer(t.val_x)  # 359 images: several chunks of the profile's max (64)
        assert logits.shape == (len(t.val_x), 10) and logits.dtype == np.float32
        top1 = float((logits.argmax(1) == t.val_y).mean())
        assert top1 >= t.reference_top1 - (0.002 if precision == "fp16" else 0.01)
    finally:
        backend.close()


@NEEDS_GPU
def test_backend_is_thread_safe(tiny_engines: dict[str, Any]) -> None:
    t = tiny_engines["tiny"]
    work, art = tiny_engines["built"]["fp16"]
    backend = trt_rt.TensorRTBackend(work / art.model_file, Manifest(target=art.target))
    expected = [backend.infer(t.val_x[i : i + 1]) for i in range(16)]
    results: dict[int, list[np.ndarray]] = {}

    def worker(k: int) -> None:
        results[k] = [backend.infer(t.val_x[i : i + 1]) for i in range(16) for _ in range(3)][::3]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    backend.close()
    for out in results.values():
        for a, b in zip(out, expected):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


# --- the build and run orchestration against a fake TensorRT (CPU; checks our calls, not TensorRT) -------------


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(strongly_typed: bool = True, layer_json: dict[str, Any] | None = None) -> tuple[Any, FakeCuda]:
        return fake_tensorrt.install(monkeypatch, strongly_typed, layer_json or TRT10_JSON)

    return install


def test_engine_build_orchestration_strongly_typed_int8(fake: Any, tmp_path: Path) -> None:
    from bitdeploy.converters import calibration as calib_mod
    from tests.converters.tiny_digits import RESOLUTION, tiny_digits

    trt, _ = fake(strongly_typed=True)
    t = tiny_digits()
    cal = calib_mod.from_image_set(t.train, RESOLUTION, size=32)
    work, cache = tmp_path / "w", tmp_path / "cache"
    work.mkdir()
    art = bind(
        "trt", "int8", ConvertOptions(cache_dir=cache, extras=TensorRTOptions(batch="1,8,64", workspace_gb=2))
    ).convert(t.onnx, work, cal)
    log = trt.log
    assert log["network_flags"] == 1 << 1 and log["flags"] == []  # strongly typed: precision from the graph, no flags
    assert log["profile"] == ("input", (1, 3, 32, 32), (8, 3, 32, 32), (64, 3, 32, 32)) and log["workspace"] == 2 << 30
    assert Path(log["parsed"]).name == "model.trt.onnx" and (work / "model.plan").read_bytes() == b"PLAN"
    assert art.files == ["model.plan", "model.trt.onnx"] and art.eval_model_file == "model.trt.onnx"
    tgt = art.target.to_dict()
    assert (tgt["tensorrt_version"], tgt["gpu_name"], tgt["compute_capability"], tgt["device"]) == (
        "10.9.0",
        "NVIDIA Fake GPU",
        "8.9",
        "cuda:0",
    )
    assert (
        tgt["precision_used"] == "int8+fp16+fp32"
        and tgt["layers"]["by_precision"]["int8"] == 1
        and tgt["strongly_typed"] is True
    )
    assert tgt["profile"] == {"min": 1, "opt": 8, "max": 64} and tgt["onnx"]["format"] == "qdq"
    cache_file = trt_engine.timing_cache_path(cache, "tensorrt", "10.9.0", "NVIDIA Fake GPU", "8.9")
    assert cache_file is not None and cache_file.read_bytes() == b"+timed" and log["cache_in"] == b""
    art2 = bind("trt", "int8", ConvertOptions(cache_dir=cache)).convert(
        t.onnx, tmp_path, cal
    )  # second build reuses the cache
    assert trt.log["cache_in"] == b"+timed" and any("reused" in n for n in art2.notes)


def test_engine_build_weakly_typed_uses_builder_flags_and_refuses_silent_fp32(fake: Any, tmp_path: Path) -> None:
    from tests.converters.tiny_digits import tiny_digits

    t = tiny_digits()
    trt, _ = fake(strongly_typed=False)
    art = bind("trt", "fp16", ConvertOptions(cache=False)).convert(t.onnx, tmp_path)
    assert (
        trt.log["network_flags"] == 1 << 0
        and trt.log["flags"] == ["FP16"]
        and art.target.get("builder_flags") == ["FP16"]
    )
    fp32_only = {
        "Layers": [{"LayerType": "CaskConvolution", "Inputs": [{"Format/Datatype": "Row major linear FP32 format"}]}]
    }
    fake(strongly_typed=True, layer_json=fp32_only)
    (tmp_path / "x").mkdir()
    with pytest.raises(ConversionError, match=r"TensorRT built no FP16 layers"):
        bind("trt", "fp16", ConvertOptions(cache=False)).convert(t.onnx, tmp_path / "x")


def test_runtime_buffers_chunks_and_thread_local_contexts(fake: Any, tmp_path: Path) -> None:
    trt, cuda = fake()
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"PLAN")
    target = {
        "tensorrt_version": "10.9.0",
        "gpu_name": "NVIDIA Fake GPU",
        "compute_capability": "8.9",
        "precision_used": "fp16+fp32",
    }
    backend = trt_rt.TensorRTBackend(plan, Manifest(target=TargetInfo.from_dict(target)))
    assert (backend.min_batch, backend.max_batch, backend.num_classes) == (1, 4, 10)
    x = np.random.default_rng(0).standard_normal((10, 3, 4, 4)).astype(np.float32)
    out = backend.infer(x)  # 10 > profile max 4: chunks of 4, 4, 2
    np.testing.assert_array_equal(out, x.reshape(10, -1)[:, :10] * 2)
    assert out.dtype == np.float32
    with pytest.raises(
        BitdeployError, match=r"infer expects a float32 NCHW array of shape NxNxNxN \(got float32 \(0, 3, 4, 4\)\)"
    ):
        backend.infer(x[:0])  # the Backend contract: at least one row
    with pytest.raises(
        BundleError, match=r"input must be \(N, 3, 4, 4\) for this TensorRT engine"
    ):  # the engine's own profile
        backend.infer(x[:, :, :2])
    results: dict[int, np.ndarray] = {}

    def work(k: int) -> None:
        results[k] = backend.infer(x[k : k + 3])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for k, r in results.items():
        np.testing.assert_array_equal(r, x[k : k + 3].reshape(3, -1)[:, :10] * 2)
    assert trt.log["contexts"] == 4  # this thread + 3 workers, one execution context each
    assert backend.describe()["cuda_api"] == "fake-cuda"
    backend.close()
    assert len(cuda.freed) == 8  # input + output device buffers of 4 thread states
    with pytest.raises(BundleError, match="closed"):
        backend.infer(x[:1])


@NO_TRT
def test_gpu_benchmark_exits_1_with_one_line_without_tensorrt() -> None:
    import subprocess

    proc = subprocess.run([sys.executable, str(script("trt_gpu"))], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert (
        proc.stderr.strip().count("\n") == 0
        and "TensorRT is not installed" in proc.stderr
        and "bitdeploy[tensorrt]" in proc.stderr
    )
