"""`bitdeploy export-repo`: Triton and OVMS repositories, checked with Triton's own ModelConfig schema."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from bitdeploy.cli import cli
from bitdeploy.core.errors import BitdeployError
from bitdeploy.runtimes.bundle import bundle_writer, write_manifest
from bitdeploy.runtimes.export.model_repo import export_repo
from tests.runtimes.conftest import LABELS, make_manifest

text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def parse_config(path: Path) -> object:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture()
def trt_bundle(tmp_path: Path) -> Path:
    """A TensorRT bundle's layout (the plan is a stand-in: export-repo only copies it)."""
    out = tmp_path / "tiny-trt"
    with bundle_writer(out) as tmp:
        (tmp / "model.plan").write_bytes(b"not really a plan")
        (tmp / "model.onnx").write_bytes(b"the ONNX the plan was built from")
        manifest = make_manifest("tensorrt", "model.plan", "cuda:0", "fp16")
        manifest = replace(
            manifest, target=replace(manifest.target, details={"profile": {"min": 1, "opt": 4, "max": 4}})
        )
        write_manifest(tmp, manifest, ["model.plan", "model.onnx"])
    return out


def test_triton_repo_for_onnxruntime_and_openvino(ort_bundle: Path, ov_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    result = CliRunner().invoke(
        cli,
        [
            "export-repo",
            str(ort_bundle),
            str(ov_bundle),
            "--name",
            "tiny-ort",
            "--name",
            "tiny-ov",
            "--format",
            "triton",
            "--out",
            str(out),
            "--max-batch",
            "16",
            "--max-delay-ms",
            "2.5",
        ],
    )
    assert result.exit_code == 0, result.output
    for name, backend, files in (
        ("tiny-ort", "onnxruntime", ["model.onnx"]),
        ("tiny-ov", "openvino", ["model.bin", "model.xml"]),
    ):
        config = parse_config(out / name / "config.pbtxt")
        assert config.name == name and config.backend == backend and config.max_batch_size == 16
        assert config.dynamic_batching.max_queue_delay_microseconds == 2500
        (inp,) = config.input
        assert inp.name == "input" and inp.data_type == model_config_pb2.TYPE_FP32 and list(inp.dims) == [3, 32, 32]
        (outp,) = config.output
        assert (
            outp.name == "logits" and outp.data_type == model_config_pb2.TYPE_FP32 and list(outp.dims) == [len(LABELS)]
        )
        assert (out / name / outp.label_filename).read_text().splitlines() == LABELS
        assert sorted(p.name for p in (out / name / "1").iterdir()) == files
        default = config.default_model_filename or {"onnxruntime": "model.onnx", "openvino": "model.xml"}[backend]
        assert (out / name / "1" / default).is_file()
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert (out / "tiny-ort" / "1" / "model.onnx").read_bytes() == (ort_bundle / "model.onnx").read_bytes()


def test_triton_tensorrt_plan_caps_the_batch_at_the_profile(trt_bundle: Path, tmp_path: Path) -> None:
    export_repo([trt_bundle], "triton", tmp_path / "repo", max_batch=8)
    config = parse_config(tmp_path / "repo" / "tiny" / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 4
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert [p.name for p in (tmp_path / "repo" / "tiny" / "1").iterdir()] == ["model.plan"]


def test_fixed_batch_engine_has_no_dynamic_batching(tmp_path: Path, tiny_model: dict) -> None:
    src = tmp_path / "fixed"
    with bundle_writer(src) as tmp:
        (tmp / "model.onnx").write_bytes(tiny_model["onnx"].read_bytes())
        manifest = make_manifest("onnxruntime", "model.onnx", "cpu", "fp32")
        manifest = replace(manifest, input=replace(manifest.input, shape=(2, 3, 32, 32)))
        write_manifest(tmp, manifest, ["model.onnx"])
    export_repo([src], "triton", tmp_path / "repo")
    config = parse_config(tmp_path / "repo" / "tiny" / "config.pbtxt")
    assert (
        config.max_batch_size == 0
        and list(config.input[0].dims) == [2, 3, 32, 32]
        and list(config.output[0].dims) == [2, 10]
    )
    assert not config.HasField("dynamic_batching")


def test_ovms_repo(ort_bundle: Path, ov_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "ovms"
    export_repo([ov_bundle, ort_bundle], "ovms", out, names=["tiny-ov", "tiny-ort"])
    config = json.loads((out / "config.json").read_text())
    entries = [e["config"] for e in config["model_config_list"]]
    assert [e["name"] for e in entries] == ["tiny-ov", "tiny-ort"]
    for e in entries:
        assert (
            not Path(e["base_path"]).is_absolute() and (out / e["base_path"] / "1").is_dir()
        )  # relative to config.json
    assert sorted(p.name for p in (out / "tiny-ov" / "1").iterdir()) == ["model.bin", "model.xml"]
    assert [p.name for p in (out / "tiny-ort" / "1").iterdir()] == ["model.onnx"]


def test_ovms_refuses_a_plan_and_leaves_nothing_behind(ort_bundle: Path, trt_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "ovms"
    with pytest.raises(BitdeployError, match="OpenVINO Model Server cannot run a TensorRT model"):
        export_repo([ort_bundle, trt_bundle], "ovms", out, names=["a", "b"])
    assert not out.exists() and list(tmp_path.glob(".ovms*")) == []


def test_existing_output_needs_force(ort_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BitdeployError, match="not empty; choose a new --out or pass --force"):
        export_repo([ort_bundle], "triton", out)
    assert (out / "keep.txt").is_file()
    export_repo([ort_bundle], "triton", out, force=True)
    assert not (out / "keep.txt").exists() and (out / "tiny" / "config.pbtxt").is_file()


def test_pack_input_and_name_collisions(ort_bundle: Path, tmp_path: Path) -> None:
    from bitdeploy.runtimes.bundle.pack import pack

    packed = pack(ort_bundle, tmp_path / "tiny.bitpack")
    export_repo([packed], "triton", tmp_path / "from-pack")
    assert parse_config(tmp_path / "from-pack" / "tiny" / "config.pbtxt").name == "tiny"
    with pytest.raises(BitdeployError, match="both be named 'tiny'; pass --name once per bundle"):
        export_repo([ort_bundle, packed], "triton", tmp_path / "twice")
    with pytest.raises(BitdeployError, match="1 --name value"):
        export_repo([ort_bundle, packed], "triton", tmp_path / "twice", names=["x"])
    with pytest.raises(BitdeployError, match="cannot be a repository directory"):
        export_repo([ort_bundle], "triton", tmp_path / "bad", names=["../up"])


def test_cli_errors_are_one_line(bundle_copy: Path, tmp_path: Path) -> None:
    (bundle_copy / "model.onnx").write_bytes(b"tampered")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bitdeploy",
            "export-repo",
            str(bundle_copy),
            "--format",
            "triton",
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "checksum mismatch" in lines[0]
    assert not (tmp_path / "r").exists()
