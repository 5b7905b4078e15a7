"""The TensorRT-ready ONNX, checked on the CPU: Q/DQ placement rules and the accuracy gate in ONNX Runtime.

"No Q/DQ around normalisations" means, for every GroupNorm decomposition (Reshape -> InstanceNormalization ->
Reshape -> Mul -> Add): none of its nodes reads a DequantizeLinear output and none feeds a QuantizeLinear.
Q/DQ sit on the convolutions' inputs (after GN+ReLU) and weights only; residual Adds and the head stay float.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import helper, numpy_helper  # noqa: E402

from bitdeploy.converters import calibration as calib_mod  # noqa: E402
from bitdeploy.converters import ort_quant, trt_qdq  # noqa: E402
from bitdeploy.converters.base import ConvertOptions  # noqa: E402
from bitdeploy.core.errors import ConversionError  # noqa: E402
from tests.converters.tiny_digits import TinyDigits  # noqa: E402


@pytest.fixture(scope="module")
def qdq(
    tiny: TinyDigits, calibration: calib_mod.CalibrationData, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    work = tmp_path_factory.mktemp("qdq")
    name, info = trt_qdq.prepare_onnx(tiny.onnx, work, "int8", calibration, ConvertOptions())
    return work / name, info


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[i : i + 64]})[0] for i in range(0, len(x), 64)])


def _inits(model: Any) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_qdq_placement_follows_tensorrt_rules(qdq: tuple[Path, dict[str, Any]], tiny: TinyDigits) -> None:
    path, info = qdq
    model = onnx.load(str(path))
    report = trt_qdq.inspect_qdq(model)
    assert report.violations == []
    fp32 = onnx.load(str(tiny.onnx))
    convs = [n for n in fp32.graph.node if n.op_type == "Conv"]
    norms = [n for n in fp32.graph.node if n.op_type == "InstanceNormalization"]
    assert report.quantized_convs == len(convs) - 1 and len(report.float_convs) == 1  # all but the head
    assert report.norm_groups == len(norms) and report.residual_adds == 4  # tiny: one unit per block
    assert info["quantized_convs"] == report.quantized_convs and info["format"] == "qdq"

    inits = _inits(model)
    qdq_nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq_nodes
    for n in qdq_nodes:  # zero zero-points, signed INT8 everywhere (TensorRT's requirement)
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any()
    producers = {o: n for n in model.graph.node for o in n.output}
    for conv in model.graph.node:
        if conv.op_type != "Conv" or conv.name in report.float_convs:
            continue
        wdq = producers[conv.input[1]]
        assert wdq.op_type == "DequantizeLinear"
        weight, scale = inits[wdq.input[0]], inits[wdq.input[1]]
        axis = next((a.i for a in wdq.attribute if a.name == "axis"), 1)
        assert (
            weight.dtype == np.int8 and axis == 0 and scale.shape == (weight.shape[0],)
        )  # one scale per output channel
        xdq = producers[conv.input[0]]
        assert xdq.op_type == "DequantizeLinear" and inits[xdq.input[1]].size == 1  # per-tensor activation, symmetric
    for group in trt_qdq.norm_groups(model.graph):
        assert [n.op_type for n in group] == list(trt_qdq.GN_CHAIN)
        for node in group:
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)
    # Bias stays float: TensorRT fuses it; no INT32 bias DequantizeLinear.
    assert all(
        inits[n.input[0]].dtype == np.int8
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
    )


def test_qdq_onnx_passes_the_accuracy_gate_in_onnxruntime(qdq: tuple[Path, dict[str, Any]], tiny: TinyDigits) -> None:
    path, _ = qdq
    logits = _run(path, tiny.val_x)
    top1 = float((logits.argmax(1) == tiny.val_y).mean())
    assert tiny.reference_top1 >= 0.8  # a trained model, or the gate means nothing
    assert top1 >= tiny.reference_top1 - 0.01, (top1, tiny.reference_top1)
    assert float((logits.argmax(1) == tiny.reference_logits.argmax(1)).mean()) >= 0.97


def _rewrite(path: Path, out: Path, edit: Any) -> Any:
    model = onnx.load(str(path))
    edit(model)
    onnx.save(model, str(out))
    return model


def test_inspector_catches_asymmetric_and_per_tensor_quantization(
    tiny: TinyDigits, calibration: calib_mod.CalibrationData, tmp_path: Path
) -> None:
    trt_like = dict(symmetric_activations=True, activation_type="int8", quantize_outputs=False, quantize_bias=False)
    cases = [
        (
            "asym",
            dict(activation_type="uint8", symmetric_activations=False, exclude_head=True),
            "zero point must be int8 0",
        ),
        ("pt", dict(trt_like, per_channel=False, exclude_head=True), "not per output channel on axis 0"),
        ("head", dict(trt_like, exclude_head=False), "classifier head is quantized"),
    ]
    for name, options, violation in cases:
        path = tmp_path / f"{name}.onnx"
        ort_quant.quantize_qdq(tiny.onnx, path, calibration, ort_quant.QdqOptions(**options))
        v = trt_qdq.inspect_qdq(onnx.load(str(path))).violations
        assert any(violation in m for m in v), (name, v)


def test_inspector_catches_qdq_around_a_norm_and_a_residual_add(
    qdq: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, _ = qdq

    def wrap(model: Any, node: Any, index: int) -> None:
        """Put a Q/DQ pair on input `index` of `node` (as a quantizer that ignored the rules would)."""
        g = model.graph
        src = node.input[index]
        g.initializer.extend(
            [
                numpy_helper.from_array(np.array(0.05, np.float32), f"{src}_s"),
                numpy_helper.from_array(np.array(0, np.int8), f"{src}_z"),
            ]
        )
        q = helper.make_node("QuantizeLinear", [src, f"{src}_s", f"{src}_z"], [f"{src}_q"], name=f"{src}_Q")
        dq = helper.make_node("DequantizeLinear", [f"{src}_q", f"{src}_s", f"{src}_z"], [f"{src}_dq"], name=f"{src}_DQ")
        node.input[index] = f"{src}_dq"
        g.node.extend([q, dq])

    def around_norm(model: Any) -> None:
        norm = next(n for n in model.graph.node if n.op_type == "InstanceNormalization")
        wrap(model, norm, 0)

    m = _rewrite(path, tmp_path / "norm.onnx", around_norm)
    assert any("GroupNorm): reads a DequantizeLinear output" in v for v in trt_qdq.inspect_qdq(m).violations)

    def on_residual(model: Any) -> None:
        groups = {n.output[0] for g in trt_qdq.norm_groups(model.graph) for n in g}
        consts = {i.name for i in model.graph.initializer}
        add = next(
            n
            for n in model.graph.node
            if n.op_type == "Add" and n.output[0] not in groups and not consts.intersection(n.input)
        )
        wrap(model, add, 0)

    m = _rewrite(path, tmp_path / "add.onnx", on_residual)
    assert any("residual Add has Q/DQ on it" in v for v in trt_qdq.inspect_qdq(m).violations)


def test_fp16_onnx_keeps_norms_fp32_and_io_fp32(tiny: TinyDigits, tmp_path: Path) -> None:
    name, info = trt_qdq.prepare_onnx(tiny.onnx, tmp_path, "fp16", None, ConvertOptions())
    model = onnx.load(str(tmp_path / name))
    assert info["format"] == "fp16-casts"
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in [*model.graph.input, *model.graph.output]}
    assert set(elem.values()) == {onnx.TensorProto.FLOAT}
    inits = _inits(model)
    conv_weights = [inits[n.input[1]] for n in model.graph.node if n.op_type == "Conv"]
    assert conv_weights and all(w.dtype == np.float16 for w in conv_weights)
    model = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*model.graph.value_info, *model.graph.input]}
    types.update({k: onnx.helper.np_dtype_to_tensor_dtype(v.dtype) for k, v in inits.items()})
    for n in model.graph.node:
        if n.op_type == "InstanceNormalization":  # statistics computed in FP32
            assert all(types.get(i) == onnx.TensorProto.FLOAT for i in n.input)
    logits = _run(tmp_path / name, tiny.val_x)
    top1 = float((logits.argmax(1) == tiny.val_y).mean())
    assert tiny.reference_top1 - top1 <= 0.002


def test_fp32_is_copied_and_int8_needs_calibration(tiny: TinyDigits, tmp_path: Path) -> None:
    name, info = trt_qdq.prepare_onnx(tiny.onnx, tmp_path, "fp32", None, ConvertOptions())
    assert (tmp_path / name).read_bytes() == tiny.onnx.read_bytes() and info["format"] == "fp32"
    with pytest.raises(ConversionError, match=r"int8 needs calibration images; pass --dataset"):
        trt_qdq.prepare_onnx(tiny.onnx, tmp_path / "x", "int8", None, ConvertOptions())


def test_searched_float_layers_stay_float_in_the_tensorrt_onnx(
    tiny: TinyDigits, calibration: calib_mod.CalibrationData, tmp_path: Path
) -> None:
    """The INT8 search's float layers reach TensorRT as Q/DQ placement: those convs get no Q/DQ, the rules hold."""
    keep = ("body.block1.unit01.conv2", "body.block3.unit01.downsample")
    name, info = trt_qdq.prepare_onnx(tiny.onnx, tmp_path, "int8", calibration, ConvertOptions(), keep)
    model = onnx.load(str(tmp_path / name))
    report = trt_qdq.inspect_qdq(model, float_layers=keep)
    assert report.violations == []
    assert len(trt_qdq.inspect_qdq(model).violations) == 2  # unasked-for float convs are still caught
    assert sorted(report.float_convs) == sorted(
        ["/head/conv/Conv", "/body/block1/unit01/conv2/Conv", "/body/block3/unit01/downsample/Conv"]
    )
    assert set(keep) <= set(info["float_layers"]) and "head.conv" in info["float_layers"]
