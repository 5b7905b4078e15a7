"""The layers an INT8 conversion may keep in float, named once for every engine.

A layer is a convolution, named by its PyTorch module path ("body.block2.unit01.conv2"). The export names each
ONNX Conv node after it ("/body/block2/unit01/conv2/Conv"); OpenVINO keeps those names as friendly names; LiteRT's
PT2E graph records the module path in each node's `nn_module_stack`. So a build can ask every engine for the same
float layers (the `float_layers` argument of `Converter.convert`) and each converter maps them onto its own
mechanism: ONNX Runtime's `nodes_to_exclude`, NNCF's `IgnoredScope`, a PT2E annotation filter, TensorRT's Q/DQ
placement.

Groups: the INT8 search ranks layers a group at a time, coarse to fine: one block ("body.block2"), one bottleneck
unit ("body.block2.unit01") or one layer; the stem and the head are groups of their own at every level.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

GRANULARITIES = ("layer", "unit", "block")


CONV_SUFFIXES = ("/Conv", "/Conv/WithoutBiases")  # ONNX; OpenVINO splits a biased conv into Convolution + Add


def is_conv_name(node_name: str) -> bool:
    return node_name.endswith(CONV_SUFFIXES)


def layer_of(node_name: str) -> str:
    """ "/body/block2/unit01/conv2/Conv" -> "body.block2.unit01.conv2" (the exporter's naming; anything else as is)."""
    parts = node_name.removesuffix("/WithoutBiases").strip("/").split("/")
    return ".".join(parts[:-1]) if len(parts) > 1 else node_name


def conv_layers(onnx_path: Path) -> list[str]:
    """Every convolution of an exported model, in graph order, as layer names."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return list(dict.fromkeys(layer_of(n.name) for n in model.graph.node if n.op_type == "Conv"))


def node_names(nodes: Iterable[tuple[str, str]], layers: Sequence[str]) -> list[str]:
    """The names of the (name, op type) convolution nodes that belong to `layers`."""
    wanted = set(layers)
    return [name for name, op in nodes if op in ("Conv", "Convolution") and layer_of(name) in wanted]


def group_of(layer: str, granularity: str) -> str:
    """The group a layer belongs to: itself, its bottleneck unit or its block (stem and head: their module)."""
    parts = layer.split(".")
    if granularity == "layer":
        return layer
    if parts[0] != "body":
        return parts[0]  # "root" (the stem) or "head"
    return ".".join(parts[: 3 if granularity == "unit" else 2])


@dataclass(frozen=True)
class Group:
    name: str
    layers: tuple[str, ...]


def groups(layers: Sequence[str], granularity: str) -> list[Group]:
    """The layers grouped at `granularity`, groups in the order their first layer appears."""
    out: dict[str, list[str]] = {}
    for layer in layers:
        out.setdefault(group_of(layer, granularity), []).append(layer)
    return [Group(name, tuple(members)) for name, members in out.items()]
