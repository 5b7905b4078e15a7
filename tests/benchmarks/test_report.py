"""report.md / report.html from bench documents: derived columns, selection, merging, and a real browser render."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bitdeploy.benchmarks.plots import pareto_front
from bitdeploy.benchmarks.report import select_fastest, table_rows, write_report
from bitdeploy.benchmarks.schema import new_document, new_entry, write_json
from bitdeploy.cli import cli
from bitdeploy.errors import BitdeployError

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _entry(name: str, target: str, precision: str, p50: float, top1: float | None, kind: str = "bundle", status: str = "valid") -> dict[str, Any]:
    lat = [p50 * (1 + 0.01 * (i % 7)) for i in range(50)]
    return new_entry(
        name=name, kind=kind, model="m-r50x1", resolution=128, num_classes=10, target=target, precision=precision,
        precision_used="int8+f32" if precision == "int8" else "f32", backend_device="cpu",
        device="AMD EPYC (2 threads)", status=status, size_mb=10.0,
        single_stream={"n": 50, "p50_ms": p50, "p90_ms": p50 * 1.05, "p99_ms": p50 * 1.06, "mean_ms": p50, "min_ms": p50, "max_ms": p50 * 1.06, "latencies_ms": lat},
        offline={"results": [{"batch_size": 1, "images_per_s": 1000 / p50}, {"batch_size": 8, "images_per_s": 1500 / p50}], "best_images_per_s": 1500 / p50, "best_batch_size": 8},
        end_to_end={"mean_ms": p50 + 1, "preprocess_mean_ms": 1.0, "infer_mean_ms": p50},
        accuracy=None if top1 is None else {"dataset": "digits", "split": "val", "samples": 360, "top1": top1, "top5": 1.0, "reference": None},
    )  # fmt: skip


def _doc(host: str = "box-a") -> dict[str, Any]:
    results = [
        _entry("pytorch-fp32:m-r50x1@128", "pytorch", "fp32", 50.0, 0.970, kind="pytorch"),
        _entry("ort-fp32", "onnxruntime", "fp32", 20.0, 0.970),
        _entry("ort-int8", "onnxruntime", "int8", 10.0, 0.965),
        _entry("ov-int8", "openvino", "int8", 6.0, 0.940),  # fastest, but 3 pp worse
        _entry("trt-fp16", "tensorrt", "fp16", 1.0, None, status="skipped: no NVIDIA GPU"),
    ]
    results[-1]["single_stream"] = results[-1]["offline"] = results[-1]["end_to_end"] = None
    return new_document(results, {"hostname": host, "cpu": {"model": "AMD EPYC", "flags": ["avx512_vnni"]}, "gpus": [], "libraries": {}}, {"warmup": 20, "batch_sizes": [1, 8]})


def test_rows_have_speedup_and_delta_against_fp32() -> None:
    rows = {r["entry"]["name"]: r for r in table_rows([_doc()])}
    assert rows["ort-fp32"]["speedup"] == pytest.approx(2.5)
    assert rows["ov-int8"]["speedup"] == pytest.approx(50 / 6)
    assert rows["ov-int8"]["delta_pp"] == pytest.approx(-3.0)
    assert rows["ort-int8"]["delta_pp"] == pytest.approx(-0.5)
    assert rows["trt-fp16"]["p50"] is None and rows["trt-fp16"]["speedup"] is None


def test_select_fastest_respects_the_accuracy_gate() -> None:
    sel = select_fastest(_doc(), max_accuracy_drop=1.0)
    assert sel is not None and sel["name"] == "ort-int8"
    assert "10.00 ms" in sel["reason"] and "ov-int8 is faster (6.00 ms) but fails the gate (-3.00 pp)" in sel["reason"]
    assert select_fastest(_doc(), max_accuracy_drop=5.0)["name"] == "ov-int8"  # type: ignore[index]


def test_pareto_front() -> None:
    pts = [(6.0, 94.0), (10.0, 96.5), (20.0, 97.0), (50.0, 97.0), (12.0, 95.0)]
    assert pareto_front(pts) == [0, 1, 2]


def test_report_files(tmp_path: Path) -> None:
    doc = _doc()
    doc["results"][2]["error"] = None
    doc["results"][4]["status"] = "skipped: see https://example.com/why"  # a URL in text must not survive as a URL
    paths = write_report(doc, tmp_path, select_fastest(doc))
    md = paths["markdown"].read_text()
    header = md.splitlines()[2]
    for col in ("target", "precision", "device", "status", "size MB", "top-1", "Δ top-1", "p50 ms", "p90 ms", "p99 ms", "images/s", "speed-up"):
        assert col in header
    assert "| ort-int8 (selected) | onnxruntime | int8 (int8+f32) |" in md and "**Selected: ort-int8**" in md
    assert "| 2.50x |" in md and "| -3.00 |" in md
    html = paths["html"].read_text()
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', html)) >= 3
    assert not re.search(r"(?i)(https?|ftp)://|src=\"(?!data:)|href=|url\(", html)
    merged = json.loads(paths["json"].read_text())
    assert merged["documents"][0]["results"][0]["name"] == doc["results"][0]["name"]


def test_merge_two_machines_device_column(tmp_path: Path) -> None:
    a, b = _doc("box-a"), _doc("box-b")
    for e in b["results"]:
        e["device"] = "NVIDIA H100"
        if e["single_stream"]:
            e["single_stream"]["p50_ms"] /= 4
    fa, fb = write_json(a, tmp_path / "a.json"), write_json(b, tmp_path / "b.json")
    result = CliRunner().invoke(cli, ["report", str(fa), str(fb), "--out", str(tmp_path / "r"), "--select", "fastest"])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "r" / "report.md").read_text()
    assert "ort-fp32 @ box-a" in md and "ort-fp32 @ box-b" in md and "NVIDIA H100" in md
    assert "ort-int8 @ box-b (selected)" in md
    # speed-ups only compare rows of the same machine
    rows = {r["label"]: r for r in table_rows([a, b])}
    assert rows["ort-fp32 @ box-b"]["speedup"] == pytest.approx(2.5)
    # results.json of a report reads back as input
    again = CliRunner().invoke(cli, ["report", str(tmp_path / "r" / "results.json"), "--out", str(tmp_path / "r2")])
    assert again.exit_code == 0 and "ort-fp32 @ box-b" in (tmp_path / "r2" / "report.md").read_text()


def test_report_refuses_foreign_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something-else"}))
    future = copy.deepcopy(_doc())
    future["schema_version"] = 99
    fut = tmp_path / "future.json"
    fut.write_text(json.dumps(future))
    for path, needle in ((bad, "not a bitdeploy bench result"), (fut, "schema version 99"), (tmp_path / "missing.json", "no such results file")):
        proc = subprocess.run([sys.executable, "-m", "bitdeploy", "report", str(path), "--out", str(tmp_path / "o")], capture_output=True, text=True)
        assert proc.returncode == 1 and needle in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "report.html").exists()
    with pytest.raises(BitdeployError):
        write_report([str(bad)], tmp_path / "o")


_CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth}));
  const rows = document.querySelectorAll('table#results tbody tr').length;
  document.body.setAttribute('data-check', JSON.stringify({imgs, rows}));
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium; .ci/run does it)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    paths = write_report(_doc(), tmp_path / "r", select_fastest(_doc()))
    page = tmp_path / "check.html"  # the report plus a probe script; the report itself holds no script
    page.write_text(paths["html"].read_text().replace("</body>", _CHECK + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]  # fmt: skip
    proc = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    match = re.search(r"data-check=\"([^\"]*)\"", proc.stdout)
    assert match, f"chromium did not render the page (rc {proc.returncode}): {proc.stderr[-500:]}"
    check = json.loads(match.group(1).replace("&quot;", '"'))
    assert check["rows"] == 5
    assert len(check["imgs"]) >= 3 and all(i["ok"] and i["w"] > 100 for i in check["imgs"]), check


def test_report_without_matplotlib_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    paths = write_report(_doc(), tmp_path)
    html = paths["html"].read_text()
    assert "<img" not in html and "matplotlib is not installed" in html and 'id="results"' in html
    assert "| ort-fp32 |" in paths["markdown"].read_text()
