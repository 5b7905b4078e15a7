"""The CPU models bitdeploy can emulate, the boards they stand for, and the lowest CPU the runtime runs on.

Stdlib only: the CLI reads this before numpy is imported, to refuse a CPU below numpy's baseline with one line
instead of an "Illegal instruction" core dump.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bitdeploy.core.errors import BitdeployError

EMULATED_ENV = "BITDEPLOY_EMULATED_CPU"  # set by the host for the guest: which table row it runs as
NOTE = "emulation checks numerics, not speed: timings under QEMU say nothing about the device"


@dataclass(frozen=True)
class CpuModel:
    name: str  # what users type (lower case)
    arch: str  # "arm64" or "x86_64": the emulation kit it needs
    qemu_cpu: str  # QEMU's -cpu name
    board: str
    features: tuple[str, ...]  # the ISA features that choose kernels, as /proc/cpuinfo and the fingerprint name them


CPUS: tuple[CpuModel, ...] = (
    CpuModel("cortex-a53", "arm64", "cortex-a53", "Raspberry Pi 3", ("asimd",)),
    CpuModel("cortex-a72", "arm64", "cortex-a72", "Raspberry Pi 4", ("asimd",)),
    CpuModel("cortex-a76", "arm64", "cortex-a76", "Raspberry Pi 5", ("asimd", "fphp", "dotprod")),
    CpuModel("neoverse-n1", "arm64", "neoverse-n1", "AWS Graviton2", ("asimd", "fphp", "dotprod")),
    CpuModel(
        "neoverse-v1", "arm64", "neoverse-v1", "AWS Graviton3", ("asimd", "fphp", "dotprod", "i8mm", "bf16", "sve")
    ),
    CpuModel(
        "haswell",
        "x86_64",
        "Haswell",
        "x86 AVX2 without VNNI, Core 4th-9th gen",
        ("sse4_2", "popcnt", "avx", "avx2", "fma"),
    ),
    CpuModel(
        "sandybridge", "x86_64", "SandyBridge", "x86 AVX without AVX2, Core 2nd/3rd gen", ("sse4_2", "popcnt", "avx")
    ),
    CpuModel("nehalem", "x86_64", "Nehalem", "x86 SSE4.2 only, Celeron/Atom J-series class", ("sse4_2", "popcnt")),
    CpuModel("penryn", "x86_64", "Penryn", "x86 SSE4.1, Core 2: below the floor", ("sse4_1",)),
)


# What platforms call the architectures the CPU table names ("x86_64", "arm64"); "x86" is 32-bit x86.
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "i386": "x86", "i686": "x86", "aarch64": "arm64"}


def machine() -> str:
    """This machine's architecture as its platform names it, lower case ("x86_64", "aarch64", "amd64"): what a
    fingerprint records."""
    return platform.machine().lower()


def cpu_arch(name: str | None = None) -> str:
    """The architecture `name` (a platform's or a fingerprint's; default: this machine's) as the CPU table names
    it: "x86_64", "arm64", "x86" (32-bit), else the name lower-cased."""
    raw = machine() if name is None else name.lower()
    return _ARCH_ALIASES.get(raw, raw)


def find(names: str) -> list[CpuModel]:
    """The table rows for a comma-separated list of names (case-insensitive); an unknown name is one line."""
    by_name = {c.name: c for c in CPUS}
    picked: list[CpuModel] = []
    for raw in names.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name not in by_name:
            raise BitdeployError(
                f"unknown CPU model {raw.strip()!r}; choose from {', '.join(by_name)} (bitdeploy devices)"
            )
        if by_name[name] not in picked:
            picked.append(by_name[name])
    if not picked:
        raise BitdeployError(f"no CPU model named; choose from {', '.join(by_name)} (bitdeploy devices)")
    return picked


def emulated_as() -> CpuModel | None:
    """The table row this process runs as, when the host started it under emulation."""
    name = os.environ.get(EMULATED_ENV, "").strip().lower()
    return next((c for c in CPUS if c.name == name), None)


# numpy's x86-64 wheels are built for a baseline the whole CPU must have: (first version, what it needs, level).
_NUMPY_X86_BASELINES = (
    ((2, 4), ("ssse3", "sse4_1", "sse4_2", "popcnt"), "x86-64-v2"),
    ((1, 0), ("sse3",), "SSE3"),
)


def _numpy_version() -> tuple[int, int] | None:
    try:
        major, minor = version("numpy").split(".")[:2]
        return int(major), int(minor)
    except (PackageNotFoundError, ValueError):
        return None


def _cpu_flags() -> set[str] | None:
    """This CPU's flags: the emulated table row's, else /proc/cpuinfo's (None where neither exists)."""
    row = emulated_as()
    if row is not None:
        implied = {"sse3", "ssse3", "sse4_1"} if "sse4_2" in row.features else {"sse3", "ssse3"}
        return set(row.features) | implied
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return {"sse3" if f == "pni" else f for f in value.split()}
    return None


def below_floor() -> str | None:
    """Why this x86-64 CPU cannot run the installed numpy (one line with the fix), or None when it can."""
    row = emulated_as()
    arch = row.arch if row is not None else cpu_arch()
    installed = _numpy_version()
    flags = _cpu_flags()
    if arch != "x86_64" or installed is None or flags is None:
        return None
    for since, needs, level in _NUMPY_X86_BASELINES:
        if installed >= since:
            missing = [f for f in needs if f not in flags]
            if not missing:
                return None
            where = f"{row.name} ({row.board})" if row is not None else "this CPU"
            return (
                f"{where} lacks {', '.join(f.upper().replace('_', '.') for f in missing)}, which numpy "
                f"{installed[0]}.{installed[1]}'s wheels need ({level}); run bitdeploy on a Nehalem-or-newer CPU, or "
                f'pip install "numpy<2.4" (SSE3), with which ONNX Runtime and LiteRT run on SSE4.1 (OpenVINO needs SSE4.2)'
            )
    return None


def exit_if_below_floor() -> None:
    """Exit 1 with one line, before numpy is imported, on a CPU below the installed numpy's baseline."""
    why = below_floor()
    if why is not None:
        import sys

        print(f"error: {why}", file=sys.stderr)
        sys.exit(1)
