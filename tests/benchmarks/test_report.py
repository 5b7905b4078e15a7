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

from bitdeploy.benchmarks.plots import latency_distribution, pareto_front, throughput_vs_batch
from bitdeploy.benchmarks.report import select_fastest, table_rows
from bitdeploy.benchmarks.report_render import write_report
from bitdeploy.benchmarks.schema import new_document, new_entry, write_json
from bitdeploy.cli import cli
from bitdeploy.core.errors import BitdeployError

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _entry(
    name: str, target: str, precision: str, p50: float, top1: float | None, kind: str = "bundle", status: str = "valid"
) -> dict[str, Any]:
    lat = [p50 * (1 + 0.01 * (i % 7)) for i in range(50)]
    return new_entry(
        name=name,
        kind=kind,
        model="m-r50x1",
        resolution=128,
        num_classes=10,
        target=target,
        precision=precision,
        precision_used="int8+f32" if precision == "int8" else "f32",
        backend_device="cpu",
        device="AMD EPYC (2 threads)",
        status=status,
        size_mb=10.0,
        single_stream={
            "n": 50,
            "p50_ms": p50,
            "p90_ms": p50 * 1.05,
            "p99_ms": p50 * 1.06,
            "mean_ms": p50,
            "min_ms": p50,
            "max_ms": p50 * 1.06,
            "latencies_ms": lat,
        },
        offline={
            "results": [{"batch_size": 1, "images_per_s": 1000 / p50}, {"batch_size": 8, "images_per_s": 1500 / p50}],
            "best_images_per_s": 1500 / p50,
            "best_batch_size": 8,
        },
        end_to_end={"mean_ms": p50 + 1, "preprocess_mean_ms": 1.0, "infer_mean_ms": p50},
        accuracy=None
        if top1 is None
        else {"dataset": "digits", "split": "val", "samples": 360, "top1": top1, "top5": 1.0, "reference": None},
    )


def _doc(host: str = "box-a") -> dict[str, Any]:
    results = [
        _entry("pytorch-fp32:m-r50x1@128", "pytorch", "fp32", 50.0, 0.970, kind="pytorch"),
        _entry("ort-fp32", "onnxruntime", "fp32", 20.0, 0.970),
        _entry("ort-int8", "onnxruntime", "int8", 10.0, 0.965),
        _entry("ov-int8", "openvino", "int8", 6.0, 0.940),  # fastest, but 3 pp worse
        _entry("trt-fp16", "tensorrt", "fp16", 1.0, None, status="skipped: no NVIDIA GPU"),
    ]
    results[-1]["single_stream"] = results[-1]["offline"] = results[-1]["end_to_end"] = None
    return new_document(
        results,
        {"hostname": host, "cpu": {"model": "AMD EPYC", "flags": ["avx512_vnni"]}, "gpus": [], "libraries": {}},
        {"warmup": 20, "batch_sizes": [1, 8]},
    )


def test_rows_have_speedup_and_delta_against_fp32() -> None:
    rows = {r["entry"]["name"]: r for r in table_rows([_doc()])}
    assert rows["ort-fp32"]["speedup"] == pytest.approx(2.5)
    assert rows["ov-int8"]["speedup"] == pytest.approx(50 / 6)
    assert rows["ov-int8"]["delta_pp"] == pytest.approx(-3.0)
    assert rows["ort-int8"]["delta_pp"] == pytest.approx(-0.5)
    assert rows["trt-fp16"]["p50"] is None and rows["trt-fp16"]["speedup"] is None


