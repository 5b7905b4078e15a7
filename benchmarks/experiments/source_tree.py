"""Import `bitdeploy` straight from a source tree, without `pip install -e .`.

The package maps folders to names that differ from them (`pipeline/` is `bitdeploy`, `training/` is
`bitdeploy.training`, ...: `[tool.setuptools.package-dir]` in pyproject.toml). `install(root)` reads that table
(tomllib, else tomli, else a line parser of that one table, else the layout built in below) and puts a finder in
front of `sys.meta_path` that serves each mapped name from its folder; every other `bitdeploy.*` module (the
subpackages under pipeline/ such as `bitdeploy.core`, whatever they are called) is found through its parent's
`__path__`, as for any package. An installed bitdeploy (editable or not) is not consulted for these names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

TOP = "bitdeploy"
# The layout when pyproject.toml is missing or has no package-dir table (a tree copied without it).
FALLBACK = {
    "bitdeploy": "pipeline",
    "bitdeploy.training": "training",
    "bitdeploy.converters": "converters",
    "bitdeploy.runtimes": "runtimes",
    "bitdeploy.benchmarks": "benchmarks",
}
_ENTRY = re.compile(r"""^\s*["']?([A-Za-z0-9_.]+)["']?\s*=\s*["']([^"']*)["']\s*(#.*)?$""")


def _toml_reader() -> Any:
    for name in ("tomllib", "tomli"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def parse_package_dir(text: str) -> dict[str, str]:
    """The `[tool.setuptools.package-dir]` table of a pyproject.toml, without a TOML library."""
    table: dict[str, str] = {}
    inside = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            inside = stripped.split("#", 1)[0].strip() == "[tool.setuptools.package-dir]"
            continue
        match = _ENTRY.match(line) if inside else None
        if match:
            table[match.group(1)] = match.group(2)
    return table


def package_dirs(root: Path) -> dict[str, Path]:
    """Package name -> absolute folder, for the names under `bitdeploy`, from root/pyproject.toml."""
    pyproject = root / "pyproject.toml"
    table: dict[str, str] = {}
    if pyproject.is_file():
        text = pyproject.read_text(encoding="utf-8")
        toml = _toml_reader()
        if toml is not None:
            table = toml.loads(text).get("tool", {}).get("setuptools", {}).get("package-dir", {})
        else:
            table = parse_package_dir(text)
    chosen = {k: v for k, v in table.items() if k == TOP or k.startswith(TOP + ".")}
    if TOP not in chosen:
        chosen = FALLBACK
    return {name: (root / folder).resolve() for name, folder in chosen.items()}


class SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Serves the mapped package names from their folders, and their submodules through the parent's path."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        folder = self.dirs.get(fullname)
        if folder is not None:
            init = folder / "__init__.py"
            if init.is_file():
                return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(folder)])
            spec = ModuleSpec(fullname, None, is_package=True)  # a folder without __init__.py: a namespace
            spec.submodule_search_locations = [str(folder)]
            return spec
        parent = fullname.rpartition(".")[0]
        if parent and fullname.split(".", 1)[0] == TOP and parent in sys.modules:
            search = getattr(sys.modules[parent], "__path__", None)
            if search is not None:
                return importlib.machinery.PathFinder.find_spec(fullname, list(search), target)
        return None


def source_of(module: ModuleType) -> Path | None:
    file = getattr(module, "__file__", None)
    return Path(file).resolve() if file else None


def install(root: Path) -> SourceTreeFinder:
    """Make `import bitdeploy...` read root's folders. Refuses (ImportError) when bitdeploy was already imported
    from somewhere else, since its modules would then mix two trees."""
    dirs = package_dirs(root.resolve())
    loaded = sys.modules.get(TOP)
    if loaded is not None:
        where = source_of(loaded)
        if where is None or where.parent != dirs[TOP]:
            raise ImportError(f"bitdeploy is already imported from {where}, not from {dirs[TOP]}")
    for finder in sys.meta_path:
        if isinstance(finder, SourceTreeFinder) and finder.dirs == dirs:
            return finder
    finder = SourceTreeFinder(dirs)
    sys.meta_path.insert(0, finder)
    importlib.invalidate_caches()
    return finder
