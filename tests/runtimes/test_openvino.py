"""The OpenVINO backend: IR bundles, the precision hint from the manifest, hints, devices, pool."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitdeploy.core.errors import BundleError
from bitdeploy.runtimes import load
from bitdeploy.runtimes.bundle.manifest import TargetInfo
from bitdeploy.runtimes.engines.ov import precision_hint

pytest.importorskip("openvino")


def test_ir_bundle_matches_torch_in_f32(ov_bundle: Path, tiny_model: dict[str, Any]) -> None:
    with load(ov_bundle) as model:
        info = model.describe()
        logits = model.infer(tiny_model["x"])
        one = model.infer(tiny_model["x"][:1])  # the IR keeps the dynamic batch
    assert info["backend"] == "openvino" and info["device"] == "CPU" and info["precision_used"] == "f32"
    assert info["performance_hint"] == "LATENCY" and info["infer_requests"] >= 1
    np.testing.assert_allclose(logits, tiny_model["ref"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(one, logits[:1], atol=1e-5)


def test_threads_and_hint(ov_bundle: Path) -> None:
    with load(ov_bundle, threads=1, hint="throughput") as model:
        info = model.describe()
    assert info["threads"] == 1 and info["performance_hint"] == "THROUGHPUT"
    with pytest.raises(BundleError, match="unknown OpenVINO performance hint"):
        load(ov_bundle, hint="fastest")


def test_unavailable_device_is_one_line(ov_bundle: Path) -> None:
    with pytest.raises(BundleError, match="OpenVINO device 'NPU' is not available here") as err:
        load(ov_bundle, device="NPU")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("target", "expect"),
    [
        ({"precision": "fp32", "precision_used": "f32"}, "f32"),
        ({"precision": "fp32"}, "f32"),  # fp32 bundles are pinned even without a record
        ({"precision": "fp16", "precision_used": "bf16"}, "bf16"),
        ({"precision": "fp16", "precision_used": "f16"}, "f16"),
        ({"precision": "int8", "precision_used": "int8+f32"}, "f32"),
        ({"precision": "int8", "precision_used": "int8 + bf16"}, "bf16"),
        ({"precision": "int8", "precision_used": "int8"}, None),  # nothing recorded: the device decides
        ({"precision": "fp16"}, None),
        ({"precision": "int8", "precision_used": "int8+bf16", "inference_precision": "f32"}, "f32"),  # the pin wins
        ({"precision": "fp16", "inference_precision": "bf16"}, "bf16"),
    ],
)
def test_precision_hint_from_manifest(target: dict[str, str], expect: str | None) -> None:
    assert precision_hint(TargetInfo.from_dict(target)) == expect


def test_bf16_manifest_is_honoured(ov_bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(ov_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["target"]["precision_used"] = "bf16"
    (copy / "manifest.json").write_text(json.dumps(m))
    with load(copy) as model:
        used = model.describe()["precision_used"]
    import openvino as ov

    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert used == ("bf16" if has_bf16 else "f32")  # OpenVINO falls back to f32 on CPUs without bf16
    assert model.backend is None


def test_damaged_ir_is_one_line(ov_bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(ov_bundle, copy)
    (copy / "model.xml").write_text("<net>broken")
    with pytest.raises(BundleError, match="OpenVINO cannot compile the model") as err:
        load(copy, verify=False)
    assert "\n" not in str(err.value)
