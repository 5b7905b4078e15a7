"""The accuracy-latency front figure and report section: one panel per device class, the grid readable by colour
(model @ px), marker (target) and fill (precision), the Pareto front ringed, the selection circled in its panel."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

import pytest

from bitdeploy.benchmarks.report import COLUMNS, cells, table_rows
from bitdeploy.benchmarks.report_render import write_report
from bitdeploy.benchmarks.schema import new_document, new_entry

pytest.importorskip("matplotlib")

from matplotlib.legend import Legend

BUILD_HOST, PI = "x86-64 AVX-512 VNNI", "aarch64 Cortex-A76"
MODELS = {"m-r50x1": (0.930, 1.0), "m-r101x1": (0.950, 1.9)}  # (top-1 at 32 px, p50 at 32 px on the build host)
TARGETS = {"onnx": ("onnxruntime", 1.0, 0.006), "openvino": ("openvino", 0.85, 0.003)}  # backend, speed, INT8 drop


def _entry(model: str, px: int, target: str, precision: str, scale: float, rss: Any = None) -> dict[str, Any]:
    base_top1, base_ms = MODELS[model]
    backend, speed, drop = TARGETS[target]
    p50 = round(base_ms * (px / 32) ** 2 * speed * (0.4 if precision == "int8" else 1.0) * scale, 3)
    top1 = base_top1 + (0.025 if px == 64 else 0.0) - (drop if precision == "int8" else 0.0)
    e = new_entry(
        name=f"{model}-{px}/{target}-{precision}",
        kind="bundle",
        model=model,
        resolution=px,
        target=backend,
        precision=precision,
        status="valid",
        size_mb=10.0,
        single_stream={
            "n": 100,
            "p50_ms": p50,
            "p90_ms": p50 * 1.05,
            "p99_ms": p50 * 1.1,
            "spread": {"p50_ms": [p50 * 0.97, p50 * 1.04]},
        },
        build_accuracy={"top1": top1, "reference_top1": base_top1 + (0.025 if px == 64 else 0.0)},
    )
    if rss is not None:
        e["serving_memory"] = rss  # written by the build's serving-memory probe, not a new_entry field (yet)
    return e


def _doc(host: str, cls: str, scale: float, sizes: tuple[int, ...] = (32,)) -> dict[str, Any]:
    entries = [
        _entry(m, px, t, p, scale, {"peak_rss_mb": 100.0 + 50 * (m == "m-r101x1") + 0.1 * px * scale})
        for m in MODELS
        for px in sizes
        for t in TARGETS
        for p in ("fp32", "int8")
    ]
    entries[1]["serving_memory"] = {"error": "the probe process died"}  # m-r50x1-32/onnx-int8: no figure
    baseline = _entry("m-r101x1", sizes[-1], "onnx", "fp32", scale * 2.5)  # slowest, and the most accurate
    baseline.update(name=f"pytorch-fp32-eager-folded:m-r101x1@{sizes[-1]}", kind="pytorch", target="pytorch")
    baseline["build_accuracy"]["top1"] += 0.01
    failed = _entry("m-r50x1", 32, "openvino", "int8", scale * 0.5)  # fastest, but it failed its gate
    failed.update(name="m-r50x1-32/openvino-int8-w4", status="failed gate")
    env = {"hostname": host, "device_class": cls, "cpu": {}, "gpus": [], "libraries": {}}
    return new_document([*entries, baseline, failed], env, {"rounds": 3})


def _docs(sizes: tuple[int, ...] = (32,)) -> list[dict[str, Any]]:
    return [_doc("build-host", BUILD_HOST, 1.0, sizes), _doc("pi5", PI, 9.0, sizes)]


# By hand, per device (the same on both: the Pi is 9x slower throughout), over the valid bundles, by p50:
#   m-r50x1-32/openvino-int8   0.340 ms  92.70 %  front
#   m-r50x1-32/onnx-int8       0.400 ms  92.40 %  off: slower and less accurate than the row above
#   m-r101x1-32/openvino-int8  0.646 ms  94.70 %  front
#   m-r101x1-32/onnx-int8      0.760 ms  94.40 %  off
#   m-r50x1-32/openvino-fp32   0.850 ms  93.00 %  off
#   m-r50x1-32/onnx-fp32       1.000 ms  93.00 %  off
#   m-r101x1-32/openvino-fp32  1.615 ms  95.00 %  front
#   m-r101x1-32/onnx-fp32      1.900 ms  95.00 %  off: as accurate, slower
# Not candidates: the failed-gate bundle (0.17 ms, 92.70 %) and the PyTorch baseline (4.75 ms, 96.00 %).
FRONT = ["m-r50x1-32/openvino-int8", "m-r101x1-32/openvino-int8", "m-r101x1-32/openvino-fp32"]


def _by_gid(ax: Any, gid: str) -> list[Any]:
    return [ln for ln in ax.get_lines() if ln.get_gid() == gid]


def _names_at(ax: Any, rows: list[dict[str, Any]], line: Any) -> set[str]:
    """The rows drawn at a ring's points, matched by (p50, top-1 %)."""
    pts = set(zip(line.get_xdata(), line.get_ydata()))
    return {
        r["entry"]["name"]
        for r in rows
        if any(abs(r["p50"] - x) < 1e-9 and abs(r["top1"] * 100 - y) < 1e-9 for x, y in pts)
    }


