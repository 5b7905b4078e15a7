"""The package's layers (docs/architecture.md): no module imports a layer above its own.

From the bottom: the kernel (the pipeline/ modules everything may use), runtimes/, training/, converters/,
benchmarks/, and the top (the pipeline/ modules behind the CLI and the build). Every `import` counts wherever it
stands: at module level, inside a function (a lazy import still loads the layer when it runs) and under
`if TYPE_CHECKING:`. The experiment scripts in benchmarks/experiments/ are not in the package and not checked.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# pipeline/ holds both the bottom and the top layer: each of its modules is placed here
KERNEL = {"__init__", "interrupts", "errors", "fsutil", "stdio", "catalog", "targets", "cache", "resources", "devices"}
TOP = {
    "__main__",
    "cli",
    "choices",
    "cmd_bench",
    "cmd_build",
    "cmd_cache",
    "cmd_devices",
    "cmd_export",
    "cmd_export_repo",
    "cmd_models",
    "cmd_runtime",
    "cmd_train",
    "cmd_verify",
    "build",
    "build_context",
    "build_output",
    "build_row",
    "build_stages",
    "build_verify_on",
    "cache_admin",
    "choose",
    "cmd_select",
    "emulation",
    "emulation_kit",
    "grid",
}
# bottom to top; a module may import its own layer and those below it
LAYERS = ("kernel", "runtimes", "training", "converters", "benchmarks", "top")
FOLDERS = ("runtimes", "training", "converters", "benchmarks")  # each its own layer, named after it


def pipeline_layer(stem: str) -> str | None:
    return "kernel" if stem in KERNEL else "top" if stem in TOP else None


def imported_layer(name: str, pipeline: set[str]) -> str | None:
    """The layer of `bitdeploy...` module `name`; None for anything outside bitdeploy."""
    parts = name.split(".")
    if parts[0] != "bitdeploy":
        return None
    if len(parts) > 1 and parts[1] in FOLDERS:
        return parts[1]
    if len(parts) > 1 and parts[1] in pipeline:
        return pipeline_layer(parts[1])  # None for a module without a layer, which is reported on its own
    return "kernel"  # the root package, or one of its attributes (`from bitdeploy import __version__`)


def imports(path: Path, package: str) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth, relative ones resolved against `package`."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"  # a module, or an attribute of `base`: same layer


def violations(root: Path) -> list[str]:
    """Every import of a higher layer in the package folders under `root`, and every pipeline module without a
    layer; empty when the tree keeps its layers."""
    pipeline = {p.stem for p in (root / "pipeline").glob("*.py")}
    found = [
        f"pipeline/{stem}.py has no layer: add it to KERNEL or TOP in {Path(__file__).name}"
        for stem in sorted(pipeline)
        if pipeline_layer(stem) is None
    ]
    sources = [(p, "bitdeploy", pipeline_layer(p.stem)) for p in sorted((root / "pipeline").glob("*.py"))]
    for folder in FOLDERS:
        sources += [(p, f"bitdeploy.{folder}", folder) for p in sorted((root / folder).glob("*.py"))]
    for path, package, layer in sources:
        for line, name in imports(path, package) if layer is not None else ():
            target = imported_layer(name, pipeline)
            if target is not None and LAYERS.index(target) > LAYERS.index(layer):
                found.append(f"{path.relative_to(root)}:{line} ({layer}) imports {name} ({target})")
    return found


def test_the_package_keeps_its_layers() -> None:
    assert violations(ROOT) == []


def test_every_named_pipeline_module_exists() -> None:
    on_disk = {p.stem for p in (ROOT / "pipeline").glob("*.py")}
    stale = (KERNEL | TOP) - on_disk
    assert not stale, f"KERNEL/TOP name modules that no longer exist: {sorted(stale)}"
    assert not KERNEL & TOP


def _tree(root: Path, files: dict[str, str]) -> Path:
    for folder in ("pipeline", *FOLDERS):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for rel, text in {"pipeline/errors.py": "", "pipeline/cli.py": "", **files}.items():
        (root / rel).write_text(text)
    return root


def test_checker_sees_module_level_and_lazy_imports_of_a_higher_layer(tmp_path: Path) -> None:
    tree = _tree(
        tmp_path,
        {
            "runtimes/backend.py": "from bitdeploy.converters import base\n",
            "runtimes/lazy.py": "def f():\n    import bitdeploy.converters.base\n",
            "runtimes/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bitdeploy.cli import main\n",
            "converters/rel.py": "from ..benchmarks import latency\n",
            "pipeline/errors.py": "def hint():\n    from bitdeploy import cli\n",
            "pipeline/extra.py": "",
        },
    )
    assert violations(tree) == [
        "pipeline/extra.py has no layer: add it to KERNEL or TOP in test_layers.py",
        "pipeline/errors.py:2 (kernel) imports bitdeploy.cli (top)",
        "runtimes/backend.py:1 (runtimes) imports bitdeploy.converters.base (converters)",
        "runtimes/lazy.py:2 (runtimes) imports bitdeploy.converters.base (converters)",
        "runtimes/typed.py:3 (runtimes) imports bitdeploy.cli.main (top)",
        "converters/rel.py:1 (converters) imports bitdeploy.benchmarks.latency (benchmarks)",
    ]


@pytest.mark.parametrize(
    ("rel", "source"),
    [
        (
            "pipeline/cli.py",
            "def run():\n    from bitdeploy.benchmarks import bench\n    import bitdeploy.converters\n",
        ),
        ("converters/conv.py", "from bitdeploy import __version__, errors\nfrom bitdeploy.runtimes import manifest\n"),
        ("runtimes/ok.py", "import numpy\nfrom bitdeploy.errors import BundleError\nfrom . import manifest\n"),
    ],
)
def test_checker_allows_imports_downwards(tmp_path: Path, rel: str, source: str) -> None:
    assert violations(_tree(tmp_path, {rel: source})) == []
