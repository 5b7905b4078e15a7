"""The wheel must hold every package and every module on disk (the package-dir mapping has traps), and nothing
from benchmarks/experiments/ or tests/."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def source_folder(package: str) -> str:
    """The folder a package is built from: pyproject's package-dir of it or of its nearest listed parent."""
    dirs = dict(re.findall(r'^"?([\w.]+)"? = "(\w+)"$', PYPROJECT.split("[tool.setuptools.package-dir]")[1], re.M))
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in dirs:
            return "/".join([dirs[".".join(parts[:i])], *parts[i:]])
    raise AssertionError(f"{package} has no package-dir")


PACKAGES = re.findall(r'"(bitdeploy[\w.]*)"', PYPROJECT.split("packages = [")[1].split("]")[0])
FOLDERS = {source_folder(p): p.replace(".", "/") for p in PACKAGES}  # source folder -> its path in the wheel
# a path or an import of tests/ (the old parity_official.py: `Path(__file__).parents[1] / "tests" / ...`)
READS_TESTS = re.compile(r"""["']tests["'/]|^\s*(from|import) tests\b""", re.MULTILINE)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # from a copy without build outputs: setuptools packs whatever its build/lib still holds, deleted modules too
    src = out / "src"
    shutil.copytree(
        ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__")
    )
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
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


def test_wheel_holds_no_experiments_and_nothing_reads_tests(wheel: Path) -> None:
    """The experiment scripts run from a checkout only; an installed module that loads tests/ would break."""
    archive = zipfile.ZipFile(wheel)
    experiments = {p.name for p in (ROOT / "benchmarks" / "experiments").glob("*.py")}
    assert experiments and not (ROOT / "benchmarks" / "experiments" / "__init__.py").exists()
    modules = [n for n in archive.namelist() if n.endswith(".py")]
    assert not [n for n in modules if "experiments" in n or n.rsplit("/", 1)[-1] in experiments]
    assert not [n for n in modules if READS_TESTS.search(archive.read(n).decode())]


def test_checker_of_tests_references_sees_a_path_and_an_import() -> None:
    for source in ('ROOT / "tests" / "reference"', "open('tests/reference/x.py')", "    from tests.reference import x"):
        assert READS_TESTS.search(source), source
    assert not READS_TESTS.search("# Tiny configurations for tests: same unit structure\nself-tests")


def test_every_nested_package_is_listed() -> None:
    # A nested package missing from pyproject's `packages` is silently dropped from the wheel.
    assert {"pipeline", "pipeline/core", "pipeline/cli", "runtimes"} <= set(FOLDERS)
    for folder in FOLDERS:
        for sub in (ROOT / folder).iterdir():
            if sub.is_dir() and (sub / "__init__.py").exists():
                assert sub.relative_to(ROOT).as_posix() in FOLDERS, (
                    f"{sub.relative_to(ROOT)} is not in pyproject's packages"
                )


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
