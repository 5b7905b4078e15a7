"""Interference detection, rounds with spread, tie-aware selection and the report's marks.

The classifier is tested on recorded windows (quiet and busy); one real test runs a bounded busy loop beside a
short bench of the tiny ONNX bundle. Nothing here assumes the test machine is quiet.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bitdeploy.benchmarks import interference, latency
from bitdeploy.benchmarks.ranking import Candidate, fastest


def _window(wall: float, own: float, machine_busy: float, steal: float = 0.0, nivcsw: int = 0) -> dict[str, Any]:
    """A /proc/stat window as `interference.record` writes it, for a 2-core machine."""
    return interference.derive(
        {
            "wall_s": wall,
            "own_cpu_s": own,
            "involuntary_switches": nivcsw,
            "cores": 2,
            "source": "/proc/stat",
            "machine_busy_s": machine_busy,
            "steal_s": steal,
            "machine_total_s": 2 * wall,
        }
    )


# Recorded on the 2-core test host: a 2-thread engine alone (daemons add ~0.05 core) and beside a busy loop.
QUIET = _window(wall=2.0, own=3.8, machine_busy=3.9, nivcsw=40)
BUSY = _window(wall=2.0, own=2.0, machine_busy=4.0, nivcsw=150)


def test_quiet_window_is_not_disturbed() -> None:
    verdict = interference.judge([QUIET, QUIET, QUIET])
    assert not verdict["disturbed"] and verdict["reasons"] == []
    assert verdict["overall"]["others_cores"] == pytest.approx(0.05)


def test_busy_window_is_disturbed_with_the_figure_that_shows_it() -> None:
    verdict = interference.judge([QUIET, BUSY, QUIET])
    assert verdict["disturbed"]
    assert "round 2: other processes used 1.00 cores (limit 0.3)" in verdict["reasons"]


def test_steal_and_context_switches_count() -> None:
    assert interference.reasons(_window(2.0, 3.6, 3.6, steal=0.4))[0].startswith("CPU steal 10%")
    assert "involuntary context switches/s" in interference.reasons(_window(1.0, 1.9, 1.9, nivcsw=5000))[0]


def test_short_windows_are_judged_together() -> None:
    """A 0.1 s window is too coarse for /proc/stat ticks alone: one tick of noise must not mark the row."""
    noisy_tick = _window(wall=0.1, own=0.19, machine_busy=0.24)  # 0.05 s of others = 0.5 core for 0.1 s
    verdict = interference.judge([noisy_tick, QUIET, QUIET])
    assert not verdict["disturbed"], verdict["reasons"]


def test_loadavg_fallback_without_proc() -> None:
    rec = interference.derive(
        {"wall_s": 1.0, "own_cpu_s": 1.0, "involuntary_switches": 0, "cores": 2, "source": "loadavg", "load1": 2.1}
    )
    assert interference.reasons(rec) == ["load average exceeded ours by 1.10 cores (limit 0.5)"]
    assert interference.merge([rec, rec])["source"] == "loadavg"


def test_a_real_window_records_own_cpu() -> None:
    with interference.Window() as w:
        t = time.perf_counter()
        while time.perf_counter() - t < 0.2:
            pass
    assert w.record["own_cores"] > 0.3 and w.record["wall_s"] >= 0.2


def test_rounds_give_median_and_spread() -> None:
    rounds = [
        {"n": 3, "latencies_ms": [1.0, 1.0, 1.0], "p50_ms": 1.0, "p90_ms": 1.0, "mean_ms": 1.0},
        {"n": 3, "latencies_ms": [3.0, 3.0, 3.0], "p50_ms": 3.0, "p90_ms": 3.0, "mean_ms": 3.0},
        {"n": 3, "latencies_ms": [2.0, 2.0, 9.0], "p50_ms": 2.0, "p90_ms": 9.0, "mean_ms": 13 / 3},
    ]
    ss = latency.combine_single_stream(rounds)
    assert ss["p50_ms"] == 2.0 and ss["spread"]["p50_ms"] == [1.0, 3.0] and ss["n"] == 9 and ss["p99_ms"] == 9.0


def test_single_stream_and_offline_batch1_are_checked_against_each_other() -> None:
    """The issue's report: p50 10.10 ms single-stream but 2.5 images/s offline at batch 1."""
    single = {"mean_ms": 10.1}
    off = {"results": [{"batch_size": 1, "images_per_s": 2.5}, {"batch_size": 8, "images_per_s": 300.0}]}
    flag = latency.consistency(single, off)
    assert flag is not None and "39.6x apart" in flag
    assert latency.consistency(single, {"results": [{"batch_size": 1, "images_per_s": 95.0}]}) is None


