"""The machine a benchmark ran on: CPU model and ISA flags, cores, GPU, OS, Python and library versions.

Nothing here imports a heavy library: versions come from package metadata, the GPU from `nvidia-smi`.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

# ISA features that decide which kernels run (INT8 VNNI, BF16, AMX); reported when present.
CPU_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16",
    "asimd", "asimddp", "sve", "bf16", "i8mm",
)  # fmt: skip
LIBRARIES = ("bitdeploy", "numpy", "pillow", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "torch", "onnx", "nncf", "onnxslim")


def _cpuinfo() -> dict[str, Any]:
    model, flags, physical = None, set(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    phys_id = core_id = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "Model", "cpu model") and model is None:
            model = value
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key == "physical id":
            phys_id = value
        elif key == "core id":
            core_id = value
        elif not line.strip() and core_id is not None:
            physical.add((phys_id, core_id))
            phys_id = core_id = None
    if core_id is not None:
        physical.add((phys_id, core_id))
    return {
        "model": model or platform.processor() or platform.machine(),
        "flags": [f for f in CPU_FLAGS if f in flags],
        "physical_cores": len(physical) or None,
    }


def _gpus() -> list[dict[str, str]]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4:
            gpus.append({"name": parts[0], "driver": parts[1], "memory": parts[2], "compute_capability": parts[3]})
    return gpus


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def collect(threads: int | None = None) -> dict[str, Any]:
    """A JSON-ready description of this machine. `threads` is what the benchmark asked backends to use."""
    cpu = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    cpu.update(logical_cores=os.cpu_count(), usable_cores=usable)
    return {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu": cpu,
        "gpus": _gpus(),
        "threads": threads,
        "libraries": library_versions(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ},
    }


def device_label(env: dict[str, Any], backend_device: str | None) -> str:
    """The report's device column: the GPU's name for GPU targets, else the CPU model (with the threads used)."""
    dev = (backend_device or "cpu").lower()
    gpus = env.get("gpus") or []
    if gpus and any(k in dev for k in ("gpu", "cuda", "tensorrt")):
        return str(gpus[0]["name"])
    model = str((env.get("cpu") or {}).get("model") or "CPU")
    threads = env.get("threads")
    return f"{model} ({threads} thread{'s' if threads != 1 else ''})" if threads else model
