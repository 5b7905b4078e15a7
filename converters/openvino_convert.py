"""ONNX -> OpenVINO IR (`model.xml` + `model.bin`) in FP32, FP16 (compressed weights) or INT8 (NNCF PTQ).

OpenVINO picks the compute precision per device: on a CPU with AVX512-BF16 or AMX it runs even an FP32 IR in
bf16 unless INFERENCE_PRECISION_HINT is f32. A bundle validated on one CPU class must not run something else on
another, so every bundle pins the precision its float layers were validated in (`target.inference_precision`,
f32 unless `--inference-precision bf16|f16` asks otherwise) and the runtime compiles with that same hint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.converters import layers
from bitdeploy.converters.base import (
    Artifact,
    Converter,
    ConvertOptions,
    QatModel,
    RowInputs,
    TargetOptions,
    Uniform,
    option,
    reverted,
)
from bitdeploy.converters.calibration import CalibrationData, ValidationData, nncf_dataset
from bitdeploy.core.errors import BitdeployError, ConversionError, first_line, require
from bitdeploy.runtimes.bundle.manifest import Quantization

DEVICES = ("CPU", "GPU", "NPU", "AUTO")
DEFAULT_DEVICE = "CPU"
INFERENCE_PRECISIONS = ("f32", "bf16", "f16")
NATIVE = {"bf16": "x86 AVX-512 BF16 or AMX", "f16": "ARMv8.2 FP16, or a GPU"}  # where float layers run natively
MODEL_XML = "model.xml"
MODEL_BIN = "model.bin"
# NNCF range estimators by --calib-method (NNCF's own default is mean_minmax for per-tensor activations).
CALIB_METHODS = ("mean_minmax", "minmax", "mean_quantile", "histogram")


@dataclass(frozen=True)
class OpenVinoOptions(TargetOptions):
    """OpenVINO's own options: the float precision to validate and pin, and NNCF's accuracy-controlled INT8."""

    inference_precision: str = option(
        "--inference-precision",
        "OpenVINO: the precision float layers are validated and pinned in on every device (bf16/f16 only where the device has it).",
        "f32",
        choices=INFERENCE_PRECISIONS,
        precisions=("fp16", "int8"),
    )
    accuracy_control: bool = option(
        "--accuracy-control",
        "OpenVINO INT8: NNCF accuracy-controlled quantization within --max-accuracy-drop.",
        False,
        precisions=("int8",),
    )
    max_accuracy_drop: float = 1.0  # percentage points of top-1, for accuracy control (the build's gate)
    validation: ValidationData | None = None  # the labelled split accuracy control measures on

    def validate(self, precisions: Sequence[str], dataset: str | None) -> None:
        if self.accuracy_control and dataset is None:
            raise BitdeployError("--accuracy-control needs --dataset (its validation split measures the accuracy)")

    def needs_validation(self, precisions: Sequence[str]) -> bool:
        return self.accuracy_control and "int8" in precisions

    def for_row(self, precision: str, row: RowInputs) -> OpenVinoOptions:
        control = self.accuracy_control and precision == "int8"
        return replace(
            self,
            inference_precision="f32" if precision == "fp32" else self.inference_precision,  # fp32 computes in f32
            accuracy_control=control,
            max_accuracy_drop=row.max_accuracy_drop,
            validation=row.validation if control else None,
        )

    def gate_hint(self, precision: str) -> str | None:
        return "try --accuracy-control" if precision == "int8" and not self.accuracy_control else None


def parse_device(device: str | None) -> str:
    """'cpu' | 'GPU.1' | 'AUTO:GPU,CPU' | None -> an OpenVINO device string (default CPU)."""
    if not device:
        return DEFAULT_DEVICE
    text = str(device).strip()
    head = text.split(":")[0].split(".")[0].upper()
    if head not in DEVICES:
        raise ConversionError(f"unknown OpenVINO device {device!r}; choose one of: {', '.join(DEVICES)}")
    return head + text[len(head) :]


def check_device(core: Any, device: str) -> None:
    head = device.split(":")[0].split(".")[0]
    if head == "AUTO":
        return
    available = list(core.available_devices)
    if not any(d == device or d.split(".")[0] == device for d in available):
        raise ConversionError(
            f"OpenVINO device {device} is not available here (available: {', '.join(available) or 'none'}); "
            "build with --device CPU, or on a machine with that device and its driver"
        )


def compile_config(hint: str | None, threads: int | None = None, performance: str = "LATENCY") -> dict[str, Any]:
    """The compile properties a bundle is validated with; the runtime reads the same keys from the manifest."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": performance}
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def resolved_precision(compiled: Any) -> str:
    """What the compiled model computes non-quantized layers in: 'f32', 'bf16', 'f16'."""
    try:
        value = compiled.get_property("INFERENCE_PRECISION_HINT")
    except Exception:  # some plugins (NPU) do not report it
        return "device-default"
    text = str(getattr(value, "get_type_name", lambda: value)()).lower()
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(text, text)


