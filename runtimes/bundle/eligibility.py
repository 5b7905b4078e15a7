"""Whether a valid bundle may be selected: the one rule `build --select`, `bitdeploy select` and `report --select`
apply, read from the manifest (or from a bench entry's copy of it, `Checks.to_dict`).

- Float layers pinned to bf16 (or fp16) compute in what the CPU has: such a bundle is eligible only once a CPU
  that computes that precision ran it and passed: the build host (the gate ran there; `validated_on`) or a
  `--verify-on` CPU (`verified_on`) whose features have the arithmetic. A CPU without it runs the f32 fallback
  (a `--verify-on haswell` check of a bf16 bundle exercised f32, not bf16), and an emulated x86 CPU never counts
  (QEMU has no AVX-512).
- A bundle whose self-test failed on a `--verify-on` CPU of the device class asked for is never picked for that
  class; with no class asked, a failure on any CPU excludes it.

Stdlib only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bitdeploy.core.devices import CPUS, cpu_arch
from bitdeploy.runtimes.bundle.fingerprint import cpu_class
from bitdeploy.runtimes.bundle.manifest import Manifest, TargetInfo

FLOAT_PRECISIONS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}  # OpenVINO's hint -> what float layers compute in
# The CPU features (as fingerprints name them) that compute a float precision, per architecture.
ARITHMETIC: dict[str, dict[str, tuple[str, ...]]] = {
    "bf16": {"x86_64": ("avx512_bf16", "amx_bf16"), "arm64": ("bf16",)},
    "fp16": {"x86_64": ("avx512_fp16",), "arm64": ("fphp",)},
}
BUILD_HOST = "build host"
# How the selection's line groups what it excluded ("excluded, <group>: name (detail), ...").
FAILED_ON = "failing on a --verify-on CPU"
UNCHECKED = "float precision not checked on a CPU that computes it"


def float_precision(target: TargetInfo) -> str:
    """What a bundle's float layers compute in: fp32, or bf16/fp16 where the engine was pinned to it."""
    hint = str((target.details or {}).get("inference_precision") or "f32")
    return FLOAT_PRECISIONS.get(hint, hint)


def cpu_part(device_class: str) -> str:
    """The CPU class of a device class ("x86-64 AVX2 (no VNNI) + NVIDIA L4 (sm 8.9)" -> "x86-64 AVX2 (no VNNI)")."""
    return device_class.split(" + ")[0]


