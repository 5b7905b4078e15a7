"""The ONNX Runtime target: FP32 (the checked export as is), FP16 (norms in FP32), INT8 (static QDQ).

INT8 is Conv-only QDQ with per-channel symmetric INT8 weights; GroupNorm, the residual Add and the global pool
stay FP32 (see `bitdeploy.converters.ort_quant`). The integer scheme must hold on every CPU class a bundle may
meet, not only the build host's: x86 without VNNI multiplies u8 x s8 pairs into saturating int16, so full-range
weights overflow there. SCHEMES lists the choices; `auto` takes U8S8 with 7-bit weights on x86 CPUs (exact on
CPUs with and without VNNI, no slower: docs/targets.md, "ONNX Runtime INT8 on every CPU class") and S8S8 elsewhere (ARM,
CUDA: symmetric, what those kernels prefer).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitdeploy.converters.base import Artifact, Converter, RowInputs, TargetOptions, Uniform, option, reverted
from bitdeploy.converters.calibration import CalibrationData
from bitdeploy.core.devices import cpu_arch
from bitdeploy.core.errors import ConversionError
from bitdeploy.runtimes.bundle.manifest import Quantization

if TYPE_CHECKING:
    from bitdeploy.converters.base import QatModel

MODEL_FILE = "model.onnx"
DEVICES = ("cpu", "cuda")


def parse_device(device: str | None) -> str:
    """ "cpu" | "cuda" | "cuda:N" (case-insensitive) -> the normalised device string."""
    d = (device or "cpu").lower()
    base, _, index = d.partition(":")
    if base not in DEVICES or (index and (base == "cpu" or not index.isdigit())):
        raise ConversionError(f"--device {device!r} is not an ONNX Runtime device; choose one of: cpu, cuda, cuda:N")
    return d


@dataclass(frozen=True)
class Int8Scheme:
    """One ONNX Runtime INT8 integer scheme: what `ort_quant.quantize_qdq` is asked for, and why to pick it."""

    activation_type: str  # "uint8" (U8S8) or "int8" (S8S8)
    reduce_range: bool  # 7-bit weights
    why: str


SCHEMES: dict[str, Int8Scheme] = {
    "u8s8-7bit": Int8Scheme(
        "uint8",
        True,
        "U8S8 with 7-bit weights: no int16 saturation on x86 without VNNI, so every x86 CPU class computes the same",
    ),
    "u8s8": Int8Scheme("uint8", False, "U8S8 full range: VNNI/AMX x86 only; saturates on x86 CPUs without VNNI"),
    "s8s8": Int8Scheme(
        "int8", False, "S8S8: ARM and CUDA; on x86 ONNX Runtime leaves convs that share an input in FP32"
    ),
}
INT8_SCHEMES = ("auto", *SCHEMES)


@dataclass(frozen=True)
class OrtOptions(TargetOptions):
    """ONNX Runtime's own build options."""

    int8_scheme: str = option(
        "--int8-scheme",
        "ONNX Runtime INT8 integer scheme; auto: u8s8-7bit on x86 CPUs (exact with and without VNNI), s8s8 elsewhere.",
        "auto",
        choices=INT8_SCHEMES,
        precisions=("int8",),
    )
    verify_on: tuple[str, ...] = ()  # not a flag: the --verify-on CPUs' architectures, which `auto` must hold on

    def for_row(self, precision: str, row: RowInputs) -> OrtOptions:
        return replace(self, verify_on=row.verify_on) if self.int8_scheme == "auto" else self


def _host_arch() -> str:
    """This machine as `--verify-on` architectures are named: "x86_64" for any x86, else "arm64"."""
    return "x86_64" if cpu_arch() in ("x86_64", "x86") else "arm64"


def default_scheme(device: str) -> str:
    return "u8s8-7bit" if _on_cpu(device) and _host_arch() == "x86_64" else "s8s8"


def auto_scheme(device: str, verify_on: tuple[str, ...]) -> tuple[str, str]:
    """`auto`: (scheme, why). A bundle must be accurate here and on every --verify-on CPU: wherever an x86 CPU
    is among them U8S8 with 7-bit weights (never saturates without VNNI; ARM computes it exactly), else S8S8."""
    if not verify_on:
        scheme = default_scheme(device)
        return scheme, SCHEMES[scheme].why
    here = _host_arch()
    scheme = "u8s8-7bit" if _on_cpu(device) and "x86_64" in (here, *verify_on) else "s8s8"
    where = ", ".join(dict.fromkeys((here, *verify_on)))
    return scheme, f"{SCHEMES[scheme].why}; chosen to hold on every CPU it is verified on ({where})"


def _on_cpu(device: str) -> bool:
    return device.partition(":")[0] == "cpu"


def _copy_model(src: Path, dst: Path) -> list[str]:
    """Copy an ONNX file and its external-data sidecar (same base name) if it has one."""
    shutil.copyfile(src, dst)
    files = [dst.name]
    sidecar = src.with_name(src.name + ".data")
    if sidecar.is_file():
        shutil.copyfile(sidecar, dst.with_name(dst.name + ".data"))
        files.append(dst.name + ".data")
    return files