def _range_estimator(method: str | None) -> Any:
    import nncf
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    name = (method or "mean_minmax").lower()
    if name not in CALIB_METHODS:
        raise ConversionError(
            f"--calib-method {method!r} is not available for OpenVINO; choose one of: {', '.join(CALIB_METHODS)}"
        )
    # 7-bit weights in every layer (NNCF's default fixes only the first): x86 CPUs without VNNI multiply u8 x s8
    # pairs into saturating int16, and a bundle built on a VNNI host failed its self-test on Haswell/SandyBridge.
    overflow = {"overflow_fix": nncf.OverflowFix.ENABLE}
    if name == "mean_minmax":
        return nncf.AdvancedQuantizationParameters(**overflow)
    params = getattr(RangeEstimatorParametersSet, name.upper())
    return nncf.AdvancedQuantizationParameters(activations_range_estimator_params=params, **overflow)


SCOPES = ("norms-residual-head", "head", "none")
DEFAULT_SCOPE = "norms-residual-head"  # what every build uses; `ignored_scope` keeps the others for measurements
NO_VALIDATION = "--accuracy-control needs the validation split of --dataset; pass --dataset"


def _head_names(model: Any) -> list[str]:
    """The classifier head: the last global pool (ReduceMean in the IR) and the 1x1 conv it feeds."""
    pools = [op for op in model.get_ordered_ops() if op.get_type_name() == "ReduceMean"]
    names: list[str] = []
    for pool in pools[-1:]:
        names.append(pool.get_friendly_name())
        names += [
            t.get_node().get_friendly_name()
            for t in pool.output(0).get_target_inputs()
            if t.get_node().get_type_name() == "Convolution"
        ]
    return names


def _residual_adds(model: Any) -> list[str]:
    """Adds of two computed tensors: the residual joins (GroupNorm's affine Add has a constant operand)."""
    return [
        op.get_friendly_name()
        for op in model.get_ordered_ops()
        if op.get_type_name() == "Add" and all(v.get_node().get_type_name() != "Constant" for v in op.input_values())
    ]


def ignored_scope(model: Any, mode: str, float_layers: Sequence[str] = ()) -> tuple[Any, list[str]]:
    """What NNCF must leave in float, as an IgnoredScope plus a note. docs/targets.md has the data.

    "norms-residual-head" (default): GroupNorm's statistics (MVN input), the residual Adds and the classifier
    head stay float; the convolutions' inputs and weights are INT8 (NNCF still quantizes the normalised tensor
    before GroupNorm's affine: keeping that float too cost 13 %). Measured as fast as NNCF's default placement
    (within noise) with lower logit error. "head": NNCF's placement except the head. "none": NNCF's defaults.
    `float_layers` (the INT8 search's, `bitdeploy.converters.layers`) adds those convolutions to any mode.
    """
    import nncf

    if mode not in SCOPES:
        raise ConversionError(f"unknown OpenVINO INT8 float scope {mode!r}; choose one of: {', '.join(SCOPES)}")
    convs = layers.node_names(
        ((op.get_friendly_name(), op.get_type_name()) for op in model.get_ordered_ops()), float_layers
    )
    extra = [f"{len(convs)} searched layers"] if convs else []
    if mode == "none":
        return (nncf.IgnoredScope(names=convs), [f"kept in float: {extra[0]}"]) if convs else (None, [])
    names = _head_names(model) + convs
    types: list[str] = []
    what = ["classifier head"]
    if mode == "norms-residual-head":
        present = {op.get_type_name() for op in model.get_ordered_ops()}
        types = [t for t in ("MVN", "GroupNormalization") if t in present]
        adds = _residual_adds(model)
        names += adds
        what = ["GroupNorm", f"{len(adds)} residual Adds", "classifier head"]
    what += extra
    if not names and not types:
        return None, ["no classifier head found to keep in float"]
    return nncf.IgnoredScope(names=names, types=types), [f"kept in float: {', '.join(what)}"]


def float_conv_layers(scope: Any) -> list[str]:
    """The convolutions an IgnoredScope keeps in float, as layer names."""
    names = list(getattr(scope, "names", None) or [])
    return list(dict.fromkeys(layers.layer_of(n) for n in names if layers.is_conv_name(n)))


