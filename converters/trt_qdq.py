"""The TensorRT-ready ONNX: explicit INT8 (Q/DQ) or FP16 casts, written into the graph (TensorRT 11 has no precision flags).

INT8 follows TensorRT's explicit-quantization rules: signed INT8, zero points of 0 (TensorRT rejects others),
symmetric per-tensor activation scales, symmetric per-output-channel weight scales (axis 0), and Q/DQ only on
the inputs of the body's convolutions. GroupNorm (Reshape -> InstanceNormalization -> Reshape -> Mul -> Add),
the residual Adds and the classifier head stay in float: TensorRT has no INT8 normalisation (C3), and a
quantized residual stream would add error at every unit. The calibration is the shared CalibrationData, run
through ONNX Runtime's QDQ quantizer (`ort_quant.quantize_qdq`), so this file can be validated on the CPU.

FP16 keeps InstanceNormalization and its variance in FP32 with casts around it and FP32 graph inputs/outputs
(`ort_quant.convert_fp16`), which a strongly typed TensorRT network builds exactly as written.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.converters.base import ConvertOptions, check_request
from bitdeploy.converters.calibration import CalibrationData
from bitdeploy.converters.layers import layer_of
from bitdeploy.core.errors import ConversionError

ONNX_NAME = "model.trt.onnx"
GN_CHAIN = ("Reshape", "InstanceNormalization", "Reshape", "Mul", "Add")


@dataclass
class QdqReport:
    """Where the Q/DQ nodes are, and every rule they break (empty `violations` = TensorRT-ready)."""

    quantized_convs: int = 0
    float_convs: list[str] = field(default_factory=list)
    weight_scales: int = 0
    activation_scales: int = 0
    norm_groups: int = 0
    residual_adds: int = 0
    violations: list[str] = field(default_factory=list)


def _initializers(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _graph_maps(graph: Any) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, list[Any]]]:
    """(constant values, each tensor's producer, each tensor's consumers) of a graph."""
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return _initializers(graph), producers, consumers


def _axis(node: Any) -> int:
    for attr in node.attribute:
        if attr.name == "axis":
            return int(attr.i)
    return 1  # the ONNX default for QuantizeLinear/DequantizeLinear


def norm_groups(graph: Any) -> list[list[Any]]:
    """The GroupNorm decompositions: InstanceNormalization with its Reshape before and Reshape/Mul/Add after."""
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    groups = []
    for node in graph.node:
        if node.op_type != "InstanceNormalization":
            continue
        group = [node]
        before = producers.get(node.input[0])
        if before is not None and before.op_type == "Reshape":
            group.insert(0, before)
        current = node
        for op in GN_CHAIN[2:]:
            nxt = consumers.get(current.output[0], [])
            if len(nxt) != 1 or nxt[0].op_type != op:
                break
            current = nxt[0]
            group.append(current)
        groups.append(group)
    return groups


def inspect_qdq(  # noqa: C901 - one pass over the nodes, one branch per QDQ pattern
    model: Any, head_in_float: bool = True, float_layers: Sequence[str] = ()
) -> QdqReport:
    """Check a QDQ ONNX against TensorRT's explicit-quantization rules and bitdeploy's placement.

    Rules: every Q/DQ zero point is int8 0; activation scales are scalars (per-tensor, symmetric); weight DQs
    feeding a Conv are per-channel on axis 0 with one scale per output channel; no node of a GroupNorm
    decomposition reads a DQ output or feeds a Q; residual Adds neither read DQ outputs nor feed Qs; every body
    Conv reads a DQ'd input and a DQ'd weight; the head Conv (the last one) does neither when `head_in_float`,
    nor does a conv of `float_layers` (the INT8 search's, `bitdeploy.converters.layers`).
    """
    graph = model.graph
    report = QdqReport()
    inits, producers, consumers = _graph_maps(graph)

    def from_dq(name: str) -> bool:
        p = producers.get(name)
        return p is not None and p.op_type == "DequantizeLinear"

    def to_q(name: str) -> bool:
        return any(c.op_type == "QuantizeLinear" for c in consumers.get(name, []))

    weight_dqs: set[str] = set()
    convs = [n for n in graph.node if n.op_type == "Conv"]
    for i, conv in enumerate(convs):
        is_head = i == len(convs) - 1
        x_q, w_q = from_dq(conv.input[0]), from_dq(conv.input[1])
        if w_q:
            dq = producers[conv.input[1]]
            weight_dqs.add(dq.name)
            weight = inits.get(dq.input[0])
            scale = inits.get(dq.input[1])
            out_ch = weight.shape[0] if weight is not None else None
            if scale is None or scale.ndim != 1 or out_ch is None or scale.size != out_ch or _axis(dq) != 0:
                report.violations.append(f"{conv.name}: weight scale is not per output channel on axis 0")
            else:
                report.weight_scales += 1
        if is_head and head_in_float:
            if x_q or w_q:
                report.violations.append(f"{conv.name}: the classifier head is quantized; it must stay in float")
            report.float_convs.append(conv.name)
            continue
        if layer_of(conv.name) in float_layers:  # its input may be a DQ shared with a quantized sibling conv
            if w_q:
                report.violations.append(f"{conv.name}: a layer kept in float by the INT8 search has INT8 weights")
            report.float_convs.append(conv.name)
            continue
        if x_q and w_q:
            report.quantized_convs += 1
        else:
            report.float_convs.append(conv.name)
            report.violations.append(f"{conv.name}: body Conv is not quantized (input {x_q}, weight {w_q})")

    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zp is None:
            report.violations.append(f"{node.name}: no zero point (it must be an explicit int8 0)")
        elif zp.dtype != np.int8 or np.any(zp != 0):
            report.violations.append(
                f"{node.name}: zero point must be int8 0, got {zp.dtype} {zp.ravel()[:4].tolist()}"
            )
        if node.op_type == "QuantizeLinear" or node.name not in weight_dqs:
            scale = inits.get(node.input[1])
            if scale is None or scale.size != 1:
                report.violations.append(f"{node.name}: activation scale must be one per-tensor value")
            elif node.op_type == "QuantizeLinear":
                report.activation_scales += 1

    groups = norm_groups(graph)
    report.norm_groups = len(groups)
    in_groups = {n.output[0] for g in groups for n in g}  # outputs are unique names (protobuf wrappers are not stable)
    for group in groups:
        for n in group:
            if any(from_dq(i) for i in n.input if i):
                report.violations.append(f"{n.name} ({n.op_type}, GroupNorm): reads a DequantizeLinear output")
            if any(to_q(o) for o in n.output):
                report.violations.append(f"{n.name} ({n.op_type}, GroupNorm): feeds a QuantizeLinear")
    for node in graph.node:
        if node.op_type != "Add" or node.output[0] in in_groups or any(i in inits for i in node.input):
            continue
        report.residual_adds += 1
        if any(from_dq(i) for i in node.input) or any(to_q(o) for o in node.output):
            report.violations.append(f"{node.name}: residual Add has Q/DQ on it; it must stay in float")
    return report


def build_qdq(
    onnx_fp32: Path,
    out: Path,
    calibration: CalibrationData | None,
    options: ConvertOptions,
    float_layers: Sequence[str] = (),
) -> dict[str, Any]:
    """Write the INT8 QDQ ONNX for TensorRT and check its placement, keeping `float_layers` (the INT8 search's)
    in float as well; returns manifest facts.

    TensorRT's rules, asked for explicitly: signed INT8 symmetric activations (zero points of 0), per-channel
    weights, no Q/DQ on conv outputs (the GroupNorm that reads them stays float), head and bias in float.
    """
    import onnx

    from bitdeploy.converters import ort_quant

    check_request("TensorRT", "int8", calibration)
    assert calibration is not None
    qdq = ort_quant.QdqOptions(
        method=options.calib_method,
        symmetric_activations=True,  # TensorRT accepts zero points of 0 only
        activation_type="int8",
        per_channel=True,
        exclude_head=True,
        quantize_bias=False,  # TensorRT fuses a float bias into the INT8 conv; an INT32 bias DQ is not needed
        quantize_outputs=False,
        float_layers=float_layers,
    )
    info = ort_quant.quantize_qdq(onnx_fp32, out, calibration, qdq)
    report = inspect_qdq(onnx.load(str(out), load_external_data=False), float_layers=float_layers)
    if report.violations:
        raise ConversionError(
            f"the INT8 ONNX breaks TensorRT's Q/DQ rules ({report.violations[0]}; {len(report.violations)} in all); report this as a bug"
        )
    facts = dict(info) if isinstance(info, dict) else {}
    facts.update(
        {
            "format": "qdq",
            "quantized_convs": report.quantized_convs,
            "float_convs": report.float_convs,
            "norm_groups_in_float": report.norm_groups,
            "residual_adds_in_float": report.residual_adds,
            "notes": [
                f"INT8 Q/DQ on {report.quantized_convs} convs; GroupNorm x{report.norm_groups}, residual Add x{report.residual_adds} and the head stay float"
            ],
        }
    )
    return facts


def for_tensorrt(qdq_in: Path, out: Path) -> dict[str, Any]:
    """The quantization-aware fine-tune's Q/DQ model (`qat_qdq.write_qdq`) re-encoded under TensorRT's explicit-
    quantization rules, checked with `inspect_qdq` and written to `out`; returns manifest facts like `build_qdq`'s.

    The same quantized convolutions, written the way TensorRT takes them: the Q/DQ pairs on conv outputs go (their
    reader, GroupNorm, runs in float), each UINT8 activation pair (scale s, zero point z) becomes a signed INT8 pair
    with zero point 0, and an INT32 bias DQ becomes the float bias it stands for (TensorRT fuses a float bias).
    z = 128 keeps s: the same integers shifted by 128, exact. Any other z takes the symmetric scale covering the
    UINT8 range, max(z, 255 - z) * s / 127: one bit of resolution less for a non-negative input (z = 0).
    """
    import onnx
    from onnx import helper, numpy_helper

    from bitdeploy.converters.qat_qdq import _save_checked

    model = onnx.load(str(qdq_in))
    graph = model.graph
    inits, producers, consumers = _graph_maps(graph)
    taken = set(inits) | set(producers) | {i.name for i in graph.input}
    added: list[Any] = []

    def const(base: str, value: np.ndarray) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        added.append(numpy_helper.from_array(value, name))
        return name

    rewire: dict[str, str] = {}  # the output of a removed node -> the tensor its readers read instead
    removed: set[str] = set()  # removed nodes, by first output
    counts = dict.fromkeys(("exact", "rescaled", "conv_output_pairs_removed", "float_biases"), 0)
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        dqs = consumers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            raise ConversionError(f"{q.name} feeds no DequantizeLinear; write the QAT model with `qat_qdq.write_qdq`")
        source = producers.get(q.input[0])
        readers = [c.op_type for d in dqs for c in consumers.get(d.output[0], [])]
        if source is not None and source.op_type == "Conv" and "Conv" not in readers:  # a conv output's pair
            rewire.update({d.output[0]: q.input[0] for d in dqs})
            removed.update([q.output[0], *(d.output[0] for d in dqs)])
            counts["conv_output_pairs_removed"] += 1
            continue
        scale, exact = _int8_scale(q, dqs, inits)
        base = q.input[1].removesuffix("_scale")
        names = [const(f"{base}_int8_scale", scale), const(f"{base}_int8_zero_point", np.array(0, np.int8))]
        for node in (q, *dqs):
            del node.input[1:]
            node.input.extend(names)
        counts["exact" if exact else "rescaled"] += 1
    for dq in graph.node:  # INT32 biases: the float values they stand for, under the DQ's output name
        value = inits.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if value is not None and value.dtype == np.int32:
            zp = inits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else 0
            bias = ((value - zp).astype(np.float32) * inits[dq.input[1]]).astype(np.float32)
            added.append(numpy_helper.from_array(bias, dq.output[0]))
            removed.add(dq.output[0])
            counts["float_biases"] += 1

    def resolve(name: str) -> str:
        while name in rewire:
            name = rewire[name]
        return name

    kept = [n for n in graph.node if n.output[0] not in removed]
    for n in kept:
        n.input[:] = [resolve(i) for i in n.input]
    kept += [helper.make_node("Identity", [resolve(o.name)], [o.name]) for o in graph.output if o.name in rewire]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(added)
    used = {i for n in graph.node for i in n.input}
    initializers = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    stale = removed | {n.output[0] for n in kept if n.op_type == "QuantizeLinear"}  # gone, or now INT8
    value_info = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(value_info)

    float_layers, head_in_float = _float_convs(graph)
    report = inspect_qdq(model, head_in_float, float_layers)
    if report.violations:
        raise ConversionError(
            f"{Path(qdq_in).name} cannot be re-encoded for TensorRT ({report.violations[0]}; {len(report.violations)} in all); "
            "write it from the fine-tune's parameters with `bitdeploy.converters.qat_qdq.write_qdq`"
        )
    _save_checked(model, Path(out))
    in_float = f"GroupNorm x{report.norm_groups}, residual Add x{report.residual_adds}"
    in_float += " and the head" if head_in_float else ""
    return {
        "format": "qdq",
        "from": "quantization-aware fine-tune",
        "activations": "int8, per-tensor, symmetric (the fine-tune's uint8 re-encoded)",
        "weights": "int8, per-channel, symmetric (the fine-tune's)",
        "bias": "float",
        "quantized_convs": report.quantized_convs,
        "float_convs": report.float_convs,
        "float_layers": [layer_of(n) for n in report.float_convs],
        "norm_groups_in_float": report.norm_groups,
        "residual_adds_in_float": report.residual_adds,
        "reencoded": counts,
        "notes": [
            f"INT8 Q/DQ of the quantization-aware fine-tune on {report.quantized_convs} convs; {in_float} stay float",
            f"re-encoded for TensorRT: {counts['exact']} activation quantizers exact (zero point 128), "
            f"{counts['rescaled']} re-scaled to zero point 0 (one bit of resolution less on non-negative inputs); "
            f"{counts['conv_output_pairs_removed']} conv-output Q/DQ pairs removed",
        ],
    }


def _int8_scale(q: Any, dqs: Sequence[Any], inits: dict[str, np.ndarray]) -> tuple[np.ndarray, bool]:
    """A per-tensor 8-bit Q/DQ pair's signed INT8 scale with zero point 0, and whether that is exact (`for_tensorrt`)."""

    def scale_and_zero_point(node: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
        zp = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.array(0, np.uint8)
        return inits.get(node.input[1]), zp

    scale, zp = scale_and_zero_point(q)
    if scale is None or zp is None or scale.size != 1 or zp.size != 1 or zp.dtype not in (np.uint8, np.int8):
        raise ConversionError(
            f"{q.name} is not a per-tensor 8-bit quantizer; write the QAT model with `qat_qdq.write_qdq`"
        )
    for dq in dqs:
        s, z = scale_and_zero_point(dq)
        if s is None or z is None or z.dtype != zp.dtype or not (np.array_equal(s, scale) and np.array_equal(z, zp)):
            raise ConversionError(
                f"{dq.name} dequantizes with other parameters than {q.name}; write the QAT model with `qat_qdq.write_qdq`"
            )
    info, z0 = np.iinfo(zp.dtype), int(zp.ravel()[0])
    below, above = z0 - int(info.min), int(info.max) - z0  # the integer steps on either side of zero
    s0 = float(scale.ravel()[0])
    if (below, above) == (128, 127):
        return np.array(s0, np.float32), True
    return np.array(max(below, above) * s0 / 127, np.float32), False


def _float_convs(graph: Any) -> tuple[list[str], bool]:
    """The layers whose Conv reads no DequantizeLinear output, and whether the head (the last Conv) is one of them."""
    producers = {o: n.op_type for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    floating = [n.name for n in convs if all(producers.get(i) != "DequantizeLinear" for i in n.input[:2])]
    return [layer_of(n) for n in floating], bool(convs) and convs[-1].name in floating


def build_fp16(onnx_fp32: Path, out: Path) -> dict[str, Any]:
    """FP16 casts with normalisations in FP32 and FP32 I/O (a strongly typed network builds it as written)."""
    from bitdeploy.converters import ort_quant

    info = ort_quant.convert_fp16(onnx_fp32, out, keep_io_types=True)
    facts = dict(info) if isinstance(info, dict) else {}
    facts.update(
        {"format": "fp16-casts", "notes": ["FP16 casts in the graph; InstanceNormalization and its statistics in FP32"]}
    )
    return facts


def _copy_external_data(onnx_path: Path, work_dir: Path) -> list[str]:
    """Copy an export's external-data sidecars (models > 2 GB) beside the copy; their names stay as recorded."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    names = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                names.add(entry.value)
    for name in names:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ConversionError(
                f"{onnx_path.name}: external data location {name!r} leaves its directory; re-export with `bitdeploy export`"
            )
        shutil.copyfile(onnx_path.parent / name, work_dir / name)
    return sorted(names)


def prepare_onnx(
    onnx_fp32: Path,
    work_dir: Path,
    precision: str,
    calibration: CalibrationData | None,
    options: ConvertOptions,
    float_layers: Sequence[str] = (),
) -> tuple[str, dict[str, Any]]:
    """Write `model.trt.onnx` (the graph TensorRT builds; it also lets the bundle be rebuilt for another GPU);
    INT8 keeps `float_layers` in float as well."""
    check_request("TensorRT", precision, calibration)
    out = Path(work_dir) / ONNX_NAME
    if precision == "fp32":
        shutil.copyfile(onnx_fp32, out)
        return ONNX_NAME, {
            "format": "fp32",
            "notes": [],
            "extra_files": _copy_external_data(Path(onnx_fp32), Path(work_dir)),
        }
    if precision == "fp16":
        return ONNX_NAME, build_fp16(onnx_fp32, out)
    return ONNX_NAME, build_qdq(onnx_fp32, out, calibration, options, float_layers)
