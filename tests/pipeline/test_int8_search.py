"""The INT8 search (`--int8-fallback auto`), the agreement gate (`--min-agreement`) and float layers per engine.

The hard case is made honestly: the tiny model's head is a ridge fit on random features (`ckpt`), so its top-2
logits sit close and uniform INT8 flips 1-5 % of the 359 validation images on every engine; a tight gate then fails
uniform INT8. The search ranks and chooses on half of those images and the bundle reports on the other half, so
the search tests use them all (the build tests' 120-image `--eval-limit` is too few for both roles: it has its own
test). Nothing edits weights. The speed decision is faked where the choice, not this machine's timing, is tested.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bitdeploy.converters import layers
from bitdeploy.core.errors import BundleError
from bitdeploy.core.options import GateSpec
from bitdeploy.runtimes.bundle.manifest_mix import Candidate, ImageSets, Int8Mix, LayerCost, SpeedDecision
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
    """A build of the tiny checkpoint without a drop allowance unless a test gives one, and without the cache; the
    search alone (`--int8-fallback search`, unless a test gives another): `auto` would go on to the fine-tune
    (tests/pipeline/test_build_qat.py)."""
    return ["build", *base_args(ckpt, out, "--no-cache", "--int8-fallback", "search", *more, gate=())]


def manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())


# -- the parts ----------------------------------------------------------------------------------------------------
def test_layers_are_named_once_for_every_engine_and_grouped_coarse_to_fine() -> None:
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
    # coarse to fine (the bisection's budget-chosen granularity is gone): a block is refined into its units, a
    # block of one unit straight into its layers, a single layer not at all
    from bitdeploy.builder.search import children, level

    blocks = layers.groups(TINY_LAYERS, "block")
    assert [level(g) for g in blocks] == ["block"] * 6
    assert [g.name for g in children(blocks[2])] == [
        f"body.block2.unit01.{c}" for c in ("downsample", "conv1", "conv2", "conv3")
    ]
    assert children(blocks[0]) == [] and level(children(blocks[2])[0]) == "layer"
    r50 = [f"body.block3.unit0{u}.conv{c}" for u in (1, 2) for c in (1, 2, 3)]
    assert [g.name for g in children(layers.Group("body.block3", tuple(r50)))] == [
        "body.block3.unit01",
        "body.block3.unit02",
    ]
    assert level(layers.Group("body.block3.unit01", tuple(r50[:3]))) == "unit"


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
        sensitivity=[
            LayerCost(
                name="root", layers=1, error_reduction=0.4, rank=1, float_in_mix=1, kl=0.01, level="block", ranking=1
            )
        ],
        candidates=[
            Candidate(
                name="+ root", float_groups=1, float_layers=1, passed=1, p50_ms=0.6, chosen=1, kl=0.01, report_passed=1
            ),
            Candidate(name="+ head", float_groups=1, float_layers=1, passed=0, error="ConversionError: boom"),
        ],
        measure="kl",
        made_by="revert",
        stop="passed",
        sets=ImageSets("digits:val", "validation split stratified by label, seed 0", 359, 179, 180),
        speed=SpeedDecision("rule", 5, 1, 0, None),
    )
    again = Int8Mix.from_dict(json.loads(json.dumps(mix.to_dict())))
    assert again == mix and again.chosen == mix.candidates[0]
    # a manifest from before the split search still loads: it ranked by the mean |logit error|, no sets
    old = {k: v for k, v in mix.to_dict().items() if k not in ("measure", "made_by", "stop", "sets", "speed")}
    old["candidates"] = [{k: v for k, v in c.items() if k in ("name", "passed", "chosen")} for c in old["candidates"]]
    read = Int8Mix.from_dict(old)
    assert (read.measure, read.made_by, read.stop, read.sets, read.speed) == (
        "mean_abs_logit_diff",
        "convert",
        "",
        None,
        None,
    )
    assert read.candidates[1].error is None and read.chosen is not None and read.chosen.name == "+ root"
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


ALL_IMAGES = ("--eval-limit", "1000")  # every validation image (359): about half to search on, half to report on


def search_args(ckpt: Path, out: Path, *more: str) -> list[str]:
    return build_args(ckpt, out, *ALL_IMAGES, *more)


def _fake_speed(kept: bool) -> Any:
    """`Search.speed` with fixed figures: FP32 1.0 ms, uniform INT8 0.5 ms, the mix 0.6 ms (kept) or 1.2 ms."""
    from bitdeploy.builder.search_speed import FP32, MIX, UNIFORM, SpeedVerdict

    mix = 0.6 if kept else 1.2

    def speed(self: Any, answer: Any, judged: Any) -> SpeedVerdict:
        spread = {FP32: (0.95, 1.05), UNIFORM: (0.45, 0.55), MIX: (mix - 0.05, mix + 0.05)}
        return SpeedVerdict(kept, {FP32: 1.0, UNIFORM: 0.5, MIX: mix}, spread, 5)

    return speed


def _error_lines(err: str) -> list[str]:
    return [x for x in err.splitlines() if x.startswith("error:")]


def test_the_search_chooses_on_its_images_and_the_bundle_reports_on_the_others(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bitdeploy.builder import search as int8_search
    from tests.converters.model_files import onnx_float_convs

    monkeypatch.setattr(int8_search.Search, "speed", _fake_speed(True))  # the choice, not this machine's speed
    out = tmp_path / "auto"
    args = search_args(ckpt, out, "--target", "onnx", "--precision", "int8", "--max-accuracy-drop", "1")
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    m = manifest(out)
    mix, acc, sets = m["int8_mix"], m["accuracy"], m["int8_mix"]["sets"]
    assert sets["validation"] == 359 and sets["search"] + sets["report"] == 359 and sets["report"] >= 180
    assert "stratified by label, seed 0" in sets["how"]
    # the bundle's verdict and figures are on the report's images, which the search never saw
    assert m["valid"] and acc["passed"] and acc["samples"] == sets["report"] and acc["split"] == "val:report"
    assert (mix["measure"], mix["made_by"], mix["stop"]) == ("kl", "revert", "passed")
    assert mix["uniform"]["report_agreement"] is not None and not mix["uniform"]["passed"]
    # the model file holds exactly the mix's float layers (read with onnx.load), at most half of the 18
    assert onnx_float_convs(out / "model.onnx") == set(mix["float_layers"]) and 0 < len(mix["float_layers"]) <= 9
    assert set(mix["float_layers"]) == set(m["target"]["quantization"]["float_layers"])
    chosen = [c for c in mix["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["passed"] and chosen[0]["report_passed"] == 1
    assert chosen[0]["report_agreement"] == acc["agreement"] and chosen[0]["float_layers"] == len(mix["float_layers"])
    assert chosen[0]["p50_ms"] == 0.6 and mix["fp32_p50_ms"] == 1.0 and mix["uniform"]["p50_ms"] == 0.5
    assert mix["speed"]["kept"] == 1 and mix["speed"]["rounds"] == 5
    assert 1 <= mix["evaluations"] <= 24 and all(c["kl"] is not None for c in mix["candidates"])
    first = [c for c in mix["sensitivity"] if c["ranking"] == 1]  # the blocks, ranked on uniform INT8
    assert {c["name"] for c in first} == {g.name for g in layers.groups(TINY_LAYERS, "block")}
    ranks = [c["rank"] for c in first if c["rank"] is not None]  # a passing block ends the ranking: the rest wait
    assert ranks == list(range(1, len(ranks) + 1)) and {c["level"] for c in first} == {"block"}
    assert all(c["error_reduction"] is None for c in first if c["rank"] is None)
    for c in mix["sensitivity"]:
        members = {n for n in TINY_LAYERS if n == c["name"] or n.startswith(c["name"] + ".")}
        assert bool(c["float_in_mix"]) == (members <= set(mix["float_layers"]))
    line = [x for x in stdout.splitlines() if x.startswith("int8 search: onnx-int8:")]
    assert len(line) == 1 and f"{len(mix['float_layers'])} of 18 layers kept in float" in line[0]
    assert f"on the {sets['report']} report images" in line[0] and "vs uniform INT8 0.50 ms" in line[0]
    assert "search 1/24:" in err and "ETA" in err
    from bitdeploy.runtimes.bundle.mix_text import summary

    shown = summary(Int8Mix.from_dict(mix))  # inspect's line: the figures on the report's images, and the sets
    assert f"agreement {acc['agreement'] * 100:.2f}%" in shown and "on the report's images" in shown
    assert f"searched on {sets['search']} of 359 validation images, reported on the other {sets['report']}" in shown
    code, _, err = run_cli(["verify", str(out)], capsys)  # its self-test: the report's images and the mix's logits
    assert code == 0, err


def test_a_mix_not_faster_than_fp32_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bitdeploy.builder import search as int8_search

    monkeypatch.setattr(int8_search.Search, "speed", _fake_speed(False))
    out = tmp_path / "slow"
    code, _, err = run_cli(
        search_args(ckpt, out, "--target", "onnx", "--precision", "int8", "--max-accuracy-drop", "1"), capsys
    )
    line = _error_lines(err)
    assert code == 1 and len(line) == 1 and "Traceback" not in err
    assert "not faster than ONNX Runtime FP32 by more than the spread of both" in line[0]
    assert "p50 1.20 ms [1.15-1.25] vs uniform INT8 0.50 ms [0.45-0.55] and FP32 1.00 ms [0.95-1.05]" in line[0]
    m = manifest(out)
    # uniform INT8, judged as a build without a search judges it (on every image: the search chose nothing)
    assert m["valid"] is False and m["int8_mix"]["float_layers"] == [] and m["int8_mix"]["stop"] == "speed"
    assert m["accuracy"]["samples"] == 359 and "not faster" in m["invalid_reason"]


def test_int8_that_cannot_pass_with_most_layers_int8_stops_early(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every candidate is converted and measured for real; only the verdicts are forced to fail, as on a model whose
    error is spread over the network. A candidate that fails to convert is recorded and skipped."""
    from bitdeploy.builder import search as int8_search
    from bitdeploy.builder import search_data
    from bitdeploy.core.errors import ConversionError
    from bitdeploy.runtimes.bundle.mix_text import summary

    monkeypatch.setattr(search_data, "holds", lambda result, spec: False)
    monkeypatch.setattr(int8_search.Search, "passes_point", lambda self, t: False)
    real = int8_search.revert

    def flaky(plan: Any, ctx: Any, cache: Any, uniform: Any, float_layers: tuple[str, ...]) -> Any:
        if "body.block4.unit01.conv1" in float_layers:
            raise ConversionError("this converter cannot take the mix")
        return real(plan, ctx, cache, uniform, float_layers)

    monkeypatch.setattr(int8_search, "revert", flaky)
    out = tmp_path / "spread"
    code, stdout, err = run_cli(
        search_args(ckpt, out, "--target", "onnx", "--precision", "int8", "--min-agreement", "99"), capsys
    )
    line = _error_lines(err)
    assert code == 1 and len(line) == 1 and "Traceback" not in err
    assert "INT8 cannot meet the gate (agreement >= 99 %) with most layers INT8: the error is spread" in line[0]
    assert "use FP32, fp16 or bf16, or quantization-aware fine-tuning" in line[0] and "KL removed" in line[0]
    mix = manifest(out)["int8_mix"]
    assert mix["stop"] == "spread" and mix["evaluations"] == 7 and mix["float_layers"] == []  # 6 blocks, 1 ceiling
    failed = [c for c in mix["candidates"] if c["error"]]
    assert [c["name"] for c in failed] == ["+ body.block4"] and "cannot take the mix" in failed[0]["error"]
    assert mix["candidates"][-1]["name"].startswith("ceiling: 9 layers")  # half of the 18, the most costly first
    assert "1 candidate failed to convert (skipped)" in summary(Int8Mix.from_dict(mix))
    assert "INT8 cannot meet the gate" in stdout


