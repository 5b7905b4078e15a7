"""The smallest bundles a runtime loads: a linear classifier (Flatten, MatMul, MatMul) as ONNX, 32 px, 10 classes.

Built with `onnx.helper`, no torch; `hidden` sets the model's size (3072 x hidden float32 weights: 8 -> 0.1 MB,
4096 -> 50 MB) and makes each bundle's checksums distinct.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitdeploy.runtimes.bundle import bundle_writer, write_manifest
from bitdeploy.runtimes.bundle.manifest import TargetInfo
from tests.runtimes.conftest import RES, make_manifest


def linear_onnx(path: Path, hidden: int) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(hidden)
    w1 = rng.standard_normal((3 * RES * RES, hidden), dtype=np.float32) * 0.01
    w2 = rng.standard_normal((hidden, 10), dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w1"], ["hidden"]),
            helper.make_node("MatMul", ["hidden", "w2"], ["logits"]),
        ],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, RES, RES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime bitdeploy supports
    onnx.save(model, str(path))
    return path


def linear_bundle(out: Path, hidden: int = 8, precision: str = "fp32", **changes: Any) -> Path:
    """An ONNX Runtime bundle of `linear_onnx` at `out` (`changes`: manifest fields, e.g. valid=False)."""
    pytest.importorskip("onnxruntime")
    out.parent.mkdir(parents=True, exist_ok=True)
    with bundle_writer(out) as tmp:
        linear_onnx(tmp / "model.onnx", hidden)
        target = TargetInfo("onnxruntime", precision, precision, "cpu")
        write_manifest(
            tmp, make_manifest("onnxruntime", "model.onnx", "cpu", "fp32", target=target, **changes), ["model.onnx"]
        )
    return out
