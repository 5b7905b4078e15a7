"""Fixtures of the pipeline tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipeline.faults import build_args


@pytest.fixture(scope="session")
def clean_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The fault tests' build run once, never interrupted: (its --out, its stage cache)."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from bitdeploy.cli import main

    base = tmp_path_factory.mktemp("clean")
    try:
        main(build_args(base / "out", base / "cache"))
    except SystemExit as exc:
        assert not exc.code, "the clean build failed"
    return base / "out", base / "cache"
