"""The device fingerprint: the CPU/GPU class and engine versions that decide a bundle's numerics and speed.

INT8 and float kernels are chosen per instruction set (ONNX Runtime's U8S8 saturates without VNNI, OpenVINO
computes in bf16 where the CPU has it), so a bundle records the class it was validated on and the runtime
computes the same on the device. ISA features come from CPUID as numpy's dispatcher reads it, so they are right
under emulation (`qemu-x86_64 -cpu Haswell`), where /proc/cpuinfo still describes the host; /proc/cpuinfo adds
what numpy does not probe (AVX-VNNI, AMX, ARM i8mm) only when it agrees with CPUID. Stdlib + numpy only.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bitdeploy.core.devices import cpu_arch, emulated_as, machine

# numpy CPUID feature name -> the /proc/cpuinfo flag name the docs use.
_NUMPY_FEATURES = {
    "AVX2": "avx2",
    "FMA3": "fma",
    "F16C": "f16c",
    "AVX512F": "avx512f",
    "AVX512BW": "avx512bw",
    "AVX512VNNI": "avx512_vnni",
    "AVX512BF16": "avx512_bf16",
    "AVX512FP16": "avx512_fp16",
    "ASIMD": "asimd",
    "ASIMDHP": "fphp",
    "ASIMDDP": "asimddp",
    "SVE": "sve",
}
# Flags only /proc/cpuinfo reports; trusted when its AVX2/AVX-512 flags match CPUID (not emulated).
_PROC_ONLY = ("avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "i8mm", "bf16", "sve2")
# The distributions every build and bench uses, whatever its target (the export's among them).
BASE_LIBRARIES = ("bitdeploy", "numpy", "pillow", "torch", "onnx", "onnxslim")


def libraries() -> tuple[str, ...]:
    """What manifests' provenance and bench environments record (one list, so the two agree): the base, then each
    target record's distributions."""
    from bitdeploy.core import targets

    return tuple(dict.fromkeys((*BASE_LIBRARIES, *(d for t in targets.TARGETS.values() for d in t.distributions))))


LIBRARIES = libraries()  # the built-in records' (a target registered later: call libraries())


def _cpuid_features() -> set[str]:
    import importlib

    try:
        umath = importlib.import_module("numpy._core._multiarray_umath")  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        umath = importlib.import_module("numpy.core._multiarray_umath")
    features: dict[str, bool] = umath.__cpu_features__
    return {flag for name, flag in _NUMPY_FEATURES.items() if features.get(name)}


# Linux arm64 hwcap bits (arch/arm64/include/uapi/asm/hwcap.h): what the kernel, or QEMU for the CPU model it
# emulates, says the CPU has. numpy probes none of i8mm, bf16, sve2, and /proc/cpuinfo may not exist.
_ARM_HWCAP = {1: "asimd", 10: "fphp", 20: "asimddp", 22: "sve"}
_ARM_HWCAP2 = {1: "sve2", 13: "i8mm", 14: "bf16"}
_AT_HWCAP, _AT_HWCAP2 = 16, 26


def _arm_hwcaps() -> set[str]:
    """ARM features from the auxiliary vector (getauxval); empty off Linux arm64."""
    if platform.system() != "Linux" or cpu_arch() != "arm64":
        return set()
    import ctypes

    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return set()
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    words = ((getauxval(_AT_HWCAP), _ARM_HWCAP), (getauxval(_AT_HWCAP2), _ARM_HWCAP2))
    return {name for word, bits in words for bit, name in bits.items() if word >> bit & 1}


