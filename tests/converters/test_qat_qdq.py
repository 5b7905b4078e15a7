"""The Q/DQ ONNX of a quantization-aware fine-tune (`bitdeploy.converters.qat_qdq`): what `write_qdq` writes into the
folded FP32 export, that ONNX Runtime and OpenVINO compute the fine-tune's own fake quantization
(`bitdeploy.training.qat`) from it, and the one-line refusals of parameters that do not fit.

The structure is checked on the untrained tiny export with synthesized parameters; the engines on a random-init tiny
BiT prepared and calibrated by `training.qat` itself (its float weights exported, its `params` written in), against
that PyTorch model's logits.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from onnx import helper, numpy_helper  # noqa: E402

from bitdeploy.converters.layers import layer_of  # noqa: E402
from bitdeploy.converters.qat_qdq import (  # noqa: E402
    PARAMS_FILE,
    WEIGHT_QMAX,
    ConvQuant,
    QatParams,
    TensorQuant,
    describe,
    write_qdq,
)
from bitdeploy.core.errors import ConversionError  # noqa: E402
from tests.converters.tiny_digits import RESOLUTION, tiny_export  # noqa: E402

CONVS = 17  # tiny: the stem conv and 4 units x (conv1, conv2, conv3, downsample); the head stays float


def _inits(model: Any) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _synthesized(fp32: Path) -> QatParams:
    """Fixed activation quantizers (zero point 128 on the image, 0 on the post-ReLU body inputs, 128 on the signed
    outputs) and weight scales max |w| / 63 per output channel, as the fine-tune's start would have them."""
    model = onnx.load(str(fp32))
    inits = _inits(model)
    convs = {}
    for n in model.graph.node:
        layer = layer_of(n.name)
        if n.op_type != "Conv" or layer.startswith("head"):
            continue
        w = inits[n.input[1]]
        scales = np.abs(w).reshape(len(w), -1).max(1) / WEIGHT_QMAX
        stem = layer == "root.conv"
        convs[layer] = ConvQuant(
            TensorQuant(2 / 255 if stem else 0.02, 128 if stem else 0),
            tuple(map(float, scales)),
            TensorQuant(0.05, 128),
        )
    return QatParams(convs, record={"steps": 0, "calibrated_images": 0, "source": "synthesized (test)"})


@dataclass
class Written:
    fp32: Path
    params: QatParams
    qdq: Path
    facts: dict[str, Any]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Written:
    work = tmp_path_factory.mktemp("qdq")
    fp32 = tiny_export()
    params = _synthesized(fp32)
    facts = write_qdq(fp32, params, work / "qat.onnx")
    return Written(fp32, params, work / "qat.onnx", facts)


@dataclass
class Simulated:
    qdq: Path
    inputs: dict[str, np.ndarray]  # "random": uniform in [-1, 1]; "digits": 8-bit images as the runtime feeds them
    sim: dict[str, np.ndarray]  # the prepared, calibrated PyTorch model's logits: the fine-tune's fake quantization
    float_logits: dict[str, np.ndarray]  # the same model without quantization


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> Simulated:
    from bitdeploy.converters.onnx_export import export_onnx
    from bitdeploy.core.catalog import get_variant
    from bitdeploy.training import qat
    from bitdeploy.training.bit import create_model
    from bitdeploy.training.data import eval_batch
    from bitdeploy.training.datasets import load_dataset

    work = tmp_path_factory.mktemp("sim")
    digits = load_dataset("digits")
    inputs = {
        "random": np.random.default_rng(1).uniform(-1, 1, (128, 3, RESOLUTION, RESOLUTION)).astype(np.float32),
        "digits": eval_batch(digits.val, RESOLUTION, range(128))[0],
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        float_model = create_model(get_variant("tiny"), num_classes=10).eval()
        student = qat.prepare(copy.deepcopy(float_model))
        qat.calibrate(student, qat.calibration_batches(digits.train, RESOLUTION, 0, "cpu"))
        export_onnx(float_model, RESOLUTION, work / "fp32.onnx")  # the float weights: what a fine-tune exports
        write_qdq(work / "fp32.onnx", qat.params(student, {}), work / "qat.onnx")
        student.eval()
        with torch.no_grad():
            sim = {k: student(torch.from_numpy(x)).numpy() for k, x in inputs.items()}
            float_logits = {k: float_model(torch.from_numpy(x)).numpy() for k, x in inputs.items()}
    finally:
        torch.set_num_threads(threads)
    return Simulated(work / "qat.onnx", inputs, sim, float_logits)


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": x})[0])


def _openvino(path: Path, x: np.ndarray) -> np.ndarray:
    ov = pytest.importorskip("openvino")
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled(x)[0])


def _rms(v: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(v, dtype=np.float64))))


# --- what write_qdq writes ----------------------------------------------------------------------------


