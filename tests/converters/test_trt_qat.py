"""The TensorRT route of a quantization-aware fine-tune, checked on the CPU: the QAT's UINT8 Q/DQ model re-encoded
under TensorRT's explicit-quantization rules (`trt_qdq.for_tensorrt`) and the ready bundle made from it.

The QAT parameters are synthesized the way the fine-tune starts them (`bitdeploy.training.qat`): each activation
quantizer from the float model's observed range over a few random inputs, each weight scale max |w| per output channel
/ 63, on the untrained tiny BiT's 32 px export. Building the engine itself needs TensorRT and an NVIDIA GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bitdeploy.converters import trt_qdq  # noqa: E402
from bitdeploy.converters.base import ConvertOptions, QatModel, bind  # noqa: E402
from bitdeploy.converters.layers import layer_of  # noqa: E402
from bitdeploy.converters.qat_qdq import ConvQuant, QatParams, TensorQuant, write_qdq  # noqa: E402
from bitdeploy.core.errors import BitdeployError, ConversionError  # noqa: E402
from bitdeploy.runtimes.bundle.manifest_records import ENGINE_PENDING  # noqa: E402
from tests.converters.tiny_digits import tiny_export  # noqa: E402

RECORD = {"steps": 0, "source": "synthesized from observed float ranges (test)"}


@dataclass
class Qat:
    fp32: Path
    params: QatParams
    uint8: Path  # write_qdq's model: what every engine reads
    trt: Path  # for_tensorrt's re-encoding of it
    facts: dict[str, Any]
    x: np.ndarray  # evaluation inputs (not the ones the ranges were observed on)


def _quantizer(values: np.ndarray) -> TensorQuant:
    """UINT8 asymmetric over the observed range widened to hold 0 (as `ActQuant.settle` starts a quantizer)."""
    lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    scale = max((hi - lo) / 255, 1e-8)
    return TensorQuant(scale, int(np.clip(round(-lo / scale), 0, 255)))


def _params(fp32: Path, x: np.ndarray, head: bool = False) -> QatParams:
    """Every conv's quantizers (the head's too when `head`) from the float model's ranges on `x`."""
    model = onnx.load(str(fp32))
    convs = [n for n in model.graph.node if n.op_type == "Conv" and (head or not layer_of(n.name).startswith("head"))]
    names = list(dict.fromkeys(t for n in convs for t in (n.input[0], n.output[0])))
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in names)
    observed = dict(zip(names, _session(model.SerializeToString()).run(names, {"input": x})))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for n in convs:
        w = weights[n.input[1]]
        scales = np.maximum(np.abs(w).reshape(len(w), -1).max(1) / 63, 1e-8)
        out[layer_of(n.name)] = ConvQuant(
            _quantizer(observed[n.input[0]]), tuple(map(float, scales)), _quantizer(observed[n.output[0]])
        )
    return QatParams(out, record=RECORD)


def _session(model: Any) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(
        str(model) if isinstance(model, Path) else model, opts, providers=["CPUExecutionProvider"]
    )


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return np.asarray(_session(path).run(None, {"input": x})[0])


def _rms(v: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(v))))


@pytest.fixture(scope="module")
def qat(tmp_path_factory: pytest.TempPathFactory) -> Qat:
    work = tmp_path_factory.mktemp("qat")
    fp32 = tiny_export()
    rng = np.random.default_rng(0)
    params = _params(fp32, rng.uniform(-1, 1, (8, 3, 32, 32)).astype(np.float32))
    write_qdq(fp32, params, work / "qat.onnx")
    facts = trt_qdq.for_tensorrt(work / "qat.onnx", work / "trt.onnx")
    x = rng.uniform(-1, 1, (16, 3, 32, 32)).astype(np.float32)
    return Qat(fp32, params, work / "qat.onnx", work / "trt.onnx", facts, x)


