"""The arguments every build test of the tiny checkpoint (`ckpt`) shares: digits, 32 calibration images, a seeded
120-image validation subset, no report."""

from __future__ import annotations

from pathlib import Path

# The tiny model's head is a ridge fit on random features: its top-2 logits sit so close that INT8 noise flips
# 1-3 of the 120 images (0.8-2.5 pp) whichever scheme is used. A 3 pp gate keeps the pipeline tests about the
# pipeline; INT8 accuracy on a trained BiT is measured by `benchmarks/experiments/int8_cpu_classes.py`
# (docs/targets.md), and the INT8 search's tests set their own, tighter gates.
TINY_GATE_PP = "3"


def base_args(
    ckpt: Path, out: Path, *more: str, gate: tuple[str, ...] = ("--max-accuracy-drop", TINY_GATE_PP)
) -> list[str]:
    return [
        "--model",
        "tiny",
        "--weights",
        str(ckpt),
        "--dataset",
        "digits",
        "--out",
        str(out),
        "--calib-size",
        "32",
        "--eval-limit",
        "120",
        "--no-report",
        *gate,
        *more,
    ]
