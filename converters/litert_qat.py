"""LiteRT INT8 from a quantization-aware fine-tune: the fine-tuned model with the fine-tune's own quantization.

`LiteRtConverter.from_qat` rebuilds the folded PyTorch model from the fine-tune's FP32 export (`QatModel.onnx_fp32`)
and quantizes it with PT2E like the calibrated route (`litert_convert._convert_int8`): the same conv-only
annotation (each convolution's input, weight and output; the bias is the lowering's), but every spec fixed from the
fine-tune's `QatParams` instead of an observer to calibrate:

- a conv's input and output: int8 per tensor with the fine-tune's UINT8 scale s and zero point z - 128, the same
  grid over the same range [(0 - z) s, (255 - z) s], its integers shifted by 128 (exact);
- its weight: int8 per output channel, symmetric over [-63, 63] (7-bit), at the fine-tune's scales; the float
  weights are put on that grid first, so the integers are the Q/DQ model's (`qat_qdq.quantize_weight`) bit for bit;
- GroupNorm reads the conv output in float, as in the fine-tune: the calibrated route lets PT2E share the conv
  output's quantizer with GroupNorm's mean (`propagate_annotation`), this one does not.

Specs are found by the conv node's module path (its `nn_module_stack`: the layer names of
`bitdeploy.converters.layers`). Convolutions the parameters do not name stay float, as GroupNorm's statistics do;
the head stays float as in the calibrated route. The stem stays the converter's float conv (an int8 stem makes the
graph input int8) computing the fine-tune's quantized stem: input and output rounded onto their UINT8 grids,
weights on the 7-bit grid. Nothing is calibrated: an observer no parameter fixes raises ConversionError.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bitdeploy.converters.qat_qdq import ConvQuant, QatParams, TensorQuant, quantize_weight
from bitdeploy.core.errors import ConversionError

if TYPE_CHECKING:
    from bitdeploy.converters.base import QatModel
    from bitdeploy.converters.litert_ranges import Int8Step

SOURCE = "quantization-aware fine-tune"
NET = "net."  # BiTLite holds the folded ResNetV2 as `net`
STEM = "root.conv"  # float with its quantization emulated (`_fake_stem`)
FLOAT = ("head.conv",)  # float, as the calibrated route keeps it: the logits leave the graph as float32
RERUN = "the QAT parameters come from another model: run the fine-tune again on this one"


def int8_step(precision: str, qat: QatModel) -> Int8Step:
    """The INT8 step `LiteRtConverter._run` takes (`litert_convert.Int8Step`), with the fine-tune's parameters."""
    if precision != "int8":
        raise ConversionError(
            f"a quantization-aware fine-tune makes INT8 bundles, not {precision}; build it with --precision int8"
        )
    params = QatParams.load(Path(qat.params))

    def int8(lite: Any, float_types: tuple[type, ...], sample: Any, out: Path) -> tuple[dict[str, Any], list[str]]:
        return convert(lite, sample, params, out)

    return int8


def convert(lite: Any, sample: Any, params: QatParams, path: Path) -> tuple[dict[str, Any], list[str]]:
    """Write the QAT model's .tflite to `path`; returns (the quantization record, notes)."""
    import litert_torch
    import torch
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from bitdeploy.converters.litert_ranges import batch_dim

    _check_shapes(lite, params)
    int8 = [name for name in params.convs if name != STEM and name not in FLOAT]
    agreement = _snap_weights(lite, params, int8)
    if STEM in params.convs:
        _fake_stem(lite, params.convs[STEM], params.weight_qmax)
    done: dict[str, str] = {}
    quantizer, pinned = _quantizer(params, done)
    exported = torch.export.export(lite, (sample,), dynamic_shapes=batch_dim(torch)).module()
    prepared = prepare_pt2e(exported, quantizer)
    observers = _check_observers(prepared, pinned)
    unseen = [name for name in int8 if done.get(name) != "int8"]
    if unseen:
        raise ConversionError(
            f"the LiteRT graph has no convolution for {len(unseen)} QAT-quantized layers (first: {unseen[0]}); "
            "report it with the model name"
        )
    quantized = convert_pt2e(prepared, fold_quantize=False)
    move_exported_model_to_eval(quantized)
    edge = litert_torch.convert(
        quantized, (sample,), quant_config=QuantConfig(pt2e_quantizer=quantizer), dynamic_shapes=batch_dim(torch)
    )
    edge.export(str(path))
    return _record(params, done, int8, observers, agreement)


