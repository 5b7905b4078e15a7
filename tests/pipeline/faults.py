"""Helpers of the fault tests: one small build (tiny BiT, 32 px, a 2-step fine-tune on digits, ONNX Runtime FP32 and
INT8), the CLI run in process or as a subprocess, what a bundle's files hash to, and a full disk on tmpfs."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.clirun import run_cli

BUILD = shlex.split(
    "build --model tiny --weights none --dataset digits --resolution 32 --steps 2 --batch-size 16 --target onnx "
    "--precision fp32,int8 --calib-size 16 --eval-limit 40 --bench-iterations 5 --max-accuracy-drop 100"
)
BUNDLES = ("onnx-fp32", "onnx-int8")


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> Run:
    """`bitdeploy ARGS` in process, through the real entry point (error lines and exit codes)."""
    return Run(*run_cli(args, capsys))


def build_args(out: Path, cache: Path, *more: str) -> list[str]:
    return [*BUILD, "--out", str(out), "--cache-dir", str(cache), "--no-report", *more]


def subprocess_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-c", "import sys; from bitdeploy.cli import main; main(sys.argv[1:])", *args]


def digests(out: Path) -> dict[str, dict[str, str]]:
    """{bundle: the manifest's {file: sha256}} of a build's bundles (the manifest itself holds timestamps)."""
    return {b: json.loads((out / b / "manifest.json").read_text())["files"] for b in BUNDLES}


def cache_problems(cache: Path) -> list[str]:
    """Every stage-cache entry's problem (an empty list: the cache is consistent)."""
    from bitdeploy.core.cache import entry_problem
    from bitdeploy.core.cache_admin import scan

    entries, _ = scan(cache)
    return [f"{e.name}: {p}" for e in entries if (p := entry_problem(e.path)) is not None]


def half_written(root: Path) -> list[Path]:
    """Temporary names a write leaves until it finishes (`.<name>.tmp-*`, `*.tmp`, `.old-*`) under root."""
    marks = (".tmp-", ".tmp", ".old-", ".damaged-")
    return [p for p in root.rglob("*") if any(m in p.name for m in marks)]


@contextmanager
def full_disk(base: Path, size_kb: int) -> Iterator[Path]:
    """A real file system of `size_kb` (tmpfs), for ENOSPC where every library really writes; skips where mount
    is not permitted (not root, or a container without CAP_SYS_ADMIN)."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("a small tmpfs needs root and mount(8)")
    mnt = base / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here ({done.stderr.strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave_kb: int = 0) -> None:
    """Fill a file system until `leave_kb` remain."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while (room := shutil.disk_usage(disk).free - leave_kb * 1024) > 0:
                f.write(b"\0" * min(room, 1 << 20))
        except OSError:
            pass  # full
