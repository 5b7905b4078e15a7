"""`bitdeploy bench` and `bitdeploy report` through the CLI, on tiny ONNX and OpenVINO bundles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bitdeploy.cli import cli

FAST = ["--iterations", "30", "--warmup", "2", "--batch-sizes", "1,4", "--threads", "1", "--no-progress"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bitdeploy", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bench_json(onnx_bundle: Path, openvino_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    args = [
        *FAST,
        "--dataset",
        "digits",
        "--samples",
        "64",
        "--reference",
        str(onnx_bundle),
        "--pytorch-baseline",
        "--compile-timeout",
        "240",
        "--json",
        str(out),
    ]
    result = CliRunner().invoke(cli, ["bench", str(onnx_bundle), str(openvino_bundle), *args])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_bench_writes_latency_throughput_and_environment(bench_json: dict) -> None:
    doc = bench_json
    assert doc["schema"] == "bitdeploy-bench" and doc["schema_version"] == 1
    assert doc["environment"]["cpu"]["model"] and doc["environment"]["libraries"]["numpy"]
    assert doc["settings"]["iterations"] == 30
    by_target = {e["target"]: e for e in doc["results"] if e["kind"] == "bundle"}
    assert set(by_target) == {"onnxruntime", "openvino"}
    for target in ("onnxruntime", "openvino"):
        e = by_target[target]
        assert e["status"] == "valid", e
        ss = e["single_stream"]
        assert ss["n"] == 30 and len(ss["latencies_ms"]) == 30
        assert 0 < ss["min_ms"] <= ss["p50_ms"] <= ss["p90_ms"] <= ss["p99_ms"] <= ss["max_ms"]
        assert [r["batch_size"] for r in e["offline"]["results"]] == [1, 4]
        assert all(r["images_per_s"] > 0 for r in e["offline"]["results"])
        assert e["end_to_end"]["n"] == 30 and e["end_to_end"]["preprocess_mean_ms"] > 0
        assert e["load_s"] > 0 and e["peak_rss_mb"] > 10 and e["size_mb"] > 0.1
        acc = e["accuracy"]
        assert acc["samples"] == 64 and 0 <= acc["top1"] <= acc["top5"] <= 1
        assert acc["reference"]["name"] == "tiny-onnx-fp32"
    assert by_target["onnxruntime"]["accuracy"]["reference"]["agreement"] == 1.0
    assert by_target["openvino"]["precision_used"] == "f32"  # pinned, not the CPU's bf16 default
    assert by_target["openvino"]["accuracy"]["reference"]["max_abs_logit_diff"] < 1e-2
    # three PyTorch baselines, timed first, each labelled; torch.compile either ran or says why not
    base = [e for e in doc["results"] if e["kind"] == "pytorch"]
    assert [e["describe"]["form"] for e in base] == ["eager-ws", "eager-folded", "compiled-folded"]
    assert [e["name"].split(":")[0] for e in base] == [
        "pytorch-fp32-eager-ws",
        "pytorch-fp32-eager-folded",
        "pytorch-fp32-compiled-folded",
    ]
    assert all(e["describe"]["label"] for e in base) and doc["results"][:3] == base
    ran = [e for e in base if e["status"] == "valid"]
    assert base[0] in ran and base[1] in ran
    assert base[2] in ran or base[2]["status"].startswith("skipped: torch.compile"), base[2]["status"]
    for e in ran:
        assert e["single_stream"]["n"] == 30 and e["single_stream"]["p50_ms"] > 0
        assert [r["batch_size"] for r in e["offline"]["results"]] == [1, 4]
        assert e["accuracy"] is None  # random weights: no top-1 claimed
    if base[2] in ran:
        assert 0 < base[2]["describe"]["compile_s"] <= 240


def test_bench_report_flag_and_json_to_stdout(onnx_bundle: Path, tmp_path: Path) -> None:
    proc = run_cli(
        "bench",
        str(onnx_bundle),
        "--scenario",
        "single-stream",
        "--iterations",
        "10",
        "--warmup",
        "1",
        "--no-e2e",
        "--no-raw",
        "--json",
        "-",
        "--report",
        str(tmp_path / "r"),
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    (entry,) = doc["results"]
    assert entry["offline"] is None and entry["end_to_end"] is None and "latencies_ms" not in entry["single_stream"]
    assert "p50 ms" in proc.stderr  # the table goes to stderr when stdout carries the JSON
    assert (tmp_path / "r" / "report.html").is_file() and (tmp_path / "r" / "report.md").is_file()


def test_one_failing_bundle_does_not_stop_the_others(onnx_bundle: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "tampered"
    shutil.copytree(onnx_bundle, broken)
    with open(broken / "model.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    out = tmp_path / "b.json"
    proc = run_cli(
        "bench",
        str(broken),
        str(onnx_bundle),
        "--iterations",
        "5",
        "--warmup",
        "0",
        "--batch-sizes",
        "2",
        "--no-e2e",
        "--json",
        str(out),
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip().splitlines()[-1].startswith("error: 1 of 2 benchmarks failed; first: tampered:")
        and "checksum" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    doc = json.loads(out.read_text())
    assert doc["results"][0]["status"].startswith("failed:") and doc["results"][1]["status"] == "valid"


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["bench", "/nonexistent/bundle", "--iterations", "2"], 1, "no such bundle"),
        (["bench", "{b}", "--iterations", "5", "--duration", "1"], 2, "either --iterations or --duration"),
        (["bench", "{b}", "--batch-sizes", "1,x"], 2, "comma-separated list of integers"),
        (["bench", "{b}", "--batch-sizes", "0"], 2, "batch sizes must be integers >= 1"),
        (["bench", "{b}", "--reference", "{b}"], 1, "--reference needs --dataset"),
        (["bench", "{b}", "--dataset", "/nonexistent/data", "--iterations", "2"], 1, "/nonexistent/data"),
    ],
)
def test_bad_input_is_one_line(args: list[str], code: int, needle: str, onnx_bundle: Path) -> None:
    proc = run_cli(*(a.replace("{b}", str(onnx_bundle)) for a in args))
    assert proc.returncode == code, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    if code == 1:
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