def test_overlapping_spreads_tie_and_agreement_then_size_decides() -> None:
    """The issue's pick: LiteRT INT8 1.56 ms over OpenVINO INT8 1.63 ms from one run each."""
    litert = Candidate("litert-int8", 1.56, (1.50, 1.70), agreement=0.990, size_mb=25.0)
    ov = Candidate("openvino-int8", 1.63, (1.55, 1.66), agreement=0.995, size_mb=26.0)
    slow = Candidate("ort-fp32", 4.0, (3.9, 4.1), agreement=1.0, size_mb=98.0)
    picked = fastest([litert, ov, slow])
    assert picked is not None
    winner, tied, why = picked
    assert winner is ov and {c.name for c in tied} == {"litert-int8", "openvino-int8"}
    assert why.startswith("tied on speed") and "higher agreement" in why
    same_agreement = fastest([Candidate("a", 1.0, (0.9, 1.2), 0.99, 30.0), Candidate("b", 1.1, (1.0, 1.2), 0.99, 20.0)])
    assert same_agreement is not None and same_agreement[0].name == "b"  # smaller size


def test_apart_spreads_have_a_winner() -> None:
    picked = fastest([Candidate("a", 1.0, (0.95, 1.05)), Candidate("b", 1.5, (1.4, 1.6))])
    assert picked is not None and picked[0].name == "a" and len(picked[1]) == 1


def _report_doc(disturbed_row: bool) -> dict[str, Any]:
    from bitdeploy.benchmarks.schema import new_document, new_entry

    entries = []
    for i in range(9):  # the cluster: 9 bundles within 1.5 ms
        p50 = 1.0 + i * 0.15
        entries.append(
            new_entry(
                name=f"bundle-{i}",
                kind="bundle",
                target="onnxruntime",
                precision="int8",
                status="valid",
                model="m",
                resolution=32,
                single_stream={
                    "n": 30,
                    "p50_ms": p50,
                    "p90_ms": p50,
                    "p99_ms": p50,
                    "spread": {"p50_ms": [p50 - 0.1, p50 + 0.1]},
                },
                offline={
                    "results": [
                        {"batch_size": 1, "images_per_s": 1000 / p50, "images_per_s_spread": [900 / p50, 1100 / p50]},
                        {"batch_size": 8, "images_per_s": 0.4, "images_per_s_spread": [0.3, 0.5]},
                    ],
                    "best_images_per_s": 1000 / p50,
                    "best_batch_size": 1,
                    "best_images_per_s_spread": [900 / p50, 1100 / p50],
                },
                accuracy={"dataset": "d", "top1": 0.9 + i * 0.001, "samples": 64},
                disturbed=disturbed_row and i == 3,
                flags=["other processes used 1.00 cores (limit 0.3)"] if disturbed_row and i == 3 else [],
            )
        )
    return new_document(entries, {"hostname": "h", "cpu": {}, "gpus": [], "libraries": {}}, {"rounds": 3})


def test_report_banner_marks_and_spreads() -> None:
    from bitdeploy.benchmarks.report import cells, table_rows
    from bitdeploy.benchmarks.report_render import markdown

    quiet = table_rows([_report_doc(False)])
    assert "WARNING" not in markdown([_report_doc(False)], quiet, None)
    rows = table_rows([_report_doc(True)])
    text = markdown([_report_doc(True)], rows, None)
    assert "WARNING: 1 of 9 rows" in text and "bundle-3: other processes used 1.00 cores" in text
    assert "valid DISTURBED" in cells(rows[3]) and cells(rows[0])[8] == "1.00 [0.90-1.10]"


