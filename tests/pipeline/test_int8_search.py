"""The INT8 search (`--int8-fallback auto`), the agreement gate (`--min-agreement`) and float layers per engine.

The hard case is made honestly: the tiny model's head is a ridge fit on random features (`ckpt`), so its top-2
logits sit close and uniform INT8 flips 2-4 of the 120 validation images on every engine; a gate of 99 % agreement
with FP32 then fails uniform INT8, and keeping the most sensitive layers in float passes it. Nothing edits weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bitdeploy.converters import layers
from bitdeploy.core.errors import BundleError
from bitdeploy.core.options import GateSpec
from bitdeploy.runtimes.bundle.manifest_mix import Candidate, Int8Mix, LayerCost
from tests.clirun import one_error_line, run_cli
from tests.pipeline.tiny_args import base_args

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

TINY_LAYERS = [
    "root.conv",
    *[f"body.block{b}.unit01.{c}" for b in range(1, 5) for c in ("downsample", "conv1", "conv2", "conv3")],
    "head.conv",
]


def build_args(ckpt: Path, out: Path, *more: str) -> list[str]:
    """A build of the tiny checkpoint without a drop allowance unless a test gives one, and without the cache."""
    return ["build", *base_args(ckpt, out, "--no-cache", *more, gate=())]


def manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())


# -- the parts ----------------------------------------------------------------------------------------------------
def test_layers_are_named_once_for_every_engine_and_grouped_by_the_budget() -> None:
    assert layers.layer_of("/body/block2/unit01/conv2/Conv") == "body.block2.unit01.conv2"
    assert layers.layer_of("/head/conv/Conv/WithoutBiases") == "head.conv"  # OpenVINO's biased Convolution
    assert layers.node_names([("/root/conv/Conv", "Conv"), ("/root/pad/Pad", "Pad")], ["root.conv"]) == [
        "/root/conv/Conv"
    ]
    units = layers.groups(TINY_LAYERS, "unit")
    assert [g.name for g in units] == ["root", *[f"body.block{b}.unit01" for b in range(1, 5)], "head"]
    assert [len(g.layers) for g in units] == [1, 4, 4, 4, 4, 1]
    assert [g.name for g in layers.groups(TINY_LAYERS, "block")][1:5] == [f"body.block{b}" for b in range(1, 5)]
    assert len(layers.groups(TINY_LAYERS, "layer")) == 18
    # 18 layers + a bisection need 24 evaluations; 6 unit groups need 10
    assert layers.finest(TINY_LAYERS, 24) == "layer" and layers.finest(TINY_LAYERS, 23) == "unit"
    assert layers.finest(TINY_LAYERS, 10) == "unit" and layers.finest(TINY_LAYERS, 4) == "block"


def test_gate_spec_agreement_alone_and_with_the_drop() -> None:
    default = GateSpec()
    assert default.drop_allowance == 1.0 and default.describe() == "top-1 drop <= 1 pp"
    alone = GateSpec(min_agreement_pct=99.0)
    assert alone.drop_allowance is None and alone.describe() == "agreement >= 99 %"
    assert alone.passes(drop_pp=5.0, agreement=0.995) and not alone.passes(drop_pp=0.0, agreement=0.98)
    both = GateSpec(max_drop_pp=0.5, min_agreement_pct=99.0)
    assert both.describe() == "top-1 drop <= 0.5 pp and agreement >= 99 %"
    assert not both.passes(1.0, 0.999) and not both.passes(0.0, 0.98) and both.passes(0.4, 0.99)
    assert both.shortfall(1.0, 0.98) == "top-1 dropped 1.00 pp (allowed 0.5 pp); agreement 98.00 % (needed 99 %)"


def test_int8_mix_record_reads_back_and_refuses_bad_fields() -> None:
    mix = Int8Mix(
        engine="onnxruntime",
        gate="agreement >= 99 %",
        granularity="unit",
        quantizable_layers=18,
        float_layers=["root.conv"],
        evaluations=7,
        budget=10,
        search_s=3.5,
        uniform=Candidate(name="uniform INT8", float_groups=0, float_layers=0, agreement=0.975, passed=0),
        fp32_p50_ms=1.0,
        fp32_p50_spread=(0.9, 1.1),
        sensitivity=[LayerCost(name="root", layers=1, error_reduction=0.4, rank=1, float_in_mix=1)],
        candidates=[Candidate(name="root", float_groups=1, float_layers=1, passed=1, p50_ms=0.6, chosen=1)],
    )
    again = Int8Mix.from_dict(json.loads(json.dumps(mix.to_dict())))
    assert again == mix and again.chosen == mix.candidates[0]
    with pytest.raises(BundleError, match=r"int8_mix\.float_layers must be a list of strings"):
        Int8Mix.from_dict({"float_layers": "root.conv"})
    with pytest.raises(BundleError, match=r"int8_mix\.sensitivity\.rank must be an integer"):
        Int8Mix.from_dict({"sensitivity": [{"rank": "1"}]})


# -- the build ----------------------------------------------------------------------------------------------------
def test_min_agreement_needs_a_dataset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(
        ["build", "--model", "tiny", "--weights", "none", "--out", tmp_path / "o", "--min-agreement", "99"], capsys
    )
    assert code != 0 and "--min-agreement gates on the labelled validation split" in one_error_line(err)


def test_fallback_none_keeps_the_failing_uniform_int8_invalid(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ckpt: Path
) -> None:
    out = tmp_path / "none"
    args = build_args(ckpt, out, "--target", "onnx", "--precision", "int8", "--int8-fallback", "none")
    code, stdout, err = run_cli([*args, "--min-agreement", "99", "--max-accuracy-drop", "0.5"], capsys)
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 1 and len(line) == 1 and "failed the accuracy gate" in line[0] and "INT8 search" not in line[0]
    m = manifest(out)
    acc = m["accuracy"]
    assert m["valid"] is False and "int8_mix" not in m
    assert acc["min_agreement_pct"] == 99.0 and acc["max_accuracy_drop_pp"] == 0.5
    assert acc["agreement"] < 0.99 and "agreement" in m["invalid_reason"]
    assert "int8 search" not in stdout


def _fake_timing(mix_ms: float) -> Any:
    """`Search.time` with fixed figures: FP32 1.0 ms, uniform INT8 0.5 ms, every passing mix `mix_ms`."""
    from bitdeploy.builder import search as int8_search

    def time(self: Any, passing: list[Any]) -> dict[str, Any]:
        out = {int8_search.FP32: (1.0, (0.95, 1.05)), int8_search.UNIFORM: (0.5, (0.45, 0.55))}
        out.update({m.name: (mix_ms + 0.01 * len(m.found.float_layers), None) for m in passing})
        return out

    return time


def test_auto_search_keeps_sensitive_layers_in_float_until_the_gate_passes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bitdeploy.builder import search as int8_search

    monkeypatch.setattr(int8_search.Search, "time", _fake_timing(0.6))  # the choice, not this machine's speed
    out = tmp_path / "auto"
    args = build_args(ckpt, out, "--target", "onnx", "--precision", "int8", "--min-agreement", "99")
    code, stdout, err = run_cli([*args, "--int8-search-budget", "10"], capsys)
    assert code == 0, err
    m = manifest(out)
    mix, acc = m["int8_mix"], m["accuracy"]
    assert m["valid"] and acc["passed"] and acc["agreement"] >= 0.99 and acc["max_accuracy_drop_pp"] is None
    assert mix["engine"] == "onnxruntime" and mix["granularity"] == "unit" and mix["quantizable_layers"] == 18
    assert mix["uniform"]["agreement"] < 0.99 and not mix["uniform"]["passed"]
    assert 0 < len(mix["float_layers"]) < 18  # at least one layer stays INT8
    assert set(mix["float_layers"]) == set(m["target"]["quantization"]["float_layers"])
    assert 2 <= mix["evaluations"] <= 10
    ranks = [c["rank"] for c in mix["sensitivity"]]
    assert ranks == list(range(1, 7)) and {c["name"] for c in mix["sensitivity"]} == {
        g.name for g in layers.groups(TINY_LAYERS, "unit")
    }
    kept = {c["name"] for c in mix["sensitivity"] if c["float_in_mix"]}
    assert kept == {layers.group_of(name, "unit") for name in mix["float_layers"]}
    chosen = [c for c in mix["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["passed"] and chosen[0]["float_layers"] == len(mix["float_layers"])
    # the fastest passing candidate is the one with the fewest float layers under the fake timing
    fewest = min(c["float_layers"] for c in mix["candidates"] if c["passed"])
    assert chosen[0]["float_layers"] == fewest and chosen[0]["p50_ms"] < mix["fp32_p50_ms"] == 1.0
    line = [x for x in stdout.splitlines() if x.startswith("int8 search: onnx-int8:")]
    assert len(line) == 1 and f"{len(mix['float_layers'])} of 18 layers kept in float" in line[0]
    assert "vs uniform INT8 0.50 ms and FP32 1.00 ms" in line[0]
    assert "search 1/10:" in err and "ETA" in err


def test_a_mix_not_faster_than_fp32_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bitdeploy.builder import search as int8_search

    monkeypatch.setattr(int8_search.Search, "time", _fake_timing(1.2))
    out = tmp_path / "slow"
    args = build_args(ckpt, out, "--target", "onnx", "--precision", "int8", "--min-agreement", "99")
    code, _, err = run_cli([*args, "--int8-search-budget", "10"], capsys)
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 1 and len(line) == 1 and "Traceback" not in err
    assert "not faster than ONNX Runtime FP32 (1.00 ms, fastest round 0.95 ms)" in line[0]
    assert "layers in float" in line[0]
    m = manifest(out)
    assert m["valid"] is False and m["int8_mix"]["float_layers"] == [] and "not faster" in m["invalid_reason"]


def test_a_gate_no_mix_can_pass_names_the_best_candidate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every candidate is converted and measured for real; only its verdict is forced to fail, as a gate that no
    mix keeping a layer in INT8 can meet would."""
    from dataclasses import replace

    from bitdeploy.builder import search as int8_search

    real = int8_search.try_candidate

    def failing(*args: Any, **kwargs: Any) -> Any:
        found = real(*args, **kwargs)
        return replace(found, result=replace(found.result, passed=False))

    monkeypatch.setattr(int8_search, "try_candidate", failing)
    out = tmp_path / "never"
    args = build_args(ckpt, out, "--target", "onnx", "--precision", "int8", "--min-agreement", "99")
    code, stdout, err = run_cli([*args, "--int8-search-budget", "6"], capsys)
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 1 and len(line) == 1 and "Traceback" not in err
    assert "INT8 search: no mix passes the gate (agreement >= 99 %); best found:" in line[0]
    m = manifest(out)
    mix = m["int8_mix"]
    assert m["valid"] is False and mix["evaluations"] == 6 and mix["float_layers"] == []
    # 4 groups measured alone, then all but the least sensitive in float, then the budget's last: another group
    # as the only one in INT8 (accuracy need not rise as layers go float)
    assert [c["name"].split(" ")[0] for c in mix["candidates"]][:2] == ["5", "all"]
    best = max(mix["candidates"], key=lambda c: (c["agreement"], c["top1"]))
    assert f"agreement {best['agreement'] * 100:.2f}%" in line[0]
    assert "no mix passes the gate" in stdout


