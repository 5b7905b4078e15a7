"""The experiment scripts of benchmarks/experiments/, a plain folder outside the wheel, imported by path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

FOLDER = Path(__file__).resolve().parents[1] / "benchmarks" / "experiments"


def script(name: str) -> Path:
    return FOLDER / f"{name}.py"


def load(name: str) -> ModuleType:
    """The script as a module named after its file, the name the scripts import one another by."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, script(name))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
