"""The machine a benchmark ran on: device fingerprint and class, cores, OS, Python and library versions.

Nothing here imports a heavy library: versions come from package metadata, the GPU from `nvidia-smi`.
"""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path
from typing import Any

from bitdeploy.runtimes.bundle.fingerprint import LIBRARIES, device_class, host_fingerprint, package_versions


def _physical_cores() -> int | None:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    cores = set()
    for block in text.split("\n\n"):
        fields = dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in block.splitlines()))
        if "core id" in fields:
            cores.add((fields.get("physical id"), fields["core id"]))
    return len(cores) or None


def collect(threads: int | None = None) -> dict[str, Any]:
    """A JSON-ready description of this machine. `threads` is what the benchmark asked backends to use.

    The CPU and GPUs are the runtime's device fingerprint (ISA from CPUID, so right under emulation too), so
    results from several machines group by the same device class bundles record in their manifests.
    """
    fp = host_fingerprint()
    cpu = {**fp["cpu"], "flags": fp["cpu"]["features"], "physical_cores": _physical_cores()}
    usable: int | None
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
        "gpus": fp["gpus"],
        "device_class": device_class(fp),
        "threads": threads,
        "libraries": package_versions(LIBRARIES),
        "env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ
        },
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
