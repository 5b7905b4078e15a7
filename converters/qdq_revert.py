"""Reverting convolutions of a QDQ ONNX graph to float: the INT8 search's candidates for ONNX Runtime.

The search quantizes once (`ort_quant.quantize_qdq`) and builds each candidate from that graph, as NNCF's accuracy
control does inside its model: for every listed convolution, the DequantizeLinear on its input is bypassed (the
conv reads the float tensor the QuantizeLinear read), its weight and bias go back to the float initializers of the
FP32 export, and the Q/DQ pair on its output is bypassed for every reader that is not a quantized conv. Q/DQ nodes
and initializers nothing reads any more are dropped. No calibration runs again, so every other layer keeps the
ranges and integer weights of the uniform INT8 graph.

A reverted conv reads its float input even where a quantized neighbour shares that tensor's Q/DQ (ONNX Runtime's
`nodes_to_exclude` would leave it reading the shared dequantized tensor). `float_convs` reads a graph back: the
convolutions with no DequantizeLinear on any input, as layer names, which is what the tests check the file by.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bitdeploy.converters import layers
from bitdeploy.core.errors import ConversionError, first_line

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _maps(graph: Any) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producers, consumers


def _quantized(node: Any, producers: dict[str, Any]) -> bool:
    """A conv that reads a dequantized tensor on any input (activation, weight or bias)."""
    return any((p := producers.get(i)) is not None and p.op_type == "DequantizeLinear" for i in node.input if i)


def float_convs(model_path: str | Path) -> list[str]:
    """The convolutions of an ONNX graph that read no DequantizeLinear output, as layer names in graph order."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producers, _ = _maps(graph)
    return [layers.layer_of(n.name) for n in graph.node if n.op_type == "Conv" and not _quantized(n, producers)]


def quantized_convs(model_path: str | Path) -> list[str]:
    """The convolutions that read a DequantizeLinear output, as layer names in graph order."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producers, _ = _maps(graph)
    return [layers.layer_of(n.name) for n in graph.node if n.op_type == "Conv" and _quantized(n, producers)]


def _bypass_input(conv: Any, producers: dict[str, Any]) -> None:
    """Input 0 reads what the QuantizeLinear before its DequantizeLinear read."""
    dq = producers.get(conv.input[0])
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = producers.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            conv.input[0] = q.input[0]


def _float_params(conv: Any, source: Any, initializers: dict[str, Any], graph: Any, taken: set[str]) -> None:
    """Weight and bias from the FP32 export's conv of the same name (renamed where a DequantizeLinear already
    writes that name, as ONNX Runtime's bias DQ does)."""
    present = {i.name for i in graph.initializer}
    for port in range(1, len(conv.input)):
        if port >= len(source.input) or source.input[port] not in initializers:
            raise ConversionError(f"{conv.name}: the FP32 export has no float parameter for input {port}")
        init = initializers[source.input[port]]
        name = init.name if init.name not in taken else f"{init.name}_float"
        if name not in present:
            copy = type(init)()
            copy.CopyFrom(init)
            copy.name = name
            graph.initializer.append(copy)
            present.add(name)
        conv.input[port] = name


def _bypass_output(conv: Any, consumers: dict[str, list[Any]], quantized: set[str], outputs: set[str]) -> None:
    """Readers of the conv's Q -> DQ output read the conv's float output, except quantized convs (which need it)."""
    y = conv.output[0]
    for q in [n for n in consumers.get(y, []) if n.op_type == "QuantizeLinear"]:
        for dq in [n for n in consumers.get(q.output[0], []) if n.op_type == "DequantizeLinear"]:
            if dq.output[0] in outputs:
                continue
            for reader in consumers.get(dq.output[0], []):
                if reader.op_type == "Conv" and reader.name in quantized:
                    continue
                for k, name in enumerate(reader.input):
                    if name == dq.output[0]:
                        reader.input[k] = y


def _prune(graph: Any) -> int:
    """Drop Q/DQ nodes whose outputs nothing reads, then unread initializers; returns the nodes dropped."""
    outputs = {o.name for o in graph.output}
    dropped = 0
    while True:
        _, consumers = _maps(graph)
        dead = [
            n for n in graph.node if n.op_type in QDQ_OPS and not any(o in consumers or o in outputs for o in n.output)
        ]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
        dropped += len(dead)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return dropped


def revert(qdq_path: Path, fp32_path: Path, out_path: Path, float_layers: Sequence[str]) -> dict[str, Any]:
    """Write `qdq_path` with the convolutions of `float_layers` in float to `out_path`; returns what was done."""
    import onnx

    model = onnx.load(str(qdq_path))
    fp32 = onnx.load(str(fp32_path))
    graph = model.graph
    sources = {layers.layer_of(n.name): n for n in fp32.graph.node if n.op_type == "Conv"}
    initializers = {i.name: i for i in fp32.graph.initializer}
    wanted = set(float_layers)
    convs = [n for n in graph.node if n.op_type == "Conv" and layers.layer_of(n.name) in wanted]
    missing = wanted - {layers.layer_of(n.name) for n in convs}
    if missing:
        raise ConversionError(f"{qdq_path.name} has no convolution for {', '.join(sorted(missing))}")
    producers, consumers = _maps(graph)
    quantized = {n.name for n in graph.node if n.op_type == "Conv" and _quantized(n, producers)}
    reverting = {n.name for n in convs}
    outputs = {o.name for o in graph.output}
    for conv in convs:
        _bypass_input(conv, producers)
        _float_params(conv, sources[layers.layer_of(conv.name)], initializers, graph, set(producers))
        _bypass_output(conv, consumers, quantized - reverting, outputs)
    dropped = _prune(graph)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp))
        tmp.replace(out_path)
    except Exception as exc:  # onnx raises its own types
        raise ConversionError(f"the reverted QDQ graph is not valid ONNX ({first_line(exc)}); report it") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return {"reverted_layers": sorted(wanted), "dropped_qdq_nodes": dropped}
