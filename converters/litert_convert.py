"""The LiteRT (TensorFlow Lite) target: the folded BiT in PyTorch -> `.tflite` with litert-torch.

FP32: the model as is. FP16: float16 conv weights, dequantized to float32 at load (ai-edge-quantizer's float
casting). INT8: PT2E static quantization of the bottleneck convolutions (per-channel symmetric int8 weights, int8
activations), calibrated on the build's CalibrationData; the stem conv, GroupNorm, residual adds, pooling and the
head stay float32, so the graph's input and logits are float32 (docs/targets.md, LiteRT target). A quantization-
aware fine-tune's INT8 (`from_qat`) takes its scales and zero points instead of calibrating (`litert_qat`).

The PyTorch module is rebuilt from the checked ONNX export (the converter contract's input), by parameter
name, and must reproduce it before anything is converted. Two rewrites keep the batch dynamic, since the
lowering bakes the traced batch into every reshape: GroupNorm as grouped-mean convolutions (no reshape), and
logits returned as (N, 1, 1, classes) so the graph ends without a reshape (the runtime flattens them). The
`.tflite` input is NCHW float32 like every other bundle; the converter puts one transpose to NHWC inside.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bitdeploy.converters.base import Artifact, Converter, QatModel, Uniform
from bitdeploy.converters.calibration import CalibrationData
from bitdeploy.converters.litert_ranges import RANGES_FILE, Int8Step, batch_dim, observe
from bitdeploy.core.errors import ConversionError, first_line, require
from bitdeploy.core.fsutil import temp_dir
from bitdeploy.runtimes.bundle.manifest import Manifest, Quantization, TargetInfo

MODEL_FILE = "model.tflite"
CHECK_TOLERANCE = 1e-4  # rebuilt PyTorch vs the ONNX export, and FP32 .tflite vs PyTorch, x max(1, max |logit|)
CALIB_BATCH = 16
LOG_ENV = "BITDEPLOY_LITERT_LOG"  # set to 1 to see litert-torch's own output
# INT8's quantization step: (BiTLite, its float module types, sample, .tflite path) -> (quantization record, notes)


@contextlib.contextmanager
def _quiet(keep: bool) -> Iterator[None]:
    """Silence stdout/stderr at the file-descriptor level (litert-torch's progress lines, absl/XLA logs, the
    quantizer's prints) unless `keep`; failures still surface as ConversionError."""
    if keep:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "wb") as null, open(os.devnull, "w") as text:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                warnings.simplefilter("ignore")
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _scope(node_name: str) -> str:
    """ "/body/block1/unit01/gn1/Mul" -> "body.block1.unit01.gn1"."""
    return ".".join(node_name.strip("/").split("/")[:-1])


def read_onnx_state(onnx_path: Path) -> tuple[dict[str, np.ndarray], tuple[int, ...], int, int]:
    """The folded parameters by PyTorch name, plus (block units, root width, classes), from our ONNX export."""
    onnx = require("onnx", "train")
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    state = {name: a for name, a in inits.items() if re.fullmatch(r"(root|body|head)\.[\w.]+\.(weight|bias)", name)}
    for node in model.graph.node:  # GroupNorm affine: the Mul/Add right after each norm, in its module's scope
        if node.op_type in ("Mul", "Add") and re.fullmatch(r"/[\w/]+/gn\d?/(Mul|Add)", node.name):
            const = [inits[i] for i in node.input if i in inits]
            if len(const) == 1:
                state[f"{_scope(node.name)}.{'weight' if node.op_type == 'Mul' else 'bias'}"] = const[0].reshape(-1)
    if "root.conv.weight" not in state or "head.conv.weight" not in state:
        raise ConversionError(
            f"{onnx_path}: not a bitdeploy BiT export (no root.conv / head.conv weights); rebuild it with `bitdeploy export`"
        )
    units: dict[int, int] = {}
    for name in state:
        m = re.match(r"body\.block(\d+)\.unit(\d+)\.", name)
        if m:
            units[int(m.group(1))] = max(units.get(int(m.group(1)), 0), int(m.group(2)))
    block_units = tuple(units[b] for b in sorted(units))
    return state, block_units, int(state["root.conv.weight"].shape[0]), int(state["head.conv.weight"].shape[0])


