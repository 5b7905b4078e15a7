"""Small modules: no package module is over 450 lines (the experiment scripts are not the package)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("pipeline", "runtimes", "converters", "benchmarks", "training")
LIMIT = 450


def test_no_package_module_is_over_450_lines() -> None:
    sizes = {
        str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines())
        for folder in FOLDERS
        for p in (REPO / folder).rglob("*.py")
        if "experiments" not in p.parts
    }
    assert len(sizes) > 50
    assert {name: n for name, n in sizes.items() if n > LIMIT} == {}
