"""ONNX -> TensorRT engine (`model.plan`) for backend "tensorrt".

Precision lives in the ONNX graph: TensorRT 11 only builds strongly typed networks, so FP16 is
written as casts (normalisations and their statistics stay FP32) and INT8 as explicit Q/DQ (`trt_qdq`). Where
the installed TensorRT has the STRONGLY_TYPED flag (10.x, 11.x) the network is strongly typed and no precision
flag is set; only an older TensorRT without it gets the FP16/INT8 builder flags. TensorRT can still build
FP32 layers silently, so the engine inspector's per-layer types are read back and recorded as
`precision_used`; a requested precision that no layer runs in fails the build.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitdeploy.converters.base import Artifact, Converter, QatModel, TargetOptions, option
from bitdeploy.converters.calibration import CalibrationData
from bitdeploy.core.errors import BitdeployError, ConversionError, first_line
from bitdeploy.core.fsutil import atomic_write
from bitdeploy.runtimes.bundle.manifest import Quantization
from bitdeploy.runtimes.bundle.manifest_records import ENGINE_PENDING

PLAN = "model.plan"
DEFAULT_PROFILE = (1, 1, 32)  # batch min, opt, max: tuned for batch-1 latency, accepts batches up to 32
DEFAULT_WORKSPACE_GB = 4.0
# Lowest precision first: a layer's compute precision is the lowest among its input tensors.
PRECISION_ORDER = ("int8", "fp8", "fp16", "bf16", "fp32")
BOOKKEEPING = {"Reformat", "NoOp", "Shuffle", "Constant"}


@dataclass(frozen=True)
class TensorRTOptions(TargetOptions):
    """TensorRT's own options: the dynamic-batch profile and the builder's workspace limit."""

    batch: str | None = option(
        "--batch", "TensorRT: dynamic-batch optimisation profile [default 1,1,32].", None, metavar="MIN,OPT,MAX"
    )
    workspace_gb: float | None = option(
        "--workspace", "TensorRT: builder workspace limit in GiB [default 4].", None, metavar="GB", minimum=0.0625
    )

    def validate(self, precisions: Sequence[str], dataset: str | None) -> None:
        parse_profile(self.batch)  # a malformed profile fails before any export


def parse_profile(spec: Any) -> tuple[int, int, int]:
    """'1,8,32' | [1, 8, 32] | 16 | None -> (min, opt, max) batch sizes."""
    if spec is None or spec == "":
        return DEFAULT_PROFILE
    if isinstance(spec, int):
        return (1, spec, spec)
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else [str(v) for v in spec])]
    if len(parts) == 1:
        parts = ["1", parts[0], parts[0]]
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ConversionError(f"--batch must be MIN,OPT,MAX (e.g. 1,8,32), got {spec!r}")
    lo, opt, hi = (int(p) for p in parts)
    if not 1 <= lo <= opt <= hi:
        raise ConversionError(f"--batch needs 1 <= MIN <= OPT <= MAX, got {lo},{opt},{hi}")
    return lo, opt, hi


def tensor_precision(text: str) -> str | None:
    """Map an inspector tensor description ('Row major linear FP16 format', 'Int8', 'Float') to a precision."""
    t = text.lower()
    if "n/a" in t:
        return None
    for key, name in (
        ("int8", "int8"),
        ("fp8", "fp8"),
        ("bf16", "bf16"),
        ("bfloat", "bf16"),
        ("fp16", "fp16"),
        ("half", "fp16"),
    ):
        if key in t:
            return name
    if "int32" in t or "int64" in t or "bool" in t:
        return None
    if "fp32" in t or "float" in t:
        return "fp32"
    return None


def summarize_layers(engine_info: str | dict[str, Any]) -> dict[str, Any]:
    """Count the engine's compute layers by precision from IEngineInspector JSON (TensorRT 10 and 11 schemas).

    TensorRT 10 writes each tensor's type in "Format/Datatype"; TensorRT 11 splits it into "DataType" and
    "Format". Reformat/NoOp/Shuffle/Constant layers are counted apart: many reformats around Q/DQ are the usual
    sign of INT8 placement that costs more than it saves.
    """
    data = json.loads(engine_info) if isinstance(engine_info, str) else engine_info
    layers = data.get("Layers", []) if isinstance(data, dict) else []
    counts = dict.fromkeys(PRECISION_ORDER, 0)
    bookkeeping = 0
    unknown = 0
    for layer in layers:
        if not isinstance(layer, dict):  # LAYER_NAMES_ONLY verbosity gives plain names
            unknown += 1
            continue
        if layer.get("LayerType") in BOOKKEEPING:
            bookkeeping += 1
            continue
        found = []
        for tensor in layer.get("Inputs", []) or []:
            if isinstance(tensor, dict):
                desc = str(tensor.get("DataType") or tensor.get("Format/Datatype") or tensor.get("Format") or "")
                p = tensor_precision(desc)
                if p:
                    found.append(p)
        if not found:
            unknown += 1
            continue
        counts[min(found, key=PRECISION_ORDER.index)] += 1
    used = [p for p in PRECISION_ORDER if counts[p]]
    return {
        "by_precision": {p: n for p, n in counts.items() if n},
        "bookkeeping_layers": bookkeeping,
        "unknown_layers": unknown,
        "precision_used": "+".join(used) or "unknown",
    }


def check_realised(requested: str, summary: dict[str, Any]) -> None:
    """Refuse an engine that silently fell back to FP32 (a TensorRT build can do so without an error)."""
    wanted = {"fp16": "fp16", "int8": "int8"}.get(requested)
    by = summary.get("by_precision", {})
    if wanted and not by.get(wanted) and summary.get("precision_used") != "unknown":
        raise ConversionError(
            f"TensorRT built no {requested.upper()} layers for --precision {requested} (it ran {summary['precision_used']}); "
            "check the TensorRT version supports the ONNX's casts/Q-DQ, or build --precision fp32"
        )


def timing_cache_path(
    cache_dir: str | os.PathLike[str] | None, backend: str, trt_version: str, gpu_name: str, cc: str
) -> Path | None:
    """The timing cache, under `cache_dir`/`backend` (the record's backend name). It is only valid for one
    TensorRT version and GPU model, so both are in its name."""
    if not cache_dir:
        return None
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", gpu_name).strip("-") or "gpu"
    return Path(cache_dir) / backend / f"timing-trt{trt_version}-{slug}-sm{cc.replace('.', '')}.cache"


def _logger(trt: Any) -> Any:
    class Collecting(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg).splitlines()[0] if msg else "")

    return Collecting()


def strongly_typed_supported(trt: Any) -> bool:
    return hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")


def build_engine(
    trt: Any,
    onnx_path: Path,
    precision: str,
    profile: tuple[int, int, int],
    workspace_bytes: int,
    cache_file: Path | None,
) -> tuple[bytes, dict[str, Any]]:
    """Parse the ONNX and build a serialised engine; returns (plan bytes, build facts)."""
    logger = _logger(trt)
    builder = trt.Builder(logger)
    strong = strongly_typed_supported(trt)
    flags = 0
    if strong:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT < 10 needs it for dynamic batch
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)).splitlines()[0] for i in range(parser.num_errors)]
        raise ConversionError(
            f"TensorRT cannot parse {onnx_path.name}: {errors[0] if errors else 'unknown parser error'}"
        )
    if network.num_inputs != 1:
        raise ConversionError(f"{onnx_path.name}: expected one input, found {network.num_inputs}")
    tensor = network.get_input(0)
    sample = tuple(int(d) for d in tensor.shape[1:])
    if any(d < 0 for d in sample):
        raise ConversionError(
            f"{onnx_path.name}: only the batch dimension may be dynamic, got shape {tuple(tensor.shape)}"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if not strong:
        # Weakly typed TensorRT only: FP16 kernels by flag; INT8 needs the flag to honour the Q/DQ nodes.
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    lo, opt, hi = profile
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(tensor.name, (lo, *sample), (opt, *sample), (hi, *sample))
    config.add_optimization_profile(opt_profile)
    cache_bytes = cache_file.read_bytes() if cache_file is not None and cache_file.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if plan is None:
        detail = logger.errors[-1] if logger.errors else "no error message from TensorRT"
        raise ConversionError(
            f"TensorRT failed to build the engine ({detail}); try a larger --workspace or --precision fp32"
        )
    if cache_file is not None:
        atomic_write(cache_file, bytes(config.get_timing_cache().serialize()))
    facts = {
        "strongly_typed": strong,
        "builder_flags": []
        if strong
        else [f for f, on in (("FP16", precision == "fp16"), ("INT8", precision == "int8")) if on],
        "input": tensor.name,
        "sample_shape": list(sample),
        "build_seconds": round(seconds, 2),
        "timing_cache": str(cache_file) if cache_file is not None else None,
        "timing_cache_reused": bool(cache_bytes),
    }
    return bytes(plan), facts


def inspect_engine(trt: Any, plan: bytes, input_name: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """Deserialise, bind the optimum shape (else formats read 'N/A due to dynamic shapes') and summarise layers."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise ConversionError("TensorRT cannot deserialise the engine it just built; rebuild with --debug for details")
    context = engine.create_execution_context()
    context.set_input_shape(input_name, shape)
    inspector = engine.create_engine_inspector()
    for attr in ("execution_context", "context"):  # 10.x/11.x name, then the 8.x name
        if hasattr(inspector, attr):
            setattr(inspector, attr, context)
            break
    info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    summary = summarize_layers(info)
    summary["engine_layers"] = int(engine.num_layers)
    return summary


def check_available() -> tuple[Any, Any]:
    """(tensorrt module, CUDA api) or a one-line MissingDependencyError/ConversionError. Cheap: call it first."""
    from bitdeploy.runtimes.engines.trt import cuda_api, import_tensorrt

    trt = import_tensorrt()
    api = cuda_api()
    return trt, api


@dataclass(frozen=True)
class EngineBuild:
    """A TensorRT engine built from a bundle's ONNX on this machine's GPU: the plan and what the manifest records."""

    plan: bytes
    precision_used: str
    device: str
    details: dict[str, Any]
    notes: list[str]


def build_on_gpu(
    onnx_path: Path,
    precision: str,
    device: str | None,
    profile: tuple[int, int, int],
    workspace_gb: float,
    timing_cache_dir: Path | None,
    backend: str,
) -> EngineBuild:
    """Build, inspect and check the engine of `onnx_path` (the TensorRT-ready ONNX) on this machine's GPU: used by
    the build where TensorRT runs and by `bitdeploy engine` on the device. One-line errors without TensorRT/GPU."""
    from bitdeploy.runtimes.engines.trt import parse_device

    trt, api = check_available()
    try:
        index = parse_device(device)
        api.set_device(index)
        gpu_name, cc = api.device_info(index)
    except BitdeployError:
        raise
    except Exception as exc:  # torch's CUDA calls raise RuntimeError
        raise ConversionError(
            f"no usable NVIDIA GPU for TensorRT ({first_line(exc)}); build on a machine with one, or pass --device cuda:N"
        ) from exc
    trt_version = str(trt.__version__)
    cache_file = None
    if timing_cache_dir is not None:
        cache_file = timing_cache_path(timing_cache_dir, backend, trt_version, gpu_name, cc)
    plan, facts = build_engine(trt, onnx_path, precision, profile, int(workspace_gb * (1 << 30)), cache_file)
    summary = inspect_engine(trt, plan, facts["input"], (profile[1], *facts["sample_shape"]))
    check_realised(precision, summary)
    details = {
        "tensorrt_version": trt_version,
        "gpu_name": gpu_name,
        "compute_capability": cc,
        "profile": {"min": profile[0], "opt": profile[1], "max": profile[2]},
        "workspace_gb": workspace_gb,
        "strongly_typed": facts["strongly_typed"],
        "builder_flags": facts["builder_flags"],
        "layers": {k: summary[k] for k in ("by_precision", "bookkeeping_layers", "unknown_layers", "engine_layers")},
        "build_seconds": facts["build_seconds"],
    }
    notes = [f"TensorRT {trt_version} on {gpu_name} (sm {cc}); layers by precision: {summary['by_precision']}"]
    if facts["timing_cache"]:
        notes.append(f"timing cache {'reused' if facts['timing_cache_reused'] else 'created'}: {facts['timing_cache']}")
    return EngineBuild(plan, summary["precision_used"], f"cuda:{index}", details, notes)


def recorded_profile(details: dict[str, Any] | Any) -> tuple[tuple[int, int, int], float]:
    """The batch profile and workspace a bundle's manifest recorded for its engine (the defaults where it has none)."""
    p = details.get("profile") or {}
    profile = (int(p["min"]), int(p["opt"]), int(p["max"])) if p else DEFAULT_PROFILE
    return profile, float(details.get("workspace_gb") or DEFAULT_WORKSPACE_GB)


class TensorRTConverter(Converter):
    """Reads options.device ("cuda[:N]"), calib_method, cache, cache_dir, ready_only and `TensorRTOptions` (batch
    profile, workspace_gb). With `ready_only` (no TensorRT or no GPU here) it writes the TensorRT-ready ONNX and
    leaves the engine to the device (`bitdeploy engine`)."""

    def run(
        self, onnx_fp32: Path, work_dir: Path, calibration: CalibrationData | None, float_layers: tuple[str, ...]
    ) -> Artifact:
        from bitdeploy.converters import trt_qdq

        limits = self._limits()
        onnx_name, onnx_info = trt_qdq.prepare_onnx(
            onnx_fp32, work_dir, self.precision, calibration, self.options, float_layers
        )
        return self._finish(work_dir, onnx_name, onnx_info, limits)

    def from_qat(self, qat: QatModel, work_dir: Path) -> Artifact:
        """The INT8 bundle of a quantization-aware fine-tune: its Q/DQ model re-encoded for TensorRT
        (`trt_qdq.for_tensorrt`, no calibration), then the engine as `run` ends (or left to the device)."""
        from bitdeploy.converters import trt_qdq
        from bitdeploy.converters.qat_qdq import QatParams

        if self.precision != "int8":
            raise ConversionError(
                f"a quantization-aware fine-tune makes INT8 bundles, not {self.precision}; build it with --precision int8"
            )
        limits = self._limits()
        record = dict(QatParams.load(qat.params).record)
        onnx_info = trt_qdq.for_tensorrt(Path(qat.qdq), Path(work_dir) / trt_qdq.ONNX_NAME)
        return self._finish(Path(work_dir), trt_qdq.ONNX_NAME, onnx_info, limits, {"qat": record})

    def _limits(self) -> tuple[tuple[int, int, int], float]:
        """The batch profile and workspace in GiB; unless `ready_only`, first a one-line error when TensorRT or the
        GPU is missing (before any ONNX work)."""
        if not self.options.ready_only:
            check_available()
        trt_options = self.options.extras_for(TensorRTOptions)
        return parse_profile(trt_options.batch), float(trt_options.workspace_gb or DEFAULT_WORKSPACE_GB)

    def _finish(
        self,
        work_dir: Path,
        onnx_name: str,
        onnx_info: dict[str, Any],
        limits: tuple[tuple[int, int, int], float],
        quantization_extra: dict[str, Any] | None = None,
    ) -> Artifact:
        """The bundle around the TensorRT-ready ONNX written to `work_dir`: with `ready_only` the ONNX alone, its engine
        pending; else the engine built here. INT8 records the ONNX facts (and `quantization_extra`) as quantization."""
        precision, options = self.precision, self.options
        profile, workspace_gb = limits
        onnx_details = {k: v for k, v in onnx_info.items() if k not in ("notes", "extra_files")}
        files = [onnx_name, *onnx_info.get("extra_files", [])]
        quantization = None
        if precision == "int8":
            quantization = Quantization.from_dict({**onnx_details, **(quantization_extra or {})})
        settings = {
            "profile": {"min": profile[0], "opt": profile[1], "max": profile[2]},
            "workspace_gb": workspace_gb,
            "onnx": onnx_details,
        }
        if options.ready_only:
            engine = {"status": ENGINE_PENDING, "build_with": "bitdeploy engine BUNDLE (TensorRT and an NVIDIA GPU)"}
            notes = [f"engine pending: {onnx_name} is built into an engine on the device", *onnx_info.get("notes", [])]
            target = self.target_info(
                f"{precision} (engine pending)",
                options.device or "cuda:0",
                quantization,
                {**settings, "engine": engine},
            )
            return Artifact(files=files, model_file=onnx_name, target=target, notes=notes, eval_model_file=onnx_name)
        cache_dir = None
        if options.cache:  # --no-cache: neither read nor write the timing cache
            from bitdeploy.core.cache import default_root

            cache_dir = Path(options.cache_dir or default_root())
        built = build_on_gpu(
            work_dir / onnx_name, precision, options.device, profile, workspace_gb, cache_dir, self.target.backend
        )
        atomic_write(work_dir / PLAN, built.plan)
        details = {**settings, **built.details, "engine": {"status": "built", "where": "at build"}}
        notes = [*built.notes, *onnx_info.get("notes", [])]
        target = self.target_info(built.precision_used, built.device, quantization, details)
        return Artifact(files=[PLAN, *files], model_file=PLAN, target=target, notes=notes, eval_model_file=onnx_name)