def test_reencoded_model_follows_tensorrt_rules(qat: Qat) -> None:
    model = onnx.load(str(qat.trt))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert not [n for n, v in inits.items() if v.dtype in (np.uint8, np.int32)]  # no UINT8, no INT32 bias
    producers = {o: n for n in model.graph.node for o in n.output}
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantizers) == len(qat.params.convs)  # one per conv input; none on conv outputs
    assert all(producers[q.input[0]].op_type != "Conv" for q in quantizers if q.input[0] in producers)
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any(), n.name
    report = trt_qdq.inspect_qdq(model)  # the default placement: every body conv INT8, the head float
    assert report.violations == []
    assert report.quantized_convs == len(qat.params.convs) and report.float_convs == ["/head/conv/Conv"]
    for conv in (n for n in model.graph.node if n.op_type == "Conv" and layer_of(n.name) in qat.params.convs):
        q = qat.params.convs[layer_of(conv.name)].input  # the scale re-encoded as the docstring says
        z = q.zero_point
        want = np.float32(q.scale) if z == 128 else np.float32(max(z, 255 - z) * float(np.float32(q.scale)) / 127)
        assert inits[producers[conv.input[0]].input[1]] == want, conv.name
    facts = qat.facts
    assert facts["format"] == "qdq" and facts["from"] == "quantization-aware fine-tune"
    assert facts["quantized_convs"] == report.quantized_convs and facts["float_layers"] == ["head.conv"]
    assert facts["norm_groups_in_float"] == report.norm_groups and facts["residual_adds_in_float"] == 4
    zps = [q.input.zero_point for q in qat.params.convs.values()]
    assert facts["reencoded"] == {
        "exact": zps.count(128),
        "rescaled": len(zps) - zps.count(128),
        "conv_output_pairs_removed": len(qat.params.convs),
        "float_biases": 0,
    }
    assert any("one bit of resolution less" in note for note in facts["notes"])


def test_reencoded_logits_stay_close_to_the_qat_models(qat: Qat) -> None:
    """Tolerance: both models quantize the same float model; the re-encoding drops the conv-output rounding and at
    most doubles the input quantizers' step (255/127 x s for z = 0), so its own error from float stays within 2x the
    QAT model's (measured: 0.86x), and by the triangle inequality the two differ by at most 3x the QAT model's error."""
    fp32, uint8, trt = (_run(p, qat.x) for p in (qat.fp32, qat.uint8, qat.trt))
    assert np.isfinite(trt).all()
    qat_error = _rms(uint8 - fp32)
    assert 0 < qat_error < 0.5 * _rms(fp32)  # a quantized model, and one that still tracks the float one
    assert _rms(trt - fp32) <= 2 * qat_error
    assert _rms(trt - uint8) <= 3 * qat_error


def test_reencoding_is_the_same_model_with_widened_zero_point_128_quantizers(qat: Qat, tmp_path: Path) -> None:
    """The oracle: the fine-tune's model without conv-output quantizers and with every input quantizer at zero point
    128 and scale max(z, 255 - z) x s / 127, written in UINT8 by write_qdq, computes what the re-encoding computes."""

    def widened(q: TensorQuant) -> TensorQuant:
        s = float(np.float32(q.scale))
        return TensorQuant(s if q.zero_point == 128 else max(q.zero_point, 255 - q.zero_point) * s / 127, 128)

    convs = {k: ConvQuant(widened(c.input), c.weight_scales, None) for k, c in qat.params.convs.items()}
    write_qdq(qat.fp32, replace(qat.params, convs=convs), tmp_path / "oracle.onnx")
    np.testing.assert_array_equal(_run(qat.trt, qat.x), _run(tmp_path / "oracle.onnx", qat.x))


def test_a_zero_point_128_quantizer_reencodes_exactly(qat: Qat, tmp_path: Path) -> None:
    layer, conv = next(iter(qat.params.convs.items()))  # the stem conv, reading the [-1, 1] image
    params = replace(qat.params, convs={layer: ConvQuant(TensorQuant(2 / 255, 128), conv.weight_scales, None)})
    write_qdq(qat.fp32, params, tmp_path / "qat.onnx")
    facts = trt_qdq.for_tensorrt(tmp_path / "qat.onnx", tmp_path / "trt.onnx")
    assert facts["reencoded"] == {"exact": 1, "rescaled": 0, "conv_output_pairs_removed": 0, "float_biases": 0}
    np.testing.assert_array_equal(_run(tmp_path / "trt.onnx", qat.x), _run(tmp_path / "qat.onnx", qat.x))


