"""The typed manifest: versions, field types, unknown fields, one writer, and v1 bundles of the previous release."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitdeploy.core.errors import BundleError
from bitdeploy.core.fsutil import sha256_file
from bitdeploy.runtimes import load
from bitdeploy.runtimes.bundle import MANIFEST, bundle_writer, load_manifest, read_manifest, write_manifest
from bitdeploy.runtimes.bundle.manifest import (
    GateResult,
    InputSpec,
    Manifest,
    Quantization,
    SelfTestSpec,
    TargetInfo,
    parse_version,
)

from .conftest import RES, make_manifest

GATE = GateResult(
    kind="accuracy",
    passed=True,
    samples=120,
    agreement=0.99,
    max_abs_logit_diff=0.2,
    mean_abs_logit_diff=0.01,
    top1=0.9,
    reference_top1=0.91,
    top1_drop_pp=1.0,
    max_accuracy_drop_pp=1.0,
    dataset="digits",
    split="val",
    evaluated_with="onnxruntime (cpu)",
)


def _bundle(tmp_path: Path, manifest: Manifest | None = None) -> Path:
    with bundle_writer(tmp_path / "b") as tmp:
        (tmp / "model.onnx").write_bytes(b"onnx")
        write_manifest(tmp, manifest or make_manifest("onnxruntime", "model.onnx", "cpu", "fp32"), ["model.onnx"])
    return tmp_path / "b"


def _set(bundle: Path, **fields: object) -> None:
    data = json.loads((bundle / MANIFEST).read_text())
    data.update(fields)
    (bundle / MANIFEST).write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        (1, (1, 0)),
        ("1", (1, 0)),
        ("1.7", (1, 7)),
        ("2.0", (2, 0)),
        ("x", None),
        (True, None),
        (None, None),
        ("1.x", None),
    ],
)
def test_parse_version(raw: object, parsed: tuple[int, int] | None) -> None:
    assert parse_version(raw) == parsed


def test_newer_minor_is_read_and_unknown_fields_kept(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    _set(bundle, format_version="1.9", added_in_1_9={"x": 1})
    m = read_manifest(bundle)
    assert m.version == (1, 9) and m.extra == {"added_in_1_9": {"x": 1}}
    assert m.to_dict()["added_in_1_9"] == {"x": 1} and m.to_dict()["format_version"] == "1.9"


@pytest.mark.parametrize("version", [2, "2.0", "0.9", "one", None])
def test_unknown_major_is_refused(tmp_path: Path, version: object) -> None:
    bundle = _bundle(tmp_path)
    _set(bundle, format_version=version)
    with pytest.raises(BundleError, match="unknown bundle format version") as info:
        read_manifest(bundle)
    assert "\n" not in str(info.value)


def test_what_is_written_reads_back_as_the_same_record(tmp_path: Path) -> None:
    quant = Quantization("minmax", 32, {"scheme": "u8s8-7bit"})
    spec = SelfTestSpec(images=8, min_agreement=0.875, max_rel_error=1e-3, measured_agreement=1.0, labelled=True)
    written = make_manifest(
        "onnxruntime",
        "model.onnx",
        "cpu",
        "int8",
        gate=GATE,
        self_test=spec,
        target=TargetInfo("onnxruntime", "int8", "int8 Conv", "cpu", quant, {"fp16": None}),
    )
    m = read_manifest(_bundle(tmp_path, written))
    assert m == replace(written, files=m.files) and set(m.files) == {"model.onnx"}
    assert m.accuracy == GATE and m.gate is not None and m.gate.is_accuracy and m.num_classes == 10
    raw = json.loads((tmp_path / "b" / MANIFEST).read_text())
    assert raw["accuracy"]["top1"] == 0.9 and raw["validation"] is None  # the gate's kind picks the JSON field
    assert raw["target"]["quantization"] == {"method": "minmax", "samples": 32, "scheme": "u8s8-7bit"}
    assert not isinstance(m, Mapping)  # no raw-mapping view: readers use the fields


def test_a_validation_gate_is_written_under_validation(tmp_path: Path) -> None:
    gate = GateResult("validation", True, 32, 1.0, 1e-5, 1e-6, inputs="32 x uniform[-1, 1], seed 0", tolerance=1e-3)
    m = read_manifest(_bundle(tmp_path, make_manifest("onnxruntime", "model.onnx", "cpu", "fp32", gate=gate)))
    raw = json.loads((tmp_path / "b" / MANIFEST).read_text())
    assert raw["accuracy"] is None and raw["validation"]["tolerance"] == 1e-3
    assert m.gate == gate and m.accuracy is None


def test_target_details_hold_backend_specific_fields() -> None:
    t = TargetInfo.from_dict(
        {"backend": "tensorrt", "precision": "int8", "tensorrt_version": "10.3", "profile": {"max": 8}}
    )
    assert t.get("tensorrt_version") == "10.3" and t.get("profile") == {"max": 8} and t.get("missing", 1) == 1
    assert t.to_dict() == {
        "backend": "tensorrt",
        "precision": "int8",
        "tensorrt_version": "10.3",
        "profile": {"max": 8},
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"target": TargetInfo(backend=3)},  # type: ignore[arg-type]
        {"input": InputSpec(resize=("32", "32"))},  # type: ignore[arg-type]
        {"self_test": SelfTestSpec(images="8", min_agreement=1.0, max_rel_error=0.0)},  # type: ignore[arg-type]
    ],
)
def test_a_field_of_the_wrong_type_fails_the_write_and_leaves_nothing(tmp_path: Path, bad: dict[str, Any]) -> None:
    with pytest.raises(BundleError, match="must be") as info, bundle_writer(tmp_path / "b") as tmp:
        (tmp / "model.onnx").write_bytes(b"onnx")
        write_manifest(tmp, make_manifest("onnxruntime", "model.onnx", "cpu", "fp32", **bad), ["model.onnx"])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("target", {"backend": 3}, r"target\.backend must be a string"),
        ("target", ["onnxruntime"], "field 'target' must be an object"),
        ("input", "32x32", "field 'input' must be an object"),
        ("input", {"resize": [32]}, r"input\.resize must be \[height, width\]"),
        ("self_test", 3, "field 'self_test' must be an object"),
        ("accuracy", {"top1": "high"}, r"accuracy\.top1 must be a number"),
        ("labels", {"a": 1}, "labels and notes must be lists"),
    ],
)
def test_a_field_of_the_wrong_type_is_refused_at_read(tmp_path: Path, field: str, value: object, message: str) -> None:
    bundle = _bundle(tmp_path)
    _set(bundle, **{field: value})
    with pytest.raises(BundleError, match=message) as info:
        read_manifest(bundle)
    assert "\n" not in str(info.value)


def test_partial_manifest_for_a_backend() -> None:
    m = Manifest.from_dict({"target": {"backend": "openvino", "inference_precision": "f32"}})
    assert m.target.get("inference_precision") == "f32" and m.input == InputSpec() and m.labels == [] and not m.valid


def v1_manifest(model_sha256: str) -> dict[str, Any]:
    """manifest.json as bitdeploy 0.2 (format 1, before the typed record) wrote it, trimmed to one of each kind of
    field; the quantization method is under `calib_method`, as the OpenVINO converter wrote it then."""
    return json.loads(
        """{
  "valid": true,
  "invalid_reason": null,
  "model": {"name": "tiny", "num_classes": 10, "params": 123, "resolution": @RES,
            "weights": {"kind": "none", "source": null, "sha256": null}, "ws_eps": 1e-10, "state_sha256": "ab"},
  "target": {"backend": "onnxruntime", "precision": "int8", "precision_used": "int8 Conv (U8S8-7BIT) + fp32",
             "device": "cpu", "inference_precision": "f32", "performance_hint": "LATENCY",
             "quantization": {"format": "QDQ", "calib_method": "minmax", "samples": 32, "scheme": "u8s8-7bit"}},
  "model_file": "model.onnx",
  "input": {"name": "input", "shape": [-1, 3, @RES, @RES], "layout": "NCHW", "dtype": "float32", "color": "RGB",
            "resize": [@RES, @RES], "interpolation": "bilinear", "scale": 0.00392156862745098,
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
  "output": {"name": "logits", "kind": "logits"},
  "labels": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
  "export": {"opset": 17, "max_abs_diff": 1e-6, "nodes": 100, "simplifier": "onnxslim"},
  "accuracy": {"top1": 0.9, "reference_top1": 0.91, "agreement": 0.98, "samples": 120, "max_abs_logit_diff": 0.3,
               "mean_abs_logit_diff": 0.02, "top1_drop_pp": 1.0, "max_accuracy_drop_pp": 1.0, "passed": true,
               "reference": "pytorch-fp32", "dataset": "digits", "split": "val", "evaluated_with": "onnxruntime (cpu)"},
  "validation": null,
  "calibration": {"samples": 32, "method": "minmax", "seed": 0, "sha256": "cd", "source": "digits", "split": "train"},
  "notes": ["INT8 scheme u8s8-7bit"],
  "provenance": {"bitdeploy": "0.2.0", "created": "2026-11-02T10:00:00+00:00", "versions": {"numpy": "2.1.0"}},
  "build_latency": {"batch1_p50_ms": 1.5, "queries": 100},
  "validated_on": {"cpu": {"class": "x86-64-v4"}, "gpus": [], "evaluated_with": "onnxruntime (cpu)"},
  "self_test": null,
  "format": "bitdeploy-bundle",
  "format_version": 1,
  "files": {"model.onnx": "@SHA"}
}""".replace("@RES", str(RES)).replace("@SHA", model_sha256)
    )


def test_a_v1_bundle_of_the_previous_release_still_loads_and_predicts(
    tiny_model: dict[str, Any], tmp_path: Path
) -> None:
    bundle = tmp_path / "v1"
    bundle.mkdir()
    shutil.copy(tiny_model["onnx"], bundle / "model.onnx")
    (bundle / MANIFEST).write_text(json.dumps(v1_manifest(sha256_file(bundle / "model.onnx"))))
    m = load_manifest(bundle)  # checksums verified, valid
    assert m.version == (1, 0) and m.model.name == "tiny" and m.model.resolution == RES and m.num_classes == 10
    assert m.target.quantization == Quantization("minmax", 32, {"format": "QDQ", "scheme": "u8s8-7bit"})
    assert m.target.get("inference_precision") == "f32"  # an old top-level target field lands in the details
    assert m.accuracy is not None and m.accuracy.top1 == 0.9 and m.accuracy.evaluated_with == "onnxruntime (cpu)"
    assert m.input == InputSpec.square(RES) and m.provenance is not None and m.provenance.bitdeploy == "0.2.0"
    assert m.validated_on is not None and m.validated_on["cpu"]["class"] == "x86-64-v4" and m.self_test is None
    with load(bundle) as model:
        assert model.infer(np.zeros((2, 3, RES, RES), np.float32)).shape == (2, 10)
