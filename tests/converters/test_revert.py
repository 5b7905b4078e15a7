"""The INT8 search's candidates made by reverting the one uniform INT8 model (no recalibration): the model file
shows exactly the listed convolutions unquantized, read back with onnx.load and ov.Core().read_model here (not
through the converters' own readers), and each matches the engine's own exclusion route where both mean the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitdeploy.converters import layers
from bitdeploy.converters.base import ConvertOptions, Uniform, bind
from bitdeploy.core.errors import ConversionError
from tests.converters.model_files import ir_float_convs, onnx_float_convs

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# a unit's conv2 reads its own relu (no neighbour shares its input), the stem reads the image, the head has a bias
REVERTED = ("body.block2.unit01.conv2", "root.conv", "head.conv")


def _convert(tiny: Any, calibration: Any, target: str, work: Path, float_layers: tuple[str, ...] = ()) -> Any:
    work.mkdir(parents=True, exist_ok=True)
    return bind(target, "int8", ConvertOptions()).convert(tiny.onnx, work, calibration, float_layers)


def _ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0]).reshape(len(x), -1)


def test_onnx_runtime_revert_leaves_exactly_the_listed_convs_unquantized(
    tiny: Any, calibration: Any, tmp_path: Path
) -> None:
    converter = bind("onnx", "int8", ConvertOptions())
    uniform = _convert(tiny, calibration, "onnx", tmp_path / "uniform")
    assert onnx_float_convs(tmp_path / "uniform" / "model.onnx") == set() and converter.reverts
    art = converter.revert(Uniform(tiny.onnx, tmp_path / "uniform", uniform), tmp_path / "mix", REVERTED)
    mix = tmp_path / "mix" / art.model_file
    assert onnx_float_convs(mix) == set(REVERTED)
    assert set(art.target.quantization.details["float_layers"]) == set(REVERTED)  # read from the file too
    fp32 = {i.name: i for i in onnx.load(str(tiny.onnx)).graph.initializer}
    for init in onnx.load(str(mix)).graph.initializer:
        name = init.name.removesuffix("_float")
        if name.startswith(REVERTED) and name in fp32:  # the FP32 export's weight and bias, bit for bit
            assert init.raw_data == fp32[name].raw_data or np.array_equal(
                onnx.numpy_helper.to_array(init), onnx.numpy_helper.to_array(fp32[name])
            )
    # where ONNX Runtime's own exclusion means the same (no shared input), the graphs compute the same logits
    excluded = _convert(tiny, calibration, "onnx", tmp_path / "excluded", REVERTED)
    x = tiny.val_x[:64]
    np.testing.assert_allclose(
        _ort_logits(mix, x), _ort_logits(tmp_path / "excluded" / excluded.model_file, x), rtol=0, atol=1e-5
    )
    with pytest.raises(ConversionError, match=r"no convolution for body\.block9"):
        converter.revert(
            Uniform(tiny.onnx, tmp_path / "uniform", uniform), tmp_path / "bad", ("body.block9.unit01.conv1",)
        )


def test_onnx_runtime_revert_of_a_conv_sharing_its_input(tiny: Any, calibration: Any, tmp_path: Path) -> None:
    """A unit's downsample and conv1 read one quantized tensor: the reverted one reads it in float, the other keeps
    its Q/DQ (ONNX Runtime's nodes_to_exclude would leave the excluded conv reading the shared DQ)."""
    uniform = _convert(tiny, calibration, "onnx", tmp_path / "uniform")
    shared = ("body.block1.unit01.downsample",)
    art = bind("onnx", "int8", ConvertOptions()).revert(
        Uniform(tiny.onnx, tmp_path / "uniform", uniform), tmp_path / "m", shared
    )
    graph = onnx.load(str(tmp_path / "m" / art.model_file)).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    convs = {layers.layer_of(n.name): n for n in graph.node if n.op_type == "Conv"}
    assert producers.get(convs["body.block1.unit01.downsample"].input[0]) == "Relu"
    assert producers.get(convs["body.block1.unit01.conv1"].input[0]) == "DequantizeLinear"
    assert onnx_float_convs(tmp_path / "m" / art.model_file) == set(shared)


def test_openvino_revert_removes_the_listed_fake_quantize_as_nncf_does(
    tiny: Any, calibration: Any, tmp_path: Path
) -> None:
    ov = pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    converter = bind("openvino", "int8", ConvertOptions())
    uniform = _convert(tiny, calibration, "openvino", tmp_path / "uniform")
    assert ir_float_convs(tmp_path / "uniform" / "model.xml") == {"head.conv"}  # the default float scope
    wanted = ("body.block2.unit01.conv2", "root.conv")
    art = converter.revert(Uniform(tiny.onnx, tmp_path / "uniform", uniform), tmp_path / "mix", wanted)
    assert ir_float_convs(tmp_path / "mix" / art.model_file) == {*wanted, "head.conv"}
    assert set(art.files) == {"model.xml", "model.bin"} and (tmp_path / "mix" / "model.bin").is_file()
    # the same as NNCF quantizing with those layers in its IgnoredScope (the ranges do not depend on them)
    scoped = _convert(tiny, calibration, "openvino", tmp_path / "scoped", wanted)
    core, x = ov.Core(), tiny.val_x[:64]

    def run(xml: Path) -> np.ndarray:
        compiled = core.compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return np.asarray(compiled(x)[0]).reshape(len(x), -1)

    np.testing.assert_allclose(
        run(tmp_path / "mix" / "model.xml"), run(tmp_path / "scoped" / scoped.model_file), atol=1e-5
    )