def test_one_panel_per_device_class_with_its_own_front() -> None:
    from bitdeploy.benchmarks.plots_front import accuracy_vs_latency

    rows = table_rows(_docs())
    fig = accuracy_vs_latency(rows)
    assert len(fig.axes) == 2
    for ax, cls, host in zip(fig.axes, (BUILD_HOST, PI), ("build-host", "pi5")):
        assert ax.get_title().startswith(cls) and host in ax.get_title()
        mine = [r for r in rows if r["device_class"] == cls]
        (ring,) = _by_gid(ax, "pareto-front")
        assert _names_at(ax, mine, ring) == set(FRONT)  # not the failed-gate bundle, not the baseline
        assert len(ax.containers) == len(mine)  # one p50 spread bar per point, all 10 drawn
        assert len(ax.texts) == 0  # keyed by legends, never labelled beside the points
        lo, hi = ax.get_xlim()
        assert lo <= min(r["p50_spread"][0] for r in mine) and hi >= max(r["p50_spread"][1] for r in mine)
    # Each panel has its own latency axis: the Pi's is about 9x the build host's.
    assert fig.axes[1].get_xlim()[1] > 5 * fig.axes[0].get_xlim()[1]
    assert fig.axes[0].get_ylim() == fig.axes[1].get_ylim()  # one top-1 axis


def test_selected_is_circled_only_in_its_device_class_panel() -> None:
    from bitdeploy.benchmarks.plots_front import accuracy_vs_latency

    name = "m-r101x1-32/openvino-int8"
    rows = table_rows(_docs(), {"name": name, "reason": "fastest within budget", "device_class": PI})
    assert [(r["entry"]["name"], r["device_class"]) for r in rows if r["selected"]] == [(name, PI)]
    fig = accuracy_vs_latency(rows)
    red = [
        [ln for ln in ax.get_lines() if ln.get_markeredgecolor() in ("red", (1.0, 0.0, 0.0, 1.0))] for ax in fig.axes
    ]
    assert [len(x) for x in red] == [0, 1]
    assert _names_at(fig.axes[1], [r for r in rows if r["device_class"] == PI], red[1][0]) == {name}
    # Without a device class the name is marked wherever it was measured.
    fig = accuracy_vs_latency(table_rows(_docs(), {"name": name, "reason": ""}))
    assert [len(_by_gid(ax, "selected")) for ax in fig.axes] == [1, 1]


def test_legends_key_colour_marker_and_fill() -> None:
    from bitdeploy.benchmarks.plots_front import accuracy_vs_latency

    rows = table_rows(_docs(sizes=(32, 64)))
    rows[3]["disturbed"] = "other processes used 1.00 cores"
    fig = accuracy_vs_latency(rows)
    legends = fig.findobj(Legend)
    assert len(legends) == 2
    texts = [t.get_text() for leg in legends for t in leg.get_texts()]
    cells_ = ["m-r50x1 @ 32 px", "m-r50x1 @ 64 px", "m-r101x1 @ 32 px", "m-r101x1 @ 64 px"]
    assert [t for t in texts if " px" in t] == cells_
    for needle in ("onnxruntime", "openvino", "pytorch (FP32 baseline)", "fp32: filled", "int8: hollow"):
        assert needle in texts
    assert any("(DISTURBED)" in t and rows[3]["label"] in t for t in texts)
    assert not any(r["label"] in t for r in rows if not r["disturbed"] for t in texts)  # no per-row keys
    # The encoding itself: same cell, same colour in both panels; onnxruntime circles, openvino squares; INT8 hollow.
    points = {(ln.get_xdata()[0], ln.get_ydata()[0]): ln for ax in fig.axes for ln in _by_gid(ax, "point")}
    assert len(points) == len(rows)
    for r in rows:
        ln = points[(r["p50"], r["top1"] * 100)]
        shape = {"onnxruntime": "o", "openvino": "s", "pytorch": "*"}[r["entry"]["target"]]
        assert ln.get_marker() == shape
        hollow = ln.get_markerfacecolor() in ("white", (1.0, 1.0, 1.0, 1.0))
        assert hollow == (r["entry"]["precision"] == "int8")
    edge: dict[tuple[str, int], set[str]] = {}
    for r in rows:
        if r["entry"]["kind"] == "bundle":
            key = (r["entry"]["model"], r["entry"]["resolution"])
            edge.setdefault(key, set()).add(str(points[(r["p50"], r["top1"] * 100)].get_markeredgecolor()))
    assert all(len(v) == 1 for v in edge.values()) and len({next(iter(v)) for v in edge.values()}) == 4
    assert len(_by_gid(fig.axes[0], "disturbed")) == 1 and not _by_gid(fig.axes[1], "disturbed")


