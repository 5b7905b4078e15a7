"""The report's INT8 sensitivity section: one bar per group of layers in rank order, the groups the chosen mix
keeps in float in their own colour, unmeasured groups shown as such; the section in report.md and report.html
only when a row's bundle holds an `int8_mix` (the build reads it from the row's manifest, `builder.report.write_report`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bitdeploy.benchmarks.report_render import write_report
from bitdeploy.benchmarks.schema import new_document, new_entry
from bitdeploy.runtimes.bundle.manifest_mix import Int8Mix, LayerCost
from tests.int8_mix_sample import FLOAT_GROUPS, ROW, UNMEASURED, failed_mix, sample_mix

pytest.importorskip("matplotlib")

from matplotlib.colors import to_hex

from bitdeploy.benchmarks import plots_mix

ENV = {"hostname": "build-host", "device_class": "x86-64 AVX2", "cpu": {}, "gpus": [], "libraries": {}}


def _bars(fig: Any) -> dict[str, Any]:
    return {p.get_gid(): p for p in fig.axes[0].patches if p.get_gid()}


def test_one_bar_per_group_in_rank_order_float_marked() -> None:
    mix = sample_mix()
    fig = plots_mix.sensitivity_plot(ROW, mix)
    ax = fig.axes[0]
    bars = _bars(fig)
    assert list(bars) == [c.name for c in mix.sensitivity] and len(bars) == 5
    for c in mix.sensitivity:
        bar = bars[c.name]
        if c.error_reduction is None:
            assert to_hex(bar.get_facecolor()) == plots_mix.UNMEASURED_FACE and bar.get_hatch() == "//"
            continue
        assert bar.get_width() == pytest.approx(c.error_reduction * 100)
        want = plots_mix.FLOAT_COLOUR if c.name in FLOAT_GROUPS else plots_mix.INT8_COLOUR
        assert to_hex(bar.get_facecolor()) == want
    assert bars["head.conv"].get_width() < 0  # a group whose float copy made the error worse reads as such
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == f"1. {FLOAT_GROUPS[0]} (3)" and labels[-1] == f"5. {UNMEASURED} (4)"
    assert ax.yaxis_inverted()  # rank 1 on top
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["kept in float", "INT8", "not measured"]
    assert "not measured" in [t.get_text() for t in ax.texts]
    title = ax.get_title()
    assert ROW in title and "onnxruntime" in title and "6 of 48 layers kept in fp32" in title


def test_ranks_order_the_bars_and_a_fully_measured_search_has_no_unmeasured_key() -> None:
    shuffled = [
        LayerCost(name="b", layers=1, error_reduction=0.1, rank=2, float_in_mix=0),
        LayerCost(name="a", layers=2, error_reduction=0.6, rank=1, float_in_mix=1),
    ]
    fig = plots_mix.sensitivity_plot("row", Int8Mix(engine="openvino", sensitivity=shuffled, float_layers=["x"]))
    assert list(_bars(fig)) == ["a", "b"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["kept in float", "INT8"]
    assert plots_mix.sensitivity_plot("row", failed_mix()) is None  # no group measured: no plot


def _doc(mixes: list[dict[str, Any]] | None) -> dict[str, Any]:
    entry = new_entry(
        name=ROW,
        kind="bundle",
        model="m-r50x1",
        resolution=64,
        target="onnxruntime",
        precision="int8",
        status="valid",
        single_stream={"n": 50, "p50_ms": 1.1, "p90_ms": 1.2, "p99_ms": 1.3},
    )
    return new_document([entry], ENV, {"rounds": 3, **({"int8_mix": mixes} if mixes is not None else {})})


def test_report_section_only_with_a_mix(tmp_path: Path) -> None:
    mixes = [{"name": ROW, **sample_mix().to_dict()}, {"name": "m-r50x1-64/openvino-int8", **failed_mix().to_dict()}]
    paths = write_report(_doc(mixes), tmp_path / "with")
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    assert "## INT8 sensitivity" in md and md.index("## INT8 sensitivity") < md.index("## Environment and method")
    assert f"**{ROW}**: onnxruntime, gate agreement >= 99.5 %: 6 of 48 layers kept in fp32" in md
    assert f"| 1 | {FLOAT_GROUPS[0]} | 3 | 41.2% | +1.30 pp | float |" in md
    assert f"| 5 | {UNMEASURED} | 4 | not measured | - | INT8 |" in md
    assert "no mix chosen, all 2 layers INT8" in md  # the failed search: its line, no table
    assert md.count("| rank | group |") == 1
    assert 'id="int8-sensitivity"' in page and page.count('<table class="mix">') == 1
    assert page.count('alt="m-r50x1-64/onnx-int8 (onnxruntime): 6 of 48 layers kept in fp32"') == 1
    # results.json keeps the records, so `bitdeploy report results.json` renders the section again
    merged = json.loads(paths["json"].read_text())
    again = write_report(merged["documents"], tmp_path / "again")
    assert again["markdown"].read_text() == md

    for doc in (_doc(None), _doc([{"name": "broken", "float_layers": 3}])):  # none, or one that does not parse
        paths = write_report(doc, tmp_path / "without")
        assert "INT8 sensitivity" not in paths["markdown"].read_text()
        assert "int8-sensitivity" not in paths["html"].read_text()


def test_the_build_reads_each_rows_manifest(tmp_path: Path) -> None:
    from bitdeploy.builder.report import write_report as build_report
    from bitdeploy.runtimes.bundle.manifest import TargetInfo
    from tests.rows import row
    from tests.runtimes.conftest import make_manifest

    def manifest(mix: Int8Mix | None) -> Any:
        target = TargetInfo("onnxruntime", "int8", "int8", "cpu")
        return make_manifest("onnxruntime", "model.onnx", "cpu", "int8", target=target, int8_mix=mix)

    rows = [
        row("onnx-int8", bundle="b/onnx-int8", manifest=manifest(sample_mix()), cell="m-r50x1-64"),
        row("onnx-fp32", bundle="b/onnx-fp32", manifest=manifest(None)),
        row("openvino-fp32", "failed: no runtime"),  # no bundle at all
    ]
    model = {"name": "m-r50x1", "resolution": 64, "num_classes": 10}
    html = build_report(rows, model, None, tmp_path / "report", None, {})
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"**{ROW}**: onnxruntime" in md and md.count("**: ") == 1
    assert "INT8 sensitivity" in html.read_text()
    stored = json.loads((tmp_path / "report" / "results.json").read_text())["documents"][0]["settings"]["int8_mix"]
    assert stored == [{"name": ROW, **sample_mix().to_dict()}]
    build_report(rows[1:], model, None, tmp_path / "plain", None, {})
    assert "INT8 sensitivity" not in (tmp_path / "plain" / "report.md").read_text()
