"""The suite scripts run end to end on the tiny model (figures are not asserted: CI machines are noisy)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bitdeploy.benchmarks import runtime_vs_benchmark_app as rvb

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
    assert got == {"median_ms": 106.40, "mean_ms": 106.02, "count": 50, "threads": 2, "precision": "float32", "sync": True}
    sub_ms = rvb.parse_benchmark_app(BENCHMARK_APP_OUTPUT.replace("106.40 ms", "396.17 us"))
    assert sub_ms["median_ms"] == pytest.approx(0.39617)
    with pytest.raises(RuntimeError, match="no median latency"):
        rvb.parse_benchmark_app("[ ERROR ] something broke")


def test_runtime_vs_benchmark_app_on_tiny_bundle(openvino_bundle: Path, tmp_path: Path) -> None:
    if not Path(rvb.benchmark_app_command()[0]).exists():
        pytest.skip("benchmark_app is not installed with this openvino")
    out = tmp_path / "r.json"
    affinity = os.sched_getaffinity(0)
    try:
        code = rvb.main([str(openvino_bundle), "--threads", "1", "--iterations", "20", "--warmup", "2", "--rounds", "2", "--json", str(out)])
    finally:
        os.sched_setaffinity(0, affinity)  # the script pins its own process; give pytest its cores back
    res = json.loads(out.read_text())
    assert code == (0 if res["within_tolerance"] else 1)
    assert len(res["ours_median_ms"]) == 2 and len(res["benchmark_app_median_ms"]) == 2
    assert res["benchmark_app_threads"] == 1 and res["benchmark_app_precision"] == "float32" and res["precision"] == "f32"
    assert res["ratio"] == pytest.approx(res["ours_ms"] / res["benchmark_app_ms"])


def test_export_naive_vs_folded_on_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("onnxslim")
    from bitdeploy.benchmarks import export_naive_vs_folded as nvf

    out = tmp_path / "r.json"
    args = ["--model", "tiny", "--resolution", "32", "--num-classes", "10", "--threads", "1", "--rounds", "2", "--chunk", "3", "--warmup", "1", "--repeats", "1", "--calib-samples", "2", "--no-openvino", "--json", str(out)]
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