def rebuild_model(onnx_path: Path) -> Any:
    """The folded ResNetV2 (plain convs) holding the export's parameters, checked against ONNX Runtime."""
    torch = require("torch", "train")
    from bitdeploy.converters.onnx_export import _ort_runner
    from bitdeploy.training.bit import ResNetV2, fold_weight_standardization

    state, block_units, root_width, classes = read_onnx_state(onnx_path)
    folded = fold_weight_standardization(ResNetV2(block_units, root_width / 64, classes)).eval()
    expected = folded.state_dict()
    loaded = {}
    for name, ref in expected.items():
        if name in state:
            loaded[name] = torch.from_numpy(np.array(state[name], dtype=np.float32)).reshape(ref.shape)
        elif re.search(r"gn\d?\.(weight|bias)$", name):
            loaded[name] = ref  # an identity affine (ones / zeros) that the simplifier removed
        else:
            raise ConversionError(
                f"{onnx_path}: parameter {name} is missing from the ONNX export; rebuild it with `bitdeploy export`"
            )
    folded.load_state_dict(loaded)
    resolution = _input_resolution(onnx_path)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, resolution, resolution)).astype(np.float32)
    with torch.no_grad():
        got = folded(torch.from_numpy(x)).numpy()
    want = _ort_runner(Path(onnx_path))(x)
    diff = float(np.abs(got - want).max())
    if not diff <= CHECK_TOLERANCE * max(1.0, float(np.abs(want).max())):
        raise ConversionError(
            f"the PyTorch model rebuilt from {Path(onnx_path).name} differs from it by {diff:.3g}; report it with the model name"
        )
    return folded


def _input_resolution(onnx_path: Path) -> int:
    import onnx

    dims = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value)


