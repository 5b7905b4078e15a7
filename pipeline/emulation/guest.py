"""Run bundles' self-tests on emulated CPUs: one QEMU user-mode guest per CPU model verifies every bundle.

The guest runs `python -m bitdeploy verify BUNDLE... --record FILE`: the runtime code a device runs, from a
copy of this installation's `bitdeploy` and `bitdeploy.runtimes` packages (pure Python; nothing else of
bitdeploy is copied, as on a device without the build extras), over the kit's engines (arm64) or this Python's
own (x86_64). The host reads the records; a guest that dies (Illegal instruction) becomes one line per bundle.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bitdeploy.core.devices import EMULATED_ENV, CpuModel
from bitdeploy.core.errors import BitdeployError
from bitdeploy.emulation.kit import guest_python, kit_root, require_ready

GUEST_TIMEOUT_S = 3600.0  # an FP16 ONNX Runtime bundle of R50x1 takes minutes emulated

# Variables that pin CPU kernels or engine paths to this host (OPENBLAS_CORETYPE=Haswell makes numpy run AVX2
# on an emulated SSE4.2 CPU): the device would not have them, so the guest must not inherit them.
KERNEL_PINNING_PREFIXES = ("OPENBLAS_", "GOTO", "MKL_", "DNNL_", "ONEDNN_", "ORT_", "OV_", "OPENVINO_", "NPY_", "ATEN_")
KERNEL_PINNING_NAMES = frozenset({"OMP_PLACES", "OMP_PROC_BIND", "KMP_AFFINITY", "LD_PRELOAD", "TF_ENABLE_ONEDNN_OPTS"})


def is_kernel_pinning(name: str) -> bool:
    """Whether a host variable selects CPU kernels or engine paths (so a guest must start without it)."""
    return name in KERNEL_PINNING_NAMES or name.startswith(KERNEL_PINNING_PREFIXES)


def guest_environment(host: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(environment for a guest, sorted names dropped): the host's, less QEMU's and the kernel-pinning ones."""
    dropped = sorted(k for k in host if is_kernel_pinning(k))
    env = {k: v for k, v in host.items() if not k.startswith("QEMU_") and k not in dropped}
    return env, dropped


# the subpackages a guest imports from
STAGED = (
    "core",
    "cli",
    "builder",
    "emulation",
    "runtimes",
    "runtimes.engines",
    "runtimes.bundle",
    "runtimes.serving",
    "runtimes.export",
)


def check_ready(cpus: Sequence[CpuModel], kit: Path | None = None) -> None:
    """Fail with one line (what to install) unless every architecture of `cpus` can be emulated here."""
    root = kit_root(kit)
    for arch in dict.fromkeys(c.arch for c in cpus):
        require_ready(arch, root)


def _stage_runtime(dst: Path) -> None:
    """Copy the installed sources that `bitdeploy verify` runs on (what a wheel installs, less the torch-side
    training/, converters/ and benchmarks/) into dst/bitdeploy."""
    for sub in ("", *STAGED):
        package = importlib.import_module(f"bitdeploy.{sub}" if sub else "bitdeploy")
        out = dst / "bitdeploy" / sub.replace(".", "/")
        out.mkdir(parents=True, exist_ok=True)
        for f in Path(str(package.__file__)).parent.iterdir():
            if f.suffix == ".py" or f.name == "py.typed":
                shutil.copyfile(f, out / f.name)


def guest_command(cpu: CpuModel, args: list[str], root: Path, stage: Path) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that run `python -m bitdeploy ARGS` as `cpu`."""
    qemu = require_ready(cpu.arch, root)
    env, _ = guest_environment(dict(os.environ))
    env[EMULATED_ENV] = cpu.name
    if cpu.arch == "arm64":  # the kit's Python and site only: nothing of this host's Python leaks in
        env = {k: v for k, v in env.items() if not k.startswith("PYTHON")}
        env.update(
            PYTHONNOUSERSITE="1",
            PYTHONDONTWRITEBYTECODE="1",
            QEMU_CPU=cpu.qemu_cpu,
            QEMU_LD_PREFIX=str(root / "arm64" / "rootfs"),
            PYTHONPATH=f"{stage}{os.pathsep}{root / 'arm64' / 'site'}",
        )
        return [qemu.path, str(guest_python(root)), "-m", "bitdeploy", *args], env
    return [qemu.path, "-cpu", cpu.qemu_cpu, sys.executable, "-m", "bitdeploy", *args], env  # this very Python


def _death(rc: int, stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    if lines:
        return lines[-1].removeprefix("error:").strip()
    if rc < 0 or rc > 128:
        sig = -rc if rc < 0 else rc - 128
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == signal.SIGILL:
            return "the guest died: Illegal instruction (an engine or numpy needs an ISA extension this CPU lacks)"
        return f"the guest died ({name})"
    tail = [line for line in stderr.splitlines() if line.strip()]
    return f"the guest exited {rc}: {tail[-1][:300] if tail else 'no message'}"


def verify_on(
    cpu: CpuModel,
    bundles: Sequence[Path],
    kit: Path | None = None,
    threads: int | None = None,
    timeout: float = GUEST_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Verify every bundle under `cpu` in one guest process: one report per bundle, in order (`passed`, the
    self-test figures, the fingerprint the guest saw; `error` where it could not run)."""
    root = kit_root(kit)
    with tempfile.TemporaryDirectory(prefix="bitdeploy-guest-") as tmp:
        stage, log = Path(tmp) / "site", Path(tmp) / "reports.json"
        if cpu.arch == "arm64":
            _stage_runtime(stage)
        args = ["verify", *[str(Path(b).resolve()) for b in bundles], "--record", str(log)]
        if threads:
            args += ["--threads", str(threads)]
        argv, env = guest_command(cpu, args, root, stage)
        dropped = guest_environment(dict(os.environ))[1]
        try:
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
            rc, stderr = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired:
            rc, stderr = 0, f"error: the guest ran past {timeout:.0f} s; pass a larger timeout"
        try:
            done = json.loads(log.read_text(encoding="utf-8")) if log.exists() else []
        except ValueError:
            done = []
    by_bundle = {str(r.get("bundle")): r for r in done if isinstance(r, dict)}
    reports = []
    for b in bundles:
        report = by_bundle.get(str(Path(b).resolve()))
        if report is None:
            report = {"bundle": str(Path(b).resolve()), "passed": False, "error": _death(rc, stderr)}
        report.update(
            emulated={
                "cpu": cpu.name,
                "board": cpu.board,
                "arch": cpu.arch,
                "qemu_cpu": cpu.qemu_cpu,
                "dropped_env": dropped,
            }
        )
        reports.append(report)
    return reports


def failure_line(report: dict[str, Any]) -> str:
    """Why a report failed, in a few words."""
    if report.get("error"):
        return str(report["error"])
    return "; ".join((report.get("self_test") or {}).get("failures") or []) or "failed"


def summarize_failures(matrix: dict[str, list[dict[str, Any]]]) -> str | None:
    """One line naming every failed (bundle, cpu), or None when all passed."""
    failed = [(cpu, r) for cpu, reports in matrix.items() for r in reports if not r.get("passed")]
    if not failed:
        return None
    total = sum(len(r) for r in matrix.values())
    first_cpu, first = failed[0]
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return (
        f"{len(failed)} of {total} emulated self-tests failed: {Path(str(first['bundle'])).name} on {first_cpu}: "
        f"{failure_line(first)}{more}"
    )


def raise_if_failed(matrix: dict[str, list[dict[str, Any]]]) -> None:
    line = summarize_failures(matrix)
    if line is not None:
        raise BitdeployError(line)
