"""Every runtime backend runs the same conformance template (tests/runtimes/backend_conformance.py).

ONNX Runtime, OpenVINO and LiteRT run the tiny BiT at 32 px (skipped with a reason where the SDK is missing),
TensorRT runs against the fake `tensorrt` module of tests/runtimes/fake_tensorrt.py, and a numpy backend that
implements only `_infer` proves the checks live in the base class. The reference is ONNX Runtime on the FP32
ONNX (for the fake TensorRT: what the fake computes).
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitdeploy.core.errors import BitdeployError, BundleError
from bitdeploy.runtimes.bundle import read_manifest
from bitdeploy.runtimes.bundle.manifest import Manifest
from bitdeploy.runtimes.engines.base import Backend, expected_input
from tests.runtimes import fake_tensorrt
from tests.runtimes.backend_conformance import BackendConformance, Case
from tests.runtimes.conftest import make_manifest


def _needs(module: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(why)


@pytest.fixture(scope="module")
def reference(tiny_model: dict[str, Any]) -> np.ndarray:
    """ONNX Runtime on the FP32 ONNX, plain session: the logits every real backend is compared with."""
    _needs("onnxruntime", 'the reference needs ONNX Runtime: pip install "bitdeploy[onnxruntime]"')
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_model["onnx"]), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {session.get_inputs()[0].name: tiny_model["x"]})[0]
    return out


class TestOnnxRuntime(BackendConformance):
    covers = "onnxruntime"

    @pytest.fixture(scope="class")
    def case(self, tiny_model: dict[str, Any], reference: np.ndarray) -> Case:
        from bitdeploy.runtimes.engines.ort import OrtBackend

        manifest = make_manifest("onnxruntime", "model.onnx", "cpu", "fp32")
        return Case(lambda: OrtBackend(tiny_model["onnx"], manifest, threads=1), tiny_model["x"], reference, atol=1e-5)


class TestOpenVino(BackendConformance):
    covers = "openvino"

    @pytest.fixture(scope="class")
    def case(self, ov_bundle: Path, tiny_model: dict[str, Any], reference: np.ndarray) -> Case:
        from bitdeploy.runtimes.engines.ov import OpenVinoBackend

        manifest = read_manifest(ov_bundle)
        return Case(
            lambda: OpenVinoBackend(ov_bundle / "model.xml", manifest, threads=1), tiny_model["x"], reference, atol=1e-4
        )


class TestLiteRt(BackendConformance):
    covers = "litert"

    @pytest.fixture(scope="class")
    def case(self, tiny_model: dict[str, Any], reference: np.ndarray, request: pytest.FixtureRequest) -> Case:
        _needs("ai_edge_litert", 'the LiteRT runtime needs ai-edge-litert: pip install "bitdeploy[litert]"')
        _needs("litert_torch", 'building the test model needs litert-torch: pip install "bitdeploy[litert-convert]"')
        from bitdeploy.runtimes.engines.litert import LiteRtBackend

        # the FP32 conversion of tiny_model["onnx"] the LiteRT runtime tests use (conftest): one conversion for both
        bundle: Path = request.getfixturevalue("litert_bundle")
        manifest = make_manifest("litert", "model.tflite", "cpu", "fp32")
        atol = 1e-4 * max(1.0, float(np.abs(reference).max()))
        return Case(
            lambda: LiteRtBackend(bundle / "model.tflite", manifest, threads=1),
            tiny_model["x"],
            reference,
            atol=atol,
        )


class TestFakeTensorRT(BackendConformance):
    """The TensorRT backend's buffers, chunks and thread-local contexts, on the fake engine ((N, 3, 4, 4) -> (N, 10))."""

    covers = "tensorrt"

    @pytest.fixture(scope="class")
    def case(self, tmp_path_factory: pytest.TempPathFactory) -> Case:
        from bitdeploy.runtimes.engines.trt import TensorRTBackend

        plan = tmp_path_factory.mktemp("trt-contract") / "model.plan"
        plan.write_bytes(b"PLAN")
        target = {
            "backend": "tensorrt",
            "tensorrt_version": "10.9.0",
            "gpu_name": "NVIDIA Fake GPU",
            "compute_capability": "8.9",
            "precision_used": "fp16+fp32",
        }
        manifest = Manifest.from_dict(
            {"target": target, "input": {"shape": [-1, *fake_tensorrt.SAMPLE_SHAPE], "dtype": "float32"}}
        )

        def factory() -> Backend:
            with pytest.MonkeyPatch.context() as mp:  # the backend keeps the fake it was built with
                fake_tensorrt.install(mp)
                return TensorRTBackend(plan, manifest)

        x = np.random.default_rng(0).standard_normal((4, *fake_tensorrt.SAMPLE_SHAPE)).astype(np.float32)
        return Case(factory, x, fake_tensorrt.fake_logits(x), atol=0)


# --- a backend that implements only `_infer` gets every check from the base class ---------------------------


class NumpyBackend(Backend):
    """Global average pool + a fixed linear head, in numpy; records what reached `_infer`."""

    name = "numpy"

    def __init__(
        self, manifest: dict[str, Any], classes: int = 5, rows_out: int | None = None, out_dtype: Any = np.float64
    ) -> None:
        super().__init__(Path("numpy-model"), Manifest.from_dict(manifest), device="cpu")
        self.weights = np.linspace(-1, 1, 3 * classes).reshape(3, classes)
        self.rows_out, self.out_dtype = rows_out, out_dtype
        self.seen: list[tuple[tuple[int, ...], bool]] = []
        self._lock = threading.Lock()

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self.seen.append((batch.shape, batch.flags.c_contiguous))
        out = batch.astype(np.float64).mean(axis=(2, 3)) @ self.weights
        return (out if self.rows_out is None else out[: self.rows_out]).astype(self.out_dtype)


