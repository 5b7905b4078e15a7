"""The runtime benchmark scripts run end to end (small counts) and print what they claim to measure."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from bitdeploy.runtimes import load
from tests.experiments import load as load_script

runtime_overhead = load_script("runtime_overhead")
serve_load = load_script("serve_load")


def test_runtime_overhead_script(ort_bundle: Path, ov_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = runtime_overhead.main(
        [str(ort_bundle), str(ov_bundle), "--rounds", "4", "--block", "5", "--warmup", "5", "--predict-iters", "5"]
    )
    out = capsys.readouterr().out
    assert code == 0
    rows = [line for line in out.splitlines() if re.search(r"[+-]\d+\.\d\d%", line)]
    assert len(rows) == 2
    assert "onnxruntime" in rows[0] and "session.run" in rows[0]
    assert "openvino" in rows[1] and "infer_request.infer" in rows[1]
    assert "median of 20 calls each, interleaved" in out


def test_overhead_limit_fails_when_exceeded(ort_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = runtime_overhead.main(
        [
            str(ort_bundle),
            "--rounds",
            "2",
            "--block",
            "3",
            "--warmup",
            "2",
            "--predict-iters",
            "2",
            "--max-overhead",
            "-100",
        ]
    )
    assert code == 1 and "FAIL" in capsys.readouterr().err


def test_raw_call_is_the_same_model(ov_bundle: Path, tiny_model: dict) -> None:
    with load(ov_bundle) as model:
        name, raw = runtime_overhead.raw_call(model)
        np.testing.assert_allclose(raw(tiny_model["x"]), model.infer(tiny_model["x"]), atol=1e-6)
    assert name == "infer_request.infer"


def test_interleaving_alternates_order() -> None:
    calls: list[str] = []
    ta, tb = runtime_overhead.interleaved(lambda: calls.append("a"), lambda: calls.append("b"), rounds=3, block=2)
    assert calls == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"] and len(ta) == len(tb) == 6


def test_serve_load_script(ort_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = serve_load.main([str(ort_bundle), "--clients", "4", "--requests", "60", "--malformed", "17"])
    out = capsys.readouterr().out
    assert code == 0 and out.strip().endswith("PASS"), out
    assert "60/60 ok, 0 error(s)" in out and re.search(r"p50 \d+\.\d\d\s+p90 \d+\.\d\d\s+p99 \d+\.\d\d", out)
    assert "17 sent, 0 unexpected" in out and "server up" in out
