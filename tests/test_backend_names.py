"""A target is named once: in its record (bitdeploy.core.targets). No package module compares a value with a backend
name written as a string (`backend == "tensorrt"`, `name in ("onnxruntime", "openvino")`); it reads the record's
fields instead (`needs_gpu`, `evaluates_onnx`, ...). Importing a third-party module of the same name
(`require("onnxruntime", ...)`) is not a comparison and stays allowed. The experiment scripts are not the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bitdeploy.core import targets

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("pipeline", "runtimes", "converters", "benchmarks", "training")
RECORDS = REPO / "pipeline" / "core" / "targets.py"
COMPARISONS = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)


def _strings(node: ast.expr) -> list[str]:
    """The string constants of a comparison operand: itself, or the items of a literal tuple/list/set."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)]


def compared_names(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every backend name that `source` compares something with (==, !=, in, not in)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(isinstance(op, COMPARISONS) for op in node.ops):
            for operand in (node.left, *node.comparators):
                found += [(node.lineno, s) for s in _strings(operand) if s in names]
    return found


def package_modules() -> list[Path]:
    return [
        p
        for folder in FOLDERS
        for p in sorted((REPO / folder).rglob("*.py"))
        if p != RECORDS and "experiments" not in p.relative_to(REPO).parts
    ]


def test_no_module_compares_with_a_backend_name() -> None:
    names = set(targets.backend_names())
    offenders = [
        f"{path.relative_to(REPO)}:{line}: compares with {name!r}; read the target record instead"
        for path in package_modules()
        for line, name in compared_names(path.read_text(encoding="utf-8"), names)
    ]
    assert offenders == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('if backend == "tensorrt":\n    pass\n', [(1, "tensorrt")]),
        ('ok = "openvino" != name\n', [(1, "openvino")]),
        ('gpu = [r for r in rows if r.backend not in ("litert", "x")]\n', [(1, "litert")]),
        ('cpu = name in {"onnxruntime", "openvino"}\n', [(1, "onnxruntime"), (1, "openvino")]),
        ('ort = require("onnxruntime", "onnxruntime", "ONNX Runtime")\n', []),  # importing the module is fine
        ('if device == "cpu" or n < 3:\n    pass\n', []),
    ],
)
def test_the_scan_finds_comparisons_and_only_them(source: str, expected: list[tuple[int, str]]) -> None:
    assert compared_names(source, {"onnxruntime", "openvino", "tensorrt", "litert"}) == expected


def test_the_scan_reads_the_package() -> None:
    modules = {p.relative_to(REPO).as_posix() for p in package_modules()}
    assert {"pipeline/builder/verify_on.py", "runtimes/engines/base.py", "converters/ort_convert.py"} <= modules
    assert "pipeline/core/targets.py" not in modules