def _check_shapes(lite: Any, params: QatParams) -> None:
    """Every convolution the parameters name is in the model, with one weight scale per output channel."""
    modules = dict(lite.net.named_modules())
    for name, q in params.convs.items():
        weight = getattr(modules.get(name), "weight", None)
        if weight is None or weight.dim() != 4:
            raise ConversionError(f"the QAT parameters name a convolution {name} the model does not have; {RERUN}")
        if len(q.weight_scales) != weight.shape[0]:
            raise ConversionError(
                f"{name}: {len(q.weight_scales)} weight scales for {weight.shape[0]} output channels; {RERUN}"
            )


def _grid(weight: Any, q: ConvQuant, qmax: int) -> np.ndarray:
    """A conv weight on the fine-tune's 7-bit grid: its integers (`quantize_weight`) times their scales."""
    s = np.asarray(q.weight_scales, dtype=np.float32)
    return quantize_weight(weight.detach().numpy(), s, qmax).astype(np.float32) * s.reshape(-1, 1, 1, 1)


def _snap_weights(lite: Any, params: QatParams, layers: list[str]) -> float:
    """Put the int8 layers' float weights on the fine-tune's grid, so PT2E quantizes them to exactly its integers;
    returns the largest relative gap between its scales and PT2E's own per-channel minmax, max |w| / qmax."""
    import torch

    worst = 0.0
    for layer in layers:
        conv = lite.net.get_submodule(layer)
        w = conv.weight.detach().numpy()
        scales = np.asarray(params.convs[layer].weight_scales, dtype=np.float32)
        minmax = np.abs(w).reshape(w.shape[0], -1).max(1) / np.float32(params.weight_qmax)
        worst = max(worst, float(np.max(np.abs(minmax - scales) / scales)))
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(_grid(conv.weight, params.convs[layer], params.weight_qmax)))
    return worst


def _fake_stem(lite: Any, q: ConvQuant, qmax: int) -> None:
    """The float stem computing the fine-tune's quantized one: input and output rounded onto their UINT8 grids,
    weights on the 7-bit grid. The input enters as integers (x / scale by a per-channel 1x1 conv: an elementwise op
    on the graph input does not lower with a dynamic batch), its scale folded into the weights."""
    import torch
    import torch.nn.functional as F

    stem = lite.net.root.conv  # the converter's FloatStem, which no annotation reaches
    channels, inp, out = stem.in_channels, q.input, q.output

    def inverse(t: TensorQuant) -> float:
        return float(np.float32(1.0) / np.float32(t.scale))

    class FakeQuantStem(type(stem)):  # type: ignore[misc]
        inverse: torch.Tensor

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = torch.round(F.conv2d(x, self.inverse, groups=channels))
            y = super().forward(torch.clamp(n, -inp.zero_point, 255 - inp.zero_point))
            if out is None:
                return y
            n = torch.clamp(torch.round(y * inverse(out)), -out.zero_point, 255 - out.zero_point)
            return n * float(np.float32(out.scale))

    new = FakeQuantStem(channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=False)
    new.register_buffer("inverse", torch.full((channels, 1, 1, 1), inverse(inp)))
    with torch.no_grad():
        new.weight.copy_(torch.from_numpy(_grid(stem.weight, q, qmax) * np.float32(inp.scale)))
    lite.net.root.conv = new


