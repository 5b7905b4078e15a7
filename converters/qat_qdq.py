"""The explicitly quantized model of a quantization-aware fine-tune: the Q/DQ ONNX written from its quantization
parameters (`bitdeploy.training.qat_params.QatParams`, the JSON the fine-tune writes beside its checkpoint, re-exported
here for the converters) into the fine-tuned model's folded FP32 export. Torch-free.

The scheme (`SCHEME`) is the one every engine runs as written:
- weights: INT8, symmetric, per output channel, 7-bit (|q| <= 63), so x86 CPUs without VNNI, whose U8S8 kernels sum
  u8 x s8 pairs into saturating int16, compute what VNNI CPUs compute (REFERENCE E);
- a convolution's input and output: UINT8, per tensor, asymmetric (ONNX Runtime's CPU kernels fuse
  DQ -> Conv -> Q into one QLinearConv; OpenVINO reads each Q/DQ pair as a FakeQuantize);
- bias (the head's, when quantized): INT32 at input scale x weight scale;
- GroupNorm, the residual adds and the classifier head stay float, as the post-training converters keep them.

Nothing is calibrated here: every scale and zero point is the fine-tune's, so the same file is the same model on every
engine. TensorRT wants signed activations with zero points of 0; `for_tensorrt` re-encodes the same model that way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.converters import layers
from bitdeploy.core.errors import ConversionError
from bitdeploy.training.qat_params import PARAMS_FILE, SCHEME, WEIGHT_QMAX, ConvQuant, QatParams, TensorQuant

__all__ = ["PARAMS_FILE", "SCHEME", "WEIGHT_QMAX", "ConvQuant", "QatParams", "TensorQuant", "describe", "write_qdq"]


def quantize_weight(w: np.ndarray, scales: np.ndarray, qmax: int) -> np.ndarray:
    """Per-output-channel symmetric INT8 of a conv weight (OIHW)."""
    s = scales.reshape(-1, *([1] * (w.ndim - 1))).astype(np.float32)
    return np.clip(np.rint(w / s), -qmax, qmax).astype(np.int8)


class _Graph:
    """Small edit helper over an ONNX graph: unique names, initializers, rewiring consumers."""

    def __init__(self, model: Any) -> None:
        self.model, self.graph = model, model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.taken = (
            {n.name for n in self.graph.node} | set(self.inits) | {o for n in self.graph.node for o in n.output}
        )

    def name(self, base: str) -> str:
        out, k = base, 1
        while out in self.taken:
            out, k = f"{base}_{k}", k + 1
        self.taken.add(out)
        return out

    def const(self, base: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(base)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        if name not in self.inits:
            raise ConversionError(f"weight {name!r} is not an initializer; re-export the model with `bitdeploy export`")
        return numpy_helper.to_array(self.inits[name])

    def qdq(self, tensor: str, q: TensorQuant, base: str) -> tuple[list[Any], str]:
        from onnx import helper

        scale = self.const(f"{base}_scale", np.float32(q.scale))
        zp = self.const(f"{base}_zero_point", np.uint8(q.zero_point))
        quantized, out = self.name(f"{base}_quantized"), self.name(f"{base}_dequantized")
        nodes = [
            helper.make_node(
                "QuantizeLinear", [tensor, scale, zp], [quantized], name=self.name(f"{base}_QuantizeLinear")
            ),
            helper.make_node(
                "DequantizeLinear", [quantized, scale, zp], [out], name=self.name(f"{base}_DequantizeLinear")
            ),
        ]
        return nodes, out


def write_qdq(onnx_fp32: Path, params: QatParams, out: Path) -> dict[str, Any]:
    """The fine-tuned model's folded FP32 export with the fine-tune's Q/DQ written in; returns what was done."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_fp32))
    g = _Graph(model)
    convs = {layers.layer_of(n.name): n for n in model.graph.node if n.op_type == "Conv"}
    missing = sorted(set(params.convs) - set(convs))
    if missing:
        raise ConversionError(
            f"the QAT parameters name {len(missing)} convolutions the model does not have (first: {missing[0]}); "
            "they come from another model: run the fine-tune again on this one"
        )
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    new_nodes: dict[str, list[Any]] = {}  # conv name -> nodes to put before it (input, weight) / after it (output)
    after: dict[str, list[Any]] = {}
    for layer, q in params.convs.items():
        conv = convs[layer]
        base = conv.name.strip("/").replace("/", "_")
        before, x = g.qdq(conv.input[0], q.input, f"{base}_input")
        w = g.array(conv.input[1])
        scales = np.asarray(q.weight_scales, dtype=np.float32)
        if scales.shape != (w.shape[0],):
            raise ConversionError(
                f"{layer}: {scales.size} weight scales for {w.shape[0]} output channels; run the fine-tune again"
            )
        wq = g.const(f"{base}_weight_quantized", quantize_weight(w, scales, params.weight_qmax))
        ws, wz = (
            g.const(f"{base}_weight_scale", scales),
            g.const(f"{base}_weight_zero_point", np.zeros_like(scales, np.int8)),
        )
        wd = g.name(f"{base}_weight_dequantized")
        before.append(
            helper.make_node(
                "DequantizeLinear", [wq, ws, wz], [wd], name=g.name(f"{base}_weight_DequantizeLinear"), axis=0
            )
        )
        inputs = [x, wd]
        if len(conv.input) > 2 and conv.input[2]:
            bias_scale = (np.float32(q.input.scale) * scales).astype(np.float32)
            bq = np.rint(g.array(conv.input[2]) / bias_scale).astype(np.int32)
            bqn, bs = g.const(f"{base}_bias_quantized", bq), g.const(f"{base}_bias_scale", bias_scale)
            bz, bd = g.const(f"{base}_bias_zero_point", np.zeros_like(bq)), g.name(f"{base}_bias_dequantized")
            before.append(
                helper.make_node(
                    "DequantizeLinear", [bqn, bs, bz], [bd], name=g.name(f"{base}_bias_DequantizeLinear"), axis=0
                )
            )
            inputs.append(bd)
        del conv.input[:]
        conv.input.extend(inputs)
        new_nodes[conv.name] = before
        if q.output is not None:
            y = conv.output[0]
            nodes, yd = g.qdq(y, q.output, f"{base}_output")
            for c in consumers.get(y, []):
                c.input[:] = [yd if i == y else i for i in c.input]
            if y in graph_outputs:
                raise ConversionError(f"{layer} is the model's output; its output cannot be quantized")
            after[conv.name] = nodes
    ordered = []
    for n in model.graph.node:
        ordered += new_nodes.get(n.name, [])
        ordered.append(n)
        ordered += after.get(n.name, [])
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    used = {i for n in model.graph.node for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    _save_checked(model, Path(out))
    return facts(params, [name for name in convs if name not in params.convs])


def facts(params: QatParams, float_layers: list[str]) -> dict[str, Any]:
    """The manifest's quantization record of a bundle made from the fine-tune's Q/DQ model."""
    return {
        "format": "QDQ",
        "tool": "bitdeploy quantization-aware fine-tune",
        "method": "qat",
        "samples": int(params.record.get("calibrated_images", 0) or 0),
        "scheme": params.scheme,
        "quantized_nodes": len(params.convs),
        "float_layers": list(float_layers),
        "weights": f"int8 {params.weight_qmax.bit_length() + 1}-bit range, per-channel, symmetric",
        "activations": "uint8, per-tensor, asymmetric",
        "qat": dict(params.record),
    }


def describe(qdq: Path, params_path: Path) -> dict[str, Any]:
    """`facts` of a written Q/DQ model: its float convolutions read from the file."""
    import onnx

    params = QatParams.load(params_path)
    model = onnx.load(str(qdq), load_external_data=False)
    convs = [layers.layer_of(n.name) for n in model.graph.node if n.op_type == "Conv"]
    return facts(params, [c for c in dict.fromkeys(convs) if c not in params.convs])


def note(params_path: Path) -> str:
    """The bundle note that says where its quantization came from."""
    record = QatParams.load(params_path).record
    return (
        f"quantization-aware fine-tune: {record.get('steps')} steps on the {record.get('split', 'train')} split, "
        f"distilled from the FP32 model; every scale and zero point is the fine-tune's (nothing calibrated here)"
    )


def _save_checked(model: Any, out: Path) -> None:
    import onnx

    from bitdeploy.core.fsutil import temp_name

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(out)
    try:
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp))
        tmp.replace(out)
    except Exception as exc:
        raise ConversionError(f"the Q/DQ model is not valid ONNX ({exc}); rerun with --debug and report it") from exc
    finally:
        tmp.unlink(missing_ok=True)
