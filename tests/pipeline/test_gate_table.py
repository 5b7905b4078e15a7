"""The gate's intervals where people read them: the build's table, its log line, build.json, `inspect`, the
report's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitdeploy.benchmarks.schema import Timing
from bitdeploy.builder.table import table
from bitdeploy.runtimes.bundle.manifest import GateResult
from tests.rows import row

# 347 of 359 right, FP32 348: one image lost (b 2, c 1), as converters.gate.gate records it
GATE = {
    "reference_top1": 348 / 359,
    "top1_drop_pp": 100 / 359,
    "max_accuracy_drop_pp": 1.0,
    "top1_ci": (0.942491, 0.980777),
    "reference_top1_ci": (0.945171, 0.982492),
    "top1_drop_ci_pp": (-1.096, 1.702),
    "agreement_ci": (0.975723, 0.997154),
    "discordant": (2, 1),
    "confidence": 0.95,
}


def _row() -> object:
    return row("onnx-int8", top1=347 / 359, agreement=356 / 359, timing=Timing(1.0), gate=GATE)


def test_the_table_shows_each_figure_with_its_interval_and_says_within_noise() -> None:
    text = table([_row(), row("onnx-fp32", timing=Timing(2.0))])  # type: ignore[list-item]
    header, _, line, plain = text.splitlines()
    assert "top-1 [95% CI]" in header
    assert "96.66 [94.2-98.1]" in line and "-0.28 [-1.7, +1.1]" in line  # Δ is top-1 minus FP32: the drop negated
    assert "within noise" in line  # the 1 pp allowance lies inside [-1.1, +1.7] pp
    assert "[" not in plain.split("-")[0]  # a row without a gate shows none


def test_build_json_lists_the_intervals_flat() -> None:
    d = _row().as_dict()  # type: ignore[attr-defined]
    assert d["top1_ci"] == [0.942491, 0.980777] and d["delta_ci_pp"] == [-1.702, 1.096]
    assert d["agreement_ci"] == [0.975723, 0.997154] and d["confidence"] == 0.95 and d["gate_confidence"] is None
    assert d["within_noise"].startswith("within noise: the 1 pp allowance")
    assert d["accuracy"]["top1_drop_ci_pp"] == [-1.096, 1.702] and d["accuracy"]["discordant"] == [2, 1]
    old = row("onnx-int8", top1=0.9, agreement=0.99).as_dict()  # a manifest from before the intervals
    assert old["top1_ci"] is None and old["delta_ci_pp"] is None and old["within_noise"] is None


def test_the_log_line_carries_the_intervals_on_one_line() -> None:
    from bitdeploy.builder.rows import _what

    result = _row().manifest.gate  # type: ignore[attr-defined]
    line = _what(result)
    assert "top-1 96.66% [94.2-98.1] vs FP32 96.94% (-0.28 pp [-1.7, +1.1], agreement 99.2% [97.6-99.7])" in line
    assert "; within noise: the 1 pp allowance lies inside the drop's 95 % interval [-1.10, +1.70] pp" in line
    assert "\n" not in line


def test_inspect_shows_the_intervals_and_the_gate(tmp_path: Path) -> None:
    from bitdeploy.cli.cmd_runtime import summary_rows

    manifest = _row().manifest  # type: ignore[attr-defined]
    rows = dict(summary_rows(manifest, tmp_path, False, "ok"))
    assert "top-1 96.66% [94.2-98.1] vs reference 96.94% [94.5-98.2], drop +0.28 pp [-1.1, +1.7]" in rows["accuracy"]
    assert "agreement 99.16% [97.6-99.7] (95% intervals)" in rows["accuracy"]
    assert rows["gate"].startswith("top-1 drop <= 1 pp vs FP32: passed; discordant images: 2 right in FP32 only")
    assert "within noise" in rows["gate"]


def test_the_report_shows_the_build_gates_intervals() -> None:
    from bitdeploy.benchmarks.report import cells, table_rows
    from bitdeploy.benchmarks.schema import new_document
    from bitdeploy.builder.report import bench_entries

    r = _row()
    doc = new_document(bench_entries([r], {"name": "m", "resolution": 32, "num_classes": 10}, None, {}), {})  # type: ignore[list-item]
    (shown,) = table_rows([doc])
    text = cells(shown)
    assert "96.66% [94.2-98.1]" in text and "-0.28 [-1.7, +1.1]" in text
    gate = GateResult.from_dict(doc["results"][0]["build_accuracy"], "accuracy")
    assert gate.top1_ci == GATE["top1_ci"]


def test_gate_confidence_reaches_the_manifest_and_refuses_on_the_bound(
    tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On the 120-image subset even the FP32 bundle's drop interval spans about ±3 pp: a 1 pp allowance judged on
    the 95 % bound refuses it, and says that the result is within noise."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    import json

    from tests.clirun import run_cli
    from tests.pipeline.tiny_args import base_args

    out = tmp_path / "fp32"
    gate = ("--max-accuracy-drop", "1", "--gate-confidence", "0.95")
    code, stdout, err = run_cli(["build", *base_args(ckpt, out, "--target", "onnx", gate=gate)], capsys)
    acc = json.loads((out / "manifest.json").read_text())["accuracy"]
    assert acc["gate_confidence"] == 0.95 and acc["confidence"] == 0.95 and acc["samples"] == 120
    lo, hi = acc["top1_drop_ci_pp"]
    assert lo < acc["top1_drop_pp"] <= hi and hi > 1.0
    assert code == 1 and not acc["passed"]
    last = err.strip().splitlines()[-1]
    assert "failed the accuracy gate: top-1 drop's 95 % upper bound" in last and "within noise" in last
    assert "top-1 [95% CI]" in stdout
