"""What a model file leaves in float, read with the engines' own readers (onnx.load, ov.Core().read_model), not
through bitdeploy's: the INT8 search's tests check the artifact, not the list it was asked for."""

from __future__ import annotations

from pathlib import Path

from bitdeploy.converters import layers


def onnx_float_convs(path: Path) -> set[str]:
    """The Conv nodes of an ONNX file that read no DequantizeLinear output (their weights are initializers)."""
    import onnx

    graph = onnx.load(str(path)).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    out = set()
    for n in graph.node:
        if n.op_type == "Conv" and all(producers.get(i) != "DequantizeLinear" for i in n.input):
            assert all(i in inits for i in n.input[1:]), n.name
            out.add(layers.layer_of(n.name))
    return out


def ir_float_convs(path: Path) -> set[str]:
    """The Convolutions of an OpenVINO IR with no FakeQuantize on the input and a float Constant for a weight (an
    INT8 weight is a compressed i8 Constant -> Convert -> Multiply)."""
    import openvino as ov

    out = set()
    for op in ov.Core().read_model(str(path)).get_ordered_ops():
        if op.get_type_name() != "Convolution":
            continue
        act, weight = op.input_value(0).get_node(), op.input_value(1).get_node()
        if act.get_type_name() != "FakeQuantize" and weight.get_type_name() == "Constant":
            assert weight.get_element_type().is_real(), op.get_friendly_name()
            out.add(layers.layer_of(op.get_friendly_name()))
    return out