@dataclass(frozen=True)
class CheckedOn:
    """One CPU that ran the bundle before it is chosen: the build host (its gate) or a --verify-on CPU (its
    self-test, emulated)."""

    cpu: str  # BUILD_HOST or the --verify-on model ("cortex-a76")
    arch: str  # as the CPU table names it: x86_64, arm64
    cpu_class: str
    features: tuple[str, ...]
    emulated: bool
    passed: bool
    error: str | None = None

    def computes(self, precision: str) -> bool:
        """Whether this CPU ran `precision` itself (not an f32 fallback)."""
        if precision == "fp32":
            return True
        if self.emulated and self.arch == "x86_64":  # QEMU has no AVX-512: never bf16/fp16 arithmetic
            return False
        return any(f in self.features for f in ARITHMETIC.get(precision, {}).get(self.arch, ()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu,
            "arch": self.arch,
            "class": self.cpu_class,
            "features": list(self.features),
            "emulated": self.emulated,
            "passed": self.passed,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckedOn:
        return cls(
            str(data.get("cpu") or "?"),
            str(data.get("arch") or ""),
            str(data.get("class") or "unknown"),
            tuple(str(f) for f in data.get("features") or ()),
            bool(data.get("emulated")),
            bool(data.get("passed")),
            None if data.get("error") is None else str(data.get("error")),
        )


def _host(fingerprint: Mapping[str, Any] | None, backend: str) -> CheckedOn | None:
    """The build host from the manifest's `validated_on`: its gate passed there (or the bundle is invalid), and it
    counts when the bundle's own engine ran it, not an ONNX stand-in (`evaluated_with` names the engine)."""
    cpu = (fingerprint or {}).get("cpu") or {}
    if not cpu:
        return None
    ran = str((fingerprint or {}).get("evaluated_with") or backend)
    arch = cpu_arch(str(cpu.get("arch") or ""))
    features = tuple(str(f) for f in cpu.get("features") or ())
    emulated = bool(cpu.get("emulated") or cpu.get("note"))  # `note`: CPUID differs from /proc/cpuinfo
    cls = str(cpu.get("class") or cpu_class(arch, list(features)))
    return CheckedOn(BUILD_HOST, arch, cls, features, emulated, ran.startswith(backend))


def _verified(entry: Mapping[str, Any]) -> CheckedOn:
    """One `verified_on` report; what it lacks (older builds, tests) comes from the CPU table by its name."""
    name = str(entry.get("cpu") or "?")
    row = next((c for c in CPUS if c.name == name), None)
    arch = cpu_arch(str(entry.get("arch") or (row.arch if row else "")))
    features = tuple(str(f) for f in entry.get("features") or (row.features if row else ()))
    error = entry.get("error")
    return CheckedOn(
        name,
        arch,
        str(entry.get("class") or cpu_class(arch, list(features))),
        features,
        True,  # --verify-on runs QEMU guests
        bool(entry.get("passed")),
        None if error is None else str(error),
    )


@dataclass(frozen=True)
class Exclusion:
    """Why a valid bundle may not be picked: its `group` (FAILED_ON, UNCHECKED) and a word on it."""

    group: str
    detail: str  # the CPU it failed on, or the float precision nothing checked


@dataclass(frozen=True)
class Checks:
    """What selection needs of a manifest: the float layers' precision and every CPU that ran the bundle."""

    float_precision: str = "fp32"
    checked_on: tuple[CheckedOn, ...] = ()

    @classmethod
    def of(cls, manifest: Manifest) -> Checks:
        host = _host(manifest.validated_on, manifest.target.backend)
        verified = tuple(_verified(e) for e in manifest.verified_on or ())
        return cls(float_precision(manifest.target), ((host,) if host is not None else ()) + verified)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Checks:
        return cls(
            str(data.get("float_precision") or "fp32"),
            tuple(CheckedOn.from_dict(c) for c in data.get("checked_on") or () if isinstance(c, Mapping)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"float_precision": self.float_precision, "checked_on": [c.to_dict() for c in self.checked_on]}

    @property
    def float_checked(self) -> bool:
        """fp32, or a CPU that computes the pinned precision ran it and passed."""
        return any(c.passed and c.computes(self.float_precision) for c in self.checked_on) or (
            self.float_precision == "fp32"
        )

    def failed_on(self, device_class: str | None = None) -> list[CheckedOn]:
        """The --verify-on CPUs it failed on: of `device_class` (its CPU part), or any without one."""
        wanted = None if device_class is None else cpu_part(device_class)
        return [
            c
            for c in self.checked_on
            if not c.passed and c.cpu != BUILD_HOST and (wanted is None or c.cpu_class in (wanted, "unknown"))
        ]

    def exclusion(self, device_class: str | None = None) -> Exclusion | None:
        """Why it may not be picked for `device_class` (None: any device), or None when it may."""
        failed = self.failed_on(device_class)
        if failed:
            return Exclusion(FAILED_ON, ", ".join(c.cpu for c in failed))
        if not self.float_checked:
            return Exclusion(UNCHECKED, self.float_precision)
        return None


def excluded(manifest: Manifest, device_class: str | None = None) -> Exclusion | None:
    """Why a valid bundle may not be picked for `device_class` (None: for any device), or None when it may."""
    return Checks.of(manifest).exclusion(device_class)


def checking_cpus(precision: str) -> list[str]:
    """The --verify-on CPUs whose emulation computes `precision` (e.g. neoverse-v1 for bf16)."""
    probe = [CheckedOn(c.name, c.arch, "", c.features, True, True) for c in CPUS]
    return [c.cpu for c in probe if c.computes(precision)]


def exclusion_notes(excluded_: Iterable[tuple[str, Exclusion]]) -> str:
    """ "; excluded, <group>: a (detail), b (detail)" per group, in the order met ("" when nothing was)."""
    groups: dict[str, list[tuple[str, Exclusion]]] = {}
    for name, why in excluded_:
        groups.setdefault(why.group, []).append((name, why))
    out = ""
    for group, members in groups.items():
        hint = ""
        if group == UNCHECKED:
            cpus = sorted({cpu for _, why in members for cpu in checking_cpus(why.detail)})
            hint = f" (build on such a host{', or --verify-on ' + ','.join(cpus) if cpus else ''})"
        out += f"; excluded, {group}{hint}: {', '.join(f'{name} ({why.detail})' for name, why in members)}"
    return out