def test_plots_key_clustered_points_and_have_no_zero_tick() -> None:
    pytest.importorskip("matplotlib")
    from bitdeploy.benchmarks.plots import throughput_vs_batch
    from bitdeploy.benchmarks.plots_front import accuracy_vs_latency
    from bitdeploy.benchmarks.report import table_rows

    rows = table_rows([_report_doc(True)])
    fig = accuracy_vs_latency(rows)
    ax = fig.axes[0]
    assert len(ax.texts) == 0  # no labels drawn beside points: the legend keys them
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert all(f"bundle-{i}" in " ".join(labels) for i in range(9)) and "bundle-3 (DISTURBED)" in labels
    assert len(ax.containers) == 9  # one error bar (the rounds' spread) per point
    fig = throughput_vs_batch(rows)
    fig.canvas.draw()
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels() if t.get_text()]
    assert ticks and "0" not in ticks


@pytest.fixture
def busy_loop() -> Any:
    """A CPU-bound loop on one core, bounded to 120 s, stopped when the test ends."""
    code = "import time\nend = time.time() + 120\nwhile time.time() < end: pass\n"
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.3)
    yield proc
    proc.kill()
    proc.wait()


FAST = ["--iterations", "150", "--warmup", "2", "--batch-sizes", "1", "--threads", "1", "--no-progress", "--no-e2e"]


def test_busy_loop_marks_the_row_disturbed(onnx_bundle: Path, tmp_path: Path, busy_loop: Any) -> None:
    out = tmp_path / "bench.json"
    args = [sys.executable, "-m", "bitdeploy", "bench", str(onnx_bundle), *FAST]
    proc = subprocess.run([*args, "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(out.read_text())["results"][0]
    assert entry["disturbed"] and any("other processes used" in f for f in entry["flags"]), entry["interference"]
    assert len(entry["interference"]["windows"]) == 3 and entry["single_stream"]["spread"]["p50_ms"]
    assert "DISTURBED" in proc.stdout and "disturbed" in proc.stderr
    failing = subprocess.run(
        [*args, "--quiet-check", "fail", "--json", str(tmp_path / "no.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failing.returncode == 1 and "Traceback" not in failing.stderr
    assert len(failing.stderr.strip().splitlines()) == 1 and failing.stderr.startswith("error: ")
    assert "rows disturbed" in failing.stderr and not (tmp_path / "no.json").exists()


def test_build_select_fastest_says_tied() -> None:
    from bitdeploy.benchmarks.ranking import Criteria
    from bitdeploy.benchmarks.schema import Timing
    from bitdeploy.builder.finish import select
    from bitdeploy.builder.table import table
    from tests.rows import row

    disturbed = ("other processes used 1.00 cores (limit 0.3)",)
    litert = row("litert-int8", timing=Timing(1.56, p50_spread=(1.50, 1.70)), size_mb=25.0, agreement=0.990)
    ov = row(
        "openvino-int8",
        timing=Timing(1.63, p50_spread=(1.55, 1.66), disturbed=disturbed),
        size_mb=26.0,
        agreement=0.995,
    )
    pick = select([litert, ov], Criteria("fastest"))
    assert pick is not None and pick[0] is ov
    assert "tied on speed" in pick[1] and "disturbed timing, not a firm ranking: openvino-int8" in pick[1]
    text = table([litert, ov])
    assert "1.56 [1.50-1.70]" in text and "DISTURBED" in text.splitlines()[3]


def test_wait_for_quiet_gives_up_at_its_limit() -> None:
    t0 = time.perf_counter()
    quiet, waited, rec = interference.wait_for_quiet(0.3, probe_s=0.1)
    assert time.perf_counter() - t0 < 2.0 and "others_cores" in rec
    assert quiet == (interference.reasons(rec) == []) and (quiet or waited >= 0.3)
