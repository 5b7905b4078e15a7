"""LiteRT converter on the tiny BiT fine-tuned on 32 px digits: FP32 matches PyTorch at any batch, FP16 halves
the file, INT8 keeps top-1 within the gate with float I/O, and bad requests fail with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip(
    "litert_torch", reason='the LiteRT converter needs litert-torch: pip install "bitdeploy[litert-convert]"'
)
pytest.importorskip("ai_edge_litert", reason='the LiteRT runtime needs ai-edge-litert: pip install "bitdeploy[litert]"')

from bitdeploy.converters import calibration as cal
from bitdeploy.converters import litert_convert
from bitdeploy.converters.base import ConvertOptions, Uniform, bind
from bitdeploy.core.errors import ConversionError
from bitdeploy.runtimes.bundle.manifest import Manifest
from bitdeploy.runtimes.engines.litert import LiteRtBackend
from tests.converters.tiny_digits import RESOLUTION, tiny_digits


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    with LiteRtBackend(path, Manifest(), threads=2) as backend:
        return backend.infer(x)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    work = tmp_path_factory.mktemp("litert-fp32")
    artifact = bind("litert", "fp32", ConvertOptions()).convert(tiny_digits().onnx, work)
    return work, artifact


def test_fp32_matches_pytorch_at_every_batch(fp32: tuple[Path, Any]) -> None:
    work, artifact = fp32
    td = tiny_digits()
    assert (
        artifact.backend == "litert" and artifact.files == ["model.tflite"] and artifact.target.precision_used == "fp32"
    )
    assert sorted(p.name for p in work.iterdir()) == ["model.tflite"]  # no temp files left behind
    logits = _logits(work / "model.tflite", td.val_x)  # the whole split in one resized batch
    scale = max(1.0, float(np.abs(td.reference_logits).max()))
    assert np.abs(logits - td.reference_logits).max() <= 1e-4 * scale
    assert (logits.argmax(1) == td.reference_logits.argmax(1)).mean() == 1.0
    single = np.concatenate([_logits(work / "model.tflite", td.val_x[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(single, logits[:3], rtol=0, atol=1e-4 * scale)


def test_model_input_is_nchw_float32(fp32: tuple[Path, Any]) -> None:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(str(fp32[0] / "model.tflite"))
    (inp,), (out,) = it.get_input_details(), it.get_output_details()
    assert inp["dtype"] == np.float32 and list(inp["shape_signature"]) == [-1, 3, RESOLUTION, RESOLUTION]
    assert out["dtype"] == np.float32 and list(out["shape"][1:]) == [1, 1, 10]


def test_fp16_weights_halve_the_file(fp32: tuple[Path, Any], tmp_path: Path) -> None:
    td = tiny_digits()
    litert_convert._cast_fp16(fp32[0] / "model.tflite", tmp_path / "fp16.tflite")
    size32, size16 = (fp32[0] / "model.tflite").stat().st_size, (tmp_path / "fp16.tflite").stat().st_size
    assert size16 < 0.6 * size32
    logits = _logits(tmp_path / "fp16.tflite", td.val_x)
    assert (logits.argmax(1) == td.reference_logits.argmax(1)).mean() >= 0.99
    assert np.abs(logits - td.reference_logits).max() > 0  # FP16 weights really are rounded


def test_int8_passes_the_gate_with_float_io(uniform: tuple[Any, Any, Path]) -> None:
    it, artifact, work = uniform  # the default INT8 conversion on 64 calibration images (the fixture below)
    td = tiny_digits()
    assert artifact.target.quantization is not None and artifact.target.quantization.samples == 64
    assert it.get_input_details()[0]["dtype"] == np.float32 and it.get_output_details()[0]["dtype"] == np.float32
    int8_weights = [t for t in it.get_tensor_details() if t["dtype"] == np.int8 and len(t["shape"]) == 4]
    assert len(int8_weights) >= 5  # the bottleneck and head convs, not the stem or GroupNorm's averaging convs
    logits = _logits(work / "model.tflite", td.val_x)
    top1 = float((logits.argmax(1) == td.val_y).mean())
    assert (td.reference_top1 - top1) * 100 <= 1.0, (top1, td.reference_top1)


def test_int8_without_calibration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="needs calibration"):
        bind("litert", "int8", ConvertOptions()).convert(tiny_digits().onnx, tmp_path)


def test_gpu_device_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="--device cpu"):
        bind("litert", "fp32", ConvertOptions(device="cuda")).convert(tiny_digits().onnx, tmp_path)


def test_a_foreign_onnx_is_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 32, 32])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "relu.onnx"))
    with pytest.raises(ConversionError, match="not a bitdeploy BiT export"):
        bind("litert", "fp32", ConvertOptions()).convert(tmp_path / "relu.onnx", tmp_path)


def _int8(work: Path, options: ConvertOptions, float_layers: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """(the interpreter, the artifact) of an INT8 conversion on 64 calibration images: the gate test's draw, so the
    uniform conversion serves it too (the conversion's time hardly depends on the number of images)."""
    from ai_edge_litert.interpreter import Interpreter

    td = tiny_digits()
    work.mkdir()
    calib = cal.from_image_set(td.train, RESOLUTION, size=64)
    artifact = bind("litert", "int8", options).convert(td.onnx, work, calib, float_layers)
    return Interpreter(str(work / "model.tflite")), artifact


def _int8_weights(it: Any) -> int:
    dtypes = {t["index"]: t["dtype"] for t in it.get_tensor_details()}
    convs = [op for op in it._get_ops_details() if op["op_name"] == "CONV_2D"]  # no public op listing
    return sum(1 for op in convs if dtypes.get(op["inputs"][1]) == np.int8)


def _activation_scales(it: Any) -> dict[str, float]:
    """{tensor name: scale} of the int8 activations (per-tensor, unlike the per-channel weights)."""
    return {
        t["name"]: float(t["quantization_parameters"]["scales"][0])
        for t in it.get_tensor_details()
        if t["dtype"] == np.int8 and len(t["quantization_parameters"]["scales"]) == 1
    }


@pytest.fixture(scope="module")
def uniform(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    """(the interpreter, the artifact, the work dir) of the uniform INT8 conversion (default options): the model the
    gate test checks and the one the float-layer and calibration-method tests compare with."""
    work = tmp_path_factory.mktemp("litert") / "uniform"
    return (*_int8(work, ConvertOptions()), work)


def test_int8_search_float_layers_stay_float(uniform: tuple[Any, Any, Path], tmp_path: Path) -> None:
    """The INT8 search's float layers reach LiteRT through the PT2E annotation filter: their weights stay float.
    Its candidates reuse the uniform conversion's calibrated ranges: the same scales as calibrating again (the
    observers see the float graph), without calibrating."""
    from ai_edge_litert.interpreter import Interpreter

    keep = ("body.block2.unit01.conv2", "body.block4.unit01.downsample")
    mixed, artifact = _int8(tmp_path / "mixed", ConvertOptions(), keep)
    assert _int8_weights(mixed) == _int8_weights(uniform[0]) - len(keep) and _int8_weights(uniform[0]) >= 10
    quantization = artifact.target.quantization
    assert quantization is not None and set(keep) <= set(quantization.details["float_layers"])
    assert (uniform[2] / litert_convert.RANGES_FILE).is_file() and "model.tflite" in uniform[1].files
    (tmp_path / "reverted").mkdir()
    converter = bind("litert", "int8", ConvertOptions())
    reverted = converter.revert(Uniform(tiny_digits().onnx, uniform[2], uniform[1]), tmp_path / "reverted", keep)
    assert converter.reverts and reverted.target.quantization is not None
    assert reverted.target.quantization.details["ranges"] == "the uniform INT8 conversion's (reused)"
    again = Interpreter(str(tmp_path / "reverted" / "model.tflite"))
    assert _int8_weights(again) == _int8_weights(mixed)
    assert _activation_scales(again) == pytest.approx(_activation_scales(mixed), rel=1e-6)


def test_minmax_calibration_covers_the_full_range_histogram_clips(
    uniform: tuple[Any, Any, Path], tmp_path: Path
) -> None:
    """`--calib-method minmax` swaps the HistogramObserver for plain min/max: no activation range gets narrower, and
    the ones whose tails the histogram clipped get wider."""
    minmax, artifact = _int8(tmp_path / "minmax", ConvertOptions(calib_method="minmax"))
    histogram, wide = _activation_scales(uniform[0]), _activation_scales(minmax)
    assert uniform[1].target.quantization.method == "histogram" and artifact.target.quantization.method == "minmax"
    shared = sorted(set(histogram) & set(wide))
    assert len(shared) >= 10
    assert all(wide[n] >= histogram[n] * 0.999 for n in shared)
    assert sum(wide[n] > histogram[n] * 1.01 for n in shared) >= len(shared) // 2