def quantize_int8(
    model: Any, calibration: CalibrationData, options: ConvertOptions, float_layers: Sequence[str] = ()
) -> tuple[Any, dict[str, Any], list[str]]:
    """NNCF post-training INT8 with the DEFAULT_SCOPE float placement plus `float_layers` (the INT8 search's);
    with `OpenVinoOptions.accuracy_control`, the accuracy-controlled variant, measured on
    `OpenVinoOptions.validation`."""
    nncf = require("nncf", "openvino", "NNCF (nncf, the INT8 quantizer)")

    nncf.set_log_level(40)  # errors only: the build prints its own progress
    ov_options = options.extras_for(OpenVinoOptions)
    calib = nncf_dataset(calibration)  # single images: NNCF feeds the model one item at a time
    scope_mode = DEFAULT_SCOPE
    scope, notes = ignored_scope(model, scope_mode, float_layers)
    advanced = _range_estimator(options.calib_method)
    common: dict[str, Any] = {
        "preset": nncf.QuantizationPreset.PERFORMANCE,  # symmetric activations: no zero-point arithmetic
        "subset_size": len(calibration),
        "fast_bias_correction": True,
        "model_type": None,  # a CNN; ModelType.TRANSFORMER is the only other choice
        "ignored_scope": scope,
    }
    info: dict[str, Any] = {
        "tool": f"nncf {nncf.__version__}",
        "preset": "performance",
        "overflow_fix": "all layers (7-bit weights: exact on x86 without VNNI)",
        "method": options.calib_method or "mean_minmax",
        "samples": len(calibration),
        "float_scope": scope_mode,
        "float_layers": float_conv_layers(scope),
        "accuracy_control": False,
    }
    if not ov_options.accuracy_control:
        q = nncf.quantize(model, calib, advanced_parameters=advanced, **common)
        return q, info, notes
    validation = ov_options.validation
    if validation is None or len(validation) == 0:
        raise ConversionError(NO_VALIDATION)
    max_drop = float(ov_options.max_accuracy_drop) / 100.0

    def validate(compiled: Any, items: Any) -> tuple[float, list[float]]:
        # NNCF passes a model it compiled for the CPU in f32 and the raw (x, y) items.
        request = compiled.create_infer_request()
        hits = [float(int(np.argmax(request.infer({0: x})[0])) == int(y)) for x, y in items]
        return (float(np.mean(hits)) if hits else 0.0), hits

    val = validation_dataset(validation)
    try:
        q = nncf.quantize_with_accuracy_control(
            model,
            calib,
            val,
            validation_fn=validate,
            max_drop=max_drop,
            drop_type=nncf.DropType.ABSOLUTE,
            advanced_quantization_parameters=advanced,
            **common,
        )
    except nncf.ValidationError as exc:  # type: ignore[attr-defined]
        raise ConversionError(
            f"NNCF accuracy control failed ({first_line(exc)}); rebuild without --accuracy-control"
        ) from exc
    info.update({"accuracy_control": True, "max_drop_pp": max_drop * 100, "validation_samples": len(validation)})
    notes.append(f"NNCF accuracy control: max drop {max_drop * 100:g} pp on {len(validation)} validation images")
    return q, info, notes


def _read(ov: Any, onnx_path: Path) -> Any:
    try:
        return ov.convert_model(str(onnx_path))
    except Exception as exc:  # OpenVINO raises its own untyped errors
        raise ConversionError(f"OpenVINO cannot convert {Path(onnx_path).name}: {first_line(exc)}") from exc


def validation_dataset(validation: ValidationData) -> Any:
    """The labelled split as an nncf.Dataset of (single image, label) items; NNCF's transform keeps the image."""
    import nncf

    xs, ys = validation.samples, validation.labels
    return nncf.Dataset([(xs[i : i + 1], int(ys[i])) for i in range(len(xs))], lambda item: item[0])


