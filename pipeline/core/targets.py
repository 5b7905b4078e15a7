"""One record per deployment target: the single source for the build, the runtime, the bundle reader and the CLI.

A record names the converter that makes a bundle ("module:Class", a `bitdeploy.converters.base.Converter`) and
the runtime backend that runs it ("module:Class", `bitdeploy.runtimes.engines.base.Backend`), with the pip extras, import
names, model-file formats and devices of each. Both are imported only when used: availability is checked with
`importlib.util.find_spec` (and a look at the NVIDIA driver), so a build fails fast, before weights are loaded,
and `bitdeploy.runtimes` imports with only numpy and Pillow installed.

A target's own build options are a frozen `bitdeploy.converters.base.TargetOptions` subclass beside its converter,
named by the record ("module:Class"); each of its `option(...)` fields is a `bitdeploy build` flag, and its hooks
validate, bind and explain them. Adding a target is a converter module, a runtime backend module, one
`register(Target(...))`, one pip extra and its tests: the CLI's --target and --backend choices and flags, the
bundle reader, the build, the device fingerprint and `export-repo` all read `TARGETS`; none names a target.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from bitdeploy.core.errors import BitdeployError

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class TritonEngine:
    """How Triton runs a target's model file: `config.pbtxt`'s `key: "value"`, its default file name, and where."""

    key: str  # "backend" or "platform"
    value: str  # e.g. "onnxruntime", "tensorrt_plan"
    default_file: str  # the model file name Triton looks for without default_model_filename
    kind: str = "KIND_CPU"  # instance_group kind: KIND_CPU | KIND_GPU


@dataclass(frozen=True)
class Target:
    """One deployment target; its converter handles every precision listed, its backend runs the bundles."""

    name: str  # CLI name: --target NAME
    title: str  # what to call it in messages
    backend: str  # runtime name: --backend NAME, the manifest's target.backend
    converter: str  # "module:Class", a bitdeploy.converters.base.Converter subclass
    runtime: str  # "module:Class", a bitdeploy.runtimes.engines.base.Backend
    formats: tuple[str, ...]  # model-file suffixes the runtime reads
    extra: str  # pip extra that brings what the build needs
    modules: tuple[str, ...]  # import names every precision of the build needs
    runtime_extra: str  # pip extra that brings what running a bundle needs
    runtime_module: str  # import name the runtime needs
    int8_modules: tuple[str, ...] = ()  # import names INT8 needs on top (the quantizer)
    precisions: tuple[str, ...] = PRECISIONS
    needs_gpu: bool = False
    calib_methods: tuple[str, ...] = ()  # --calib-method values the quantizer offers (first = default)
    devices: str = ""  # what --device accepts, for help and messages
    cache_conversions: bool = True  # False: artifacts tied to the build machine (TensorRT engines) are rebuilt
    ready_modules: tuple[str, ...] = ()  # where the target cannot be built here: the import names that writing and
    # gating its device-independent model need (TensorRT's ONNX), the rest left to the device; empty: no such route
    options: str = ""  # "module:Class", a frozen bitdeploy.converters.base.TargetOptions: its flags and hooks
    engines: tuple[str, ...] = ()  # distributions whose versions decide the numerics (the device fingerprint);
    # the first is the runtime's own wheel, the one that brings `runtime_module` (what the emulation kit installs)
    distributions: tuple[str, ...] = ()  # what provenance records the versions of: the engines and the build's tools
    companions: tuple[str, ...] = ()  # suffixes of files that travel with the model file (OpenVINO's .bin)
    triton: TritonEngine | None = None  # None: Triton cannot serve it
    ovms: bool = False  # OpenVINO Model Server can serve its model file
    evaluates_onnx: bool = False  # its runtime evaluates the ONNX stand-in (Artifact.eval_model_file) of a target
    # whose own runtime cannot run here; exactly one record says so

    @property
    def runtime_wheel(self) -> str:
        """The pip distribution that brings `runtime_module`."""
        return self.engines[0] if self.engines else self.runtime_extra


TARGETS: dict[str, Target] = {}


def register(target: Target) -> Target:
    """Add a target (or replace the one of the same name); its --target and --backend choices appear at once."""
    clash = next((t for t in TARGETS.values() if t.backend == target.backend and t.name != target.name), None)
    if clash is not None:
        raise ValueError(f"backend {target.backend!r} already belongs to target {clash.name!r}")
    TARGETS[target.name] = target
    return target


register(
    Target(
        name="onnx",
        title="ONNX Runtime",
        backend="onnxruntime",
        converter="bitdeploy.converters.ort_convert:OrtConverter",
        runtime="bitdeploy.runtimes.engines.ort:OrtBackend",
        formats=(".onnx",),
        extra="onnxruntime",
        modules=("onnx", "onnxruntime"),
        runtime_extra="onnxruntime",
        runtime_module="onnxruntime",
        calib_methods=("minmax", "entropy", "percentile"),
        devices="cpu (default), cuda",
        options="bitdeploy.converters.ort_convert:OrtOptions",
        engines=("onnxruntime",),
        distributions=("onnxruntime", "onnxruntime-gpu"),
        triton=TritonEngine("backend", "onnxruntime", "model.onnx"),
        ovms=True,
        evaluates_onnx=True,
    )
)
register(
    Target(
        name="openvino",
        title="OpenVINO",
        backend="openvino",
        converter="bitdeploy.converters.openvino_convert:OpenVinoConverter",
        runtime="bitdeploy.runtimes.engines.ov:OpenVinoBackend",
        formats=(".xml", ".onnx"),
        extra="openvino",
        modules=("openvino",),
        runtime_extra="openvino",
        runtime_module="openvino",
        int8_modules=("nncf",),
        calib_methods=("mean_minmax", "minmax", "mean_quantile", "histogram"),
        devices="CPU (default), GPU, NPU, AUTO",
        options="bitdeploy.converters.openvino_convert:OpenVinoOptions",
        engines=("openvino",),
        distributions=("openvino", "nncf"),
        companions=(".bin",),
        triton=TritonEngine("backend", "openvino", "model.xml"),
        ovms=True,
    )
)
register(
    Target(
        name="trt",
        title="TensorRT",
        backend="tensorrt",
        converter="bitdeploy.converters.trt_engine:TensorRTConverter",
        runtime="bitdeploy.runtimes.engines.trt:TensorRTBackend",
        formats=(".plan", ".engine"),
        extra="tensorrt",
        modules=("tensorrt", "onnx", "onnxruntime"),
        runtime_extra="tensorrt",
        runtime_module="tensorrt",
        needs_gpu=True,
        calib_methods=("minmax", "entropy", "percentile"),  # through ONNX Runtime's QDQ quantizer
        devices="cuda:N (default cuda:0)",
        cache_conversions=False,  # engines are tied to the GPU and TensorRT version
        ready_modules=(
            "onnx",
            "onnxruntime",
        ),  # model.trt.onnx, gated through ONNX Runtime; `bitdeploy engine` on the device
        options="bitdeploy.converters.trt_engine:TensorRTOptions",
        engines=("tensorrt",),
        distributions=("tensorrt",),
        triton=TritonEngine("platform", "tensorrt_plan", "model.plan", kind="KIND_GPU"),
    )
)
register(
    Target(
        name="litert",
        title="LiteRT",
        backend="litert",
        converter="bitdeploy.converters.litert_convert:LiteRtConverter",
        runtime="bitdeploy.runtimes.engines.litert:LiteRtBackend",
        formats=(".tflite",),
        extra="litert-convert",
        modules=("litert_torch", "ai_edge_litert", "ai_edge_quantizer"),
        runtime_extra="litert",
        runtime_module="ai_edge_litert",
        int8_modules=("torchao",),
        calib_methods=("histogram", "minmax"),  # PT2E static activations; weights: min/max per channel
        devices="cpu (XNNPACK; default)",
        engines=("ai-edge-litert",),
        distributions=("litert-torch", "ai-edge-litert"),
    )
)


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise BitdeployError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}, all") from None


def target_names() -> list[str]:
    return list(TARGETS)


def backend_names() -> list[str]:
    return [t.backend for t in TARGETS.values()]


def find_backend(backend: str | None) -> Target | None:
    """The record whose runtime is `backend`, or None."""
    return next((t for t in TARGETS.values() if t.backend == backend), None)


def for_backend(backend: str) -> Target:
    """The record whose runtime is `backend`; a one-line BitdeployError names the choices otherwise."""
    record = find_backend(backend)
    if record is None:
        raise BitdeployError(f"unknown backend {backend!r}; choose one of: {', '.join(backend_names())}")
    return record


def find_runtime(ref: str) -> Target | None:
    """The record whose runtime is the "module:Class" `ref`, or None (how a backend class learns its name)."""
    return next((t for t in TARGETS.values() if t.runtime == ref), None)


def onnx_evaluator() -> Target:
    """The record whose runtime evaluates another target's ONNX stand-in on the CPU (`evaluates_onnx`)."""
    record = next((t for t in TARGETS.values() if t.evaluates_onnx), None)
    if record is None:
        raise BitdeployError("no target record evaluates ONNX stand-ins; register one with evaluates_onnx=True")
    return record


