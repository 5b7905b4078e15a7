"""The emulation kit: what running a bundle's self-test on another CPU needs, prepared once in the user cache.

x86_64: `qemu-x86_64` (any version) runs this Python and its installed engines as a lower CPU class.
arm64: `qemu-aarch64` >= 8.1 (7.2 shows the host's /proc/cpuinfo to the guest and ONNX Runtime crashes at
import), an arm64 Debian sysroot with Python (mmdebstrap's extract variant: nothing runs emulated), and the
aarch64 wheels of numpy, Pillow, click and each engine installed in the kit by this machine's pip (pip checks
each file against the index's sha256; apt checks the Debian signatures). After setup nothing needs the network.

Layout: `<kit>/arm64/rootfs/`, `<kit>/arm64/site/`, `<kit>/<arch>/kit.json` (written last: a kit without it is
unfinished). The kit is `$BITDEPLOY_KIT`, else `emulation/` beside the stage cache (~/.cache/bitdeploy/emulation).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bitdeploy.core import targets
from bitdeploy.core.errors import BitdeployError, first_line
from bitdeploy.core.fsutil import atomic_write, replace_dir, temp_dir

KIT_ENV = "BITDEPLOY_KIT"
KIT_FILE = "kit.json"
ARCHES = ("arm64", "x86_64")
QEMU_BINARIES = {"arm64": "qemu-aarch64", "x86_64": "qemu-x86_64"}
MIN_QEMU = {"arm64": (8, 1), "x86_64": (0, 0)}
SUITE = "bookworm"  # glibc 2.36: openvino's aarch64 wheel needs >= 2.35
GUEST_PYTHON = "3.11"
SYSROOT_PACKAGES = "python3,libstdc++6,libgomp1"
# pip does not expand --platform to older manylinux tags: each one a wheel may carry is listed.
MANYLINUX = ("manylinux2014_aarch64", *(f"manylinux_2_{v}_aarch64" for v in (17, 24, 26, 27, 28, 31, 34, 35, 36)))
# The runtime's own dependencies, then each CPU target's runtime wheel: pip name -> import name.
BASE_WHEELS = ("numpy", "pillow", "click")


def engine_wheels() -> dict[str, str]:
    """{pip name: import name} of the runtime of every target record that runs on a CPU (what a guest can run)."""
    return {t.runtime_wheel: t.runtime_module for t in targets.TARGETS.values() if not t.needs_gpu}


QEMU_FIX = (
    "install QEMU >= 8.1: Debian 12 `apt-get install -t bookworm-backports qemu-user` (add bookworm-backports to "
    "apt's sources), Debian 13 / Ubuntu 24.04 `apt-get install qemu-user`, or put a qemu-aarch64 >= 8.1 on PATH"
)


def kit_root(explicit: Path | None = None) -> Path:
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get(KIT_ENV)
    if env:
        return Path(env).expanduser()
    from bitdeploy.core.cache import default_root

    return default_root().parent / "emulation"


@dataclass(frozen=True)
class Qemu:
    path: str
    version: tuple[int, int]

    def label(self) -> str:
        return f"QEMU {self.version[0]}.{self.version[1]}"


def find_qemu(arch: str, root: Path) -> Qemu | BitdeployError:
    """The user-mode emulator for `arch` (in `<kit>/bin`, then on PATH), or the one-line error saying what to do."""
    name = QEMU_BINARIES[arch]
    found = [str(p) for p in (root / "bin" / name,) if p.is_file()] + [x for x in (shutil.which(name),) if x]
    if not found:
        fix = QEMU_FIX if arch == "arm64" else "install qemu-user (`apt-get install qemu-user`)"
        return BitdeployError(f"{name} not found; {fix}")
    try:
        out = subprocess.run([found[0], "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return BitdeployError(f"{found[0]} does not run ({first_line(exc)}); reinstall qemu-user")
    match = re.search(r"version (\d+)\.(\d+)", out)
    got = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if got < MIN_QEMU[arch]:
        return BitdeployError(
            f"{found[0]} is QEMU {got[0]}.{got[1]}; ARM emulation needs >= 8.1 "
            f"(7.2 crashes ONNX Runtime at import and computes LiteRT INT8 wrongly): {QEMU_FIX}"
        )
    return Qemu(found[0], got)


def read_kit(arch: str, root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / arch / KIT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def guest_python(root: Path) -> Path:
    return root / "arm64" / "rootfs" / "usr" / "bin" / f"python{GUEST_PYTHON}"


def readiness(arch: str, root: Path) -> tuple[Qemu | None, str | None]:
    """(the emulator, None) when `arch` can be emulated here now, else (emulator or None, what is missing + fix)."""
    qemu = find_qemu(arch, root)
    if isinstance(qemu, BitdeployError):
        return None, str(qemu)
    if arch == "arm64":
        kit = read_kit(arch, root)
        if kit is None or not guest_python(root).is_file() or not (root / "arm64" / "site").is_dir():
            return qemu, f"no arm64 emulation kit in {root}; run: bitdeploy devices setup arm64"
    return qemu, None


def require_ready(arch: str, root: Path) -> Qemu:
    qemu, missing = readiness(arch, root)
    if missing is not None or qemu is None:
        raise BitdeployError(missing or f"{QEMU_BINARIES[arch]} not found")
    return qemu


def _run(cmd: list[str], what: str, fix: str, timeout: float = 1800) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BitdeployError(f"{what} failed ({first_line(exc)}); {fix}") from exc
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        raise BitdeployError(f"{what} failed ({lines[-1][:300] if lines else f'exit {proc.returncode}'}); {fix}")


def _sysroot(root: Path) -> None:
    """The arm64 Debian sysroot with Python (only extracted: nothing runs emulated), unless it is there."""
    if guest_python(root).is_file():
        return
    tool = shutil.which("mmdebstrap")
    if tool is None:
        raise BitdeployError("mmdebstrap not found; install it (`apt-get install mmdebstrap`), then rerun the setup")
    (root / "arm64").mkdir(parents=True, exist_ok=True)
    with temp_dir(root / "arm64", ".rootfs.tmp-") as tmp:
        _run(
            [tool, "--quiet", "--variant=extract", "--arch=arm64", f"--include={SYSROOT_PACKAGES}", SUITE, str(tmp)],
            "mmdebstrap (the arm64 sysroot)",
            "check that the Debian mirror is reachable",
        )
        replace_dir(tmp, root / "arm64" / "rootfs")
    if not guest_python(root).is_file():
        raise BitdeployError(f"the arm64 sysroot has no python{GUEST_PYTHON}; delete {root / 'arm64'} and rerun setup")


def wheel_specs(engines: list[str]) -> list[str]:
    """pip requirements for the guest: the versions installed here (the same engine the build used), else latest."""
    specs = []
    for name in [*BASE_WHEELS, *engines]:
        try:
            specs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            specs.append(name)
    return specs


def _site(root: Path, engines: list[str]) -> list[str]:
    """pip-install the aarch64 wheels into `<kit>/arm64/site` (replaced whole, so a failed install leaves the old)."""
    specs = wheel_specs(engines)
    platforms = [arg for tag in MANYLINUX for arg in ("--platform", tag)]
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]
    cmd += ["--only-binary=:all:", "--python-version", GUEST_PYTHON, "--implementation", "cp"]
    cmd += ["--abi", "cp311", "--abi", "abi3", "--abi", "none", *platforms, *specs]
    with temp_dir(root / "arm64", ".site.tmp-") as tmp:
        _run(
            [*cmd, "--target", str(tmp)],
            "pip (the aarch64 wheels)",
            "check that PyPI is reachable and that these versions have aarch64 wheels",
        )
        replace_dir(tmp, root / "arm64" / "site")
    return specs


def setup(arch: str, root: Path, engines: list[str] | None = None) -> dict[str, Any]:
    """Prepare emulation of `arch` in `root` (idempotent: the sysroot is kept, the wheels are refreshed) and
    return its kit.json. A missing tool is a one-line BitdeployError with the fix."""
    if arch not in ARCHES:
        raise BitdeployError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHES)}")
    qemu = require_qemu(arch, root)
    kit: dict[str, Any] = {"arch": arch, "qemu": qemu.path, "qemu_version": list(qemu.version)}
    if arch == "arm64":
        wheels = engine_wheels()
        picked = list(wheels) if engines is None else engines
        unknown = [e for e in picked if e not in wheels]
        if unknown:
            raise BitdeployError(f"unknown engine {unknown[0]!r}; choose from {', '.join(wheels)}")
        _sysroot(root)
        kit.update(suite=SUITE, python=GUEST_PYTHON, wheels=_site(root, picked))
    atomic_write(root / arch / KIT_FILE, json.dumps(kit, indent=2) + "\n")
    return kit


def require_qemu(arch: str, root: Path) -> Qemu:
    qemu = find_qemu(arch, root)
    if isinstance(qemu, BitdeployError):
        raise qemu
    return qemu
