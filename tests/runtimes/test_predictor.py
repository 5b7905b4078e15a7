"""Predictor API: load, predict on every input kind, infer checks, timing, close, backend selection."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bitdeploy.core.errors import BitdeployError, BundleError, ImageError, MissingDependencyError
from bitdeploy.runtimes import load
from bitdeploy.runtimes.predictor import Timing, softmax
from bitdeploy.runtimes.preprocess import preprocess

from .conftest import INVALID, LABELS, VALID


def test_infer_matches_torch(ort_bundle: Path, tiny_model: dict[str, Any]) -> None:
    with load(ort_bundle) as model:
        logits = model.infer(tiny_model["x"])
    assert logits.dtype == np.float32 and logits.shape == (4, 10)
    np.testing.assert_allclose(logits, tiny_model["ref"], atol=1e-4, rtol=0)


def test_predict_every_input_kind_agrees(ort_bundle: Path, image_dir: dict[str, Path]) -> None:
    path = image_dir["photo_rgb"]
    data = path.read_bytes()
    pil = Image.open(path)
    arr = np.asarray(Image.open(path).convert("RGB"))
    with load(ort_bundle) as model:
        by_path = model.predict(path, top_k=3)
        assert model.predict(str(path), top_k=3) == by_path
        assert model.predict(data, top_k=3) == by_path
        assert model.predict(bytearray(data), top_k=3) == by_path
        assert model.predict(pil, top_k=3) == by_path
        assert model.predict(arr, top_k=3) == by_path
        assert model.predict(arr[None], top_k=3) == by_path  # N x H x W x C is a batch
        both = model.predict([path, image_dir["digit0_L"]], top_k=3)
    assert len(by_path) == 1 and len(by_path[0]) == 3 and both[0] == by_path[0]
    labels = [label for label, _ in by_path[0]]
    probs = [p for _, p in by_path[0]]
    assert all(label in LABELS for label in labels) and len(set(labels)) == 3
    assert probs == sorted(probs, reverse=True) and all(0 < p <= 1 for p in probs)


def test_predict_matches_manual_pipeline(ort_bundle: Path, image_dir: dict[str, Path]) -> None:
    images = [image_dir[k] for k in VALID]
    with load(ort_bundle) as model:
        got = model.predict(images, top_k=10)
        batch = np.stack([preprocess(p, model.input_spec) for p in images])
        probs = softmax(model.infer(batch))
    for row, pred in zip(probs, got):
        assert len(pred) == 10
        assert abs(sum(p for _, p in pred) - 1.0) < 1e-6
        for label, p in pred:
            assert p == pytest.approx(row[int(label)], abs=1e-9)


def test_batches_larger_than_max_batch(ort_bundle: Path, image_dir: dict[str, Path]) -> None:
    images = [image_dir[k] for k in VALID] * 4  # 44 images, max_batch 32 -> two chunks
    with load(ort_bundle) as model:
        single = [model.predict(p, top_k=2)[0] for p in images[: len(VALID)]]
        many = model.predict(images, top_k=2)
    assert len(many) == len(images)
    for i, pred in enumerate(many):
        expect = single[i % len(VALID)]
        assert [lab for lab, _ in pred] == [lab for lab, _ in expect]
        np.testing.assert_allclose([p for _, p in pred], [p for _, p in expect], atol=1e-5)


def test_top_k_bounds(ort_bundle: Path, image_dir: dict[str, Path]) -> None:
    with load(ort_bundle) as model:
        assert len(model.predict(image_dir["digit0_L"], top_k=50)[0]) == 10  # clamped to the label count
        for bad in (0, -1, 1.5, True):
            with pytest.raises(BitdeployError, match="top_k"):
                model.predict(image_dir["digit0_L"], top_k=bad)


def test_timing_is_reported_separately(ort_bundle: Path, image_dir: dict[str, Path]) -> None:
    with load(ort_bundle) as model:
        assert model.last_timing is None
        preds, timing = model.predict([image_dir["photo_rgb"], image_dir["digit0_L"]], return_timing=True)
    assert isinstance(timing, Timing) and timing.images == 2 and len(preds) == 2
    assert timing.preprocess_s > 0 and timing.infer_s > 0 and timing.postprocess_s >= 0
    assert timing.total_s == pytest.approx(timing.preprocess_s + timing.infer_s + timing.postprocess_s)
    assert model.last_timing is timing
    assert set(timing.as_dict()) == {"images", "preprocess_ms", "infer_ms", "postprocess_ms", "total_ms"}


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((1, 3, 32, 32), np.float64),  # dtype
        np.zeros((3, 32, 32), np.float32),  # no batch axis
        np.zeros((1, 3, 64, 64), np.float32),  # resolution
        np.zeros((1, 32, 32, 3), np.float32),  # NHWC
        np.zeros((0, 3, 32, 32), np.float32),  # empty
        [[0.0]],  # not an array
    ],
)
def test_infer_checks_shape_and_dtype(ort_bundle: Path, bad: Any) -> None:
    with (
        load(ort_bundle) as model,
        pytest.raises(BitdeployError, match="infer expects a float32 NCHW array of shape Nx3x32x32"),
    ):
        model.infer(bad)


def test_invalid_images_raise_one_line_naming_the_file(ort_bundle: Path, image_dir: dict[str, Path]) -> None:
    with load(ort_bundle) as model:
        for key in INVALID:
            with pytest.raises(ImageError) as err:
                model.predict(image_dir[key])
            msg = str(err.value)
            assert str(image_dir[key]) in msg and "\n" not in msg, msg
        with pytest.raises(ImageError, match="empty image data"):
            model.predict(b"")
        with pytest.raises(ImageError, match="uint8"):
            model.predict(np.zeros((8, 8, 3), np.float32))


def test_close_frees_and_refuses_further_use(ort_bundle: Path, tiny_model: dict[str, Any]) -> None:
    model = load(ort_bundle)
    assert not model.closed and model.backend_name == "onnxruntime" and "onnxruntime" in repr(model)
    model.close()
    model.close()  # idempotent
    assert model.closed and model.backend is None
    with pytest.raises(BitdeployError, match="closed"):
        model.infer(tiny_model["x"])


def test_describe(ort_bundle: Path) -> None:
    with load(ort_bundle, threads=1) as model:
        info = model.describe()
    assert (
        info["model"] == "tiny"
        and info["backend"] == "onnxruntime"
        and info["device"] == "cpu"
        and info["threads"] == 1
    )
    assert info["providers"] == ["CPUExecutionProvider"]


def test_backend_override_and_errors(ort_bundle: Path, ov_bundle: Path, tiny_model: dict[str, Any]) -> None:
    with load(ort_bundle, backend="openvino") as model:  # OpenVINO reads ONNX directly
        assert model.backend_name == "openvino" and model.describe()["device"] == "CPU"
        np.testing.assert_allclose(model.infer(tiny_model["x"]), tiny_model["ref"], atol=1e-4)
    with pytest.raises(BundleError, match=r"cannot read model\.xml; drop --backend or pass --backend openvino"):
        load(ov_bundle, backend="onnxruntime")
    with pytest.raises(BitdeployError, match="unknown backend"):
        load(ort_bundle, backend="tflite")
    with pytest.raises(BundleError, match="unknown ONNX Runtime device"):
        load(ort_bundle, device="tpu")
    with pytest.raises(BundleError, match="no CUDAExecutionProvider"):
        load(ort_bundle, device="cuda:0")


def test_missing_backend_sdk_is_one_line(ort_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were not installed
    with pytest.raises(MissingDependencyError) as err:
        load(ort_bundle)
    msg = str(err.value)
    assert str(ort_bundle) in msg and 'pip install "bitdeploy[onnxruntime]"' in msg and "\n" not in msg


def test_fixed_batch_engine_is_padded(bundle_copy: Path, ort_bundle: Path, image_dir: dict[str, Path]) -> None:
    """A manifest with a fixed batch (as a static TensorRT engine has) gets padded chunks of exactly that size."""
    import json

    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["input"]["shape"] = [2, 3, 32, 32]
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    images = [image_dir[k] for k in VALID[:5]]
    with load(ort_bundle) as dynamic, load(bundle_copy) as fixed:
        seen: list[int] = []
        real_infer = fixed.backend._infer  # type: ignore[union-attr]  # what reaches the engine
        fixed.backend._infer = lambda b: (seen.append(b.shape[0]), real_infer(b))[1]  # type: ignore[union-attr]
        assert fixed.max_batch == 2
        got, expect = fixed.predict(images, top_k=3), dynamic.predict(images, top_k=3)
        with pytest.raises(BitdeployError, match="shape 2x3x32x32"):
            fixed.infer(np.zeros((3, 3, 32, 32), np.float32))
    assert seen == [2, 2, 2]
    for g, e in zip(got, expect):
        assert [lab for lab, _ in g] == [lab for lab, _ in e]
        np.testing.assert_allclose([p for _, p in g], [p for _, p in e], atol=1e-6)