def _layer(node: Any) -> tuple[str, str]:
    """(layer name, module class name) of a conv node: the innermost module that ran it."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        raise ConversionError(
            f"the LiteRT graph's convolution {node.name} has no module path to find its QAT parameters by; "
            "install the torch version litert-torch pins and rerun"
        )
    path, kind = list(stack.values())[-1]
    return str(path).removeprefix(NET), str(getattr(kind, "__qualname__", kind)).rsplit(".", 1)[-1]


def _pinned_observer() -> Any:
    """A per-channel weight observer whose scales are given (the fine-tune's), not observed."""
    import torch
    from torchao.quantization.pt2e import PerChannelMinMaxObserver

    class PinnedPerChannel(PerChannelMinMaxObserver):  # type: ignore[misc]
        pinned: torch.Tensor

        def __init__(self, scales: tuple[float, ...], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.register_buffer("pinned", torch.tensor(scales, dtype=torch.float32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
            return self.pinned, torch.zeros(self.pinned.shape, dtype=torch.int64)

    return PinnedPerChannel


def _quantizer(params: QatParams, done: dict[str, str]) -> tuple[Any, Any]:
    """(a PT2E quantizer annotating every int8 conv with the fine-tune's specs, its weight observer class); records in
    `done` what became of each conv layer it met ("int8" or "float")."""
    import torch
    from litert_torch.quantize import pt2e_quantizer
    from torchao.quantization.pt2e.quantizer import FixedQParamsQuantizationSpec as Fixed
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec

    pinned = _pinned_observer()
    convs = (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)

    def activation(q: TensorQuant) -> Any:  # UINT8 (s, z) as int8 (s, z - 128)
        scale, zero = float(np.float32(q.scale)), q.zero_point - 128
        return Fixed(torch.int8, scale, zero, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine)

    def weight(scales: tuple[float, ...]) -> Any:
        qmax, ctr = params.weight_qmax, pinned.with_args(scales=scales)
        return QuantizationSpec(
            torch.int8, ctr, quant_min=-qmax, quant_max=qmax, qscheme=torch.per_channel_symmetric, ch_axis=0
        )

    class QatQuantizer(pt2e_quantizer.PT2EQuantizer):  # type: ignore[misc]
        def annotate(self, model: Any) -> Any:  # no propagate_annotation: GroupNorm reads conv outputs in float
            for node in model.graph.nodes:
                if node.op != "call_function" or node.target not in convs:
                    continue
                layer, kind = _layer(node)
                if kind == "GroupNormLite":
                    continue  # GroupNorm's grouped means: statistics, not a layer
                q = params.convs.get(layer)
                done[layer] = "float" if q is None or layer == STEM or layer in FLOAT else "int8"
                if q is None or done[layer] == "float":
                    continue
                inputs = {node.args[0]: activation(q.input), node.args[1]: weight(q.weight_scales)}
                output = activation(q.output) if q.output is not None else None
                node.meta["quantization_annotation"] = QuantizationAnnotation(inputs, output, _annotated=True)
            return model

    # the global config only tells litert-torch's lowering that this is static quantization
    quantizer = QatQuantizer().set_global(pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
    return quantizer, pinned


def _check_observers(prepared: Any, pinned: Any) -> int:
    """Every observer PT2E inserted holds the fine-tune's parameters (none would calibrate); returns their count."""
    from torchao.quantization.pt2e import FixedQParamsObserver

    from bitdeploy.converters.litert_ranges import OBSERVER

    nodes = [n for n in prepared.graph.nodes if n.op == "call_module" and str(n.target).startswith(OBSERVER)]
    for n in nodes:
        if not isinstance(getattr(prepared, n.target), (FixedQParamsObserver, pinned)):
            raise ConversionError(
                f"PT2E observes {n.args[0].name}, which no QAT parameter fixes, and a QAT model is never calibrated; "
                "report it with the model name"
            )
    return len(nodes)


def _record(
    params: QatParams, done: dict[str, str], int8: list[str], observers: int, agreement: float
) -> tuple[dict[str, Any], list[str]]:
    """(the manifest's quantization record, the notes)."""
    stem = STEM in params.convs
    stem_how = "stem conv (the fine-tune's quantization emulated)" if stem else "stem conv"
    differ = {name: "float, its quantization emulated" if name == STEM else "float" for name in params.convs}
    differ = {name: how for name, how in differ.items() if name not in int8}
    record = {
        "method": "qat",
        "samples": int(params.record.get("calibrated_images", 0) or 0),  # the fine-tune's; none here
        "source": SOURCE,
        "scheme": "pt2e-static, every scale and zero point the fine-tune's",
        "weights": f"int8 per-channel symmetric, |q| <= {params.weight_qmax}, the fine-tune's scales",
        "weight_scales_vs_minmax": agreement,  # largest relative gap to max |w| / qmax of the exported weights
        "activations": "int8 per-tensor on conv inputs and outputs: the fine-tune's uint8 scale, zero point - 128",
        "op_types": ["CONV_2D"],
        "float": [stem_how, "GroupNorm", "residual add", "pooling", "head conv"],
        "float_layers": [name for name, how in done.items() if how == "float"],
        "quantized_layers": len(int8),
        "observers": observers,
        "differs_from_qat": differ,
        "qat": dict(params.record),
    }
    notes = [f"INT8 from the quantization-aware fine-tune: {len(int8)} convolutions with its scales and zero points"]
    if stem:
        notes.append("the stem conv computes in FP32 on the fine-tune's grids (input, 7-bit weights, output)")
    others = [name for name in differ if name != STEM]
    if others:
        notes.append(f"quantized by the fine-tune, FP32 here: {', '.join(others)}")
    return record, notes