@pytest.mark.parametrize("target", ["openvino", "litert"])
def test_search_uses_each_engines_own_float_mechanism(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ckpt: Path, target: str
) -> None:
    """Real conversions and real timing through NNCF's IgnoredScope and LiteRT's PT2E annotation filter."""
    from bitdeploy.core.targets import TARGETS, unavailable_reason

    reason = unavailable_reason(TARGETS[target], "int8")
    if reason:
        pytest.skip(reason)
    out = tmp_path / target
    args = build_args(ckpt, out, "--target", target, "--precision", "int8", "--min-agreement", "99")
    code, _, err = run_cli([*args, "--int8-search-budget", "4"], capsys)
    m = manifest(out)
    mix = m["int8_mix"]
    assert mix["engine"] == TARGETS[target].backend and mix["uniform"]["agreement"] < 0.99
    passing = [c for c in mix["candidates"] if c["passed"]]
    assert passing and all(0 < c["float_layers"] < mix["quantizable_layers"] for c in passing)
    if code == 0:  # the mix beat this engine's FP32 here
        assert m["valid"] and mix["float_layers"]
        chosen = next(c for c in mix["candidates"] if c["chosen"])
        assert chosen["p50_ms"] < mix["fp32_p50_ms"] and m["accuracy"]["agreement"] >= 0.99
        assert set(mix["float_layers"]) <= set(m["target"]["quantization"]["float_layers"])
    else:
        assert "not faster than" in next(x for x in err.splitlines() if x.startswith("error:"))


