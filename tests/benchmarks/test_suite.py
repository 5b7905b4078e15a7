"""The suite scripts run end to end on the tiny model (figures are not asserted: CI machines are noisy)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.experiments import load, script

rvb = load("runtime_vs_benchmark_app")

BENCHMARK_APP_OUTPUT = """[Step 10/11] Measuring performance (Start inference synchronously, limits: 50 iterations)
[ INFO ]   INFERENCE_NUM_THREADS: 2
[ INFO ]   INFERENCE_PRECISION_HINT: <Type: 'float32'>
[ INFO ] Count:            50 iterations
[ INFO ] Latency:
[ INFO ]    Median:        106.40 ms
[ INFO ]    Average:       106.02 ms
"""


def test_parse_benchmark_app() -> None:
    got = rvb.parse_benchmark_app(BENCHMARK_APP_OUTPUT)
    assert got == {
        "median_ms": 106.40,
        "mean_ms": 106.02,
        "count": 50,
        "threads": 2,
        "precision": "float32",
        "sync": True,
    }
    sub_ms = rvb.parse_benchmark_app(BENCHMARK_APP_OUTPUT.replace("106.40 ms", "396.17 us"))
    assert sub_ms["median_ms"] == pytest.approx(0.39617)
    with pytest.raises(RuntimeError, match="no median latency"):
        rvb.parse_benchmark_app("[ ERROR ] something broke")


def test_summarize_rounds_reports_spread_match_and_faster_mode() -> None:
    ours = [10.0, 12.0, 11.0]
    s = rvb.summarize_rounds(ours, {"sync": [10.0, 12.0, 11.0], "latency": [9.0, 11.0, 10.0]}, tolerance=0.03)
    assert s["matches"] == "sync" and s["faster_mode"] == "latency"
    assert s["modes"]["sync"]["ratio"] == pytest.approx(1.0) and s["modes"]["sync"]["spread"] == pytest.approx(
        [1.0, 1.0]
    )
    assert s["modes"]["latency"]["round_ratios"] == pytest.approx([10 / 9, 12 / 11, 11 / 10])
    assert s["modes"]["latency"]["spread"] == pytest.approx([12 / 11, 10 / 9])
    assert s["ratio_vs_faster"] == pytest.approx(11 / 10) and s["within_tolerance"] is False
    assert (
        rvb.summarize_rounds(ours, {"session.run": [11.0, 12.5, 11.5]}, 0.03)["within_tolerance"] is True
    )  # faster is fine


def _run(bundle: Path, tmp_path: Path) -> tuple[int, dict]:
    out = tmp_path / "r.json"
    affinity = os.sched_getaffinity(0)
    try:
        code = rvb.main(
            [str(bundle), "--threads", "1", "--iterations", "15", "--warmup", "2", "--rounds", "2", "--json", str(out)]
        )
    finally:
        os.sched_setaffinity(0, affinity)  # the script pins its own process; give pytest its cores back
    return code, json.loads(out.read_text())


def test_runtime_vs_benchmark_app_both_modes_on_tiny_bundle(
    openvino_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not Path(rvb.benchmark_app_command()[0]).exists():
        pytest.skip("benchmark_app is not installed with this openvino")
    code, res = _run(openvino_bundle, tmp_path)
    assert code == (0 if res["within_tolerance"] else 1)
    assert set(res["modes"]) == {"sync", "latency"} and len(res["ours_per_round_ms"]) == 2
    for mode in ("sync", "latency"):
        m = res["modes"][mode]
        assert len(m["per_round_ms"]) == 2 and 0 < m["spread"][0] <= m["spread"][1]
        assert res["engine"][mode]["threads"] == 1 and res["engine"][mode]["precision"] == "float32"
    assert "-nthreads 1" in res["engine"]["sync"]["command"] and "-hint latency" in res["engine"]["latency"]["command"]
    assert res["engine"]["sync"]["sync"] and res["precision"] == "f32"
    out = capsys.readouterr().out
    assert re.search(
        r"ratio bitdeploy / sync +\d\.\d{3} on medians \(per-round spread \d\.\d{3}-\d\.\d{3}, median of per-round ratios \d\.\d{3}\)",
        out,
    )
    assert f"matches the {res['matches']} mode" in out and res["matches"] in ("sync", "latency")


def test_runtime_vs_session_run_loop_on_tiny_onnx_bundle(
    onnx_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, res = _run(onnx_bundle, tmp_path)
    assert res["backend"] == "onnxruntime" and set(res["modes"]) == {"session.run"}
    assert res["engine"]["session.run"]["threads"] == 1 and res["engine"]["session.run"]["count"] == 15
    assert res["ratio_vs_faster"] == pytest.approx(res["ours_ms"] / res["modes"]["session.run"]["median_ms"])
    assert code == (0 if res["within_tolerance"] else 1)
    assert "InferenceSession.run loop, own process" in capsys.readouterr().out


def test_runtime_vs_benchmark_app_bad_target_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(script("runtime_vs_benchmark_app")), str(tmp_path / "missing.bin")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_export_naive_vs_folded_on_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("onnxslim")
    nvf = load("export_naive_vs_folded")

    out = tmp_path / "r.json"
    args = [
        "--model",
        "tiny",
        "--resolution",
        "32",
        "--num-classes",
        "10",
        "--threads",
        "1",
        "--rounds",
        "2",
        "--chunk",
        "3",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--calib-samples",
        "2",
        "--no-openvino",
        "--json",
        str(out),
    ]
    assert nvf.main(args) == 0
    res = json.loads(out.read_text())
    g = res["graph"]
    # tiny has 17 standardised convs + the head: folded, all 18 weights are constants; naive, 17 are computed
    assert g["folded"]["conv_weights"] == {"float constant": 18}
    assert g["naive"]["conv_weights"] == {"float constant": 1, "computed at run time": 17}
    assert g["naive"]["nodes"] > 2 * g["folded"]["nodes"]
    assert res["ort_int8"]["folded"]["conv_weights"] == {"int8 constant": 18}
    assert res["ort_int8"]["naive"]["conv_weights"].get("int8 constant") == 1
    assert res["onnxruntime"]["max_abs_logit_diff"] < 1e-3
    assert "naive/folded" in capsys.readouterr().out
