"""`--target trt` on a host without TensorRT or a GPU: ready bundles (the TensorRT-ready ONNX, gated through ONNX
Runtime on the CPU), their manifest transitions, `inspect`, `pack`, `export-repo`, and `bitdeploy engine`: its one
line without TensorRT, and its build, self-test and atomic reseal through the fake TensorRT of
tests/runtimes/fake_tensorrt.py (the real engine build needs TensorRT and an NVIDIA GPU: tests/runtimes/test_trt.py).
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from bitdeploy.core.targets import TARGETS, unavailable_reason
from tests.clirun import run_cli
from tests.pipeline.tiny_args import base_args

pytestmark = pytest.mark.skipif(
    unavailable_reason(TARGETS["trt"], "fp16") is None, reason="TensorRT and a GPU are here: the build makes engines"
)


@pytest.fixture(scope="module")
def ready(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One build of the tiny model: ONNX Runtime FP32 beside TensorRT FP16 and INT8, selecting the fastest."""
    pytest.importorskip("onnxruntime")
    from bitdeploy.cli import main

    out = tmp_path_factory.mktemp("trt") / "out"
    args = [
        a for a in base_args(ckpt, out, "--target", "onnx,trt", "--precision", "fp32,fp16,int8") if a != "--no-report"
    ]
    quick = ["--no-baseline", "--bench-iterations", "20", "--no-cache", "--select", "fastest"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        try:
            main(["build", *args, *quick])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    assert code == 0, stderr.getvalue()[-3000:]
    return out, stdout.getvalue()


def test_trt_rows_are_ready_bundles_gated_on_their_onnx(ready: tuple[Path, str]) -> None:
    from bitdeploy.runtimes.bundle import read_manifest, verify_files

    out, stdout = ready
    for precision in ("fp16", "int8"):
        bundle = out / f"trt-{precision}"
        m = read_manifest(bundle)
        verify_files(bundle, m)
        assert not m.valid and m.target.engine_pending and "bitdeploy engine" in (m.invalid_reason or "")
        assert m.model_file == "model.trt.onnx" and "model.plan" not in m.files
        assert m.gate is not None and m.gate.passed and m.gate.evaluated_with == "model.trt.onnx on ONNX Runtime CPU"
        assert m.target.get("profile") == {"min": 1, "opt": 1, "max": 32} and m.self_test is not None
        line = next(x for x in stdout.splitlines() if x.split()[:2] == ["trt", precision])
        assert "ready: engine is built on the device" in line and line.split()[-2:] == ["-", "-"]  # no latency
    int8 = read_manifest(out / "trt-int8")
    assert int8.target.quantization is not None and int8.target.get("onnx", {}).get("format") == "qdq"
    assert (
        "selected: onnx-" in stdout
        and "not timed here (engine built on the device): trt-fp32, trt-fp16, trt-int8" in stdout
    ), stdout
    assert "ready for the device" in stdout.splitlines()[-1]
    report = (out / "report" / "report.md").read_text()
    assert "Ready for the device" in report and "trt-int8" in report.split("Ready for the device")[1]


def test_a_ready_bundle_says_how_to_finish_it(ready: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = ready
    bundle = out / "trt-int8"
    code, stdout, _ = run_cli(["inspect", str(bundle)], capsys)
    assert code == 0 and "ready for the device" in stdout and "pending: build it on the device" in stdout
    code, _, err = run_cli(["engine", str(bundle)], capsys)
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err and "TensorRT" in errors[0]
    for command in (
        ["predict", str(bundle), "x.png"],
        ["export-repo", str(bundle), "--format", "triton", "--out", str(out / "repo")],
    ):
        code, _, err = run_cli(command, capsys)
        assert code == 1 and f"run `bitdeploy engine {bundle}` on the device" in err, err
    assert not (out / "repo").exists()


def _passing_self_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake engine computes a fixed function of a (N, 3, 4, 4) input, not the model: the reseal's valid branch
    is reached by a self-test that passes (its failing branch runs the real self-test below)."""
    from bitdeploy.runtimes.bundle import selftest
    from bitdeploy.runtimes.bundle.selftest import SelfTestResult

    def run(infer: Any, bundle_dir: Path, manifest: Any, batch_size: int = 8) -> SelfTestResult:
        return SelfTestResult(True, 16, 1.0, 0.9, 0.0, 0.1, None, None, [])

    monkeypatch.setattr(selftest, "run", run)


def test_engine_builds_self_tests_and_reseals(
    ready: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bitdeploy.runtimes.bundle import load_manifest, read_manifest, verify_files
    from tests.runtimes.fake_tensorrt import install

    out, _ = ready
    pack = tmp_path / "trt-int8.bitpack"
    code, _, err = run_cli(["pack", str(out / "trt-int8"), str(pack)], capsys)
    assert code == 0, err
    int8 = {"Layers": [{"LayerType": "CaskConvolution", "Inputs": [{"Format/Datatype": "Channel major INT8 format"}]}]}
    trt, _ = install(monkeypatch, layer_json=int8)
    monkeypatch.setattr("bitdeploy.runtimes.engines.base.backend_available", lambda name: True)  # the fake's SDK

    # the real self-test: the fake engine does not compute the model, so the bundle is resealed invalid, saying why
    code, _, err = run_cli(["engine", str(pack), "--no-timing-cache"], capsys)
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "bundle resealed invalid" in errors[0] and "self-test on" in errors[0]
    unpacked = tmp_path / "trt-int8"
    failed = read_manifest(unpacked)
    verify_files(unpacked, failed)  # resealed: every file, the new plan included, under the checksums
    assert not failed.valid and failed.model_file == "model.plan" and not failed.target.engine_pending
    assert Path(trt.log["parsed"]).name == "model.trt.onnx" and trt.log["profile"][2][0] == 1  # recorded opt batch

    _passing_self_test(monkeypatch)
    code, stdout, err = run_cli(["engine", str(unpacked), "--no-timing-cache"], capsys)
    assert code == 0 and "bundle resealed valid" in stdout, err
    m = load_manifest(unpacked)  # valid now, checksums verified
    assert m.target.get("tensorrt_version") == "10.9.0" and m.target.get("gpu_name") == "NVIDIA Fake GPU"
    engine = m.target.get("engine")
    assert engine["status"] == "built" and engine["where"] == "on the device" and engine["self_test"]["passed"]
    assert m.gate is not None and m.gate.evaluated_with == "model.trt.onnx on ONNX Runtime CPU"  # kept from the build
    code, stdout, _ = run_cli(["inspect", str(unpacked)], capsys)
    assert code == 0 and "built on the device with TensorRT 10.9.0 on NVIDIA Fake GPU" in stdout
    code, _, err = run_cli(
        ["export-repo", str(unpacked), "--format", "triton", "--out", str(tmp_path / "repo")], capsys
    )
    assert code == 0, err
    config = next((tmp_path / "repo").rglob("config.pbtxt")).read_text()
    assert 'platform: "tensorrt_plan"' in config and next((tmp_path / "repo").rglob("model.plan")).is_file()
    assert json.loads((unpacked / "manifest.json").read_text())["valid"] is True
