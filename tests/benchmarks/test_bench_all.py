"""`bitdeploy bench DIR --all`: finding a grid's bundles, naming them, skipping invalid ones, the progress line with
its ETA, serving memory per bundle, and all of it without torch (as on a device)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bitdeploy.benchmarks.bench import Bench
from bitdeploy.benchmarks.discovery import GATE_SKIP, bundles_to_bench, find_bundles
from bitdeploy.benchmarks.measure import BenchOptions
from bitdeploy.benchmarks.progress import duration_text, eta_s, progress_line
from bitdeploy.cli import main
from bitdeploy.core.errors import BitdeployError
from bitdeploy.runtimes.bundle import read_manifest
from tests.benchmarks.tiny_onnx import linear_bundle
from tests.runtimes.test_torch_free import BLOCKED

FAST = ["--iterations", "6", "--warmup", "0", "--batch-sizes", "1", "--threads", "1", "--no-e2e"]
GATE_REASON = "accuracy gate: top-1 dropped 3.10 pp vs FP32 PyTorch (allowed 1 pp)"
# Runs in every interpreter of the process tree (bench, and the serving-memory children): PYTHONPATH -> sitecustomize.
SITECUSTOMIZE = "import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None  # `import torch` now fails\n"


def _fake(path: Path, pack: bool = False) -> None:
    """A name find_bundles takes for a bundle (it reads no manifest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if pack:
        path.write_bytes(b"")
    else:
        path.mkdir()
        (path / "manifest.json").write_text("{}")


def test_find_bundles_walks_a_grid_folder(tmp_path: Path) -> None:
    g = tmp_path / "grid"
    for rel in ("m-r50x1-32/onnx-int8", "m-r50x1-32/onnx-fp32", "m-r101x1-64/openvino-fp32", "selected"):
        _fake(g / rel)
    _fake(g / "m-r101x1-64/onnx-fp32.bitpack", pack=True)
    _fake(g / "selected.bitpack", pack=True)  # `bitdeploy select --pack`
    _fake(g / "m-r50x1-32/.onnx-int8.tmp-123-abc")  # a killed build's temporary directory
    _fake(g / ".hidden/onnx-fp32")
    _fake(g / "deeper/selected")  # only DIR/selected is the selection's copy
    _fake(g / "m-r50x1-32/onnx-int8/nested")  # inside a bundle: not searched
    (g / "report").mkdir()
    (g / "report/results.json").write_text("{}")
    (g / "m-r50x1-32/report").mkdir()
    found = [p.relative_to(g).as_posix() for p in find_bundles(g)]
    assert found == [
        "deeper/selected",
        "m-r101x1-64/onnx-fp32.bitpack",
        "m-r101x1-64/openvino-fp32",
        "m-r50x1-32/onnx-fp32",
        "m-r50x1-32/onnx-int8",
    ]
    assert find_bundles(g / "m-r50x1-32/onnx-int8") == [g / "m-r50x1-32/onnx-int8"]  # a bundle: itself
    assert find_bundles(g / "report") == []


def test_bundles_to_bench_names_and_refusals(tmp_path: Path) -> None:
    g, other = tmp_path / "grid", tmp_path / "other"
    for rel in ("a-32/onnx-fp32", "b-32/onnx-fp32", "selected"):
        _fake(g / rel)
    _fake(other / "a-32/onnx-fp32")
    notes: list[str] = []
    planned = bundles_to_bench([str(g)], True, notes.append)
    assert planned == [(str(g / "a-32/onnx-fp32"), "a-32/onnx-fp32"), (str(g / "b-32/onnx-fp32"), "b-32/onnx-fp32")]
    assert len(notes) == 1 and str(g / "selected") in notes[0]
    # the same relative path under two folders: the folder joins the name, so rows never collide
    names = [n for _, n in bundles_to_bench([str(g), str(other)], True, notes.append)]
    assert len(set(names)) == 3 and f"{other.as_posix()}/a-32/onnx-fp32" in names
    # the grid's own bundle given twice is benched once
    assert len(bundles_to_bench([str(g), str(g / "a-32/onnx-fp32")], True, notes.append)) == 2
    with pytest.raises(BitdeployError, match=r"is a folder of 2 bundles, not a bundle; pass --all"):
        bundles_to_bench([str(g)], False, notes.append)
    assert bundles_to_bench([str(g / "b-32/onnx-fp32")], False, notes.append) == [
        (str(g / "b-32/onnx-fp32"), "onnx-fp32")
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(BitdeployError, match=r"empty: no bundle under this folder"):
        bundles_to_bench([str(tmp_path / "empty")], True, notes.append)


def test_eta_from_the_mean_step() -> None:
    assert eta_s(40.0, 0, 48) is None
    assert eta_s(40.0, 6, 48) == pytest.approx(280.0)
    assert eta_s(40.0, 48, 48) == 0.0
    assert [duration_text(s) for s in (0.4, 40, 80, 3599.6, 3900)] == [
        "0 s",
        "40 s",
        "1 min 20 s",
        "1 h 00 min",
        "1 h 05 min",
    ]
    assert progress_line(1, 48, "opening a", 0.0) == "[1/48] opening a, elapsed 0 s, ETA -"
    assert progress_line(7, 48, "round 2/3 m-r50x1-32/onnx-int8", 40.0) == (
        "[7/48] round 2/3 m-r50x1-32/onnx-int8, elapsed 40 s, ETA 4 min 40 s"
    )


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two cells x two bundles; one of them failed its gate; a report folder, `selected`, a temporary directory."""
    g = tmp_path_factory.mktemp("grid") / "grid"
    linear_bundle(g / "m-a-32/onnx-fp32", hidden=8)
    linear_bundle(g / "m-a-32/onnx-int8", hidden=9, precision="int8")
    linear_bundle(g / "m-b-32/onnx-fp32", hidden=10)
    linear_bundle(g / "m-b-32/onnx-int8", hidden=11, precision="int8", valid=False, invalid_reason=GATE_REASON)
    shutil.copytree(g / "m-a-32/onnx-fp32", g / "selected")
    shutil.copytree(g / "m-b-32/onnx-fp32", g / "m-b-32/.onnx-fp32.tmp-1-x")
    (g / "report").mkdir()
    (g / "report/results.json").write_text("{}")
    return g


def test_progress_counts_every_step(grid: Path) -> None:
    """Open, 3 rounds and serving memory per benched bundle: the last line is [N/N]; the invalid one is skipped."""
    planned = bundles_to_bench([str(grid)], True, lambda _: None)
    bench = Bench(BenchOptions(batch_sizes=(1,), iterations=3, warmup=0, threads=1, end_to_end=False))
    lines: list[str] = []
    bench.log = lines.append  # type: ignore[method-assign]
    results = bench.bundles([p for p, _ in planned], [n for _, n in planned], skip_invalid=True)
    total = 3 * (1 + 3 + 1)
    assert len(lines) == total and lines[0].startswith(f"[1/{total}] opening m-a-32/onnx-fp32, elapsed ")
    assert lines[-1].startswith(f"[{total}/{total}] serving memory m-b-32/onnx-fp32")
    assert "ETA -" in lines[0] and all("ETA -" not in ln for ln in lines[1:])
    assert sum("round 2/3 " in ln for ln in lines) == 3
    assert [e.status.text if e.status else None for e in results] == [
        "valid",
        "valid",
        "valid",
        f"{GATE_SKIP} ({GATE_REASON})",
    ]


def test_bench_all_without_torch(grid: Path, tmp_path: Path) -> None:
    """`bitdeploy bench DIR --all --json` where torch, onnx and nncf cannot be imported, in bench and in each
    serving-memory child: every bundle a row named by its path, the invalid one skipped, exit 0."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=BLOCKED))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(block), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "device.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bitdeploy", "bench", str(grid), "--all", *FAST, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"bench: skipping {grid / 'selected'}" in proc.stderr and "Traceback" not in proc.stderr
    doc = json.loads(out.read_text())
    rows = {e["name"]: e for e in doc["results"]}
    assert list(rows) == ["m-a-32/onnx-fp32", "m-a-32/onnx-int8", "m-b-32/onnx-fp32", "m-b-32/onnx-int8"]
    for name, e in rows.items():
        assert e["bundle"] == str(grid / name)
        assert e["files_sha256"] == read_manifest(grid / name).files  # how device rows join build rows
    skipped = rows.pop("m-b-32/onnx-int8")
    assert skipped["status"] == f"{GATE_SKIP} ({GATE_REASON})" and skipped["serving_memory"] is None
    assert skipped["single_stream"] is None and skipped["precision"] == "int8"
    for e in rows.values():
        assert e["status"] == "valid" and e["single_stream"]["n"] == 6
        mem = e["serving_memory"]
        assert mem["peak_rss_mb"] >= mem["idle_rss_mb"] > 0 and mem["threads"] == 1, mem
    assert doc["settings"]["serving_memory"]["queries"] == 20


def test_folder_without_all_and_empty_folder_are_one_line(
    grid: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    for args, needle in (
        (
            [str(grid)],
            f"error: {grid} is a folder of 4 bundles, not a bundle; pass --all to bench every bundle under it",
        ),
        ([str(tmp_path / "empty"), "--all"], f"error: {tmp_path / 'empty'}: no bundle under this folder"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["bench", *args, *FAST])
        err = capsys.readouterr().err
        assert exc.value.code == 1 and err.startswith(needle) and len(err.strip().splitlines()) == 1, err
