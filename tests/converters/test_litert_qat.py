"""LiteRT from a quantization-aware fine-tune (`LiteRtConverter.from_qat`): the .tflite computes the fine-tune's
quantization, the model ONNX Runtime runs from its Q/DQ file (`qat_qdq.write_qdq`).

The fine-tune is synthesized on the tiny BiT at 32 px (untrained: the numbers only have to be finite): each conv's
input and output quantizer from its min/max on a few images, its weight scales max |w| / 63 per output channel, as
`bitdeploy.training.qat` sets them. A fine-tune learns every conv's quantizers on their own, so two convs reading one
tensor (a unit's conv1 and downsample) get different ones: the downsamples' input ranges are widened here.

The tolerance: the grids are the same, so on most images the .tflite computes the Q/DQ model's integers and the
logits differ only by the float ops (GroupNorm, adds, head), which the converter's FP32 check bounds at
CHECK_TOLERANCE x max(1, max |logit|). An image whose value lands within float rounding of a quantizer's step
boundary can flip one step there (the engines' kernels differ in the last bit), and the untrained net amplifies it. So at least 80% of the images must be within that bound, and the mean |difference| within 10% of
what quantizing moves the logits (mean |Q/DQ - FP32|). Measured on x86 (XNNPACK): 31 of 32 images within 3.3e-7
(median), the mean 0.3% of it (256 images: 92%, 2.9%; the worst image 0.12 with max |logit| 1.5); a float stem or
a calibrated INT8 model: 0 of 32 images, 116% and 127%.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip(
    "litert_torch", reason='the LiteRT converter needs litert-torch: pip install "bitdeploy[litert-convert]"'
)
pytest.importorskip("ai_edge_litert", reason='the LiteRT runtime needs ai-edge-litert: pip install "bitdeploy[litert]"')

from bitdeploy.converters import layers
from bitdeploy.converters.base import Artifact, QatModel, bind
from bitdeploy.converters.litert_convert import CHECK_TOLERANCE, MODEL_FILE, run_tflite
from bitdeploy.converters.qat_qdq import ConvQuant, QatParams, TensorQuant, quantize_weight, write_qdq
from bitdeploy.core.errors import ConversionError
from tests.converters.tiny_digits import RESOLUTION, tiny_export

WIDER = 1.05  # the downsamples' input ranges, widened so they differ from their unit's conv1


@dataclass
class Case:
    qat: QatModel
    params: QatParams
    artifact: Artifact
    work: Path


def _session(path: Path | bytes) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), providers=["CPUExecutionProvider"])


def _quantizer(a: np.ndarray, wider: float = 1.0) -> TensorQuant:
    lo, hi = min(float(a.min()), 0.0) * wider, max(float(a.max()), 0.0) * wider
    scale = float(np.float32((hi - lo) / 255))
    return TensorQuant(scale, int(np.clip(round(-lo / scale), 0, 255)))


def _synthesize(onnx_path: Path, x: np.ndarray) -> QatParams:
    """The quantizers a fine-tune would have: every conv but the head's, from ONNX Runtime's tensors on `x`."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    convs = {layers.layer_of(n.name): n for n in model.graph.node if n.op_type == "Conv"}
    convs = {name: n for name, n in convs.items() if not name.startswith("head")}
    tapped = sorted({t for n in convs.values() for t in (n.input[0], n.output[0])} - {"input"})
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tapped)
    values = dict(zip(tapped, _session(model.SerializeToString()).run(tapped, {"input": x})))
    values["input"] = x
    out = {}
    for name, n in convs.items():
        w = weights[n.input[1]]
        scales = (np.abs(w).reshape(w.shape[0], -1).max(1) / np.float32(63)).astype(np.float32)
        wider = WIDER if name.endswith("downsample") else 1.0
        out[name] = ConvQuant(
            _quantizer(values[n.input[0]], wider), tuple(map(float, scales)), _quantizer(values[n.output[0]])
        )
    return QatParams(out, record={"steps": 1, "calibrated_images": len(x), "teacher": "synthetic"})


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    root = tmp_path_factory.mktemp("litert-qat")
    onnx_path = tiny_export()
    x = np.random.default_rng(0).uniform(-1, 1, (8, 3, RESOLUTION, RESOLUTION)).astype(np.float32)
    _synthesize(onnx_path, x).save(root / "qat_params.json")
    params = QatParams.load(root / "qat_params.json")
    write_qdq(onnx_path, params, root / "qdq.onnx")
    qat = QatModel(root / "qdq.onnx", onnx_path, root / "qat_params.json")
    (root / "bundle").mkdir()
    converter = bind("litert", "int8")
    assert converter.takes_qat
    return Case(qat, params, converter.from_qat(qat, root / "bundle"), root / "bundle")


