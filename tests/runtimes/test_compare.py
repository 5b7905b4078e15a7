"""The one comparison (`bitdeploy.runtimes.bundle.compare`): its arithmetic, and the build's gate, `bench` and the self-test
reporting the same figures for the same logits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bitdeploy.benchmarks import accuracy as bench_accuracy
from bitdeploy.converters import gate
from bitdeploy.runtimes.bundle import compare, selftest

LOGITS = np.array([[3, 2, 1, 0], [0, 1, 3, 2], [1, 0, 2, 3]], np.float32)
LABELS = np.array([0, 3, 1])


def test_topk_top1_and_agreement() -> None:
    assert compare.topk(LOGITS, LABELS, 1) == pytest.approx(1 / 3) == compare.top1(LOGITS, LABELS)
    assert compare.topk(LOGITS, LABELS, 2) == pytest.approx(2 / 3)
    assert compare.topk(LOGITS, LABELS, 10) == 1.0  # k beyond the classes: everything is in the top-k
    shifted = LOGITS + np.array([[0, 0, 0, 5], [0, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    assert compare.agreement(shifted, LOGITS) == pytest.approx(2 / 3)
    assert compare.agreement(LOGITS[:0], LOGITS[:0]) == 1.0 and compare.top1(LOGITS[:0], LABELS[:0]) == 0.0


def test_logit_error() -> None:
    ref = np.array([[4.0, -2.0], [0.5, 0.0]], np.float32)
    assert compare.rel_error(ref + np.float32(0.4), ref) == pytest.approx(0.1)  # 0.4 / max(1, 4)
    assert compare.rel_error(np.full_like(ref, np.nan), ref) == math.inf and compare.rel_error(ref[:0], ref[:0]) == 0
    d = compare.logit_diff(ref + np.float32(0.25), ref)
    assert (d.samples, d.agreement, d.max_abs, d.mean_abs, d.finite) == (2, 1.0, 0.25, 0.25, True)
    d = compare.logit_diff(np.full_like(ref, np.inf), ref)
    assert (d.max_abs, d.mean_abs, d.finite) == (None, None, False)
    with pytest.raises(ValueError, match="differs from the reference"):
        compare.logit_diff(ref[:1], ref)


def test_gate_bench_and_self_test_report_the_same_figures(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((16, 5)).astype(np.float32)
    logits = reference + rng.normal(0, 0.3, reference.shape).astype(np.float32)
    labels = rng.integers(0, 5, 16)
    result = gate.gate(logits, reference, labels, 100)
    bench = bench_accuracy.agreement(logits, reference)
    spec = selftest.write(
        tmp_path, rng.uniform(-1, 1, (16, 3, 2, 2)).astype(np.float32), reference, labels, logits, "fp32"
    )
    assert result.agreement == bench["agreement"] == spec.measured_agreement == compare.agreement(logits, reference)
    assert result.max_abs_logit_diff == bench["max_abs_logit_diff"] and result.top1 == spec.measured_top1
    assert spec.measured_rel_error == compare.rel_error(logits, reference)
