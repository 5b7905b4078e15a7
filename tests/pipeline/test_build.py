"""`bitdeploy build`: bundles, the accuracy gate, the stage cache, --target all, fast failures.

A tiny BiT at 32 px with a closed-form (ridge) head on digits stands in for a fine-tuned model: it reaches
~0.9 validation top-1 in seconds, so the gate has something to lose.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitdeploy.cli import main
from bitdeploy.converters.base import Artifact, Converter
from bitdeploy.core.targets import TARGETS, Target, deferred_reason, unavailable_reason
from tests.pipeline.tiny_args import TINY_GATE_PP, base_args

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

RES = 32


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """`bitdeploy build ARGS` in process through the real entry point (error handling and exit codes)."""

    def invoke(args: list[str], cache: Path | None = None) -> Result:
        extra = ["--cache-dir", str(cache)] if cache is not None else ["--no-cache"]
        capsys.readouterr()
        try:
            main(["build", *args, *extra])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return invoke


def manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())


def test_no_dataset_fp32_bundle_validated_on_random_inputs(
    run: Callable[..., Result], tmp_path: Path, ckpt: Path
) -> None:
    from bitdeploy.runtimes import load
    from bitdeploy.runtimes.bundle import load_manifest

    out = tmp_path / "D"
    result = run(["--model", "tiny", "--weights", str(ckpt), "--target", "onnx", "--out", str(out), "--no-report"])
    assert result.exit_code == 0, result.output
    load_manifest(out)  # verifies checksums, refuses invalid bundles
    m = manifest(out)  # the JSON as written
    assert m["valid"] is True and m["invalid_reason"] is None
    assert m["accuracy"] is None
    v = m["validation"]
    assert v["passed"] and v["samples"] > 0 and v["max_abs_logit_diff"] < 1e-3
    assert m["target"]["backend"] == "onnxruntime" and m["target"]["precision"] == "fp32"
    assert m["model"]["resolution"] == RES and m["labels"] == [str(i) for i in range(10)]
    assert m["export"]["opset"] == 17 and m["provenance"]["versions"]["onnxruntime"]
    with load(out) as pred:
        top = pred.predict(np.full((20, 20, 3), 200, np.uint8), top_k=3)
    assert len(top[0]) == 3


def test_int8_bundle_passes_gate_with_full_manifest(run: Callable[..., Result], tmp_path: Path, ckpt: Path) -> None:
    out = tmp_path / "D"
    result = run(base_args(ckpt, out, "--target", "onnx", "--precision", "int8"))
    assert result.exit_code == 0, result.output
    m = manifest(out)
    acc = m["accuracy"]
    assert m["valid"] and acc["passed"] and acc["samples"] == 120
    assert acc["reference_top1"] > 0.7 and acc["top1"] >= acc["reference_top1"] - float(TINY_GATE_PP) / 100
    assert acc["max_accuracy_drop_pp"] == float(TINY_GATE_PP)
    assert {
        "top1",
        "reference_top1",
        "agreement",
        "samples",
        "max_abs_logit_diff",
        "mean_abs_logit_diff",
        "top1_drop_pp",
        "max_accuracy_drop_pp",
    } <= set(acc)
    cal = m["calibration"]
    assert cal["samples"] == 32 and cal["split"] == "train" and len(cal["sha256"]) == 64 and cal["method"] == "minmax"
    q = m["target"]["quantization"]
    assert (
        q["format"] == "QDQ" and "InstanceNormalization" in q["float_op_types"] and q["scheme"] in ("u8s8-7bit", "s8s8")
    )
    st = m["self_test"]
    assert st["images"] == 64 and st["labelled"] and st["file"] in m["files"] and (out / st["file"]).is_file()
    assert (
        st["criteria"]["min_agreement"] <= st["measured"]["agreement"]
        and st["criteria"]["max_rel_error"] >= st["measured"]["max_rel_error"]
    )
    assert m["validated_on"]["cpu"]["class"] and m["validated_on"]["cpu"]["features"] is not None
    assert m["model"]["weights"]["kind"] == "checkpoint"


def test_second_build_hits_cache_and_changed_input_invalidates(tmp_path: Path, ckpt: Path) -> None:
    from dataclasses import replace

    from bitdeploy.builder.build import run_build
    from bitdeploy.builder.options import BuildOptions
    from bitdeploy.core.options import (
        CacheArgs,
        CalibrationArgs,
        EngineArgs,
        ExportArgs,
        GateArgs,
        TimingArgs,
        TrainingArgs,
    )

    cache = tmp_path / "cache"
    lines: list[str] = []
    opts = BuildOptions(
        model="tiny",
        out=tmp_path / "a",
        export=ExportArgs(weights=str(ckpt)),
        engine=EngineArgs(precisions=("int8",)),
        training=TrainingArgs(dataset="digits"),
        calibration=CalibrationArgs(calib_size=16),
        gate=GateArgs(eval_limit=60, max_accuracy_drop=100.0),
        cache=CacheArgs(dir=cache),
        timing=TimingArgs(report=False),
    )
    first = run_build(opts, log=lines.append, show=lines.append)
    assert first.cache_hits == []
    opts = replace(opts, out=tmp_path / "b")
    second = run_build(opts, log=lines.append, show=lines.append)
    assert {"export", "reference", "calibration", "convert-onnx-int8"} <= set(second.cache_hits)
    assert any(line.startswith("cache hit: ONNX export") for line in lines)
    assert manifest(tmp_path / "a")["files"] == manifest(tmp_path / "b")["files"]
    # Another resolution is another export, and other calibration settings are other calibration data.
    opts = replace(opts, out=tmp_path / "c", resolution=48, calibration=CalibrationArgs(calib_size=24))
    third = run_build(opts, log=lines.append, show=lines.append)
    assert "export" not in third.cache_hits and "calibration" not in third.cache_hits
    # Changed weights (same path, new content) invalidate the export too.
    ck = torch.load(ckpt / "checkpoint.pt", weights_only=True)
    ck["model"]["head.conv.bias"] += 1.0
    changed = tmp_path / "ck2"
    changed.mkdir()
    torch.save(ck, changed / "checkpoint.pt")
    opts = replace(
        opts,
        out=tmp_path / "d",
        export=ExportArgs(weights=str(changed)),
        resolution=None,
        calibration=CalibrationArgs(calib_size=16),
    )
    fourth = run_build(opts, log=lines.append, show=lines.append)
    assert "export" not in fourth.cache_hits and "calibration" in fourth.cache_hits


class BrokenConverter(Converter):
    """A converter whose model always answers class 0: a stand-in for a quantization that lost accuracy."""

    def run(self, onnx_fp32: Path, work_dir: Path, calibration: Any, float_layers: tuple[str, ...]) -> Artifact:
        import onnx
        from onnx import helper, numpy_helper

        model = onnx.load(str(onnx_fp32))
        g = model.graph
        out = g.output[0].name
        for n in g.node:
            n.output[:] = [o if o != out else "raw_logits" for o in n.output]
        bias = np.zeros(10, np.float32)
        bias[0] = 1e4
        g.initializer.append(numpy_helper.from_array(bias, "class0"))
        g.node.append(helper.make_node("Add", ["raw_logits", "class0"], [out], name="break"))
        onnx.save(model, str(work_dir / "model.onnx"))
        return Artifact(files=["model.onnx"], model_file="model.onnx", target=self.target_info(self.precision, "cpu"))


class FailingConverter(Converter):
    def run(self, onnx_fp32: Path, work_dir: Path, calibration: Any, float_layers: tuple[str, ...]) -> Artifact:
        from bitdeploy.core.errors import ConversionError

        raise ConversionError("simulated converter crash")


def _patch_target(monkeypatch: pytest.MonkeyPatch, name: str, fn: str) -> None:
    t = TARGETS[name]
    monkeypatch.setitem(
        TARGETS, name, Target(**{**t.__dict__, "converter": f"{__name__}:{fn}", "modules": (), "int8_modules": ()})
    )


def test_gate_failure_exits_nonzero_and_writes_invalid_bundle(
    run: Callable[..., Result], tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bitdeploy.core.errors import BundleError
    from bitdeploy.runtimes.bundle import load_manifest

    _patch_target(monkeypatch, "onnx", "BrokenConverter")
    out = tmp_path / "D"
    result = run(base_args(ckpt, out, "--target", "onnx", "--precision", "fp16"))
    assert result.exit_code == 1
    assert "failed the accuracy gate" in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.output
    m = manifest(out)
    assert m["valid"] is False and "accuracy gate" in m["invalid_reason"]
    assert m["accuracy"]["passed"] is False and m["accuracy"]["top1_drop_pp"] > 1.0
    with pytest.raises(BundleError, match="marked invalid"):
        load_manifest(out)


def test_int8_without_dataset_is_refused(run: Callable[..., Result], tmp_path: Path) -> None:
    out = tmp_path / "D"
    result = run(["--model", "tiny", "--weights", "none", "--precision", "int8", "--out", str(out)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--dataset" in lines[0] and "int8" in lines[0]
    assert not out.exists()


@pytest.mark.skipif(unavailable_reason(TARGETS["trt"], "fp32") is None, reason="TensorRT and a GPU are present here")
def test_trt_unavailable_fails_fast_before_export(tmp_path: Path) -> None:
    # torch made unimportable: reaching the export would print a different error than the TensorRT one. Without
    # ONNX Runtime there is no ready bundle either (its gate runs the TensorRT-ready ONNX there): one line.
    code = (
        "import sys; sys.modules['torch'] = sys.modules['onnxruntime'] = None; "
        "from bitdeploy.cli import main; main(sys.argv[1:])"
    )
    out = tmp_path / "D"
    proc = subprocess.run(
        [sys.executable, "-c", code, "build", "--model", "m-r50x1", "--target", "trt", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "TensorRT" in lines[0] and 'pip install "bitdeploy[tensorrt]"' in lines[0] and "NVIDIA GPU" in lines[0]
    assert not out.exists()


def test_target_all_continues_past_failure_and_selects_fastest(
    run: Callable[..., Result], tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _patch_target(monkeypatch, "openvino", "FailingConverter")
    # LiteRT's converter takes ~15 s per precision here; its fp16/int8 are covered by tests/converters/test_litert.py
    monkeypatch.setitem(TARGETS, "litert", Target(**{**TARGETS["litert"].__dict__, "precisions": ("fp32",)}))
    out = tmp_path / "all"
    args = base_args(ckpt, out, "--target", "all", "--select", "fastest", "--bench-iterations", "5")
    args.remove("--no-report")
    result = run(args)
    assert result.exit_code == 0, result.output
    table = {
        line.split()[0] + "-" + line.split()[1]: line
        for line in result.output.splitlines()
        if line.split()[:1] in (["onnx"], ["openvino"], ["trt"])
    }
    assert set(table) == {f"{t}-{p}" for t in ("onnx", "openvino", "trt") for p in ("fp32", "fp16", "int8")}
    for p in ("fp32", "fp16", "int8"):
        assert " valid" in table[f"onnx-{p}"]
        assert "failed: simulated converter crash" in table[f"openvino-{p}"]
        assert (out / f"onnx-{p}" / "manifest.json").is_file() and not (out / f"openvino-{p}").exists()
        if deferred_reason(TARGETS["trt"], p) is not None:  # a ready bundle: gated here, engine built on the device
            assert "ready: engine is built on the device" in table[f"trt-{p}"]
            assert (out / f"trt-{p}" / "model.trt.onnx").is_file()
    if unavailable_reason(TARGETS["litert"], "fp32") is None:
        assert any(line.split()[:3] == ["litert", "fp32", "valid"] for line in result.output.splitlines()), (
            result.output
        )
        assert (out / "litert-fp32" / "model.tflite").is_file()
    assert "<- selected" in result.output and re.search(
        r"selected: (onnx|litert)-", result.output
    )  # the valid targets here
    summary = json.loads((out / "report" / "build.json").read_text())
    assert summary["selected"]["name"].startswith(("onnx-", "litert-")) and summary["selected"]["reason"]
    html = (out / "report" / "report.html").read_text()
    assert "onnx-int8" in html and "openvino-fp32" in html
    # Three labelled PyTorch baselines, the speed-up against the fastest, a batch-size sweep per bundle
    assert [b["form"] for b in summary["baseline"]] == ["eager-ws", "eager-folded", "compiled-folded"]
    md = (out / "report" / "report.md").read_text()
    assert "speed-up vs fastest PyTorch" in md and "(fastest PyTorch: the speed-up denominator)" in md
    assert all(f"pytorch-fp32-{form}:tiny@" in md for form in ("eager-ws", "eager-folded", "compiled-folded"))
    assert all(len(r["throughput"]) >= 3 for r in summary["rows"] if r["status"] == "valid")


def test_openvino_int8_accuracy_control_uses_the_validation_split(
    run: Callable[..., Result], tmp_path: Path, ckpt: Path
) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    out = tmp_path / "D"
    # The plumbing is under test (NNCF's own drop check runs against OpenVINO FP32, the gate against PyTorch).
    result = run(
        base_args(
            ckpt, out, "--target", "openvino", "--precision", "int8", "--accuracy-control", "--max-accuracy-drop", "5"
        )
    )
    assert result.exit_code == 0, result.output
    m = manifest(out)
    assert m["valid"] and m["target"]["backend"] == "openvino" and m["model_file"] == "model.xml"
    assert m["target"]["quantization"]["accuracy_control"] is True
    assert m["accuracy"]["samples"] == 120 and m["calibration"]["samples"] == 32


def test_finetune_runs_in_build_and_is_cached(run: Callable[..., Result], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    common = shlex.split(
        f"--model tiny --weights none --dataset digits --resolution {RES} --steps 2 --batch-size 16 --eval-limit 40 "
        "--no-report --max-accuracy-drop 100"
    )
    first = run([*common, "--out", str(tmp_path / "a")], cache)
    assert first.exit_code == 0, first.output
    tuned = manifest(tmp_path / "a")["model"]["weights"]["fine_tuned"]
    assert tuned["dataset"] == "digits" and tuned["steps"] == 2
    second = run([*common, "--out", str(tmp_path / "b")], cache)
    assert second.exit_code == 0 and "cache hit: fine-tune" in second.output


def test_option_errors_are_one_line(run: Callable[..., Result], tmp_path: Path) -> None:
    cases = [
        (["--target", "onnx", "--accuracy-control", "--dataset", "digits"], "--accuracy-control"),
        (
            ["--target", "onnx", "--calib-method", "histogram", "--dataset", "digits", "--precision", "int8"],
            "--calib-method",
        ),
        (["--steps", "5"], "--dataset"),
        (["--target", "openvino", "--inference-precision", "bf16"], "--inference-precision bf16 applies to"),
        (["--select", "fastest"], "--select"),
    ]
    for extra, needle in cases:
        result = run(["--model", "tiny", "--weights", "none", "--out", str(tmp_path / "x"), *extra])
        assert result.exit_code == 1, (extra, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0], result.output
    bad = run(["--model", "tiny", "--precision", "int4", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2


def test_cache_dir_default_follows_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bitdeploy.core.cache import default_root

    monkeypatch.setenv("BITDEPLOY_CACHE", str(tmp_path / "c"))
    assert default_root() == tmp_path / "c" / "stages"
    monkeypatch.delenv("BITDEPLOY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_root() == tmp_path / "x" / "bitdeploy" / "stages"
    assert os.fspath(default_root()).endswith("stages")


def test_stage_cache_keys_hits_and_interrupted_writes(tmp_path: Path) -> None:
    from bitdeploy.core.cache import StageCache, stage_key

    f = tmp_path / "input.bin"
    f.write_bytes(b"abc")
    k1 = stage_key("export", {"model": f}, {"resolution": 32})
    assert k1 == stage_key("export", {"model": f}, {"resolution": 32})
    assert k1 != stage_key("export", {"model": f}, {"resolution": 48})
    assert k1 != stage_key("calibration", {"model": f}, {"resolution": 32})
    f.write_bytes(b"abd")
    assert k1 != stage_key("export", {"model": f}, {"resolution": 32})

    calls: list[Path] = []

    def step(d: Path) -> dict[str, Any]:
        calls.append(d)
        (d / "out.txt").write_text("x")
        return {"n": len(calls)}

    cache = StageCache(tmp_path / "c")
    d1, _meta1, hit1 = cache.run("s", "k" * 64, step)
    d2, meta2, hit2 = cache.run("s", "k" * 64, step)
    assert (hit1, hit2) == (False, True) and d1 == d2 and meta2 == {"n": 1} and len(calls) == 1
    # A directory without stage.json (a crash mid-write) is not a hit and is replaced.
    broken = cache.path("s", "j" * 64)
    broken.mkdir(parents=True)
    (broken / "partial").write_text("?")
    d3, _meta, hit3 = cache.run("s", "j" * 64, step)
    assert not hit3 and not (d3 / "partial").exists() and (d3 / "out.txt").is_file()

    def failing(d: Path) -> dict[str, Any]:
        (d / "half").write_text("?")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.run("s", "f" * 64, failing)
    assert not cache.path("s", "f" * 64).exists()
    off = StageCache(tmp_path / "never", enabled=False)
    off.run("s", "k" * 64, step)
    off.run("s", "k" * 64, step)
    assert len(calls) == 4 and not (tmp_path / "never").exists()
    off.close()


def test_debug_shows_the_cause_of_a_conversion_failure(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A converter's ConversionError keeps its cause: one line by default, the chained traceback under --debug."""
    from bitdeploy.converters import ort_convert
    from bitdeploy.core.errors import ConversionError

    def broken(*args: Any, **kwargs: Any) -> Any:
        try:
            raise ValueError("the engine's own reason 4711")
        except ValueError as exc:
            raise ConversionError("ONNX Runtime conversion failed (the engine's own reason 4711)") from exc

    monkeypatch.setattr(ort_convert.OrtConverter, "run", broken)
    args = ["build", "--model", "tiny", "--weights", str(ckpt), "--target", "onnx", "--no-report", "--no-cache"]
    for debug in (False, True):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main([*(["--debug"] if debug else []), *args, "--out", str(tmp_path / f"b{debug}")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and "error: onnx-fp32: ONNX Runtime conversion failed" in err
        assert ("ValueError: the engine's own reason 4711" in err) is debug and ("direct cause" in err) is debug
        assert not (tmp_path / f"b{debug}").exists()


@pytest.mark.parametrize("resumable", [False, True])
def test_two_builds_needing_the_same_step_run_it_once(tmp_path: Path, resumable: bool) -> None:
    """The step's lock: a second build (here a thread with its own StageCache) waits and takes the first one's result."""
    import threading
    import time

    from bitdeploy.core.cache import StageCache

    started, calls, logs = threading.Event(), [], []

    def step(d: Path) -> dict[str, Any]:
        calls.append(d)
        started.set()
        time.sleep(0.4)
        (d / "out.txt").write_text(str(len(calls)))
        return {"n": len(calls)}

    results: list[tuple[Path, dict[str, Any], bool]] = []

    def build(first: bool) -> None:
        if not first:
            started.wait(5)
        results.append(
            StageCache(tmp_path / "c", log=logs.append).run(
                "finetune", "k" * 64, step, what="fine-tune", resumable=resumable
            )
        )

    threads = [threading.Thread(target=build, args=(i == 0,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) == 1 and len(results) == 2
    assert {r[2] for r in results} == {False, True} and results[0][0] == results[1][0] and results[1][1] == {"n": 1}
    assert (results[0][0] / "out.txt").read_text() == "1" and any(
        line.startswith("waiting: another build is running the fine-tune") for line in logs
    )
