"""Build routes as data: which converter makes each (target, precision), and what it needs to run here.

Every route starts from the folded FP32 ONNX export (torch -> onnx, cached) and runs one converter
function, named "module:function" and imported only when the route runs. Availability is checked with
`importlib.util.find_spec` and a look at the NVIDIA driver, without importing any SDK, so a build fails
fast (before weights are loaded or anything is exported) when a route cannot run on this machine.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitdeploy.errors import BitdeployError

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Target:
    """One deployment target; its converter handles every precision listed."""

    name: str  # CLI name: --target NAME
    backend: str  # runtime backend that loads the bundle (bitdeploy.runtimes.base.REGISTRY)
    title: str  # what to call it in messages
    converter: str  # "module:function" with the bitdeploy.converters.base.ConvertFn signature
    extra: str  # pip extra that brings the SDK
    modules: tuple[str, ...]  # import names every precision needs
    int8_modules: tuple[str, ...] = ()  # import names INT8 needs on top (the quantizer)
    precisions: tuple[str, ...] = PRECISIONS
    needs_gpu: bool = False
    calib_methods: tuple[str, ...] = ()  # --calib-method values the quantizer offers (first = default)
    devices: str = ""  # what --device accepts, for help and messages


TARGETS: dict[str, Target] = {
    "onnx": Target(
        name="onnx",
        backend="onnxruntime",
        title="ONNX Runtime",
        converter="bitdeploy.converters.ort_convert:convert",
        extra="onnxruntime",
        modules=("onnx", "onnxruntime"),
        calib_methods=("minmax", "entropy", "percentile"),
        devices="cpu (default), cuda",
    ),
    "openvino": Target(
        name="openvino",
        backend="openvino",
        title="OpenVINO",
        converter="bitdeploy.converters.openvino_convert:convert",
        extra="openvino",
        modules=("openvino",),
        int8_modules=("nncf",),
        calib_methods=("mean_minmax", "minmax", "mean_quantile", "histogram"),
        devices="CPU (default), GPU, NPU, AUTO",
    ),
    "trt": Target(
        name="trt",
        backend="tensorrt",
        title="TensorRT",
        converter="bitdeploy.converters.trt_engine:convert",
        extra="tensorrt",
        modules=("tensorrt", "onnx", "onnxruntime"),
        needs_gpu=True,
        calib_methods=("minmax", "entropy", "percentile"),  # through ONNX Runtime's QDQ quantizer
        devices="cuda:N (default cuda:0)",
    ),
    "litert": Target(
        name="litert",
        backend="litert",
        title="LiteRT",
        converter="bitdeploy.converters.litert_convert:convert",
        extra="litert-convert",
        modules=("litert_torch", "ai_edge_litert", "ai_edge_quantizer"),
        int8_modules=("torchao",),
        calib_methods=("histogram",),  # PT2E static: HistogramObserver on activations, min/max per channel on weights
        devices="cpu (XNNPACK; default)",
    ),
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise BitdeployError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}, all") from None


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
    return f"{target.title} is not available here ({'; '.join(problems)}); run{where}: pip install \"bitdeploy[{target.extra}]\""


def check_available(target: Target, precision: str) -> None:
    """Raise a one-line BitdeployError when the route cannot run here (used before any heavy work)."""
    reason = unavailable_reason(target, precision)
    if reason is not None:
        raise BitdeployError(reason)


def load_converter(target: Target) -> Callable[..., Any]:
    module, attr = target.converter.split(":")
    fn: Callable[..., Any] = getattr(importlib.import_module(module), attr)
    return fn


def plan_rows(target: str, precisions: list[str] | None) -> list[tuple[Target, str]]:
    """The (target, precision) pairs a build runs, in table order. `target` may be "all"."""
    targets = list(TARGETS.values()) if target == "all" else [get_target(target)]
    rows = []
    for t in targets:
        wanted = precisions or (list(t.precisions) if target == "all" else ["fp32"])
        for p in wanted:
            if p not in PRECISIONS:
                raise BitdeployError(f"unknown precision {p!r}; choose from: {', '.join(PRECISIONS)}")
            rows.append((t, p))
    return rows
