"""ONNX Runtime INT8 (QDQ) and FP16 transforms on a tiny BiT export: placement, dtypes, numerics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitdeploy.converters.base import ConvertOptions, bind
from bitdeploy.converters.calibration import CalibrationData, digest
from bitdeploy.converters.ort_convert import OrtOptions
from bitdeploy.core.errors import ConversionError

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
RES = 32


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bitdeploy.converters.onnx_export import export_onnx
    from bitdeploy.core.catalog import get_variant
    from bitdeploy.training.bit import create_model

    torch.manual_seed(0)
    model = create_model(get_variant("tiny"), 10).eval()
    with torch.no_grad():  # non-trivial GroupNorm affine so the Mul/Add survive simplification
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    export_onnx(model, RES, path)
    return path


@pytest.fixture(scope="module")
def calib() -> CalibrationData:
    x = np.random.default_rng(0).uniform(-1, 1, (16, 3, RES, RES)).astype(np.float32)
    return CalibrationData(x, "random (test only)", 0, digest(x))


def run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


def test_int8_quantizes_conv_only_with_per_channel_symmetric_weights(
    tmp_path: Path, export: Path, calib: CalibrationData
) -> None:
    from bitdeploy.converters.ort_quant import QdqOptions, quantize_qdq

    out = tmp_path / "int8.onnx"
    info = quantize_qdq(export, out, calib, QdqOptions(activation_type="uint8", reduce_range=True))  # the x86 default
    m = onnx.load(str(out))
    onnx.checker.check_model(m)
    producers = {o: n for n in m.graph.node for o in n.output}
    values = inits(m)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert info["quantized_nodes"] == len(convs) > 0
    for conv in convs:
        x_dq, w_dq = producers[conv.input[0]], producers[conv.input[1]]
        assert x_dq.op_type == "DequantizeLinear" and w_dq.op_type == "DequantizeLinear"
        w_q, w_scale, w_zp = values[w_dq.input[0]], values[w_dq.input[1]], values[w_dq.input[2]]
        assert w_q.dtype == np.int8 and w_scale.shape == (w_q.shape[0],)  # per output channel
        assert not w_zp.any()  # symmetric
        assert int(np.abs(w_q.astype(np.int32)).max()) <= 64  # 7-bit: u8 x s8 pair sums fit int16 without VNNI
        assert values[x_dq.input[2]].dtype == np.uint8
    # Normalisations and the residual stream stay float: no QuantizeLinear reads an Add or norm output.
    quantized_tensors = {n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear"}
    for n in m.graph.node:
        if n.op_type in ("InstanceNormalization", "Add"):
            assert not set(n.output) & quantized_tensors, n.name
    assert "InstanceNormalization" in info["float_op_types"]
    x = np.random.default_rng(1).uniform(-1, 1, (4, 3, RES, RES)).astype(np.float32)
    ref, got = run(export, x), run(out, x)
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.98


@pytest.mark.parametrize(
    ("scheme", "activation", "weight_max"), [("auto", np.uint8, 64), ("u8s8", np.uint8, 127), ("s8s8", np.int8, 127)]
)
def test_int8_scheme_is_recorded(
    tmp_path: Path, export: Path, calib: CalibrationData, scheme: str, activation: Any, weight_max: int
) -> None:
    import platform

    if scheme == "auto" and platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("auto picks u8s8-7bit on x86 only")
    art = bind("onnx", "int8", ConvertOptions(extras=OrtOptions(int8_scheme=scheme))).convert(export, tmp_path, calib)
    q = art.target.to_dict()["quantization"]
    assert q["scheme"] == ("u8s8-7bit" if scheme == "auto" else scheme) and q["scheme_reason"]
    assert q["scheme"].upper() in (art.target.precision_used or "")
    values = inits(onnx.load(str(tmp_path / "model.onnx")))
    weights = [v for v in values.values() if v.dtype == np.int8 and v.ndim == 4]
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == weight_max
    assert any(v.dtype == activation and v.ndim == 0 for v in values.values())  # activation zero points
    with pytest.raises(ConversionError, match="not an ONNX Runtime INT8 scheme"):
        bind("onnx", "int8", ConvertOptions(extras=OrtOptions(int8_scheme="u4s4"))).convert(
            export, tmp_path / "x", calib
        )


def test_tensorrt_flavour_is_s8s8_zero_point_zero_and_head_excluded(
    tmp_path: Path, export: Path, calib: CalibrationData
) -> None:
    from bitdeploy.converters.ort_quant import QdqOptions, head_conv_names, quantize_qdq

    out = tmp_path / "trt.onnx"
    info = quantize_qdq(
        export,
        out,
        calib,
        QdqOptions(
            symmetric_activations=True,
            activation_type="int8",
            quantize_outputs=False,
            exclude_head=True,
            quantize_bias=False,
            method="percentile",
        ),
    )
    m = onnx.load(str(out))
    values = inits(m)
    head = head_conv_names(onnx.load(str(export)))
    assert len(head) == 1 and info["excluded_nodes"] == head
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) == 3 and n.input[2] in values:
            zp = values[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any()
    producers = {o: n for n in m.graph.node for o in n.output}
    quantized_tensors = {n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear"}
    for n in m.graph.node:  # TensorRT: Q/DQ on conv inputs only, the GroupNorm reads a float conv output
        if n.op_type == "Conv":
            assert n.output[0] not in quantized_tensors, n.name
    head_node = next(n for n in m.graph.node if n.name == head[0])
    assert producers.get(head_node.input[1]) is None  # float weight initializer
    assert info["method"] == "percentile" and info["bias"] == "float"


def test_quantize_outputs_false_overrides_nothing_else(tmp_path: Path, export: Path, calib: CalibrationData) -> None:
    """No hidden TensorRT flavour: uint8 asymmetric activations stay as asked when conv outputs stay float."""
    from bitdeploy.converters.ort_quant import QdqOptions, quantize_qdq

    out = tmp_path / "u8.onnx"
    info = quantize_qdq(
        export, out, calib, QdqOptions(activation_type="uint8", symmetric_activations=False, quantize_outputs=False)
    )
    m = onnx.load(str(out))
    values = inits(m)
    zps = [
        values[n.input[2]]
        for n in m.graph.node
        if n.op_type == "QuantizeLinear" and len(n.input) == 3 and n.input[2] in values
    ]
    assert zps and all(z.dtype == np.uint8 for z in zps)
    assert info["activations"] == "uint8, per-tensor, asymmetric"
    quantized_tensors = {n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear"}
    assert not any(n.output[0] in quantized_tensors for n in m.graph.node if n.op_type == "Conv")


def test_int8_refuses_missing_calibration_and_unknown_method(
    tmp_path: Path, export: Path, calib: CalibrationData
) -> None:
    from bitdeploy.converters.ort_quant import QdqOptions, quantize_qdq

    with pytest.raises(ConversionError, match="calibration"):
        quantize_qdq(export, tmp_path / "a.onnx", None)  # type: ignore[arg-type]
    with pytest.raises(ConversionError, match="--calib-method"):
        quantize_qdq(export, tmp_path / "a.onnx", calib, QdqOptions(method="histogram"))
    assert not (tmp_path / "a.onnx").exists()


def test_fp16_keeps_norms_in_fp32_and_float32_io(tmp_path: Path, export: Path) -> None:
    from bitdeploy.converters.ort_quant import convert_fp16

    out = tmp_path / "fp16.onnx"
    info = convert_fp16(export, out)
    m = onnx.load(str(out))
    onnx.checker.check_model(m)  # includes topological order
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    conv_w = [i for i in m.graph.initializer if any(n.op_type == "Conv" and i.name == n.input[1] for n in m.graph.node)]
    assert conv_w and all(i.data_type == onnx.TensorProto.FLOAT16 for i in conv_w)
    producers = {o: n for n in m.graph.node for o in n.output}
    norms = [n for n in m.graph.node if n.op_type == "InstanceNormalization"]
    assert norms and info["kept_fp32_nodes"] == len(norms)
    for n in norms:
        src = producers[n.input[0]]
        assert src.op_type == "Cast" and src.attribute[0].i == onnx.TensorProto.FLOAT
    x = np.random.default_rng(1).uniform(-1, 1, (4, 3, RES, RES)).astype(np.float32)
    ref, got = run(export, x), run(out, x)
    assert got.dtype == np.float32
    assert np.abs(ref - got).max() <= 2e-2 * max(1.0, np.abs(ref).max())


def test_ort_converter_artifacts(tmp_path: Path, export: Path, calib: CalibrationData) -> None:
    for precision in ("fp32", "fp16", "int8"):
        work = tmp_path / precision
        work.mkdir()
        art = bind("onnx", precision, ConvertOptions(device="cpu")).convert(
            export, work, calib if precision == "int8" else None
        )
        assert art.backend == "onnxruntime" and art.model_file == "model.onnx" and (work / "model.onnx").is_file()
        assert art.target.precision == precision and art.target.precision_used
    with pytest.raises(ConversionError, match="--dataset"):
        bind("onnx", "int8", ConvertOptions()).convert(export, tmp_path)
    with pytest.raises(ConversionError, match="--device"):
        bind("onnx", "fp32", ConvertOptions(device="NPU")).convert(export, tmp_path)