def test_logits_are_the_qdq_models(case: Case) -> None:
    x = np.random.default_rng(1).uniform(-1, 1, (32, 3, RESOLUTION, RESOLUTION)).astype(np.float32)
    qdq = _session(case.qat.qdq).run(None, {"input": x})[0]
    fp32 = _session(case.qat.onnx_fp32).run(None, {"input": x})[0]
    got = run_tflite(case.work / MODEL_FILE, x)
    per_image = np.abs(got - qdq).max(1)
    same = per_image <= CHECK_TOLERANCE * max(1.0, float(np.abs(qdq).max()))
    assert same.mean() >= 0.8, per_image
    assert np.abs(got - qdq).mean() <= 0.1 * np.abs(fp32 - qdq).mean()
    assert sorted(p.name for p in case.work.iterdir()) == [MODEL_FILE]


def _int8_convs(path: Path) -> list[dict[str, Any]]:
    """Each int8 CONV_2D's input, weight and output tensor details (the weight with its values)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(str(path))
    it.allocate_tensors()
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    out = []
    for op in it._get_ops_details():  # no public op listing
        if op["op_name"] == "CONV_2D" and tensors[op["inputs"][1]]["dtype"] == np.int8:
            inp, w, y = (tensors[op[k][i]] for k, i in (("inputs", 0), ("inputs", 1), ("outputs", 0)))
            out.append({"input": inp, "weight": {**w, "value": it.get_tensor(w["index"])}, "output": y})
    return out


def _per_tensor(t: dict[str, Any]) -> tuple[float, int]:
    q = t["quantization_parameters"]
    assert len(q["scales"]) == 1 and t["dtype"] == np.int8
    return float(q["scales"][0]), int(q["zero_points"][0])


def test_the_tflite_holds_the_fine_tunes_grids(case: Case) -> None:
    """Every QAT conv but the stem is an int8 CONV_2D with the fine-tune's integers and scales: weights on the 7-bit
    grid bit for bit, inputs and outputs at its scale and zero point - 128."""
    import onnx
    from onnx import numpy_helper

    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(case.qat.onnx_fp32)).graph.initializer}
    convs = _int8_convs(case.work / MODEL_FILE)
    found = {}
    for layer, q in case.params.convs.items():
        scales = np.asarray(q.weight_scales, dtype=np.float32)
        want = quantize_weight(weights[f"{layer}.weight"], scales, 63).transpose(0, 2, 3, 1)  # OIHW -> OHWI
        match = [c for c in convs if np.array_equal(c["weight"]["value"], want)]
        if layer == "root.conv":
            assert match == []  # the stem computes in float on the fine-tune's grids
            continue
        assert len(match) == 1, layer
        c, found[layer] = match[0], True
        wq = c["weight"]["quantization_parameters"]
        assert np.array_equal(wq["scales"], scales) and not wq["zero_points"].any(), layer
        assert int(np.abs(c["weight"]["value"]).max()) <= 63
        assert _per_tensor(c["input"]) == (np.float32(q.input.scale), q.input.zero_point - 128), layer
        assert q.output is not None
        assert _per_tensor(c["output"]) == (np.float32(q.output.scale), q.output.zero_point - 128), layer
    assert len(found) == len(convs) == len(case.params.convs) - 1
    quantization = case.artifact.target.quantization
    assert quantization is not None and quantization.method == "qat"
    details = quantization.details
    assert details["source"] == "quantization-aware fine-tune" and details["qat"]["teacher"] == "synthetic"
    assert details["differs_from_qat"] == {"root.conv": "float, its quantization emulated"}
    assert details["weight_scales_vs_minmax"] <= 1e-6  # PT2E's max |w| / 63 of these weights: the same scales
    assert any("stem" in note for note in case.artifact.notes)


def test_bad_requests_fail_in_one_line(case: Case, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="--precision int8"):
        bind("litert", "fp32").from_qat(case.qat, tmp_path)
    convs = dict(case.params.convs)
    convs["body.block9.unit01.conv1"] = convs["body.block1.unit01.conv1"]
    QatParams(convs).save(tmp_path / "foreign.json")
    foreign = QatModel(case.qat.qdq, case.qat.onnx_fp32, tmp_path / "foreign.json")
    with pytest.raises(ConversionError, match="another model") as info:
        bind("litert", "int8").from_qat(foreign, tmp_path)
    assert "\n" not in str(info.value)
    assert list(tmp_path.glob("*.tflite")) == []
