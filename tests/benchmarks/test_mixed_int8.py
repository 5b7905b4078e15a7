"""benchmarks/experiments/mixed_int8.py: its table's rows and its reasons for a missing mix. The script's full runs
are recorded in docs/measurements.md; the search it drives is tested end to end in tests/pipeline/test_int8_search.py."""

from __future__ import annotations

from tests.experiments import load

mi8 = load("mixed_int8")


def test_a_search_without_a_mix_says_why_and_the_table_still_has_its_row() -> None:
    failed = {
        "gate": "top-1 drop <= 0 pp",
        "quantizable_layers": 17,
        "candidates": [
            {"name": "root", "float_layers": 1, "top1": 0.875, "agreement": 0.925, "passed": 0},
            {"name": "4 most sensitive groups", "float_layers": 13, "top1": 0.883, "agreement": 0.967, "passed": 0},
        ],
    }
    short, detail = mi8.no_mix_reason(failed)
    assert short == "none passes the gate" and "best found: 13 of 17 layers in float (4 most sensitive" in detail
    slow = {**failed, "fp32_p50_ms": 1.0, "candidates": [{**failed["candidates"][0], "passed": 1, "p50_ms": 1.2}]}
    assert (
        mi8.no_mix_reason(slow)[0] == "none faster than FP32"
        and "p50 1.20 ms vs FP32 1.00 ms" in mi8.no_mix_reason(slow)[1]
    )
    rows = [
        {
            "engine": "onnx",
            "variant": mi8.FP32,
            "accuracy": {"top1": 0.9, "agreement": 1.0, "passed": True},
            "p50_ms": 2.0,
            "p50_spread": [1.9, 2.1],
            "vs_fp32": 1.0,
            "vs_fp32_spread": [1.0, 1.0],
        },
        {
            "engine": "onnx",
            "variant": mi8.MIX,
            "why": "no mix: none passes the gate",
            "search_s": 12.0,
            "evaluations": 6,
            "budget": 10,
            "granularity": "unit",
        },
    ]
    lines = mi8.table(rows)
    assert len(lines) == 4 and all(line.count("|") == len(mi8.HEADER) + 1 for line in lines)
    assert "| 2.00 [1.90–2.10] | 1.00× | all | pass |" in lines[2]
    assert "| no mix: none passes the gate | 12 s, 6/10 evaluations (unit groups) |" in lines[3]
