"""The typed manifest: versions, field types, unknown fields, and the read-only mapping view."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitdeploy.errors import BundleError
from bitdeploy.runtimes.bundle import MANIFEST, bundle_writer, read_manifest, write_manifest
from bitdeploy.runtimes.manifest import Manifest, TargetInfo, parse_version

from .conftest import make_manifest


def _bundle(tmp_path: Path, **fields: object) -> Path:
    with bundle_writer(tmp_path / "b") as tmp:
        (tmp / "model.onnx").write_bytes(b"onnx")
        write_manifest(tmp, make_manifest("onnxruntime", "model.onnx", "cpu", "fp32", **fields), ["model.onnx"])
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
    assert m.version == (1, 9) and m.to_dict()["added_in_1_9"] == {"x": 1}


@pytest.mark.parametrize("version", [2, "2.0", "0.9", "one", None])
def test_unknown_major_is_refused(tmp_path: Path, version: object) -> None:
    bundle = _bundle(tmp_path)
    _set(bundle, format_version=version)
    with pytest.raises(BundleError, match="unknown bundle format version") as info:
        read_manifest(bundle)
    assert "\n" not in str(info.value)


def test_typed_fields_and_mapping_view(tmp_path: Path) -> None:
    m = read_manifest(_bundle(tmp_path, accuracy={"top1": 0.9}))
    assert isinstance(m.target, TargetInfo) and m.target.backend == "onnxruntime" and m.target.device == "cpu"
    assert m.labels == [str(i) for i in range(10)] and m.model_file == "model.onnx" and m.valid and m.num_classes == 10
    assert m.accuracy == {"top1": 0.9} and m.self_test is None and set(m.files) == {"model.onnx"}
    assert (
        m["labels"] == m.labels and m.get("target") == m.target.as_dict() and "model_file" in m
    )  # code written against dicts


def test_target_details_hold_backend_specific_fields() -> None:
    t = TargetInfo.from_dict(
        {"backend": "tensorrt", "precision": "int8", "tensorrt_version": "10.3", "profile": {"max": 8}}
    )
    assert t.get("tensorrt_version") == "10.3" and t.get("profile") == {"max": 8} and t.get("missing", 1) == 1
    assert t.as_dict() == {
        "backend": "tensorrt",
        "precision": "int8",
        "tensorrt_version": "10.3",
        "profile": {"max": 8},
    }


@pytest.mark.parametrize(
    ("field", "value"), [("labels", {"a": 1}), ("target", ["onnxruntime"]), ("input", "32x32"), ("self_test", 3)]
)
def test_a_field_of_the_wrong_type_fails_the_write_and_leaves_nothing(
    tmp_path: Path, field: str, value: object
) -> None:
    with pytest.raises(BundleError, match="must be") as info, bundle_writer(tmp_path / "b") as tmp:
        (tmp / "model.onnx").write_bytes(b"onnx")
        write_manifest(tmp, make_manifest("onnxruntime", "model.onnx", "cpu", "fp32", **{field: value}), ["model.onnx"])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []


def test_a_field_of_the_wrong_type_is_refused_at_read(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    _set(bundle, target={"backend": 3})
    with pytest.raises(BundleError, match=r"target\.backend must be a string"):
        read_manifest(bundle)


def test_partial_manifest_for_a_backend() -> None:
    m = Manifest.from_dict({"target": {"backend": "openvino", "inference_precision": "f32"}})
    assert m.target.inference_precision == "f32" and m.input == {} and m.labels == [] and not m.valid