def _doc_with_three_baselines(slowest_ms: float = 100.0) -> dict[str, Any]:
    """The PyTorch forms of benchmarks.baseline: Google's form slowest, folded faster, torch.compile skipped."""
    doc = _doc()
    ref, folded = (
        doc["results"][0],
        _entry("pytorch-fp32-eager-folded:m-r50x1@128", "pytorch", "fp32", 30.0, None, kind="pytorch"),
    )
    ref["name"], ref["describe"] = (
        "pytorch-fp32-eager-ws:m-r50x1@128",
        {"form": "eager-ws", "label": "PyTorch eager FP32, Google's reference weight standardisation every call"},
    )
    for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
        ref["single_stream"][key] *= slowest_ms / 50.0
    ref["single_stream"]["latencies_ms"] = [x * slowest_ms / 50.0 for x in ref["single_stream"]["latencies_ms"]]
    folded["describe"] = {
        "form": "eager-folded",
        "label": "PyTorch eager FP32, weight standardisation folded into the weights",
    }
    skipped = new_entry(
        name="pytorch-fp32-compiled-folded:m-r50x1@128",
        kind="pytorch",
        model="m-r50x1",
        resolution=128,
        target="pytorch",
        precision="fp32",
        status="skipped: torch.compile did not finish within 300 s (the compile-time bound)",
        describe={"form": "compiled-folded", "label": "torch.compile (inductor, CPU) of the folded model"},
    )
    doc["results"][1:1] = [folded, skipped]
    return doc


def test_speedup_is_against_the_fastest_baseline_and_every_baseline_is_labelled(tmp_path: Path) -> None:
    doc = _doc_with_three_baselines()
    rows = {r["entry"]["name"]: r for r in table_rows([doc])}
    assert rows["ort-fp32"]["speedup"] == pytest.approx(30 / 20)  # the folded eager model, not Google's form (100 ms)
    assert rows["ort-fp32"]["speedup_vs"] == "pytorch-fp32-eager-folded:m-r50x1@128"
    assert rows["pytorch-fp32-eager-ws:m-r50x1@128"]["speedup"] == pytest.approx(0.3)
    md = write_report(doc, tmp_path)["markdown"].read_text()
    assert "speed-up vs fastest PyTorch" in md.splitlines()[2] and "| 1.50x |" in md
    assert (
        "- pytorch-fp32-eager-folded:m-r50x1@128: PyTorch eager FP32, weight standardisation folded into the weights: p50 30.00 ms (fastest PyTorch: the speed-up denominator)"
        in md
    )
    assert "Google's reference weight standardisation every call: p50 100.00 ms\n" in md
    assert (
        "pytorch-fp32-compiled-folded:m-r50x1@128: torch.compile (inductor, CPU) of the folded model: skipped: torch.compile did not finish"
        in md
    )


def test_latency_axis_covers_the_bundles_own_spread() -> None:
    # A baseline 5x slower than the slowest bundle must not set the bundles' axis (they were once squashed).
    rows = table_rows([_doc_with_three_baselines(slowest_ms=100.0)])
    fig = latency_distribution(rows)
    bundles = [r for r in rows if r["entry"]["kind"] == "bundle" and r["p99"]]
    slowest_p99 = max(r["p99"] for r in bundles)
    fastest = min(min(r["entry"]["single_stream"]["latencies_ms"]) for r in bundles)
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert ax.get_xscale() == "log" or hi <= 3 * slowest_p99
    assert lo <= fastest and hi >= slowest_p99  # every bundle's box is inside the axis
    assert [t.get_text().split(" (n=")[0] for t in ax.get_yticklabels()] == [r["label"] for r in bundles]
    base_ax = fig.axes[1]  # the baselines on their own axis, still fully visible
    assert base_ax.get_xlim()[1] >= 100 * 1.06 and len(base_ax.get_yticklabels()) == 2


def test_throughput_plot_draws_one_line_per_row_with_every_batch_size() -> None:
    doc = _doc()
    for e in doc["results"]:
        if e["offline"]:
            e["offline"]["results"] = [{"batch_size": b, "images_per_s": 100.0 * b**0.5} for b in (16, 1, 8, 4)]
    fig = throughput_vs_batch(table_rows([doc]))
    lines = [ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")]
    assert len(lines) == 4 and all(list(ln.get_xdata()) == [1, 4, 8, 16] for ln in lines)


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
    columns = ["target", "precision", "device", "status", "size MB", "top-1", "Δ top-1", "p50 ms", "p90 ms", "p99 ms"]
    for col in [*columns, "images/s", "speed-up", "peak RSS MB"]:
        assert col in header
    assert "| ort-int8 (selected) | onnxruntime | int8 (int8+f32) |" in md and "**Selected: ort-int8**" in md
    assert "| 2.50x |" in md and "| -3.00 |" in md
    html = paths["html"].read_text()
    pngs = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]{200,})"', html)
    assert len(pngs) >= 3
    for b64 in pngs:  # decodable, a sane size, and not blank
        import base64
        import io

        from PIL import Image

        img = Image.open(io.BytesIO(base64.b64decode(b64))).convert("L")
        assert 300 <= img.width <= 2000 and 200 <= img.height <= 2000, img.size
        assert len(img.getcolors(maxcolors=1 << 16) or range(1 << 16)) >= 5
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
    for path, needle in (
        (bad, "not a bitdeploy bench result"),
        (fut, "schema version 99"),
        (tmp_path / "missing.json", "no such results file"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "bitdeploy", "report", str(path), "--out", str(tmp_path / "o")],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 1 and needle in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "report.html").exists()
    with pytest.raises(BitdeployError):
        write_report([str(bad)], tmp_path / "o")


