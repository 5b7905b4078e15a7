"""The LiteRT backend on a tiny BiT bundle: same logits as PyTorch at any batch (input resized per call),
thread-safe, loaded and predicted through `bitdeploy.runtimes.load`, and torch-free."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert", reason='the LiteRT runtime needs ai-edge-litert: pip install "bitdeploy[litert]"')

from bitdeploy.core.errors import BitdeployError, BundleError
from bitdeploy.runtimes import load
from bitdeploy.runtimes.bundle import read_manifest
from bitdeploy.runtimes.bundle.manifest import Manifest
from bitdeploy.runtimes.engines.litert import LiteRtBackend
from tests.runtimes.conftest import RES


def _backend(bundle: Path, **kw: Any) -> LiteRtBackend:
    return LiteRtBackend(bundle / "model.tflite", read_manifest(bundle), **kw)


def test_logits_match_pytorch_as_the_batch_changes(litert_bundle: Path, tiny_model: dict[str, Any]) -> None:
    x, ref = tiny_model["x"], tiny_model["ref"]
    with _backend(litert_bundle, threads=2) as b:
        for n in (4, 1, 3, 4):  # grow, shrink, grow: the input tensor is resized each time
            got = b.infer(x[:n])
            assert got.shape == (n, 10) and got.dtype == np.float32
            np.testing.assert_allclose(got, ref[:n], rtol=0, atol=1e-4 * max(1.0, float(np.abs(ref).max())))
        out = b.infer(x[:2])
        out[:] = 0  # the caller owns the result: the next call is unaffected
        assert np.abs(b.infer(x[:2])).max() > 0
        assert b.describe()["delegate"] == "XNNPACK"


def test_concurrent_calls_agree_with_serial(litert_bundle: Path, tiny_model: dict[str, Any]) -> None:
    x = np.concatenate([tiny_model["x"]] * 2)
    with _backend(litert_bundle, threads=1, max_interpreters=3) as b:
        serial = [b.infer(x[: 1 + i % 8]) for i in range(24)]
        with ThreadPoolExecutor(6) as pool:
            parallel = list(pool.map(lambda i: b.infer(x[: 1 + i % 8]), range(24)))
        assert 1 < b.describe()["interpreters"] <= 3
    for s, p in zip(serial, parallel):
        np.testing.assert_allclose(p, s, rtol=0, atol=1e-5)


def test_load_and_predict(litert_bundle: Path, image_dir: dict[str, Path], ort_bundle: Path) -> None:
    images = [image_dir["photo_rgb"], image_dir["digit0_L"]]
    with load(litert_bundle) as model, load(ort_bundle) as reference:
        preds, ref = model.predict(images, top_k=3), reference.predict(images, top_k=3)
    assert [[label for label, _ in row] for row in preds] == [[label for label, _ in row] for row in ref]
    for row, ref_row in zip(preds, ref):
        for (_, p), (_, q) in zip(row, ref_row):
            assert abs(p - q) < 1e-4


def test_bad_device_and_bad_model_fail_in_one_line(litert_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="--device cpu"):
        _backend(litert_bundle, device="cuda")
    (tmp_path / "model.tflite").write_bytes(b"not a flatbuffer")
    with pytest.raises(BundleError, match="cannot load the model"):
        LiteRtBackend(tmp_path / "model.tflite", Manifest())


def test_wrong_input_shape_is_a_one_line_error(litert_bundle: Path) -> None:
    bad = np.zeros((1, 3, RES + 1, RES + 1), np.float32)
    with (
        _backend(litert_bundle) as b,
        pytest.raises(BitdeployError, match=f"infer expects a float32 NCHW array of shape Nx3x{RES}x{RES}"),
    ):
        b.infer(bad)  # the manifest's input spec, checked by Backend.infer
    with (
        LiteRtBackend(litert_bundle / "model.tflite", Manifest()) as b,
        pytest.raises(BundleError, match="cannot run a batch"),
    ):
        b.infer(bad)  # no input spec: the interpreter itself refuses the shape, in one line


TORCH_FREE = """
import json, sys
for name in ("torch", "torchvision", "tensorflow", "litert_torch", "jax", "onnx", "onnxruntime", "openvino"):
    sys.modules[name] = None
from bitdeploy.runtimes import load
with load({bundle!r}) as model:
    preds = model.predict([{image!r}], top_k=2)
from bitdeploy.cli import main
try:
    main(["predict", {bundle!r}, {image!r}, "--json"])
except SystemExit as exc:
    assert not exc.code, exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "tensorflow", "jax", "litert_torch") and sys.modules[m] is not None)
print(json.dumps({{"preds": preds, "heavy": heavy}}))
"""


def test_litert_bundle_runs_without_torch_or_tensorflow(litert_bundle: Path, image_dir: dict[str, Path]) -> None:
    code = TORCH_FREE.format(bundle=str(litert_bundle), image=str(image_dir["photo_rgb"]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["heavy"] == [] and len(last["preds"][0]) == 2
    assert '"predictions"' in proc.stdout
