"""Reverting convolutions of a quantized OpenVINO IR to float: the INT8 search's candidates for OpenVINO.

NNCF's accuracy control reverts a layer inside the quantized model (`revert_operations_to_floating_point_precision`):
it removes the layer's FakeQuantize nodes, restores its original weights and undoes the bias correction. This does
the same on the saved IR of the uniform INT8 conversion: for every listed convolution the FakeQuantize on its
activation input is bypassed (kept for any other reader, such as the unit's other conv on a shared tensor), its
compressed INT8 weight (Constant -> Convert -> [Subtract] -> Multiply) is replaced by the FP32 export's weight, and
the bias Add after it gets the FP32 export's constant back (NNCF's fast bias correction changes it). Nodes nothing
reads any more drop out when the model is saved. No calibration runs again.

`float_convs` reads an IR back: the Convolutions with no FakeQuantize on their input and a float Constant weight.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.converters import layers
from bitdeploy.core.errors import ConversionError, require

WEIGHT_CHAIN = ("Multiply", "Subtract", "Convert", "FakeQuantize")  # what stands between an INT8 weight and the conv


def _convolutions(model: Any) -> list[Any]:
    return [op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]


def _quantized(conv: Any) -> bool:
    """Its activation goes through a FakeQuantize, or its weight is not a plain float Constant."""
    act = conv.input_value(0).get_node()
    weight = conv.input_value(1).get_node()
    return act.get_type_name() == "FakeQuantize" or weight.get_type_name() in WEIGHT_CHAIN


def float_convs(model_path: str | Path) -> list[str]:
    """The Convolutions of an IR (or any model OpenVINO reads) that are not quantized, as layer names in order."""
    ov = require("openvino", "openvino", "OpenVINO")
    model = ov.Core().read_model(str(model_path))
    return [layers.layer_of(op.get_friendly_name()) for op in _convolutions(model) if not _quantized(op)]


def quantized_convs(model_path: str | Path) -> list[str]:
    ov = require("openvino", "openvino", "OpenVINO")
    model = ov.Core().read_model(str(model_path))
    return [layers.layer_of(op.get_friendly_name()) for op in _convolutions(model) if _quantized(op)]


def _bias_add(conv: Any) -> Any | None:
    """The Add right after a conv that adds a Constant (ONNX's conv bias, split off by the converter)."""
    readers = [t.get_node() for t in conv.output(0).get_target_inputs()]
    if len(readers) != 1 or readers[0].get_type_name() != "Add":
        return None
    add = readers[0]
    return add if any(v.get_node().get_type_name() == "Constant" for v in add.input_values()) else None


def _constant_port(add: Any) -> int:
    return next(i for i, v in enumerate(add.input_values()) if v.get_node().get_type_name() == "Constant")


@functools.lru_cache(maxsize=1)
def _fp32_params(onnx_path: str, _mtime_ns: int) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Every convolution's float weight and bias constant in the FP32 export, by layer name (read once a search)."""
    ov = require("openvino", "openvino", "OpenVINO")
    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    model = ov.convert_model(onnx_path)  # held: an op's readers live only as long as its model
    for op in _convolutions(model):
        weight = op.input_value(1).get_node()
        if weight.get_type_name() != "Constant":
            continue
        add = _bias_add(op)
        bias = add.input_value(_constant_port(add)).get_node().get_data() if add is not None else None
        out[layers.layer_of(op.get_friendly_name())] = (
            np.array(weight.get_data(), np.float32),
            None if bias is None else np.array(bias, np.float32),
        )
    return out


def revert(xml_path: Path, fp32_onnx: Path, out_xml: Path, float_layers: Sequence[str]) -> dict[str, Any]:
    """Write the IR at `xml_path` with the convolutions of `float_layers` in float to `out_xml`."""
    ov = require("openvino", "openvino", "OpenVINO")
    from openvino import opset13 as ops

    model = ov.Core().read_model(str(xml_path))
    sources = _fp32_params(str(fp32_onnx), Path(fp32_onnx).stat().st_mtime_ns)
    wanted = set(float_layers)
    convs = [op for op in _convolutions(model) if layers.layer_of(op.get_friendly_name()) in wanted]
    missing = wanted - {layers.layer_of(op.get_friendly_name()) for op in convs}
    if missing:
        raise ConversionError(f"{xml_path.name} has no convolution for {', '.join(sorted(missing))}")
    biases = 0
    for conv in convs:
        layer = layers.layer_of(conv.get_friendly_name())
        if layer not in sources:
            raise ConversionError(f"{conv.get_friendly_name()}: the FP32 model's weight is not a constant")
        weight, bias = sources[layer]
        act = conv.input_value(0).get_node()
        if act.get_type_name() == "FakeQuantize":
            conv.input(0).replace_source_output(act.input_value(0))
        conv.input(1).replace_source_output(ops.constant(weight).output(0))
        add = _bias_add(conv)
        if add is not None and bias is not None:
            add.input(_constant_port(add)).replace_source_output(ops.constant(bias).output(0))
            biases += 1
    model.validate_nodes_and_infer_types()
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(out_xml), compress_to_fp16=False)
    return {"reverted_layers": sorted(wanted), "restored_biases": biases}
