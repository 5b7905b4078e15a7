"""benchmarks/experiments/qat_vs_ptq.py: its table's rows and the QAT time it reads off the build's log. The script's
full runs build three times (minutes); the QAT fallback it drives is tested in tests/pipeline."""

from __future__ import annotations

from tests.experiments import load

qvp = load("qat_vs_ptq")


def test_the_qat_time_runs_from_the_fine_tunes_end_to_the_rows_verdict() -> None:
    lines = [
        (1.0, "quantization-aware fine-tune of tiny, distilled from /ck on the training split"),
        (30.0, "cached: quantization-aware fine-tune (qat/fdac95085679)"),
        (34.5, "[qat] onnx-int8: quantization-aware fine-tune (5 steps, every convolution INT8) fails the gate"),
        (40.0, "cache hit: quantization-aware fine-tune (qat/fdac95085679)"),
        (42.0, "[qat] openvino-int8: quantization-aware fine-tune (5 steps, every convolution INT8) passes the gate"),
    ]
    assert qvp.after_fine_tune(lines, "onnx") == 4.5
    assert qvp.after_fine_tune(lines, "openvino") == 2.0
    assert qvp.after_fine_tune(lines, "litert") is None


def test_the_table_has_a_cell_for_every_column() -> None:
    report = {"top1": 0.86, "top1_ci": [0.80, 0.90], "top1_drop_pp": 1.5, "agreement": 0.97, "passed": False}
    rows = [
        {"engine": "onnx", "variant": qvp.FP32, "report": {**report, "top1_drop_pp": 0.0, "passed": True}},
        {
            "engine": "onnx",
            "variant": qvp.QAT,
            "report": report,
            "p50_ms": 1.0,
            "p50_spread": [0.9, 1.1],
            "vs_fp32": 0.5,
            "vs_fp32_spread": [0.4, 0.6],
            "default_float_layers": ["head.conv"],
            "convolutions": 54,
            "qat": {"steps": 20},
            "train_s": 61.2,
            "after_s": 8.0,
        },
        {"engine": "onnx", "variant": qvp.MIX, "why": "no mix: none passes the gate", "search_s": 12.0},
    ]
    lines = qvp.table(rows)
    assert len(lines) == 5 and all(line.count("|") == len(qvp.HEADER) + 1 for line in lines)
    assert "| 86.00 % [80.0–90.0] (-1.50 pp) | 97.00 % | fail | 1.00 [0.90–1.10] | 0.50× [0.40–0.60] |" in lines[3]
    assert "| 1 of 54 (head.conv) | 61 s fine-tune (20 steps) + 8 s export, conversion, gate |" in lines[3]
    assert "| no mix: none passes the gate |" in lines[4] and lines[4].endswith("| 12 s search |")