def test_a_quantized_head_keeps_its_bias_in_float(qat: Qat, tmp_path: Path) -> None:
    """The head is the one conv with a bias: quantized, write_qdq gives it an INT32 bias DQ; TensorRT gets floats."""
    head = _params(qat.fp32, qat.x[:4], head=True).convs["head.conv"]
    params = replace(qat.params, convs={**qat.params.convs, "head.conv": head})
    write_qdq(qat.fp32, params, tmp_path / "qat.onnx")
    facts = trt_qdq.for_tensorrt(tmp_path / "qat.onnx", tmp_path / "trt.onnx")
    assert facts["reencoded"]["float_biases"] == 1 and facts["float_convs"] == []
    model = onnx.load(str(tmp_path / "trt.onnx"))
    assert trt_qdq.inspect_qdq(model, head_in_float=False).violations == []
    conv = next(n for n in model.graph.node if n.name == "/head/conv/Conv")
    bias = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == conv.input[2])
    fp32 = onnx.load(str(qat.fp32)).graph
    name = next(n.input[2] for n in fp32.node if n.name == "/head/conv/Conv")
    fp32_bias = next(numpy_helper.to_array(i) for i in fp32.initializer if i.name == name)
    step = np.float32(head.input.scale) * np.asarray(head.weight_scales, np.float32)
    assert bias.dtype == np.float32 and np.all(np.abs(bias - fp32_bias) <= step / 2 + 1e-7)  # INT32 rounding only
    assert np.isfinite(_run(tmp_path / "trt.onnx", qat.x)).all()


def test_a_model_tensorrt_cannot_take_is_refused_in_one_line(qat: Qat, tmp_path: Path) -> None:
    model = onnx.load(str(qat.uint8))
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    next(i for i in model.graph.initializer if i.name == q.input[1]).CopyFrom(
        numpy_helper.from_array(np.array([0.1, 0.2], np.float32), q.input[1])
    )
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(ConversionError, match=r"is not a per-tensor 8-bit quantizer; write the QAT model") as err:
        trt_qdq.for_tensorrt(tmp_path / "bad.onnx", tmp_path / "trt.onnx")
    assert "\n" not in str(err.value) and not (tmp_path / "trt.onnx").exists()


def _qat_model(qat: Qat, tmp_path: Path) -> QatModel:
    return QatModel(qat.uint8, qat.fp32, qat.params.save(tmp_path / "qat_params.json"))


def test_from_qat_writes_a_ready_bundle_with_the_engine_pending(qat: Qat, tmp_path: Path) -> None:
    converter = bind("trt", "int8", ConvertOptions(ready_only=True))
    assert converter.takes_qat and not bind("trt", "fp16").takes_qat
    work = tmp_path / "bundle"
    work.mkdir()
    artifact = converter.from_qat(_qat_model(qat, tmp_path), work)
    assert artifact.model_file == artifact.eval_model_file == trt_qdq.ONNX_NAME == "model.trt.onnx"
    assert artifact.files == [trt_qdq.ONNX_NAME] and sorted(p.name for p in work.iterdir()) == [trt_qdq.ONNX_NAME]
    assert (work / trt_qdq.ONNX_NAME).read_bytes() == qat.trt.read_bytes()
    target = artifact.target
    assert target.backend == "tensorrt" and target.precision == "int8"
    assert target.precision_used == "int8 (engine pending)" and target.details["engine"]["status"] == ENGINE_PENDING
    assert target.details["onnx"]["reencoded"] == qat.facts["reencoded"] and target.quantization is not None
    assert target.quantization.details["qat"] == RECORD
    assert target.quantization.details["from"] == "quantization-aware fine-tune"
    assert artifact.notes[0].startswith("engine pending") and artifact.notes[1:] == qat.facts["notes"]
    with pytest.raises(ConversionError, match=r"makes INT8 bundles, not fp16; build it with --precision int8"):
        bind("trt", "fp16", ConvertOptions(ready_only=True)).from_qat(_qat_model(qat, tmp_path), tmp_path)


@pytest.mark.tensorrt
def test_from_qat_builds_an_int8_engine(qat: Qat, tmp_path: Path) -> None:
    from bitdeploy.converters import trt_engine

    try:
        trt_engine.check_available()
    except BitdeployError as exc:
        pytest.skip(f"no TensorRT/GPU here, the engine build needs both ({exc})")
    artifact = bind("trt", "int8", ConvertOptions(cache=False)).from_qat(_qat_model(qat, tmp_path), tmp_path)
    assert artifact.model_file == trt_engine.PLAN and (tmp_path / trt_engine.PLAN).stat().st_size > 0
    assert "int8" in (artifact.target.precision_used or "") and artifact.target.details["engine"]["status"] == "built"
    assert artifact.target.quantization is not None and artifact.target.quantization.details["qat"] == RECORD