def test_too_few_images_for_both_roles_says_what_would_do(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ckpt: Path
) -> None:
    out = tmp_path / "few"
    args = build_args(ckpt, out, "--target", "onnx", "--precision", "int8", "--min-agreement", "99.5")  # 120 images
    code, _, err = run_cli(args, capsys)
    line = _error_lines(err)
    assert code == 1 and len(line) == 1
    assert "the 120 validation images are too few to search on some and report on the others" in line[0]
    assert "needs 200 report images to allow one disagreement" in line[0] and "300 would do" in line[0]
    m = manifest(out)
    assert m["int8_mix"]["stop"] == "too few images" and m["int8_mix"]["evaluations"] == 0
    assert m["int8_mix"]["sets"] is None and m["accuracy"]["samples"] == 120  # no search: today's figures


def test_accuracy_control_is_refused_by_the_search_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NNCF's accuracy control picks its float layers on the whole validation split, the report's images included:
    the search does not start from it. Stood in by an ONNX Runtime conversion that records it, so no NNCF runs."""
    from dataclasses import replace

    from bitdeploy.converters import ort_convert

    real = ort_convert.OrtConverter.run

    def run(self: Any, *args: Any) -> Any:
        art = real(self, *args)
        q = art.target.quantization
        if q is None:
            return art
        controlled = replace(q, details={**q.details, "accuracy_control": True})
        return replace(art, target=replace(art.target, quantization=controlled))

    monkeypatch.setattr(ort_convert.OrtConverter, "run", run)
    out = tmp_path / "ac"
    code, _, err = run_cli(
        search_args(ckpt, out, "--target", "onnx", "--precision", "int8", "--min-agreement", "99"), capsys
    )
    line = _error_lines(err)
    assert code == 1 and len(line) == 1 and "not searched: NNCF's accuracy control already chose" in line[0]
    assert "--int8-fallback none" in line[0]
    mix = manifest(out)["int8_mix"]
    assert mix["stop"] == "accuracy control" and mix["evaluations"] == 0 and mix["candidates"] == []


@pytest.mark.parametrize(("target", "gate", "budget"), [("openvino", "97", "24"), ("litert", "99.5", "2")])
def test_search_uses_each_engines_own_float_mechanism(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    ckpt: Path,
    monkeypatch: pytest.MonkeyPatch,
    target: str,
    gate: str,
    budget: str,
) -> None:
    """OpenVINO reverts the one NNCF model (its IR checked with read_model); LiteRT converts each candidate with the
    uniform conversion's calibrated ranges."""
    from bitdeploy.builder import search as int8_search
    from bitdeploy.core.targets import TARGETS, unavailable_reason

    reason = unavailable_reason(TARGETS[target], "int8")
    if reason:
        pytest.skip(reason)
    monkeypatch.setattr(int8_search.Search, "speed", _fake_speed(True))
    out = tmp_path / target
    args = search_args(ckpt, out, "--target", target, "--precision", "int8", "--min-agreement", gate)
    code, _, err = run_cli([*args, "--int8-search-budget", budget], capsys)
    m = manifest(out)
    mix = m["int8_mix"]
    assert mix["engine"] == TARGETS[target].backend and mix["made_by"] == "revert"
    assert mix["sets"]["validation"] == 359 and 0 < mix["evaluations"] <= int(budget)
    assert all(c["float_layers"] <= mix["quantizable_layers"] // 2 for c in mix["candidates"])
    if code == 0:
        assert m["valid"] and mix["float_layers"] and m["accuracy"]["split"] == "val:report"
        if target == "openvino":
            from tests.converters.model_files import ir_float_convs

            assert ir_float_convs(out / "model.xml") == {*mix["float_layers"], "head.conv"}  # head: the float scope
    else:
        outcomes = ("INT8 cannot meet the gate", "no mix keeping most layers INT8 passes", "fails on the report's")
        assert any(o in _error_lines(err)[0] for o in outcomes), err


# -- bf16/fp16 float layers: selectable only once checked on the device classes --------------------------------------
def _row(name: str, p50: float, float_precision: str = "fp32", devices: dict[str, str] | None = None) -> Any:
    from bitdeploy.benchmarks.schema import Timing
    from tests.rows import row

    timing = Timing(p50_ms=p50, p50_spread=(p50, p50))
    return row(name, top1=0.9, timing=timing, float_precision=float_precision, devices=devices)


def test_bf16_float_layers_are_offered_to_select_only_after_a_cpu_computing_bf16_checked_them() -> None:
    from bitdeploy.benchmarks.ranking import Criteria
    from bitdeploy.builder.finish import select

    rows = [_row("onnx-int8", 2.0), _row("openvino-int8", 1.0, "bf16")]
    best, line = select(rows, Criteria("fastest"))
    unchecked = "excluded, float precision not checked on a CPU that computes it"
    assert best.name == "onnx-int8" and unchecked in line and "--verify-on neoverse-v1): openvino-int8 (bf16)" in line
    # haswell (emulated x86: no AVX-512) and cortex-a76 (no bf16) ran its f32 fallback: still unchecked
    fallback = {"haswell": "pass", "cortex-a76": "pass"}
    rows = [_row("onnx-int8", 2.0, devices=fallback), _row("openvino-int8", 1.0, "bf16", fallback)]
    assert select(rows, Criteria("fastest"))[0].name == "onnx-int8"
    checked = {**fallback, "neoverse-v1": "pass"}  # Graviton3 computes bf16
    rows = [_row("onnx-int8", 2.0, devices=checked), _row("openvino-int8", 1.0, "bf16", checked)]
    assert select(rows, Criteria("fastest"))[0].name == "openvino-int8"
    rows[1] = _row("openvino-int8", 1.0, "bf16", {**checked, "cortex-a76": "FAIL: agreement 0.9"})
    best, line = select(rows, Criteria("fastest"))
    assert best.name == "onnx-int8" and "failing on a --verify-on CPU: openvino-int8 (cortex-a76)" in line


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
