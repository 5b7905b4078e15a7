"""The gate's intervals (`converters.intervals`): Wilson for a proportion, Newcombe's paired interval for the drop,
against published values; `--gate-confidence` judging the bounds; the manifest fields, old manifests included."""

from __future__ import annotations

import numpy as np
import pytest

from bitdeploy.converters import intervals
from bitdeploy.converters.gate import gate
from bitdeploy.core.errors import BitdeployError, BundleError
from bitdeploy.core.options import GateArgs, GateSpec
from bitdeploy.runtimes.bundle.manifest import GateResult, Manifest


def _close(got: tuple[float, float], want: tuple[float, float], tol: float = 5e-5) -> bool:
    return abs(got[0] - want[0]) < tol and abs(got[1] - want[1]) < tol


def test_wilson_matches_newcombes_published_intervals() -> None:
    assert intervals.z_value(0.95) == pytest.approx(1.959964, abs=1e-6)
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", method 3
    assert _close(intervals.wilson(81, 263), (0.2553, 0.3662))
    assert _close(intervals.wilson(15, 148), (0.0624, 0.1605))
    # 347 of the 359 digits images: one image is 0.28 pp, the interval spans 3.8 pp
    assert _close(intervals.wilson(347, 359), (0.942491, 0.980777), 1e-6)
    assert intervals.wilson(0, 20)[0] == 0.0 and intervals.wilson(20, 20)[1] == 1.0
    lo95, hi95 = intervals.wilson(347, 359)
    lo99, hi99 = intervals.wilson(347, 359, 0.99)
    assert lo99 < lo95 and hi99 > hi95  # a higher level, a wider interval
    with pytest.raises(ValueError):
        intervals.wilson(1, 0)


def test_the_paired_drop_matches_newcombes_method_10() -> None:
    """Newcombe (1998), "Improved confidence intervals for the difference between binomial proportions based on
    paired data", the examples of its table (a, b, c, d)."""
    assert _close(intervals.paired_difference(36, 12, 2, 0), (0.0569, 0.3404))
    assert _close(intervals.paired_difference(18, 12, 2, 18), (0.0562, 0.3290))
    assert _close(intervals.paired_difference(0, 30, 0, 0), (0.8395, 1.0))
    # no discordant pair (b == c == 0): an interval around 0, symmetric
    assert _close(intervals.paired_difference(53, 0, 0, 1), (-0.0729, 0.0729))
    lo, hi = intervals.paired_difference(330, 5, 5, 19)  # b == c: a zero difference, 0 inside, symmetric
    assert lo < 0 < hi and lo == pytest.approx(-hi, abs=1e-12)
    assert intervals.paired_counts(np.array([1, 1, 0, 0, 1], bool), np.array([1, 0, 1, 0, 1], bool)) == (2, 1, 1, 1)


def _logits(n: int, wrong: int, also_right: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(artifact, FP32 reference, labels) on n images: FP32 right on all but `also_right`, which the artifact gets
    right; the artifact wrong on `wrong` images FP32 gets right."""
    labels = np.arange(n) % 10
    ref = np.eye(10, dtype=np.float32)[labels]
    ref[:also_right] = np.roll(ref[:also_right], 1, axis=1)
    art = np.eye(10, dtype=np.float32)[labels]
    art[also_right : also_right + wrong] = np.roll(art[also_right : also_right + wrong], 1, axis=1)
    return art, ref, labels


def test_gate_confidence_refuses_what_the_point_estimate_passes() -> None:
    art, ref, labels = _logits(359, wrong=3)  # a 0.84 pp drop on 359 images
    point = gate(art, ref, labels, GateSpec(max_drop_pp=1.0))
    assert point.passed and point.top1_drop_pp == pytest.approx(300 / 359, abs=1e-6)
    assert point.discordant == (3, 0) and point.confidence == 0.95 and point.gate_confidence is None
    lo, hi = point.top1_drop_ci_pp  # type: ignore[misc]
    assert lo < point.top1_drop_pp < hi and lo < 1.0 < hi
    assert point.top1_ci is not None and point.top1_ci[0] < point.top1 < point.top1_ci[1]  # type: ignore[operator]
    assert point.noise is not None and point.noise.startswith("within noise: the 1 pp allowance")
    bound = gate(art, ref, labels, GateSpec(max_drop_pp=1.0, confidence=0.95))
    assert not bound.passed and bound.gate_confidence == 0.95
    why = GateSpec(1.0, None, 0.95).shortfall(bound.top1_drop_pp, bound.agreement, bound.top1_drop_ci_pp)
    assert why.startswith("top-1 drop's 95 % upper bound") and "point 0.84 pp" in why and "within noise" in why
    assert "\n" not in why
    # a drop no sample could stretch to the allowance passes the bound too, and is not within noise
    clean = gate(*_logits(359, wrong=0), GateSpec(max_drop_pp=3.0, confidence=0.95))  # type: ignore[misc]
    assert clean.passed and clean.noise is None


def test_agreement_bound_and_its_noise() -> None:
    art, ref, labels = _logits(359, wrong=2)
    spec = GateSpec(min_agreement_pct=99.0)
    point = gate(art, ref, labels, spec)  # 99.44 % agreement: passes on the point
    assert point.passed and point.agreement_ci is not None and point.agreement_ci[0] < 0.99
    assert point.noise is not None and "99 % agreement minimum lies inside" in point.noise
    strict = GateSpec(min_agreement_pct=99.0, confidence=0.9)
    assert not gate(art, ref, labels, strict).passed
    assert strict.describe() == "agreement >= 99 %, at the 90 % bound"
    assert GateSpec().describe() == "top-1 drop <= 1 pp"


def test_gate_confidence_is_validated_in_one_line() -> None:
    assert GateArgs(gate_confidence=0.95).spec().confidence == 0.95
    for bad in (0.5, 1.0, 95.0):
        with pytest.raises(BitdeployError, match=r"--gate-confidence is a level between 0.5 and 1"):
            GateArgs(gate_confidence=bad).validate()


def test_the_intervals_round_trip_and_old_manifests_load_without_them() -> None:
    art, ref, labels = _logits(100, wrong=2, also_right=1)
    result = gate(art, ref, labels, GateSpec(max_drop_pp=1.0, confidence=0.9))
    data = result.to_dict()
    for key in ("top1_ci", "reference_top1_ci", "top1_drop_ci_pp", "agreement_ci"):
        assert isinstance(data[key], list) and len(data[key]) == 2
    assert data["discordant"] == [2, 1] and data["confidence"] == 0.9 and data["gate_confidence"] == 0.9
    assert GateResult.from_dict(data, "accuracy") == result
    old = {
        k: v for k, v in data.items() if k not in (*GateResult.INTERVALS, "discordant", "confidence", "gate_confidence")
    }
    loaded = Manifest.from_dict({"valid": True, "accuracy": old}).gate
    assert loaded is not None and loaded.top1_ci is None and loaded.top1_drop_ci_pp is None
    assert loaded.confidence is None and loaded.noise is None
    assert "top1_ci" not in loaded.to_dict()  # a rewritten old manifest keeps its keys
    with pytest.raises(BundleError, match=r"accuracy.top1_ci must be \[low, high\]"):
        GateResult.from_dict({**data, "top1_ci": [0.9]}, "accuracy")