def import_object(ref: str) -> Any:
    """Import "module:attr" (a record's converter or runtime)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def nvidia_gpu_present() -> bool:
    """A CUDA-capable NVIDIA GPU is visible: the driver lists one and CUDA_VISIBLE_DEVICES does not hide it."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    return any(Path("/dev").glob("nvidia[0-9]*"))


def _missing(modules: tuple[str, ...]) -> list[str]:
    missing = []
    for m in modules:
        try:
            if importlib.util.find_spec(m) is None:
                missing.append(m)
        except (ImportError, ValueError):
            missing.append(m)
    return missing


def unavailable_reason(target: Target, precision: str, short: bool = False) -> str | None:
    """Why (target, precision) cannot be built on this machine, as one line with the fix (`short`: just the
    cause, for the summary table); None if it can."""
    if precision not in target.precisions:
        return f"{target.title} has no {precision} route; choose one of: {', '.join(target.precisions)}"
    needed = target.modules + (target.int8_modules if precision == "int8" else ())
    missing = _missing(needed)
    gpu = (not target.needs_gpu) or nvidia_gpu_present()
    if not missing and gpu:
        return None
    problems = []
    if missing:
        problems.append(f"{', '.join(missing)} not installed")
    if not gpu:
        problems.append("no NVIDIA GPU visible")
    if short:
        return "; ".join(problems)
    where = " on a machine with an NVIDIA GPU" if target.needs_gpu else ""
    return f'{target.title} is not available here ({"; ".join(problems)}); run{where}: pip install "bitdeploy[{target.extra}]"'


