"""`bitdeploy build` over a model x resolution grid, `--shard`, `--max-hours`, and `bitdeploy select`.

The tiny BiT with a closed-form head fitted at 32 px (conftest `ckpt`) stands in for a fine-tuned model: exported
at 16 px it loses accuracy, so the grid's cells differ in both speed and top-1, as real ones do.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from bitdeploy.builder.grid import Cell, over_budget, parse_shard, plan_cells, shard_cells
from tests.pipeline import faults

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

CELLS = ("tiny-16", "tiny-32")
GATE = ["--eval-limit", "120", "--calib-size", "32", "--max-accuracy-drop", "100"]


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    run = faults.cli(args, capsys)
    return run.code, run.out, run.err


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory, ckpt: Path) -> tuple[Path, str, str]:
    """One grid build: tiny at 16 and 32 px x ONNX Runtime FP32/INT8, timed, with a generous latency budget. In
    process through the real entry point (no second interpreter importing torch), stdout and stderr kept apart;
    `grid_cache` copies its stage cache."""
    from bitdeploy.cli import main

    base = tmp_path_factory.mktemp("grid")
    out = base / "grid"
    args = ["build", "--model", "tiny", "--weights", str(ckpt), "--dataset", "digits", "--resolution", "16,32"]
    args += ["--target", "onnx", "--precision", "fp32,int8", "--no-baseline", "--bench-iterations", "20", *GATE]
    args += ["--latency-budget", "1000", "--cache-dir", str(base / "cache"), "--out", str(out)]
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    assert code == 0, stderr.getvalue()[-3000:]
    return out, stdout.getvalue(), stderr.getvalue()


def grid_cache(grid: tuple[Path, str, str], tmp_path: Path) -> Path:
    """A private copy of the grid build's stage cache (its 16 px cell: export, reference, calibration, conversions)."""
    copy = tmp_path / "cache"
    shutil.copytree(grid[0].parent / "cache", copy)
    return copy


