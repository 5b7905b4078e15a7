"""Every converter runs the same conformance template (tests/converters/converter_conformance.py) on the untrained
tiny BiT at 32 px: ONNX Runtime, OpenVINO and LiteRT where their build extras are installed; TensorRT, like any
target whose build cannot run here, skips with its record's reason (no NVIDIA GPU, tensorrt not installed)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.converters.base import Artifact, Converter
from bitdeploy.core import targets
from tests.converters.converter_conformance import ConverterCase, ConverterConformance, watched_convert


class TestOnnxRuntimeConverter(ConverterConformance):
    covers = "onnx"


class TestOpenVinoConverter(ConverterConformance):
    covers = "openvino"


class TestLiteRtConverter(ConverterConformance):
    covers = "litert"


class TestTensorRTConverter(ConverterConformance):
    covers = "trt"


# --- the template's watcher sees every write outside the work dir ------------------------------------------------


class LeakyConverter(Converter):
    """A converter that breaks the contract three ways: beside its input, in the working directory, in $TMPDIR."""

    def run(self, onnx_fp32: Path, work_dir: Path, calibration: Any, float_layers: tuple[str, ...]) -> Artifact:
        shutil.copyfile(onnx_fp32, work_dir / "model.onnx")
        onnx_fp32.with_suffix(".onnx.bak").write_bytes(b"x")
        Path("scratch.txt").write_text("x")
        tempfile.mkstemp(suffix=".leftover")
        return Artifact(files=["model.onnx"], model_file="model.onnx", target=self.target_info(self.precision, None))


class TidyConverter(Converter):
    """A converter that keeps the contract: its temporaries are gone, its files are in the work dir."""

    def run(self, onnx_fp32: Path, work_dir: Path, calibration: Any, float_layers: tuple[str, ...]) -> Artifact:
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(onnx_fp32, Path(tmp) / "x.onnx")
            shutil.copyfile(Path(tmp) / "x.onnx", work_dir / "model.onnx")
        return Artifact(files=["model.onnx"], model_file="model.onnx", target=self.target_info(self.precision, None))


def _case(converter: str, tmp_path: Path) -> ConverterCase:
    onnx = tmp_path / "given" / "m.onnx"
    onnx.parent.mkdir()
    onnx.write_bytes(b"onnx")
    record = replace(targets.onnx_evaluator(), converter=f"{__name__}:{converter}")
    return ConverterCase(record, onnx, np.zeros((1, 3, 4, 4), np.float32))


def test_the_watcher_sees_writes_beside_the_input_in_the_cwd_and_left_in_tmp(tmp_path: Path) -> None:
    done = watched_convert(_case("LeakyConverter", tmp_path), tmp_path / "sandbox", "fp32")
    assert [c for c in done.outside if not c.startswith("~")] == [
        "+sandbox/cwd/scratch.txt",
        "+sandbox/input/m.onnx.bak",
        *[c for c in done.outside if c.startswith("+sandbox/tmp/") and c.endswith(".leftover")],
    ]
    assert any(c.endswith(".leftover") for c in done.outside)
    assert (done.work / "model.onnx").is_file()


def test_the_watcher_passes_a_tidy_converter(tmp_path: Path) -> None:
    done = watched_convert(_case("TidyConverter", tmp_path), tmp_path / "sandbox", "fp32")
    assert [c for c in done.outside if not c.startswith("~")] == [] and done.artifact.files == ["model.onnx"]