def _proc_cpuinfo() -> tuple[dict[str, str], set[str]]:
    """(first processor's fields, its flags) from /proc/cpuinfo; empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}, set()
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip().lower()] = value.strip()
    return fields, set((fields.get("flags") or fields.get("features") or "").split())


def cpu_features() -> tuple[list[str], bool]:
    """(sorted numerics-relevant ISA features, whether /proc/cpuinfo disagrees with CPUID, i.e. emulated)."""
    cpuid = _cpuid_features() | _arm_hwcaps()
    _, proc = _proc_cpuinfo()
    probed = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}
    emulated = bool(proc) and cpu_arch() == "x86_64" and (proc & probed) != (cpuid & probed)
    extra = set() if emulated else {f for f in _PROC_ONLY if f in proc}
    if "asimddp" in cpuid | proc:
        extra.add("dotprod")
    return sorted((cpuid | extra) - {"asimddp"}), emulated


def cpu_class(arch: str, features: list[str]) -> str:
    """A short class name that groups machines whose INT8/bf16 numerics and speed ratios match."""
    f = set(features)
    if cpu_arch(arch) == "x86_64":
        if "amx_int8" in f:
            return "x86-64 AMX"
        if "avx512_vnni" in f:
            return "x86-64 AVX-512 VNNI" + (" BF16" if "avx512_bf16" in f else "")
        if "avx512f" in f:
            return "x86-64 AVX-512 (no VNNI)"
        if "avx_vnni" in f:
            return "x86-64 AVX2 AVX-VNNI"
        if "avx2" in f:
            return "x86-64 AVX2 (no VNNI)"
        return "x86-64 (no AVX2)"
    if cpu_arch(arch) == "arm64":
        return "arm64" + ("".join(f" {x}" for x in ("dotprod", "i8mm", "bf16") if x in f) or " (no dotprod)")
    return arch or "unknown"


def _gpus() -> list[dict[str, str]]:
    """NVIDIA GPUs as nvidia-smi names them (model, compute capability, driver); empty without one."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "compute_capability": parts[1], "driver": parts[2]})
    return gpus


def engine_distributions() -> tuple[str, ...]:
    """The distributions whose versions decide a bundle's numerics: every target record's engines, and numpy."""
    from bitdeploy.core import targets

    return (*dict.fromkeys(d for t in targets.TARGETS.values() for d in t.engines), "numpy")


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of `names` from package metadata (nothing is imported); missing ones are left out."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


@lru_cache(maxsize=1)
def host_fingerprint() -> dict[str, Any]:
    """This machine's fingerprint (cached: it does not change while the process runs)."""
    fields, _ = _proc_cpuinfo()
    arch = machine()
    features, emulated = cpu_features()
    cpu: dict[str, Any] = {
        "arch": arch,
        "vendor": fields.get("vendor_id") or fields.get("cpu implementer") or platform.processor() or "unknown",
        "model": fields.get("model name") or fields.get("hardware") or platform.processor() or "unknown",
        "features": features,
        "class": cpu_class(arch, features),
    }
    if emulated:
        cpu["note"] = "ISA from CPUID differs from /proc/cpuinfo: running under emulation; the model name is the host's"
    row = emulated_as()
    if row is not None:  # started by `verify --emulate`: name the model QEMU runs, not the host's
        cpu.update(model=f"{row.name} ({row.board}), emulated by QEMU", emulated=row.name)
    return {
        "cpu": cpu,
        "gpus": _gpus(),
        "engines": package_versions(engine_distributions()),
        "os": f"{platform.system()} {platform.release()}",
    }


def device_class(fingerprint: dict[str, Any] | None) -> str:
    """The class a fingerprint belongs to: the CPU class, plus the GPU model and compute capability if any."""
    if not fingerprint:
        return "unknown"
    name = str((fingerprint.get("cpu") or {}).get("class") or "unknown")
    gpus = fingerprint.get("gpus") or []
    if gpus:
        name += f" + {gpus[0].get('name')} (sm {gpus[0].get('compute_capability')})"
    return name


def summary(fingerprint: dict[str, Any] | None) -> str:
    """One line for people: class, model, features."""
    if not fingerprint:
        return "unknown (the bundle records no fingerprint)"
    cpu = fingerprint.get("cpu") or {}
    return f"{device_class(fingerprint)}: {cpu.get('model', 'unknown')} [{' '.join(cpu.get('features') or [])}]"