MANIFEST_8PX = {"input": {"shape": [-1, 3, 8, 8], "dtype": "float32"}}


def _numpy_logits(x: np.ndarray, classes: int = 5) -> np.ndarray:
    return (x.astype(np.float64).mean(axis=(2, 3)) @ np.linspace(-1, 1, 3 * classes).reshape(3, classes)).astype(
        np.float32
    )


class TestNumpyBackend(BackendConformance):
    @pytest.fixture(scope="class")
    def case(self) -> Case:
        x = np.random.default_rng(1).uniform(-1, 1, (4, 3, 8, 8)).astype(np.float32)
        return Case(lambda: NumpyBackend(MANIFEST_8PX), x, _numpy_logits(x), atol=1e-6)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 3, 8, 8), np.float64),  # dtype
        np.zeros((3, 8, 8), np.float32),  # no batch axis
        np.zeros((2, 3, 9, 8), np.float32),  # fixed height
        np.zeros((0, 3, 8, 8), np.float32),  # no rows
        [[0.0]],  # not an array
        "image.jpg",
    ],
)
def test_bad_batches_never_reach_the_engine(bad: Any) -> None:
    backend = NumpyBackend(MANIFEST_8PX)
    with pytest.raises(
        BitdeployError, match=r"^infer expects a float32 NCHW array of shape Nx3x8x8 \(got .+\); use predict\(\)"
    ) as err:
        backend.infer(bad)
    assert "\n" not in str(err.value) and backend.seen == []


def test_engine_gets_a_contiguous_batch_and_the_caller_float32() -> None:
    backend = NumpyBackend(MANIFEST_8PX)
    x = np.random.default_rng(2).uniform(size=(2, 8, 8, 3)).astype(np.float32).transpose(0, 3, 1, 2)  # NHWC memory
    out = backend.infer(x)
    assert backend.seen == [((2, 3, 8, 8), True)] and out.dtype == np.float32  # _infer returned float64
    np.testing.assert_allclose(out, _numpy_logits(x), atol=1e-6)


@pytest.mark.parametrize("rows_out", [1, 0])
def test_a_wrong_number_of_rows_from_the_engine_is_one_line(rows_out: int) -> None:
    backend = NumpyBackend(MANIFEST_8PX, rows_out=rows_out)
    with pytest.raises(BundleError, match=r"numpy-model: the model returned shape \(\d, 5\) for a batch of 3") as err:
        backend.infer(np.zeros((3, 3, 8, 8), np.float32))
    assert "\n" not in str(err.value)


def _expected(manifest: dict[str, Any]) -> tuple[tuple[int | None, ...], np.dtype[Any]]:
    return expected_input(Manifest.from_dict(manifest))


def test_the_manifest_input_spec_sets_what_is_checked() -> None:
    assert _expected({}) == ((None, None, None, None), np.dtype(np.float32))  # no input spec: 4-D, any size
    assert _expected({"input": {"shape": [0, 3, "H", -1], "dtype": "float16"}}) == (
        (None, 3, None, None),
        np.dtype(np.float16),
    )
    assert _expected({"input": {"shape": [1, 3, 8]}})[0] == (None, None, None, None)  # not NCHW: any size
    with pytest.raises(BundleError, match=r"manifest input dtype 'pixels' is unknown; rebuild the bundle"):
        _expected({"input": {"dtype": "pixels"}})
    anything = NumpyBackend({"target": {}})
    assert anything.infer(np.zeros((2, 3, 5, 7), np.float32)).shape == (2, 5)
    half = NumpyBackend({"input": {"shape": [2, 3, 8, 8], "dtype": "float16"}})  # a fixed batch of 2, float16
    assert half.infer(np.zeros((2, 3, 8, 8), np.float16)).dtype == np.float32
    with pytest.raises(BitdeployError, match=r"float16 NCHW array of shape 2x3x8x8 \(got float32 \(2, 3, 8, 8\)\)"):
        half.infer(np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(BitdeployError, match=r"shape 2x3x8x8 \(got float16 \(1, 3, 8, 8\)\)"):
        half.infer(np.zeros((1, 3, 8, 8), np.float16))


def test_a_backend_must_implement_infer() -> None:
    class NoEngine(Backend):
        name = "none"

    with pytest.raises(TypeError, match="_infer"):
        NoEngine(Path("x"), {})  # type: ignore[abstract]


def test_the_predictor_adds_only_its_own_checks(ort_bundle: Path) -> None:
    """Predictor.infer leaves the input checks to its backend and checks what is its own: closed, labels."""
    from bitdeploy.runtimes import load

    model = load(ort_bundle)
    backend = model.backend
    assert backend is not None and backend.input_shape == (None, 3, 32, 32) and backend.input_dtype == np.float32
    with pytest.raises(
        BitdeployError, match=r"^infer expects a float32 NCHW array of shape Nx3x32x32 \(got float32 \(1, 3, 8, 8\)\)"
    ):
        model.infer(np.zeros((1, 3, 8, 8), np.float32))
    backend._infer = lambda b: np.zeros((len(b), 7), np.float32)  # type: ignore[method-assign]
    with pytest.raises(
        BundleError, match=r"the model returned shape \(2, 7\) but the manifest has 10 labels; rebuild the bundle"
    ):
        model.infer(np.zeros((2, 3, 32, 32), np.float32))
    model.close()
    with pytest.raises(BitdeployError, match="predictor is closed; load the bundle again"):
        model.infer(np.zeros((2, 3, 32, 32), np.float32))
