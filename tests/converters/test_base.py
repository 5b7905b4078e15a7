"""The converter contract: frozen typed options, each target's own options class (flags and hooks), the shared
precision/calibration guard, and the artifact's cache round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitdeploy.converters.base import (
    Artifact,
    Converter,
    ConvertOptions,
    RowInputs,
    TargetOptions,
    bind,
    check_request,
    options_class,
)
from bitdeploy.converters.calibration import CalibrationData, ValidationData
from bitdeploy.converters.openvino_convert import OpenVinoOptions
from bitdeploy.converters.ort_convert import OrtOptions
from bitdeploy.converters.trt_engine import TensorRTOptions
from bitdeploy.core.errors import BitdeployError, ConversionError
from bitdeploy.core.targets import TARGETS, get_target
from bitdeploy.runtimes.bundle.manifest import Quantization, TargetInfo


def test_convert_options_are_frozen() -> None:
    options = ConvertOptions(device="cpu", threads=2, extras=OrtOptions(int8_scheme="s8s8"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.device = "cuda"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.extras_for(OrtOptions).int8_scheme = "u8s8"  # type: ignore[misc]
    assert dataclasses.replace(options, device="cuda").device == "cuda" and options.device == "cpu"


def test_extras_for_returns_the_targets_own_or_its_defaults() -> None:
    trt = TensorRTOptions(batch="1,8,32", workspace_gb=2.0)
    options = ConvertOptions(cache_dir=Path("/tmp/c"), extras=trt)
    assert options.extras_for(TensorRTOptions) is trt
    # Another target's extras, or none at all: that target's defaults, never the foreign object.
    assert options.extras_for(OrtOptions) == OrtOptions() and OrtOptions().int8_scheme == "auto"
    assert options.extras_for(OpenVinoOptions) == OpenVinoOptions()
    assert OpenVinoOptions().validation is None and OpenVinoOptions().accuracy_control is False
    defaults = ConvertOptions()
    assert (defaults.device, defaults.calib_method, defaults.cache, defaults.extras) == (None, None, True, None)


@pytest.mark.parametrize("name", [n for n in TARGETS if TARGETS[n].options])
def test_every_options_class_is_a_frozen_target_options_with_flags(name: str) -> None:
    cls = options_class(TARGETS[name])
    assert cls is not None and issubclass(cls, TargetOptions) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    flags = cls.flags()
    assert flags and all(f.flag.startswith("--") and f.help for _, f, _ in flags)
    assert cls().given() == []  # the defaults are what "not given" means


def test_openvino_options_bind_to_the_row() -> None:
    validation = ValidationData.from_arrays(np.zeros((2, 3, 4, 4), np.float32), np.zeros(2, np.int64))
    row = RowInputs(max_accuracy_drop=0.5, validation=validation, dataset="digits")
    own = OpenVinoOptions(inference_precision="bf16", accuracy_control=True)
    assert [f.flag for _, f, _ in own.given()] == ["--inference-precision", "--accuracy-control"]
    fp32 = own.for_row("fp32", row)  # fp32 computes in f32 and is never accuracy-controlled
    assert (fp32.inference_precision, fp32.accuracy_control, fp32.validation) == ("f32", False, None)
    int8 = own.for_row("int8", row)
    assert (int8.inference_precision, int8.accuracy_control, int8.max_accuracy_drop) == ("bf16", True, 0.5)
    assert int8.validation is validation and int8.cache_key()["validation"] == validation.sha256
    assert own.needs_validation(["int8"]) and not own.needs_validation(["fp16"])
    assert OpenVinoOptions().gate_hint("int8") == "try --accuracy-control" and own.gate_hint("int8") is None
    with pytest.raises(BitdeployError, match="--accuracy-control needs --dataset"):
        own.validate(["int8"], None)


def test_tensorrt_options_refuse_a_bad_profile_before_any_work() -> None:
    TensorRTOptions(batch="1,8,32").validate(["fp16"], None)
    with pytest.raises(ConversionError, match="--batch needs 1 <= MIN <= OPT <= MAX"):
        TensorRTOptions(batch="8,4,2").validate(["fp16"], None)


def test_one_guard_for_precision_and_calibration() -> None:
    calibration = CalibrationData(np.zeros((2, 3, 4, 4), np.float32), "test", 0, "0" * 64)
    check_request("X", "int8", calibration)
    with pytest.raises(ConversionError, match=r"^X precision must be fp32, fp16 or int8, got 'bf16'$"):
        check_request("X", "bf16", None)
    with pytest.raises(ConversionError, match=r"int8 needs calibration images; pass --dataset"):
        check_request("X", "int8", None)


@pytest.mark.parametrize("name", list(TARGETS))
def test_bind_gives_the_records_converter_bound_to_one_row(name: str) -> None:
    options = ConvertOptions(threads=1)
    converter = bind(name, "fp16", options)
    assert isinstance(converter, Converter) and type(converter).__name__ == TARGETS[name].converter.partition(":")[2]
    assert (converter.target, converter.precision, converter.options) == (TARGETS[name], "fp16", options)
    assert bind(TARGETS[name], "fp32").options == ConvertOptions()  # a record binds as well as its name
    info = converter.target_info("fp16 + fp32", "cpu", details={"k": 1})
    assert (info.backend, info.precision, info.precision_used, info.device) == (
        TARGETS[name].backend,
        "fp16",
        "fp16 + fp32",
        "cpu",
    )
    assert dict(info.details) == {"k": 1} and info.quantization is None


def test_convert_runs_the_shared_guard_before_the_targets_run(tmp_path: Path) -> None:
    ran: list[tuple[Path, Path, tuple[str, ...]]] = []

    class Recording(Converter):
        def run(
            self, onnx_fp32: Path, work_dir: Path, calibration: CalibrationData | None, float_layers: tuple[str, ...]
        ) -> Artifact:
            ran.append((onnx_fp32, work_dir, float_layers))
            return Artifact(files=["m"], model_file="m", target=self.target_info("fp32", None))

    converter = Recording(get_target("onnx"), "int8")
    with pytest.raises(ConversionError, match="needs calibration"):
        converter.convert(tmp_path / "m.onnx", tmp_path)
    assert ran == []
    text_paths: Any = (str(tmp_path / "m.onnx"), str(tmp_path))  # paths given as text are made Paths
    art = Recording(get_target("onnx"), "fp32").convert(*text_paths, None, ("a",))
    assert ran == [(tmp_path / "m.onnx", tmp_path, ("a",))] and art.target.precision == "fp32"
    with pytest.raises(NotImplementedError):
        Converter(get_target("onnx"), "fp32").convert(tmp_path / "m.onnx", tmp_path)
    with pytest.raises(TypeError, match=r"not a bitdeploy\.converters\.base\.Converter"):
        bind(dataclasses.replace(get_target("onnx"), converter="bitdeploy.converters.base:check_request"), "fp32")


def test_artifact_round_trips_through_the_cache_as_json() -> None:
    target = TargetInfo("onnxruntime", "int8", "int8 Conv", "cpu", Quantization("minmax", 8, {"scheme": "s8s8"}))
    art = Artifact(files=["model.onnx"], model_file="model.onnx", target=target, notes=["n"])
    assert Artifact.from_dict(art.to_dict()) == art and art.backend == "onnxruntime"
    old = {
        "files": ["model.onnx"],
        "model_file": "model.onnx",
        "backend": "onnxruntime",
        "target": {"precision": "fp32"},
    }
    assert Artifact.from_dict(old).backend == "onnxruntime"  # cached before the backend moved into the target
    with pytest.raises(ValueError, match="unknown backend"):
        Artifact(files=["m"], model_file="m", target=TargetInfo("nope"))