class OpenVinoConverter(Converter):
    """Reads options.device, options.threads (the validation compile), options.calib_method and `OpenVinoOptions`."""

    def run(
        self, onnx_fp32: Path, work_dir: Path, calibration: CalibrationData | None, float_layers: tuple[str, ...]
    ) -> Artifact:
        ov = require("openvino", "openvino", "OpenVINO")
        precision, options = self.precision, self.options
        ov_options = options.extras_for(OpenVinoOptions)
        if ov_options.accuracy_control and precision != "int8":
            raise ConversionError("--accuracy-control applies to --precision int8 only")
        if ov_options.accuracy_control and ov_options.validation is None:
            raise ConversionError(NO_VALIDATION)
        device = parse_device(options.device)
        core = ov.Core()
        check_device(core, device)
        hint = (ov_options.inference_precision or "f32").lower()
        if hint not in INFERENCE_PRECISIONS:
            raise ConversionError(
                f"--inference-precision {hint!r} is not an OpenVINO float precision; choose one of: {', '.join(INFERENCE_PRECISIONS)}"
            )
        if precision == "fp32" and hint != "f32":
            raise ConversionError(
                f"--precision fp32 computes in f32; for {hint} arithmetic build --precision fp16 or int8 with --inference-precision {hint}"
            )
        model = _read(ov, onnx_fp32)
        notes: list[str] = []
        quant: dict[str, Any] | None = None
        if precision == "int8":
            from bitdeploy.core.stdio import stdout_to_stderr

            assert calibration is not None  # refused above
            with stdout_to_stderr("nncf"):  # NNCF's progress bars and log lines never reach the stdout table
                model, quant, q_notes = quantize_int8(model, calibration, options, float_layers)
            notes.extend(q_notes)
        return self._save(model, work_dir, (device, hint), (notes, quant))

    def from_qat(self, qat: QatModel, work_dir: Path) -> Artifact:
        """The fine-tune's Q/DQ model read as is: OpenVINO turns each Q/DQ pair into a FakeQuantize with the
        fine-tune's scale and zero point; nothing is calibrated (no NNCF)."""
        from bitdeploy.converters import qat_qdq

        ov = require("openvino", "openvino", "OpenVINO")
        hint = (self.options.extras_for(OpenVinoOptions).inference_precision or "f32").lower()
        device = parse_device(self.options.device)
        check_device(ov.Core(), device)
        quant = qat_qdq.describe(qat.qdq, qat.params)
        return self._save(_read(ov, qat.qdq), work_dir, (device, hint), ([qat_qdq.note(qat.params)], quant))

    def _save(
        self, model: Any, work_dir: Path, where: tuple[str, str], made: tuple[list[str], dict[str, Any] | None]
    ) -> Artifact:
        """Write the IR, compile it as the runtime will (`where`: device, float precision hint) and record what
        it computes in; `made`: the notes and quantization facts of how the model was made."""
        ov = require("openvino", "openvino", "OpenVINO")
        core = ov.Core()
        precision, (device, hint), (notes, quant) = self.precision, where, made
        config = compile_config(hint, self.options.threads)
        xml = work_dir / MODEL_XML
        # fp16 stores weights as f16 (half the file); int8 weights are already int8, and the few float
        # constants left (GroupNorm affine, head) stay f32 so only quantization error remains.
        ov.save_model(model, str(xml), compress_to_fp16=(precision == "fp16"))
        compiled = core.compile_model(str(xml), device, config)
        computed = resolved_precision(compiled)
        del compiled
        used = {"fp32": computed, "fp16": computed, "int8": f"int8+{computed}"}[precision]
        if computed not in (hint, "device-default"):
            raise ConversionError(
                f"OpenVINO on {device} computes in {computed}, not the requested {hint}: this CPU has no {hint} arithmetic "
                f"({NATIVE.get(hint, 'none known')}); build with --inference-precision f32 or on such a CPU"
            )
        notes.append(
            f"float layers pinned to {hint} on every device"
            + (" (weights stored as f16)" if precision == "fp16" else "")
        )
        details = {"inference_precision": hint, "performance_hint": "LATENCY", "openvino_version": ov.get_version()}
        quantization = Quantization.from_dict(quant) if quant is not None else None
        target = self.target_info(used, device, quantization, details)
        return Artifact(files=[MODEL_XML, MODEL_BIN], model_file=MODEL_XML, target=target, notes=notes)

    def revert(self, uniform: Uniform, work_dir: Path, float_layers: tuple[str, ...]) -> Artifact:
        """The uniform INT8 IR with `float_layers`' FakeQuantize removed and float weights restored, as NNCF's
        accuracy control reverts (`openvino_revert`)."""
        from bitdeploy.converters import openvino_revert

        info = openvino_revert.revert(uniform.work / MODEL_XML, uniform.onnx_fp32, work_dir / MODEL_XML, float_layers)
        return reverted(uniform.artifact, self.float_layers(work_dir / MODEL_XML), info)

    def float_layers(self, model_path: Path) -> list[str]:
        from bitdeploy.converters import openvino_revert

        return openvino_revert.float_convs(model_path)
