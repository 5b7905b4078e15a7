"""`--int8-fallback qat|auto`: the quantization-aware fine-tune in a build, on the tiny checkpoint (`ckpt`).

The tiny model's head is a ridge fit on random features, so its top-2 logits sit close and an agreement gate of 100 %
fails uniform INT8; the tests check what the escalation does (one fine-tune and one Q/DQ model per build, shared by
the engines, recorded in every manifest, gated on images it never trained on), not whether a 3-step fine-tune
rescues this model. Whether it passes is measured by benchmarks/experiments/qat_vs_ptq.py (docs/measurements.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from tests.clirun import run_cli
from tests.pipeline.tiny_args import base_args

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

QAT_STEPS = "3"


def qat_args(ckpt: Path, out: Path, cache: Path, *more: str) -> list[str]:
    gate = ("--min-agreement", "100")
    return [
        "build",
        *base_args(ckpt, out, "--cache-dir", str(cache), "--qat-steps", QAT_STEPS, *more, gate=gate),
    ]


def manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def qat_build(tmp_path_factory: pytest.TempPathFactory, ckpt: Path) -> tuple[Path, Path, int, str, str]:
    """One `--int8-fallback qat` build of ONNX Runtime and OpenVINO INT8: (out, cache, exit code, stdout, stderr)."""
    from bitdeploy.cli import main

    base = tmp_path_factory.mktemp("qat")
    out, cache = base / "out", base / "cache"
    args = qat_args(ckpt, out, cache, "--target", "onnx,openvino", "--precision", "int8", "--int8-fallback", "qat")
    stdout, stderr = io.StringIO(), io.StringIO()  # run_cli takes capsys, which a module fixture cannot: by hand
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main(args)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return out, cache, code, stdout.getvalue(), stderr.getvalue()


def test_qat_makes_one_qdq_model_that_both_engines_run(qat_build: tuple[Path, Path, int, str, str]) -> None:
    out, cache, _code, _stdout, err = qat_build
    assert "Traceback" not in err
    qdq = list((cache / "qat-qdq").glob("*/model.qat.onnx"))
    assert len(qdq) == 1, "one Q/DQ model per build, shared by the engines"
    assert len(list((cache / "qat").glob("*/qat_params.json"))) == 1, "one fine-tune per build"
    ort_bundle, ov_bundle = out / "onnx-int8", out / "openvino-int8"
    assert sha(ort_bundle / "model.onnx") == sha(qdq[0]), "ONNX Runtime runs the Q/DQ model as written"
    for bundle in (ort_bundle, ov_bundle):
        m = manifest(bundle)
        q = m["target"]["quantization"]
        assert q["method"] == "qat" and q["float_layers"] == ["head.conv"]
        record = q["qat"]
        assert record["steps"] == int(QAT_STEPS) and record["split"] == "train" and record["train_seconds"] > 0
        assert "KL divergence" in record["loss"] and record["teacher"]
        assert m["valid"] == m["accuracy"]["passed"]
        assert m["accuracy"]["split"] == "val", "--int8-fallback qat: gated on the whole validation split"
    ov_xml = (ov_bundle / "model.xml").read_text()
    # every quantized conv's output and input as a FakeQuantize (conv1 and the projection read one tensor whose two
    # equal pairs OpenVINO may merge), and no calibration ran: the IR is the Q/DQ model's
    assert ov_xml.count('type="FakeQuantize"') >= 17 + 13


def test_the_table_marks_qat_rows_and_says_how_they_did(qat_build: tuple[Path, Path, int, str, str]) -> None:
    _out, _cache, code, stdout, _err = qat_build
    rows = [x for x in stdout.splitlines() if x.startswith(("onnx ", "openvino "))]
    assert len(rows) == 2 and all("int8 (qat)" in r for r in rows)
    lines = [x for x in stdout.splitlines() if x.startswith("int8 qat: ")]
    assert len(lines) == 2
    assert all(f"quantization-aware fine-tune ({QAT_STEPS} steps" in x and "never trained on" in x for x in lines)
    passed = ["passes the gate" in x for x in lines]
    assert code == (0 if all(passed) else 1)


def test_qat_is_cached_and_a_target_without_a_route_says_so(
    qat_build: tuple[Path, Path, int, str, str],
    ckpt: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bitdeploy.converters.base import Converter
    from bitdeploy.converters.openvino_convert import OpenVinoConverter

    _out, cache, *_ = qat_build
    monkeypatch.setattr(OpenVinoConverter, "from_qat", Converter.from_qat)  # as a target with no route
    args = qat_args(ckpt, tmp_path / "again", cache, "--target", "openvino", "--precision", "int8")
    code, stdout, err = run_cli([*args, "--int8-fallback", "qat"], capsys)
    assert code == 1 and "Traceback" not in err
    assert "OpenVINO has no route for a quantization-aware fine-tune" in stdout
    assert "cache hit: quantization-aware fine-tune" not in err  # no route: nothing fine-tuned