def test_rows_without_model_fall_back_to_a_colour_per_row() -> None:
    from bitdeploy.benchmarks.plots_front import accuracy_vs_latency

    docs = _docs()
    for e in docs[1]["results"]:  # the Pi's document predates model/resolution in entries
        e["model"] = e["resolution"] = None
    rows = table_rows(docs)
    fig = accuracy_vs_latency(rows)
    texts = [t.get_text() for leg in fig.findobj(Legend) for t in leg.get_texts()]
    assert "m-r50x1 @ 32 px" in texts and "m-r101x1 @ 32 px" in texts
    assert all((r["label"] in texts) == (r["host"] == "pi5") for r in rows)
    colours = {
        str(ln.get_markeredgecolor()) for ln in _by_gid(fig.axes[1], "point") if ln.get_marker() != "*"
    }  # one per row on the Pi
    assert len(colours) == len([r for r in rows if r["host"] == "pi5" and r["entry"]["kind"] == "bundle"])


def test_report_has_the_front_section_the_rss_column_and_the_figure(tmp_path: Path) -> None:
    from PIL import Image

    selected = {"name": "m-r101x1-32/openvino-int8", "reason": "most accurate within 1 ms", "device_class": PI}
    paths = write_report(_docs(), tmp_path, selected)
    md = paths["markdown"].read_text()
    assert md.splitlines()[4].endswith("| peak RSS MB |") and COLUMNS[-1] == "peak RSS MB"
    assert "| m-r50x1-32/onnx-fp32 @ build-host |" in md and re.search(r"onnx-fp32 @ build-host \|.*\| 103 \|\n", md)
    assert re.search(r"m-r50x1-32/onnx-int8 @ build-host \|.*\| - \|\n", md)  # the probe failed: no figure
    front = md[md.index("## Accuracy–latency front") :]
    for cls, host, scale in ((BUILD_HOST, "build-host", 1.0), (PI, "pi5", 9.0)):
        part = front[front.index(f"**{cls} ({host})**") :]
        listed = re.findall(r"^\| (\S+) @ " + host, part, flags=re.M)[: len(FRONT)]
        assert listed == FRONT  # in front order, fastest first
        assert f"| {0.34 * scale:.2f} [" in part and f"| {100 + 0.1 * 32 * scale:.0f} |" in part
    assert "| m-r101x1-32/openvino-int8 @ pi5 (selected) | 94.70% |" in front
    assert "m-r101x1-32/openvino-int8 @ build-host (selected)" not in md
    assert f"**Selected: m-r101x1-32/openvino-int8 on {PI}** - most accurate within 1 ms" in md
    html = paths["html"].read_text()
    assert 'id="front"' in html and "<th>peak RSS MB</th>" in html and html.count('<table class="front">') == 2
    assert html.count('<tr class="selected">') == 2  # the results table's row and the front table's row
    figs = dict(re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html))
    img = Image.open(io.BytesIO(base64.b64decode(figs["Accuracy against latency, Pareto front marked"])))
    assert 1000 <= img.width <= 2000 and 400 <= img.height <= 2000, img.size  # two panels and the legends


def test_cells_match_columns_and_rss_is_dash_without_a_figure() -> None:
    rows = table_rows(_docs())
    assert all(len(cells(r)) == len(COLUMNS) for r in rows)
    by = {(r["entry"]["name"], r["host"]): cells(r)[-1] for r in rows}
    assert by[("m-r50x1-32/onnx-fp32", "pi5")] == "129" and by[("m-r50x1-32/onnx-int8", "pi5")] == "-"
    assert by[("m-r50x1-32/openvino-int8-w4", "pi5")] == "-"  # no serving_memory key at all