def cpu_computes_fp16(model_path: Path) -> bool:
    """Whether ONNX Runtime's CPU provider runs the FP16 graph in FP16: it inserts Casts to FP32 where it
    has no FP16 kernel (x86 has none for Conv), which shows as extra Cast nodes after optimisation."""
    import tempfile

    import onnx
    import onnxruntime as ort

    before = sum(1 for n in onnx.load(str(model_path), load_external_data=False).graph.node if n.op_type == "Cast")
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        after = sum(
            1
            for n in onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node
            if n.op_type == "Cast"
        )
    return after <= before


class OrtConverter(Converter):
    """Reads options.device ("cpu" | "cuda[:N]"), options.calib_method and `OrtOptions.int8_scheme`."""

    def run(
        self, onnx_fp32: Path, work_dir: Path, calibration: CalibrationData | None, float_layers: tuple[str, ...]
    ) -> Artifact:
        from bitdeploy.converters import ort_quant

        precision, options = self.precision, self.options
        device = parse_device(options.device)
        out = work_dir / MODEL_FILE
        details: dict[str, Any] = {}
        quantization = None
        notes: list[str] = []
        if precision == "fp32":
            files = _copy_model(Path(onnx_fp32), out)
            used = "fp32"
        elif precision == "fp16":
            info = ort_quant.convert_fp16(onnx_fp32, out)
            files = [MODEL_FILE]
            if _on_cpu(device) and not cpu_computes_fp16(out):
                used = "fp16 storage, fp32 compute"
                notes.append(
                    "ONNX Runtime's CPU provider casts FP16 nodes to FP32 here: smaller file, no speed-up; FP16 pays off on CUDA"
                )
            else:
                used = "fp16 + fp32 normalisations"
            details["fp16"] = info
            notes.append(
                f"kept in FP32: {', '.join(info['kept_fp32_op_types']) or 'nothing'} ({info['kept_fp32_nodes']} nodes), graph I/O float32"
            )
        else:
            assert calibration is not None  # check_request refused int8 without it
            ort_options = options.extras_for(OrtOptions)
            scheme = ort_options.int8_scheme or "auto"
            if scheme not in INT8_SCHEMES:
                raise ConversionError(
                    f"--int8-scheme {scheme!r} is not an ONNX Runtime INT8 scheme; choose one of: {', '.join(INT8_SCHEMES)}"
                )
            scheme, why = (
                auto_scheme(device, ort_options.verify_on) if scheme == "auto" else (scheme, SCHEMES[scheme].why)
            )
            chosen = SCHEMES[scheme]
            qdq = ort_quant.QdqOptions(
                method=options.calib_method,
                activation_type=chosen.activation_type,
                reduce_range=chosen.reduce_range,
                symmetric_activations=not _on_cpu(device),
                float_layers=float_layers,
            )
            info = ort_quant.quantize_qdq(onnx_fp32, out, calibration, qdq)
            files = [MODEL_FILE]
            info.update(scheme=scheme, scheme_reason=why)
            used = f"int8 {'+'.join(info['op_types'])} ({scheme.upper()}) + fp32"
            quantization = Quantization.from_dict(info)
            notes.append(f"INT8 scheme {scheme}: {why}")
            notes.append(
                f"INT8 Q/DQ on {info['quantized_nodes']} {'/'.join(info['op_types'])} nodes; float: {', '.join(info['float_op_types'])}"
            )
        target = self.target_info(used, device, quantization, details)
        return Artifact(files=files, model_file=MODEL_FILE, target=target, notes=notes)

    def from_qat(self, qat: QatModel, work_dir: Path) -> Artifact:
        """The fine-tune's Q/DQ model as is: its UINT8 activations and 7-bit weights are the u8s8-7bit scheme,
        which every x86 class computes exactly (and ARM too), so it runs where --verify-on asks."""
        from bitdeploy.converters import qat_qdq

        device = parse_device(self.options.device)
        files = _copy_model(qat.qdq, work_dir / MODEL_FILE)
        info = qat_qdq.describe(qat.qdq, qat.params)
        scheme = "u8s8-7bit"
        info.update(scheme=scheme, scheme_reason=SCHEMES[scheme].why, op_types=["Conv"])
        notes = [qat_qdq.note(qat.params), f"INT8 scheme {scheme}: {SCHEMES[scheme].why}"]
        target = self.target_info(f"int8 Conv ({scheme.upper()}, QAT) + fp32", device, Quantization.from_dict(info))
        return Artifact(files=files, model_file=MODEL_FILE, target=target, notes=notes)

    def revert(self, uniform: Uniform, work_dir: Path, float_layers: tuple[str, ...]) -> Artifact:
        """The uniform QDQ graph with `float_layers`' Q/DQ dropped and float weights restored (`qdq_revert`)."""
        from bitdeploy.converters import qdq_revert

        info = qdq_revert.revert(uniform.work / MODEL_FILE, uniform.onnx_fp32, work_dir / MODEL_FILE, float_layers)
        return reverted(uniform.artifact, self.float_layers(work_dir / MODEL_FILE), info)

    def float_layers(self, model_path: Path) -> list[str]:
        from bitdeploy.converters import qdq_revert

        return qdq_revert.float_convs(model_path)
