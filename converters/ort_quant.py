"""ONNX graph precision transforms built on ONNX Runtime's tools: static INT8 (QDQ) and FP16.

Both keep BiT's GroupNorm in float (no backend runs it well in INT8 or FP16). The export decomposes each GroupNorm into
Reshape -> InstanceNormalization -> Reshape -> Mul -> Add, and all 49 of them share one InstanceNorm scale
tensor: ORT's default op set then fails ("Quantization parameter shared mode is not supported for weight"),
and no backend has an INT8 normalisation anyway. So only Conv is quantized by default: Q/DQ on every conv
input (after GN+ReLU, bounded) and per-output-channel symmetric INT8 weights. The residual Add, the norms
and the global pool stay float; `exclude_head` keeps the classifier conv float too.

`quantize_qdq` is also what the TensorRT INT8 route uses to write its explicit-quantization ONNX; it asks for
what TensorRT needs explicitly (`bitdeploy.converters.trt_qdq.build_qdq`: symmetric INT8 activations, so zero
points of 0, and `quantize_outputs=False`, no Q/DQ on conv outputs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitdeploy.converters import layers
from bitdeploy.converters.base import check_request
from bitdeploy.converters.calibration import CalibrationData, ort_reader
from bitdeploy.core.errors import ConversionError, first_line
from bitdeploy.core.stdio import stdout_to_stderr

METHODS = ("minmax", "entropy", "percentile")
DEFAULT_OP_TYPES: tuple[str, ...] = ("Conv",)
# Normalisations and everything that computes their statistics stay FP32 in FP16 graphs (x² overflows FP16).
FP32_OP_TYPES: tuple[str, ...] = (
    "InstanceNormalization",
    "GroupNormalization",
    "LayerNormalization",
    "BatchNormalization",
    "ReduceMean",
    "ReduceSumSquare",
    "ReduceL2",
    "Pow",
    "Sqrt",
    "Reciprocal",
)
ACTIVATION_TYPES = ("int8", "uint8")


def topological_sort(graph: Any) -> None:
    """Reorder graph.node so every node comes after its inputs' producers (the FP16 converter appends the
    input Casts at the end, which onnx.checker rejects)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        progress = False
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
                progress = True
            else:
                rest.append(n)
        if not progress:
            raise ConversionError(
                f"the graph has a cycle or a missing input at node {rest[0].name!r}; rerun with --debug and report it"
            )
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs advice ("consider pre-processing") on the root logger; we measured it."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def head_conv_names(model: Any) -> list[str]:
    """Names of the classifier convs: Conv nodes that read a GlobalAveragePool/ReduceMean output."""
    producers = {o: n for n in model.graph.node for o in n.output}
    names = []
    for n in model.graph.node:
        if (
            n.op_type == "Conv"
            and n.input
            and (p := producers.get(n.input[0])) is not None
            and p.op_type in ("GlobalAveragePool", "ReduceMean")
        ):
            names.append(n.name)
    return names


@dataclass(frozen=True)
class QdqOptions:
    """How `quantize_qdq` places Q/DQ. No field overrides another: the file is what the fields say.

    Weights: INT8, symmetric, per output channel (`per_channel`). Activations: `activation_type` int8 (S8S8,
    TensorRT and ARM) or uint8 (U8S8: faster on x86 VNNI, measured in docs/targets.md), per tensor, asymmetric
    unless `symmetric_activations` (TensorRT needs symmetric int8: zero points of 0). `reduce_range`: 7-bit
    weights, so x86 CPUs without VNNI, whose U8S8 kernels sum u8 x s8 pairs into saturating int16, compute
    exactly what VNNI CPUs do (see `bitdeploy.converters.ort_convert.SCHEMES`). `quantize_outputs`: Q/DQ on the
    quantized nodes' outputs too; ONNX Runtime's CPU kernels need the output Q to fuse QLinearConv, while TensorRT
    keeps the conv output float for the GroupNorm that reads it (TensorRT has no INT8 normalisation), so its route
    passes False. `method`: minmax | entropy | percentile (None: minmax).
    """

    per_channel: bool = True
    symmetric_activations: bool = False
    method: str | None = "minmax"
    op_types: Sequence[str] = DEFAULT_OP_TYPES
    nodes_to_exclude: Sequence[str] = ()
    float_layers: Sequence[str] = ()  # layer names (`bitdeploy.converters.layers`): their convs stay float
    activation_type: str = "int8"
    reduce_range: bool = False
    exclude_head: bool = False
    quantize_bias: bool = True
    quantize_outputs: bool = True
    batch_size: int = 1
    extra_options: Mapping[str, Any] | None = None  # passed to quantize_static on top of ours


