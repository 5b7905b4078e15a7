"""Serving memory in a fresh process (`bitdeploy.benchmarks.memory`), on the smallest ONNX bundles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bitdeploy.benchmarks.memory import METHOD, input_chw, serving_memory
from bitdeploy.core.errors import BitdeployError
from bitdeploy.runtimes.bundle import read_manifest, write_manifest
from tests.benchmarks.tiny_onnx import linear_bundle

BIG_HIDDEN = 4096  # 3072 x 4096 float32: a 50 MB model file


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return linear_bundle(tmp_path_factory.mktemp("memory") / "small", hidden=8)


def test_child_reports_peak_over_idle(small: Path) -> None:
    out = serving_memory(small, threads=1, queries=5)
    assert out["peak_rss_mb"] >= out["idle_rss_mb"] > 0
    assert out["queries"] == 5 and out["load_s"] > 0 and out["backend"] == "onnxruntime" and out["threads"] == 1
    assert out["method"] == METHOD  # Linux: VmHWM
    json.dumps(out)  # JSON-ready, as bench stores it


def test_bigger_model_peaks_higher(small: Path, tmp_path: Path) -> None:
    """The engine holds the weights: 50 MB more of them show in the peak (measured: about +90 MB with ONNX Runtime,
    the file's bytes and the session's copy); the idle figure, taken before the load, does not move."""
    big = linear_bundle(tmp_path / "big", hidden=BIG_HIDDEN)
    a, b = serving_memory(small, threads=1, queries=3), serving_memory(big, threads=1, queries=3)
    assert b["peak_rss_mb"] - a["peak_rss_mb"] > 30, (a, b)
    assert abs(b["idle_rss_mb"] - a["idle_rss_mb"]) < 15, (a, b)


def test_missing_bundle_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(BitdeployError) as exc:
        serving_memory(tmp_path / "nope", queries=1)
    msg = str(exc.value)
    assert "no such bundle" in msg and str(tmp_path / "nope") in msg and "\n" not in msg
    assert not msg.startswith("error:")


def test_engine_error_is_one_line(small: Path, tmp_path: Path) -> None:
    """A model file the engine refuses (checksums re-recorded, so it gets that far): the SDK's error in one line."""
    broken = tmp_path / "broken"
    shutil.copytree(small, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx model")
    write_manifest(broken, read_manifest(broken), ["model.onnx"])
    with pytest.raises(BitdeployError) as exc:
        serving_memory(broken, queries=1)
    assert str(broken) in str(exc.value) and "\n" not in str(exc.value)


def test_timeout_is_one_line(small: Path) -> None:
    with pytest.raises(BitdeployError, match=r"did not finish within 0\.01 s"):
        serving_memory(small, timeout_s=0.01)


def test_input_chw(small: Path) -> None:
    from dataclasses import replace

    m = read_manifest(small)
    assert input_chw(m) == (3, 32, 32)
    assert input_chw(replace(m, input=replace(m.input, shape=(-1, 3, -1, None)))) == (3, 32, 32)
    assert input_chw(replace(m, input=replace(m.input, shape=None))) == (3, 32, 32)