_CHECK = """<script>
function inked(img) {  // fraction of pixels that are not background white, and distinct colours among them
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext('2d');
  g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let ink = 0; const colours = new Set();
  for (let i = 0; i < d.length; i += 4) {
    if (d[i] < 240 || d[i + 1] < 240 || d[i + 2] < 240) { ink++; colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]); }
  }
  return {ink: ink / (c.width * c.height), colours: colours.size};
}
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth, h: i.naturalHeight, ...inked(i)}));
  const rows = document.querySelectorAll('table#results tbody tr').length;
  document.body.setAttribute('data-check', JSON.stringify({imgs, rows}));
});
</script>"""


@pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium; .ci/run does it)"
)
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    paths = write_report(_doc(), tmp_path / "r", select_fastest(_doc()))
    page = tmp_path / "check.html"  # the report plus a probe script; the report itself holds no script
    page.write_text(paths["html"].read_text().replace("</body>", _CHECK + "</body>"))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    proc = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    match = re.search(r"data-check=\"([^\"]*)\"", proc.stdout)
    assert match, f"chromium did not render the page (rc {proc.returncode}): {proc.stderr[-500:]}"
    check = json.loads(match.group(1).replace("&quot;", '"'))
    assert check["rows"] == 5
    assert len(check["imgs"]) >= 3 and all(i["ok"] for i in check["imgs"]), check
    for img in check["imgs"]:  # a sane size, and drawn on: axes, text and coloured marks, not a blank canvas
        assert 300 <= img["w"] <= 2000 and 200 <= img["h"] <= 2000, img
        assert 0.01 <= img["ink"] <= 0.6 and img["colours"] >= 5, img


def test_report_without_matplotlib_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    paths = write_report(_doc(), tmp_path)
    html = paths["html"].read_text()
    assert "<img" not in html and "matplotlib is not installed" in html and 'id="results"' in html
    assert "| ort-fp32 |" in paths["markdown"].read_text()


def test_merged_results_are_grouped_by_device_class(tmp_path: Path) -> None:
    avx512, avx2, avx512_again = _doc("box-a"), _doc("box-b"), _doc("box-c")
    avx2["environment"]["device_class"] = "x86-64 AVX2 (no VNNI)"  # written by env.collect from the fingerprint
    avx2["environment"]["cpu"]["flags"] = ["avx2"]
    avx512_again["environment"]["cpu"]["flags"] = ["avx2", "avx512f", "avx512_vnni"]  # an older document: derived
    rows = table_rows([avx512, avx2, avx512_again])
    assert [r["host"] for r in rows][:: len(avx512["results"])] == ["box-a", "box-c", "box-b"]  # classes kept together
    assert {r["device_class"] for r in rows if r["host"] == "box-c"} == {"x86-64 AVX-512 VNNI"}
    paths = write_report([avx512, avx2, avx512_again], tmp_path / "r")
    md = paths["markdown"].read_text()
    assert (
        md.index("## x86-64 AVX-512 VNNI")
        < md.index("ort-fp32 @ box-c")
        < md.index("## x86-64 AVX2 (no VNNI)")
        < md.index("ort-fp32 @ box-b")
    )
    assert 'class="device-class"' in paths["html"].read_text()
    single = write_report([avx512], tmp_path / "one")["markdown"].read_text()
    assert "## x86-64" not in single  # one class: one plain table
