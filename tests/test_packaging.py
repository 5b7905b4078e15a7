"""The wheel must hold every package and every module on disk (the package-dir mapping has traps)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "pipeline": "bitdeploy",
    "training": "bitdeploy/training",
    "converters": "bitdeploy/converters",
    "runtimes": "bitdeploy/runtimes",
    "benchmarks": "bitdeploy/benchmarks",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (whl,) = out.glob("bitdeploy-*.whl")
    return whl


def test_wheel_holds_every_module(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in FOLDERS.items():
        for src in (ROOT / folder).glob("*.py"):
            assert f"{package}/{src.name}" in names, f"{folder}/{src.name} missing from the wheel"
    assert "bitdeploy/py.typed" in names
    assert not any(n.startswith(("tests/", "training/", "pipeline/")) for n in names), (
        "stray top-level folders in the wheel"
    )


def test_folders_are_flat() -> None:
    # Nested packages must be listed in pyproject's `packages`, or the wheel silently drops them.
    for folder in FOLDERS:
        nested = [p for p in (ROOT / folder).iterdir() if p.is_dir() and (p / "__init__.py").exists()]
        assert not nested, f"{folder} has nested packages {nested}; keep it flat or list them in pyproject.toml"


def test_wheel_metadata_extras(wheel: Path) -> None:
    meta = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    for extra in ("onnxruntime", "openvino", "tensorrt", "litert", "litert-convert", "train", "all", "dev"):
        assert f"Provides-Extra: {extra}" in text
    requires = [line for line in text.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not any("torch" in r for r in requires), "the base install must not require torch"


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[dev]')")
def test_lint_bans_the_training_stack_in_the_runtime_only() -> None:
    """runtimes/ruff.toml: importing torch, onnx, nncf or bitdeploy's training/converters code in runtimes/ fails
    `ruff check`; the same imports in converters/ pass."""
    source = "import numpy\nimport torch\nfrom onnx import helper\nimport nncf\nfrom bitdeploy.converters import base\nfrom bitdeploy.training import bit\n"

    def banned(path: str) -> list[str]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "ruff",
                "check",
                "--select",
                "TID251",
                "--output-format",
                "concise",
                "--stdin-filename",
                path,
                "-",
            ],
            input=source,
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        return [line.split("`")[1] for line in done.stdout.splitlines() if "TID251" in line]

    assert banned("runtimes/new_backend.py") == ["torch", "onnx", "nncf", "bitdeploy.converters", "bitdeploy.training"]
    assert banned("converters/new_converter.py") == []