# -- bf16/fp16 float layers: selectable only once checked on the device classes --------------------------------------
def _row(name: str, p50: float, float_precision: str = "fp32", devices: dict[str, str] | None = None) -> Any:
    from bitdeploy.benchmarks.schema import Timing
    from tests.rows import row

    timing = Timing(p50_ms=p50, p50_spread=(p50, p50))
    return row(name, top1=0.9, timing=timing, float_precision=float_precision, devices=devices)


def test_bf16_float_layers_are_offered_to_select_only_after_verify_on() -> None:
    from bitdeploy.benchmarks.ranking import Criteria
    from bitdeploy.builder.finish import select

    rows = [_row("onnx-int8", 2.0), _row("openvino-int8", 1.0, "bf16")]
    best, line = select(rows, Criteria("fastest"))
    assert (
        best.name == "onnx-int8"
        and "excluded until --verify-on checks their float precision: openvino-int8 (bf16)" in line
    )
    checked = {"haswell": "pass", "cortex-a76": "pass"}
    rows = [_row("onnx-int8", 2.0, devices=checked), _row("openvino-int8", 1.0, "bf16", checked)]
    assert select(rows, Criteria("fastest"))[0].name == "openvino-int8"
    rows[1] = _row("openvino-int8", 1.0, "bf16", {**checked, "cortex-a76": "FAIL: agreement 0.9"})
    assert select(rows, Criteria("fastest"))[0].name == "onnx-int8"


def test_bf16_on_a_cpu_without_it_says_so_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenVINO reports the precision it compiled to; a CPU without bf16 units compiles an f32 model."""
    pytest.importorskip("openvino")
    from bitdeploy.converters import openvino_convert
    from bitdeploy.converters.base import ConvertOptions, bind
    from bitdeploy.converters.onnx_export import export_onnx
    from bitdeploy.core.catalog import get_variant
    from bitdeploy.core.errors import ConversionError
    from bitdeploy.training.bit import create_model

    onnx_path = tmp_path / "tiny.onnx"
    export_onnx(create_model(get_variant("tiny"), 10).eval(), 32, onnx_path)

    monkeypatch.setattr(openvino_convert, "resolved_precision", lambda compiled: "f32")
    options = ConvertOptions(extras=openvino_convert.OpenVinoOptions(inference_precision="bf16"))
    with pytest.raises(ConversionError) as caught:
        bind("openvino", "fp16", options).convert(onnx_path, tmp_path / "work")
    line = str(caught.value)
    assert "\n" not in line and "computes in f32, not the requested bf16" in line
    assert "no bf16 arithmetic (x86 AVX-512 BF16 or AMX)" in line and "--inference-precision f32" in line