def manifests(out: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    return {
        p.parent.relative_to(out).as_posix(): json.loads(p.read_text())
        for p in sorted(out.glob("*/*/manifest.json"))
        if p.parent.parent.name != "selected"
    }


def test_plan_and_shard_arithmetic() -> None:
    cells = plan_cells(["a", "b"], [32, 64, 32])
    assert [c.name for c in cells] == ["a-32", "a-64", "b-32", "b-64"]
    assert Cell("a", None).name == "a"
    assert parse_shard("1/3") == (1, 3)
    assert [c.name for c in shard_cells(cells, (1, 3))] == ["a-64"]
    assert sorted(c.name for i in range(3) for c in shard_cells(cells, (i, 3))) == sorted(c.name for c in cells)
    assert not over_budget(5.0, [], None)
    assert over_budget(50.0, [20.0], 60.0) and not over_budget(30.0, [20.0], 60.0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--resolution", "16,abc"], "'abc' is not a whole number of pixels"),
        (["--shard", "2/2"], "--shard 2/2: I must be in 0..N-1"),
        (["--shard", "x"], "is not I/N"),
        (["--target", "onnx,nope"], "'nope' is not one of"),
        (["--min-top1", "0.5"], "0.5 is not in the range 1<=x<=100"),
    ],
)
def test_grid_option_errors_are_one_line(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _out, err = cli(
        ["build", "--model", "tiny,tiny", "--weights", "none", "--out", str(tmp_path / "g"), *extra], capsys
    )
    assert code in (1, 2) and message in err and "Traceback" not in err
    assert not (tmp_path / "g").exists()


def test_grid_builds_every_cell_into_one_table_and_report(grid: tuple[Path, str, str]) -> None:
    out, stdout, stderr = grid
    found = manifests(out)
    assert sorted(found) == [f"{c}/onnx-{p}" for c in CELLS for p in ("fp32", "int8")]
    for name, m in found.items():
        assert m["model"]["resolution"] == int(name.split("/")[0].split("-")[1])
        lat = m["build_latency"]
        assert lat["batch1_p50_ms"] > 0 and len(lat["batch1_p50_spread_ms"]) == 2
        assert 20 < lat["serving_peak_rss_mb"] < 4000  # a fresh runtime process, numpy and ONNX Runtime loaded
    table = stdout.split("selected:")[0]
    assert table.splitlines()[0].split()[:3] == ["model", "px", "target"]
    assert "peak RSS MB" in table.splitlines()[0]
    assert sum(1 for line in table.splitlines() if line.startswith("tiny ")) == 4
    assert "grid: cell 1/2 tiny @ 16 px" in stderr and "grid: cell 2/2 tiny @ 32 px" in stderr and "ETA" in stderr
    summary = json.loads((out / "report" / "build.json").read_text())
    assert len(summary["rows"]) == 4 and summary["settings"]["selection"] == "most accurate with p50 <= 1000 ms"
    assert (out / "report" / "report.html").is_file()


def test_latency_budget_picks_the_most_accurate_bundle_within_it(grid: tuple[Path, str, str]) -> None:
    out, stdout, _ = grid
    rows = json.loads((out / "report" / "build.json").read_text())["rows"]
    best = max(rows, key=lambda r: (r["top1"], -r["p50_ms"]))
    assert f"selected: {best['name']}: most accurate with p50 <= 1000 ms" in stdout
    assert [r["name"] for r in rows if r["selected"]] == [best["name"]]
    assert best["name"].startswith("tiny-32/")  # the head was fitted at 32 px: 16 px loses accuracy


def test_select_without_results_uses_the_build_host_and_says_so(
    grid: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _, _ = grid
    found = manifests(out)
    p50 = sorted(m["build_latency"]["batch1_p50_ms"] for m in found.values())
    budget = p50[len(p50) // 2]  # half the bundles fit
    code, stdout, err = cli(["select", str(out), "--latency-budget", f"{budget:.6f}"], capsys)
    assert code == 0, err
    fits = [
        (m["accuracy"]["top1"], -m["build_latency"]["batch1_p50_ms"], name)
        for name, m in found.items()
        if m["build_latency"]["batch1_p50_ms"] <= float(f"{budget:.6f}")
    ]
    winner = max(fits)[2]
    assert f"selected: {winner}: most accurate with p50 <= {float(f'{budget:.6f}'):g} ms" in stdout
    assert "figures: build host figures" in stdout and "--results device.json" in stdout
    chosen = json.loads((out / "selected" / "manifest.json").read_text())
    assert chosen["files"] == found[winner]["files"]
    record = json.loads((out / "selection.json").read_text())
    assert record["selected"]["name"] == winner and record["front"]


def slower_device(doc: dict, budget: float) -> dict:  # type: ignore[type-arg]
    """The host's bench results as a slower device would give them: compute-bound, so 4x the time at 2x the
    resolution, scaled so every 16 px bundle just fits `budget`. Synthetic figures for a test, marked as such."""
    slow = copy.deepcopy(doc)
    slow["environment"]["device_class"] = "test: slower device"
    slow["environment"]["hostname"] = "slow-device"
    base = max(e["single_stream"]["p50_ms"] for e in slow["results"] if e["resolution"] == 16)
    for e in slow["results"]:
        factor = budget / base * (e["resolution"] / 16) ** 2
        ss = e["single_stream"]
        ss["p50_ms"] *= factor
        ss["spread"]["p50_ms"] = [x * factor for x in ss["spread"]["p50_ms"]]
    return slow


def test_select_with_a_slower_devices_results_picks_a_lower_resolution(
    grid: tuple[Path, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _, _ = grid
    host_json = tmp_path / "host.json"
    code, _, err = cli(
        [
            "bench",
            str(out),
            "--all",
            "--json",
            str(host_json),
            "--iterations",
            "30",
            "--scenario",
            "single-stream",
            "--no-e2e",
            "--no-memory",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    host = json.loads(host_json.read_text())
    assert sorted(e["name"] for e in host["results"]) == sorted(manifests(out))
    budget = 2 * max(e["single_stream"]["p50_ms"] for e in host["results"])
    device_json = tmp_path / "device.json"
    device_json.write_text(json.dumps(slower_device(host, budget)))

    code, on_host, err = cli(["select", str(out), "--results", str(host_json), "--latency-budget", f"{budget}"], capsys)
    assert code == 0, err
    code, on_device, err = cli(
        ["select", str(out), "--results", str(device_json), "--latency-budget", f"{budget}"], capsys
    )
    assert code == 0, err
    host_pick = on_host.split("selected: ")[1].split(":")[0]
    device_pick = on_device.split("selected: ")[1].split(":")[0]
    assert host_pick.startswith("tiny-32/") and device_pick.startswith("tiny-16/")
    assert "runner-up tiny-32/" in on_device and "is over the latency budget" in on_device
    assert "measured on test: slower device (slow-device)" in on_device
    assert json.loads((out / "selection.json").read_text())["selected"]["name"] == device_pick


def test_a_budget_no_bundle_meets_exits_1_naming_the_fastest(
    grid: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _, _ = grid
    before = json.loads((out / "selection.json").read_text()) if (out / "selection.json").exists() else None
    code, _stdout, err = cli(["select", str(out), "--latency-budget", "0.0001"], capsys)
    assert code == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: no valid bundle meets p50 <= 0.0001 ms: the fastest is tiny-16/onnx-")
    assert " at p50 " in line and " ms (top-1 " in line
    after = json.loads((out / "selection.json").read_text()) if (out / "selection.json").exists() else None
    assert after == before  # nothing written


def test_build_exits_1_when_no_bundle_meets_the_budget(
    ckpt: Path, grid: tuple[Path, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the grid's 16 px cell is this build's: its steps come from (a copy of) that stage cache, the timing is fresh
    args = ["build", "--model", "tiny", "--weights", str(ckpt), "--dataset", "digits", "--resolution", "16"]
    args += ["--precision", "fp32,int8", "--no-baseline", "--bench-iterations", "10", *GATE]
    args += ["--cache-dir", str(grid_cache(grid, tmp_path))]
    code, stdout, err = cli([*args, "--latency-budget", "0.0001", "--out", str(tmp_path / "b")], capsys)
    assert code == 1, err
    rows = [line.split()[:3] for line in stdout.splitlines() if line.startswith("onnx ")]
    assert rows == [["onnx", "fp32", "valid"], ["onnx", "int8", "valid"]]  # the table shows every bundle, built
    assert (
        err.strip().splitlines()[-1].startswith("error: no valid bundle meets p50 <= 0.0001 ms: the fastest is onnx-")
    )
    assert (tmp_path / "b" / "onnx-fp32" / "manifest.json").is_file()


def test_shards_on_separate_processes_then_one_build_assembles_from_the_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """N local processes stand in for the nodes of an indexed Job / SLURM array over one shared --cache-dir."""
    cache, out = tmp_path / "shared-cache", tmp_path / "grid"
    args = ["build", "--model", "tiny", "--weights", "none", "--dataset", "digits", "--resolution", "16,24"]
    args += ["--steps", "2", "--batch-size", "16", "--no-hflip", "--eval-limit", "60", "--max-accuracy-drop", "100"]
    args += ["--no-report", "--cache-dir", str(cache), "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bitdeploy", *args, "--shard", f"{i}/2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_so, se) in zip(procs, results):
        assert p.returncode == 0, se[-2000:]
    assert "shard 0/2 done: cells tiny-16" in results[0][0] and "shard 1/2 done: cells tiny-24" in results[1][0]
    assert all(se.count("fine-tuning tiny on digits") == 1 for _, se in results)  # each node fine-tuned its cell

    code, _stdout, err = cli(args, capsys)
    assert code == 0, err
    assert "fine-tuning tiny" not in err and err.count("cache hit: fine-tune of tiny on digits") == 2
    assert err.count("cache hit: ONNX Runtime fp32 conversion") == 2
    assert sorted(manifests(out)) == ["tiny-16/onnx-fp32", "tiny-24/onnx-fp32"]


def test_max_hours_stops_before_a_cell_and_keeps_what_finished(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import bitdeploy.builder.grid

    monkeypatch.setattr(
        bitdeploy.builder.grid, "over_budget", lambda elapsed, done, budget: budget is not None and len(done) >= 1
    )
    args = ["build", "--model", "tiny", "--weights", str(ckpt), "--resolution", "16,24", "--no-report", "--no-cache"]
    code, stdout, err = cli([*args, "--max-hours", "0.5", "--out", str(tmp_path / "g")], capsys)
    assert code == 0, err
    assert "skipped: --max-hours 0.5 reached before this cell" in stdout
    assert "stopped by --max-hours 0.5: 1 of 2 cells built; run the same command again" in stdout
    assert (tmp_path / "g" / "tiny-16" / "onnx-fp32" / "manifest.json").is_file()
    assert not (tmp_path / "g" / "tiny-24").exists()


def test_each_cells_pytorch_baselines_keep_their_own_model_and_resolution() -> None:
    from bitdeploy.benchmarks.baseline import QuickBaseline
    from bitdeploy.benchmarks.schema import Status, Timing
    from bitdeploy.builder.report import bench_entries

    baselines = [
        QuickBaseline("eager-folded", "eager", Status.parse("ok"), model, res, timing=Timing(p50_ms=ms))
        for model, res, ms in (("tiny", 16, 1.0), ("s-r50x1", 32, 5.0))
    ]
    first_cell = {"name": "tiny", "resolution": 16, "num_classes": 10}
    entries = bench_entries([], first_cell, baselines, {})
    assert [(e.name, e.model, e.resolution) for e in entries] == [
        ("pytorch-fp32-eager-folded:tiny@16", "tiny", 16),
        ("pytorch-fp32-eager-folded:s-r50x1@32", "s-r50x1", 32),
    ]
    assert [b.as_dict()["model"] for b in baselines] == ["tiny", "s-r50x1"]