def deferred_reason(target: Target, precision: str) -> str | None:
    """Why (target, precision) is built here only as a ready bundle, its last step left to the device (the short
    cause, as the summary table shows it); None when it is built here in full, or cannot be built here at all."""
    reason = unavailable_reason(target, precision, short=True)
    if reason is None or not target.ready_modules or precision not in target.precisions:
        return None
    return None if _missing(target.ready_modules) else reason


def check_available(target: Target, precision: str) -> None:
    """Raise a one-line BitdeployError when the route cannot run here (used before any heavy work)."""
    reason = unavailable_reason(target, precision)
    if reason is not None:
        raise BitdeployError(reason)


def load_converter(target: Target) -> type[Any]:
    """The record's converter class (a `bitdeploy.converters.base.Converter` subclass), imported."""
    cls: type[Any] = import_object(target.converter)
    return cls


class Asked(NamedTuple):
    """A (target, precision) a build asks for; `bitdeploy.builder.plan.RowPlan` is what it becomes once checked."""

    target: Target
    precision: str


def plan_rows(target: str, precisions: Sequence[str] | None) -> list[Asked]:
    """The (target, precision) pairs a build runs, in table order. `target` may be "all" or a comma list."""
    targets = (
        list(TARGETS.values())
        if target == "all"
        else [get_target(name) for name in dict.fromkeys(n.strip() for n in target.split(",") if n.strip())]
    )
    rows = []
    for t in targets:
        wanted = precisions or (list(t.precisions) if target == "all" else ["fp32"])
        for p in wanted:
            if p not in PRECISIONS:
                raise BitdeployError(f"unknown precision {p!r}; choose from: {', '.join(PRECISIONS)}")
            rows.append(Asked(t, p))
    return rows
