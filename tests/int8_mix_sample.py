"""A synthetic `int8_mix` record (what the INT8 search writes), for the inspect and report tests: five unit groups
of a 48-layer model, the two most costly kept in float, one group the budget left unmeasured."""

from __future__ import annotations

from typing import Any

from bitdeploy.runtimes.bundle.manifest_mix import Candidate, Int8Mix, LayerCost

ROW = "m-r50x1-64/onnx-int8"
FLOAT_GROUPS = ("body.block2.unit01", "body.block3.unit02")
UNMEASURED = "body.block4.unit01"
GATE = "agreement >= 99.5 %"  # what both searches had to meet


def _tried(name: str, groups: int, layers: int, top1: float, agreement: float, passed: int, **timing: Any) -> Candidate:
    """A mix the search evaluated: `groups` groups (`layers` layers) in float, its top-1, agreement and verdict."""
    return Candidate(
        name=name, float_groups=groups, float_layers=layers, top1=top1, agreement=agreement, passed=passed, **timing
    )


def sample_mix(uniform_p50: float | None = None) -> Int8Mix:
    cost = [  # name, layers, error removed, agreement gain pp, in float
        ("body.block2.unit01", 3, 0.412, 1.3, 1),
        ("body.block3.unit02", 3, 0.275, 0.9, 1),
        ("root", 1, 0.081, 0.2, 0),
        ("head.conv", 1, -0.012, -0.05, 0),  # noise: leaving it in float made the error a little worse
    ]
    sensitivity = [
        LayerCost(
            name=name,
            layers=n,
            agreement=0.97 + gain / 100,
            mean_abs_logit_diff=0.5 * (1 - removed),
            agreement_gain_pp=gain,
            error_reduction=removed,
            rank=rank,
            float_in_mix=kept,
        )
        for rank, (name, n, removed, gain, kept) in enumerate(cost, 1)
    ]
    sensitivity.append(LayerCost(name=UNMEASURED, layers=4, rank=5, float_in_mix=0))
    return Int8Mix(
        engine="onnxruntime",
        gate=GATE,
        granularity="unit",
        quantizable_layers=48,
        float_layers=[f"{g}.conv{i}" for g in FLOAT_GROUPS for i in (1, 2, 3)],
        evaluations=7,
        budget=8,
        search_s=123.4,
        uniform=_tried("uniform INT8", 0, 0, 0.781, 0.970, 0, p50_ms=uniform_p50),
        fp32_p50_ms=2.4,
        fp32_p50_spread=(2.35, 2.46),
        sensitivity=sensitivity,
        candidates=[  # name, float groups, float layers, top-1, agreement, passed
            _tried("4 most sensitive groups", 4, 8, 0.80, 0.998, 1),
            _tried("2 most sensitive groups", 2, 6, 0.799, 0.9961, 1, p50_ms=1.1, p50_spread=(1.08, 1.13), chosen=1),
            _tried("1 most sensitive group", 1, 3, 0.79, 0.991, 0),
        ],
    )


def failed_mix() -> Int8Mix:
    """A search that found no passing mix among too few groups: nothing measured, nothing chosen."""
    return Int8Mix(
        engine="openvino",
        gate=GATE,
        granularity="block",
        quantizable_layers=2,
        budget=8,
        search_s=0.0,
        uniform=Candidate(name="uniform INT8", float_layers=0, top1=0.7, agreement=0.95, passed=0),
    )