def _lite_modules() -> tuple[Any, Any, Any]:
    """(GroupNormLite, BiTLite, FloatStem) classes, defined once torch is importable."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class GroupNormLite(nn.Module):
        """nn.GroupNorm without reshapes: per-channel means over H, W, averaged within groups by a grouped 1x1
        conv of constant 1/k weights. Same arithmetic (two-pass, biased variance, eps)."""

        average: torch.Tensor  # a buffer (register_buffer), typed for the checker

        def __init__(self, gn: nn.GroupNorm) -> None:
            super().__init__()
            c, g = gn.num_channels, gn.num_groups
            self.groups, self.eps = g, gn.eps
            self.register_buffer("average", torch.full((c, c // g, 1, 1), 1.0 / (c // g)))
            self.weight = nn.Parameter(gn.weight.detach().clone().reshape(1, c, 1, 1))
            self.bias = nn.Parameter(gn.bias.detach().clone().reshape(1, c, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mean = F.conv2d(x.mean((2, 3), keepdim=True), self.average, groups=self.groups)
            d = x - mean
            var = F.conv2d((d * d).mean((2, 3), keepdim=True), self.average, groups=self.groups)
            return d * torch.rsqrt(var + self.eps) * self.weight + self.bias

    class BiTLite(nn.Module):
        """The folded ResNetV2 returning channels-last logits (N, 1, 1, classes)."""

        def __init__(self, folded: nn.Module) -> None:
            super().__init__()
            self.net: Any = folded  # a ResNetV2 (root/body/head), read by attribute
            for parent in list(folded.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.GroupNorm):
                        setattr(parent, name, GroupNormLite(child))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net.head(self.net.body(self.net.root(x))).permute(0, 2, 3, 1)

    class FloatStem(nn.Conv2d):
        """The root conv, marked so INT8 leaves it in float: quantizing it makes the converter turn the graph
        input itself into int8, and bundles keep float32 I/O."""

    return GroupNormLite, BiTLite, FloatStem


def _convert_float(lite: Any, sample: Any, path: Path) -> None:
    import litert_torch
    import torch

    edge = litert_torch.convert(lite, (sample,), dynamic_shapes=batch_dim(torch))
    edge.export(str(path))


def _convert_int8(
    lite: Any,
    float_types: tuple[type, ...],
    sample: Any,
    calibration: CalibrationData | None,
    path: Path,
    float_layers: tuple[str, ...],
    method: str,
    ranges: Path | None = None,
) -> dict[str, Any]:
    import litert_torch
    import torch
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    # GroupNorm's averaging convs are statistics, not weights; the stem: see FloatStem; the head, so the logits
    # leave the graph as float32. Matched by class name and path: torch.export records module types as
    # qualified-name strings, which set_module_type does not match.
    float_names = tuple(t.__qualname__ for t in float_types)
    float_paths = ("head.conv", *float_layers)  # module paths under BiTLite's `net`

    def quantize_node(node: Any) -> bool:
        stack = node.meta.get("nn_module_stack") or {}
        float_type = any(str(getattr(t, "__qualname__", t)).endswith(float_names) for _, t in stack.values())
        return not float_type and not any(
            path == p or path.endswith(f".{p}") for path, _ in stack.values() for p in float_paths
        )

    class ConvOnlyQuantizer(pt2e_quantizer.PT2EQuantizer):  # type: ignore[misc]
        STATIC_OPS: ClassVar[list[str]] = [
            "conv"
        ]  # adds, muls, pools stay float: the residual stream carries GroupNorm's range

        def _annotate_for_static_quantization_config(self, model: Any) -> Any:
            self._annotate_all_static_patterns(model, self.global_config, quantize_node)
            return model

    quantizer = ConvOnlyQuantizer().set_global(_static_config(pt2e_quantizer, method))
    exported = torch.export.export(lite, (sample,), dynamic_shapes=batch_dim(torch)).module()
    prepared = prepare_pt2e(exported, quantizer)
    observed = observe(prepared, calibration, ranges, CALIB_BATCH)
    quantized = convert_pt2e(prepared, fold_quantize=False)
    move_exported_model_to_eval(quantized)
    edge = litert_torch.convert(
        quantized, (sample,), quant_config=QuantConfig(pt2e_quantizer=quantizer), dynamic_shapes=batch_dim(torch)
    )
    edge.export(str(path))
    return {
        "method": method,
        "scheme": "pt2e-static",
        "weights": "int8 per-channel symmetric",
        "activations": "int8 per-tensor symmetric",
        "op_types": ["CONV_2D"],
        "float": ["stem conv", "GroupNorm", "residual add", "pooling", "head conv"],
        "float_layers": ["root.conv", *float_paths],
        "samples": observed,
        "ranges": "the uniform INT8 conversion's (reused)" if ranges is not None and ranges.is_file() else "calibrated",
    }


def _static_config(pt2e_quantizer: Any, method: str) -> Any:
    """litert-torch's static INT8 config (per-channel symmetric weights); `minmax` swaps the activations'
    HistogramObserver (which clips the tails it finds rare) for a plain running min/max."""
    config = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    if method == "histogram":
        return config
    from torchao.quantization.pt2e import MinMaxObserver

    act = replace(config.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
    return replace(config, input_activation=act, output_activation=act)


def _cast_fp16(src: Path, dst: Path) -> None:
    from ai_edge_quantizer import qtyping, quantizer, recipe_manager

    rp = recipe_manager.RecipeManager()
    rp.add_quantization_config(
        regex=".*",
        operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
        op_config=qtyping.OpQuantizationConfig(
            weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
            compute_precision=qtyping.ComputePrecision.FLOAT,
            explicit_dequantize=True,
        ),
        algorithm_key="float_casting",
    )
    qt = quantizer.Quantizer(str(src), rp.get_quantization_recipe())
    qt.quantize().export_model(str(dst), overwrite=True)


def run_tflite(path: Path, x: np.ndarray) -> np.ndarray:
    """Logits (N, classes) of a .tflite on `x` through the bitdeploy runtime backend."""
    from bitdeploy.runtimes.engines.litert import LiteRtBackend

    backend = LiteRtBackend(path, Manifest())
    try:
        return backend.infer(x)
    finally:
        backend.close()


class LiteRtConverter(Converter):
    """Reads options.device (only "cpu": XNNPACK) and options.calib_method (default: the record's first). litert-torch's
    own output shows when BITDEPLOY_LITERT_LOG is set."""

    def run(
        self, onnx_fp32: Path, work_dir: Path, calibration: CalibrationData | None, float_layers: tuple[str, ...]
    ) -> Artifact:
        ranges = work_dir / RANGES_FILE if self.precision == "int8" else None  # kept for the INT8 search's candidates
        return self._run(onnx_fp32, work_dir, self._calibrated(calibration, float_layers, ranges))

    def revert(self, uniform: Uniform, work_dir: Path, float_layers: tuple[str, ...]) -> Artifact:
        """Converted again with `float_layers` left out of the PT2E annotation and the uniform conversion's ranges
        loaded into the observers instead of calibrating; the lowering runs per candidate (its graph differs)."""
        ranges = uniform.work / RANGES_FILE
        int8 = self._calibrated(uniform.calibration, float_layers, ranges if ranges.is_file() else None)
        return self._run(uniform.onnx_fp32, work_dir, int8)

    def from_qat(self, qat: QatModel, work_dir: Path) -> Artifact:
        """The fine-tuned export quantized with the fine-tune's own scales and zero points (`litert_qat`)."""
        from bitdeploy.converters import litert_qat

        return self._run(Path(qat.onnx_fp32), Path(work_dir), litert_qat.int8_step(self.precision, qat))

    def _calibrated(
        self, calibration: CalibrationData | None, float_layers: tuple[str, ...], ranges: Path | None
    ) -> Int8Step:
        """The calibrated INT8 step (`_convert_int8`); `ranges`: the observers' states to reuse (`observe`)."""
        method = self.options.calib_method or self.target.calib_methods[0]

        def int8(lite: Any, floats: tuple[type, ...], sample: Any, out: Path) -> tuple[dict[str, Any], list[str]]:
            record = _convert_int8(lite, floats, sample, calibration, out, float_layers, method, ranges)
            notes = [f"kept in float by the INT8 search: {len(float_layers)} more layers"] if float_layers else []
            return record, [
                *notes,
                "INT8 on the bottleneck convolutions (per-channel weights); the 3-channel stem, GroupNorm, residual adds, pooling and the head stay FP32",
            ]

        return int8

    def _run(self, onnx_fp32: Path, work_dir: Path, int8: Int8Step) -> Artifact:
        device = (self.options.device or "cpu").lower()
        if device != "cpu":
            raise ConversionError(f"--device {device!r} is not a LiteRT device here; use --device cpu (XNNPACK)")
        with temp_dir(work_dir, ".litert-") as tmp:
            with _quiet(bool(os.environ.get(LOG_ENV))):
                torch = require("torch", "train")
                litert_torch = require("litert_torch", "litert-convert", "litert-torch")
                folded = rebuild_model(Path(onnx_fp32))
                res = _input_resolution(Path(onnx_fp32))
                sample = torch.zeros(2, 3, res, res)
                target, notes = self._convert(folded, sample, tmp, int8)
            if self.precision == "fp32":
                _check_fp32(folded, tmp / MODEL_FILE, res)
            os.replace(tmp / MODEL_FILE, work_dir / MODEL_FILE)
        target = replace(
            target,
            details={
                **target.details,
                "versions": {"litert_torch": litert_torch.__version__, "torch": torch.__version__.split("+")[0]},
            },
        )
        return Artifact(files=[MODEL_FILE], model_file=MODEL_FILE, target=target, notes=notes)

    def _convert(self, folded: Any, sample: Any, tmp: Path, int8: Int8Step) -> tuple[TargetInfo, list[str]]:
        """Write tmp/model.tflite; returns (the manifest's target record, notes). `int8`: INT8's quantization step."""
        precision = self.precision
        group_norm_type, bitlite, float_stem = _lite_modules()
        stem = folded.root.conv
        folded.root.conv = float_stem(
            stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=False
        )
        folded.root.conv.load_state_dict(stem.state_dict())
        lite = bitlite(folded).eval()
        quantization = None
        notes = ["GroupNorm rewritten without reshapes (grouped-mean convs) so the batch stays dynamic"]
        out = tmp / MODEL_FILE
        try:
            if precision == "int8":
                record, more = int8(lite, (group_norm_type, float_stem), sample, out)
                quantization = Quantization.from_dict(record)
                notes += more
                used = "int8 CONV_2D + fp32"
            elif precision == "fp16":
                _convert_float(lite, sample, tmp / "fp32.tflite")
                _cast_fp16(tmp / "fp32.tflite", out)
                used = "fp16 weights, fp32 compute"
                notes.append("FP16 conv weights, dequantized to FP32 at load: half the file, FP32 arithmetic")
            else:
                _convert_float(lite, sample, out)
                used = "fp32"
        except (ConversionError, MemoryError):
            raise
        except Exception as exc:  # litert-torch / jax / MLIR raise their own types with long traces
            raise ConversionError(
                f"litert-torch could not convert the model to {precision} ({type(exc).__name__}: {first_line(exc)}); set {LOG_ENV}=1 to see its log"
            ) from exc
        details = {"input_layout": "NCHW", "delegate": "XNNPACK"}
        return self.target_info(used, "cpu", quantization, details), notes


def _check_fp32(folded: Any, path: Path, res: int) -> None:
    import torch

    x = np.random.default_rng(1).uniform(-1, 1, (3, 3, res, res)).astype(np.float32)
    with torch.no_grad():
        want = folded(torch.from_numpy(x)).numpy()
    got = run_tflite(path, x)
    diff = float(np.abs(got - want).max())
    if not diff <= CHECK_TOLERANCE * max(1.0, float(np.abs(want).max())):
        raise ConversionError(
            f"the FP32 .tflite differs from PyTorch by {diff:.3g} at batch 3; set {LOG_ENV}=1, rerun and report it"
        )