def test_every_body_conv_gets_its_quantizers_and_the_head_stays_float(written: Written, tmp_path: Path) -> None:
    model = onnx.load(str(written.qdq))
    onnx.checker.check_model(model, full_check=True)
    fp32 = onnx.load(str(written.fp32))
    fp32_inits, inits = _inits(fp32), _inits(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    fp32_convs = {layer_of(n.name): n for n in fp32.graph.node if n.op_type == "Conv"}
    convs = {layer_of(n.name): n for n in model.graph.node if n.op_type == "Conv"}
    assert set(convs) == set(fp32_convs) == {*written.params.convs, "head.conv"} and len(written.params.convs) == CONVS
    for layer, q in written.params.convs.items():
        conv, before = convs[layer], fp32_convs[layer]
        # input: QuantizeLinear -> DequantizeLinear (uint8, the fine-tune's scale and zero point) of the same tensor
        dq = producers[conv.input[0]]
        qn = producers[dq.input[0]]
        assert (qn.op_type, dq.op_type, qn.input[0]) == ("QuantizeLinear", "DequantizeLinear", before.input[0])
        assert list(qn.input[1:]) == list(dq.input[1:])
        zp, scale = inits[qn.input[2]], inits[qn.input[1]]
        assert zp.dtype == np.uint8 and int(zp) == q.input.zero_point and scale == np.float32(q.input.scale)
        # weights: an INT8 initializer, 7-bit, per output channel (axis 0), zero points 0
        wdq = producers[conv.input[1]]
        assert wdq.op_type == "DequantizeLinear" and helper.get_attribute_value(wdq.attribute[0]) == 0
        assert wdq.attribute[0].name == "axis"
        wq, ws, wz = (inits[i] for i in wdq.input)
        w = fp32_inits[before.input[1]]
        assert wq.dtype == np.int8 and wq.shape == w.shape and np.abs(wq.astype(int)).max() <= WEIGHT_QMAX
        assert np.all(np.abs(wq.astype(int)).reshape(len(w), -1).max(1) == WEIGHT_QMAX)  # max |w| on the last level
        np.testing.assert_array_equal(ws, np.asarray(q.weight_scales, np.float32))
        assert wz.dtype == np.int8 and wz.shape == ws.shape == (w.shape[0],) and not wz.any()
        step = ws.reshape(-1, 1, 1, 1)
        assert np.all(np.abs(wq * step - w) <= step / 2 * (1 + 1e-5))
        assert len(conv.input) == 2  # the body convs have no bias
        # output: its only reader is a uint8 QuantizeLinear -> DequantizeLinear, which the old readers now read
        (oq,) = consumers[conv.output[0]]
        (odq,) = consumers[oq.output[0]]
        assert (oq.op_type, odq.op_type) == ("QuantizeLinear", "DequantizeLinear")
        assert q.output is not None and inits[oq.input[2]].dtype == np.uint8
        assert int(inits[oq.input[2]]) == q.output.zero_point and inits[oq.input[1]] == np.float32(q.output.scale)
        readers = {n.name for n in fp32.graph.node if before.output[0] in n.input}
        assert readers and readers == {n.name for n in consumers[odq.output[0]]}
    head = convs["head.conv"]
    assert producers[head.input[0]].op_type != "DequantizeLinear"
    assert all(inits[i].dtype == np.float32 for i in head.input[1:])
    ops = [n.op_type for n in model.graph.node]
    assert (ops.count("QuantizeLinear"), ops.count("DequantizeLinear")) == (2 * CONVS, 3 * CONVS)
    assert not [
        n for n, v in inits.items() if v.dtype == np.float32 and v.ndim == 4 and n in fp32_inits and n != head.input[1]
    ]
    facts = written.facts
    assert (facts["format"], facts["method"], facts["quantized_nodes"], facts["float_layers"]) == (
        "QDQ",
        "qat",
        CONVS,
        ["head.conv"],
    )
    assert facts["weights"].startswith("int8 7-bit") and facts["qat"] == dict(written.params.record)
    assert describe(written.qdq, written.params.save(tmp_path / PARAMS_FILE)) == facts


# --- the engines compute the fine-tune's fake quantization ---------------------------------------------


def _check_close(engine: np.ndarray, simulated: Simulated, inputs: str, what: str) -> None:
    """Tolerance. The engines run the arithmetic the PyTorch simulation runs, but accumulate in another order (and
    in integers where they fuse Q -> Conv -> Q): an element within float rounding of a rounding boundary lands one
    quantization step apart, and 51 quantizers in 13 layers carry such one-step flips on to the logits. How large that
    is, is measured without any engine: the simulation itself with the unfused standardisation (weights equal to
    ~5e-7) departs from itself by ~6 % of the quantization's own effect (|float - simulation|, rms), ONNX Runtime by
    8-13 %, OpenVINO 15-25 % (4 seeds). So: rms(engine - sim) <= 0.35 rms(float - sim), top-1 shared with the
    simulation on >= 95 % of images (the float model: 73-90 %), no logit further than 10 % of the logit range. An
    engine that drops, misplaces or misreads a quantizer (sign of a zero point, a per-tensor weight scale) lands
    about as far from the simulation as the float model does."""
    sim, float_logits = simulated.sim[inputs], simulated.float_logits[inputs]
    quantization = _rms(float_logits - sim)
    ratio = _rms(engine - sim) / quantization
    worst = float(np.abs(engine - sim).max())
    top1 = float((engine.argmax(1) == sim.argmax(1)).mean())
    figures = f"{what} on {inputs} images: rms ratio {ratio:.3f}, max |diff| {worst:.4f}, top-1 shared {top1:.3f}"
    assert np.isfinite(engine).all() and quantization > 1e-3, figures
    assert ratio <= 0.35 and top1 >= 0.95, figures
    assert worst <= 0.1 * float(np.ptp(sim)), figures


@pytest.mark.parametrize("inputs", ["random", "digits"])
def test_onnxruntime_computes_the_fine_tunes_fake_quantization(inputs: str, simulated: Simulated) -> None:
    _check_close(_ort(simulated.qdq, simulated.inputs[inputs]), simulated, inputs, "onnxruntime")


def test_openvino_computes_the_fine_tunes_fake_quantization(simulated: Simulated) -> None:
    _check_close(_openvino(simulated.qdq, simulated.inputs["random"]), simulated, "random", "openvino")


def test_openvino_computes_the_fine_tunes_fake_quantization_on_8_bit_images(simulated: Simulated) -> None:
    """The stem's grid keeps every 8-bit pixel off a rounding tie (`ActQuant.fix_for_pixels`): with the calibrated
    2/255 grid every pixel sat on one, and OpenVINO rounded a third of them the other way (rms ratio ~1.0)."""
    _check_close(_openvino(simulated.qdq, simulated.inputs["digits"]), simulated, "digits", "openvino")


# --- bad input ----------------------------------------------------------------------------------------


def test_parameters_of_another_model_are_refused_in_one_line(written: Written, tmp_path: Path) -> None:
    stray = ConvQuant(TensorQuant(0.02, 0), (0.01,) * 8, TensorQuant(0.05, 128))
    params = replace(written.params, convs={**written.params.convs, "body.block9.unit01.conv1": stray})
    with pytest.raises(ConversionError, match=r"does not have \(first: body\.block9\.unit01\.conv1\)") as err:
        write_qdq(written.fp32, params, tmp_path / "out.onnx")
    assert "run the fine-tune again on this one" in str(err.value) and "\n" not in str(err.value)
    stem = written.params.convs["root.conv"]
    params = replace(written.params, convs={"root.conv": replace(stem, weight_scales=stem.weight_scales[:-1])})
    with pytest.raises(
        ConversionError, match=r"root\.conv: 31 weight scales for 32 output channels; run the fine-tune"
    ):
        write_qdq(written.fp32, params, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(
    "text",
    ["{not json", '{"convs": {"root.conv": {"input": {"scale": 0.1}}}}', '{"scheme": "x"}', "[1, 2]", ""],
    ids=["corrupt", "truncated-entry", "no-convs", "not-an-object", "empty"],
)
def test_a_broken_parameter_file_is_a_one_line_error(text: str, tmp_path: Path) -> None:
    path = tmp_path / PARAMS_FILE
    path.write_text(text)
    with pytest.raises(
        ConversionError, match=r"is not a bitdeploy QAT parameter file .*`bitdeploy train --qat`"
    ) as err:
        QatParams.load(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    with pytest.raises(ConversionError, match="is not a bitdeploy QAT parameter file"):
        QatParams.load(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("scale", "zero_point"), [(0.0, 0), (float("nan"), 0), (-0.1, 0), (float("inf"), 0), (0.1, 256), (0.1, -1)]
)
def test_an_invalid_activation_quantizer_is_refused(scale: float, zero_point: int, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"invalid quantizer"):
        TensorQuant(scale, zero_point)
    entry = {"input": {"scale": scale, "zero_point": zero_point}, "weight_scales": [0.01], "output": None}
    path = tmp_path / PARAMS_FILE
    path.write_text(json.dumps({"convs": {"root.conv": entry}}))  # json writes nan/inf as NaN/Infinity, and reads them
    with pytest.raises(ConversionError) as err:
        QatParams.load(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("scales", [(0.0, 0.01), (float("nan"), 0.01), (0.01, -0.01), (float("inf"),), ()])
def test_invalid_weight_scales_are_refused(scales: tuple[float, ...], written: Written, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"invalid weight scales"):
        ConvQuant(TensorQuant(0.02, 0), scales)
    path = tmp_path / PARAMS_FILE
    entry = {"input": {"scale": 0.02, "zero_point": 0}, "weight_scales": list(scales)}
    path.write_text(json.dumps({"convs": {"root.conv": entry}}))
    with pytest.raises(ConversionError, match=r"invalid weight scales"):
        QatParams.load(path)
