"""stdout carries bitdeploy's results only: a library's progress bars and log lines go to stderr."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from bitdeploy.core.stdio import stdout_to_stderr


def test_prints_and_stdout_log_handlers_go_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("bitdeploy-test-chatty")
    handler = logging.StreamHandler(sys.stdout)  # as NNCF's logger holds stdout from import time
    logger.addHandler(handler)
    try:
        with stdout_to_stderr("bitdeploy-test-chatty"):
            print("progress 50%")
            logger.warning("a log line")
        print("the table")
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
    out, err = capsys.readouterr()
    assert out == "the table\nafter\n"  # restored afterwards
    assert err == "progress 50%\na log line\n"


NNCF_QUANTIZE = """
import numpy as np, openvino as ov, nncf
from openvino import opset13 as ops
from bitdeploy.core.stdio import stdout_to_stderr
x = ops.parameter([1, 3, 8, 8], np.float32, name="x")
w = ops.constant(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32))
model = ov.Model([ops.relu(ops.convolution(x, w, [1, 1], [1, 1], [1, 1], [1, 1]))], [x])
data = [np.random.default_rng(i).standard_normal((1, 3, 8, 8)).astype(np.float32) for i in range(4)]
with stdout_to_stderr("nncf"):
    nncf.quantize(model, nncf.Dataset(data), subset_size=4)
print("table")
"""


def test_nncf_progress_bar_stays_out_of_stdout() -> None:
    pytest.importorskip("nncf")
    pytest.importorskip("openvino")
    proc = subprocess.run([sys.executable, "-c", NNCF_QUANTIZE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert proc.stdout == "table\n"
    assert "Statistics collection" in proc.stderr  # NNCF's bar, where it belongs (it printed to stdout before)