def quantize_qdq(
    onnx_in: str | Path, onnx_out: str | Path, calibration: CalibrationData, options: QdqOptions = QdqOptions()
) -> dict[str, Any]:
    """Static INT8 QDQ quantization of `onnx_in` into `onnx_out` as `options` say; returns what was done (for the
    manifest)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = (options.method or "minmax").lower()
    if method not in METHODS:
        raise ConversionError(
            f"--calib-method {method!r} is not available for ONNX Runtime; choose one of: {', '.join(METHODS)}"
        )
    if options.activation_type not in ACTIVATION_TYPES:
        raise ConversionError(f"activation type must be one of {ACTIVATION_TYPES}, got {options.activation_type!r}")
    check_request("ONNX Runtime", "int8", calibration)
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    model = onnx.load(str(onnx_in), load_external_data=False)
    input_name = model.graph.input[0].name
    unnamed = [n for n in model.graph.node if not n.name]
    if unnamed:
        raise ConversionError(
            f"{onnx_in.name}: {len(unnamed)} nodes have no name, so Q/DQ placement cannot be controlled; re-export with `bitdeploy export`"
        )
    excluded = list(options.nodes_to_exclude)
    excluded += layers.node_names(((n.name, n.op_type) for n in model.graph.node), options.float_layers)
    if options.exclude_head:
        excluded += [n for n in head_conv_names(model) if n not in excluded]
    targets = [n for n in model.graph.node if n.op_type in options.op_types and n.name not in excluded]
    if not targets:
        raise ConversionError(
            f"{onnx_in.name}: no {'/'.join(options.op_types)} node left to quantize; check the exclusions"
        )

    reader = ort_reader(calibration, input_name, options.batch_size)
    ort_options: dict[str, Any] = {
        "ActivationSymmetric": options.symmetric_activations,
        "WeightSymmetric": True,
        "QuantizeBias": options.quantize_bias,
        # Histogram methods keep every activation of every batch until the end; collect one batch at a time.
        **({"CalibStridedMinMax": 1} if method != "minmax" else {}),
        # False (TensorRT): Q/DQ on the inputs and weights only; the output stays float for the GroupNorm that
        # reads it (TensorRT has no INT8 norm). ONNX Runtime's CPU kernels need the output Q to fuse QLinearConv.
        **({} if options.quantize_outputs else {"OpTypesToExcludeOutputQuantization": list(options.op_types)}),
        **(options.extra_options or {}),
    }
    cal_method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[options.activation_type]
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    tmp = onnx_out.with_name(f".{onnx_out.name}.tmp")
    try:
        with _quiet_root_logger(), stdout_to_stderr():  # the histogram calibrators print every tensor to stdout
            quantize_static(
                str(onnx_in),
                str(tmp),
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(options.op_types),
                nodes_to_exclude=excluded,
                per_channel=options.per_channel,
                reduce_range=options.reduce_range,
                activation_type=qtype,
                weight_type=QuantType.QInt8,
                calibrate_method=cal_method,
                extra_options=ort_options,
            )
        tmp.replace(onnx_out)
    except ConversionError:
        raise
    except Exception as exc:  # onnxruntime.quantization raises plain Exceptions
        raise ConversionError(
            f"ONNX Runtime quantization failed ({first_line(exc)}); rerun with --debug and report it"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    quantized = onnx.load(str(onnx_out), load_external_data=False)
    q_inputs = {n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    n_q = sum(1 for n in quantized.graph.node if n.op_type in options.op_types and n.input and n.input[0] in q_inputs)
    float_ops = sorted(
        {
            n.op_type
            for n in quantized.graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and n.op_type not in options.op_types
        }
    )
    return {
        "format": "QDQ",
        "tool": "onnxruntime.quantization.quantize_static",
        "method": method,
        "samples": len(calibration),
        "activations": f"{options.activation_type}, per-tensor, {'symmetric' if options.symmetric_activations else 'asymmetric'}",
        "weights": f"{'int8 7-bit range' if options.reduce_range else 'int8'}, {'per-channel' if options.per_channel else 'per-tensor'}, symmetric",
        "op_types": list(options.op_types),
        "quantized_nodes": n_q,
        "excluded_nodes": excluded,
        "float_layers": list(dict.fromkeys(layers.layer_of(n) for n in excluded)),
        "float_op_types": float_ops,
        "bias": "int32" if options.quantize_bias else "float",
    }


def convert_fp16(
    onnx_in: str | Path,
    onnx_out: str | Path,
    keep_fp32_op_types: Sequence[str] = FP32_OP_TYPES,
    keep_io_types: bool = True,
) -> dict[str, Any]:
    """FP16 weights and activations, with normalisations (and their statistics) kept in FP32.

    The graph input and output stay float32 (`keep_io_types`), so bundles keep the same preprocessing and
    logits dtype; Cast nodes are inserted around the FP32 islands.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    model = onnx.load(str(onnx_in))
    kept = [n.op_type for n in model.graph.node if n.op_type in keep_fp32_op_types]
    try:
        half = convert_float_to_float16(model, keep_io_types=keep_io_types, op_block_list=list(keep_fp32_op_types))
        topological_sort(half.graph)
    except Exception as exc:
        raise ConversionError(f"FP16 conversion failed ({first_line(exc)}); rerun with --debug and report it") from exc
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    tmp = onnx_out.with_name(f".{onnx_out.name}.tmp")
    try:
        onnx.save(half, str(tmp))
        onnx.checker.check_model(str(tmp))
        tmp.replace(onnx_out)
    except Exception as exc:
        raise ConversionError(
            f"the FP16 model is not valid ONNX ({first_line(exc)}); rerun with --debug and report it"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    casts = sum(1 for n in half.graph.node if n.op_type == "Cast")
    return {
        "tool": "onnxruntime.transformers.float16.convert_float_to_float16",
        "kept_fp32_op_types": sorted(set(kept)),
        "kept_fp32_nodes": len(kept),
        "casts": casts,
        "io": "float32" if keep_io_types else "float16",
    }
