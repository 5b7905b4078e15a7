"""`bitdeploy predict | inspect | pack | serve` through the real entry point (`bitdeploy.cli.main`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clirun import one_error_line
from tests.clirun import run_cli as run

from .conftest import INVALID, VALID
from .test_integrity import edit_manifest, flip_byte


def test_predict_text(ort_bundle: Path, image_dir: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["predict", ort_bundle, image_dir["photo_rgb"], image_dir["digit0_L"], "--top-k", "3"], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert (
        lines[0] == str(image_dir["photo_rgb"])
        and lines[1].lstrip().startswith("1. ")
        and lines[4] == str(image_dir["digit0_L"])
    )
    assert "2 image(s) with onnxruntime on cpu: preprocess" in lines[-1] and "inference" in lines[-1]


def test_predict_json_every_valid_mode(
    ort_bundle: Path, image_dir: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    paths = [image_dir[k] for k in VALID]
    code, out, err = run(["predict", ort_bundle, *paths, "--json", "-k", "2"], capsys)
    assert code == 0 and err == ""
    data = json.loads(out)
    assert [d["image"] for d in data] == [str(p) for p in paths]
    for d in data:
        assert len(d["predictions"]) == 2 and d["predictions"][0]["probability"] >= d["predictions"][1]["probability"]
        assert set(d["predictions"][0]) == {"label", "probability"}


@pytest.mark.parametrize("key", INVALID)
def test_predict_bad_image_names_the_file(
    ort_bundle: Path, image_dir: dict[str, Path], capsys: pytest.CaptureFixture[str], key: str
) -> None:
    code, out, err = run(["predict", ort_bundle, image_dir[key], image_dir["digit1_L"], "--json"], capsys)
    assert code == 1
    assert str(image_dir[key]) in one_error_line(err)
    data = json.loads(out)  # the good image is still classified, in order
    assert data[0]["image"] == str(image_dir[key]) and "error" in data[0] and "predictions" not in data[0]
    assert data[1]["image"] == str(image_dir["digit1_L"]) and len(data[1]["predictions"]) == 5


def test_predict_missing_image_and_bundle(
    ort_bundle: Path, tmp_path: Path, image_dir: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["predict", ort_bundle, tmp_path / "nope.png"], capsys)
    assert code == 1 and "nope.png: no such file" in one_error_line(err)
    code, _, err = run(["predict", tmp_path / "nobundle", image_dir["digit0_L"]], capsys)
    assert code == 1 and "no such bundle" in one_error_line(err)
    code, _, err = run(
        ["predict", image_dir["digit0_L"], image_dir["digit0_L"]], capsys
    )  # an image passed as the bundle
    assert code == 1 and "not a bundle directory or a bitdeploy pack" in one_error_line(err)


def test_predict_usage_errors_exit_2(
    ort_bundle: Path, image_dir: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["predict", ort_bundle], capsys)[0] == 2  # no image
    assert run(["predict", ort_bundle, image_dir["digit0_L"], "--top-k", "0"], capsys)[0] == 2
    assert run(["predict", ort_bundle, image_dir["digit0_L"], "--backend", "tflite"], capsys)[0] == 2


def test_predict_modified_bundle(
    bundle_copy: Path, image_dir: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    flip_byte(bundle_copy / "model.onnx")
    code, out, err = run(["predict", bundle_copy, image_dir["digit0_L"]], capsys)
    assert code == 1 and out == ""
    assert "model.onnx: checksum mismatch" in one_error_line(err) and "--no-verify" in err
    code, out, _ = run(["predict", bundle_copy, image_dir["digit0_L"], "--no-verify"], capsys)
    assert code == 0 and out.startswith(str(image_dir["digit0_L"]))


def test_predict_backend_override(
    ort_bundle: Path, image_dir: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["predict", ort_bundle, image_dir["photo_p"], "--json", "--threads", "1"]
    code, out_ort, _ = run(args, capsys)
    code2, out_ov, _ = run([*args, "--backend", "openvino", "--device", "CPU"], capsys)
    assert code == code2 == 0
    ort_preds, ov_preds = json.loads(out_ort)[0]["predictions"], json.loads(out_ov)[0]["predictions"]
    assert [p["label"] for p in ort_preds] == [p["label"] for p in ov_preds]
    assert all(abs(a["probability"] - b["probability"]) < 1e-4 for a, b in zip(ort_preds, ov_preds))


def test_inspect(ort_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["inspect", ort_bundle], capsys)
    assert code == 0 and err == ""
    rows = {line[:12].strip(): line[12:] for line in out.splitlines()}
    assert (
        rows["format"] == "bitdeploy-bundle v1"
        and rows["status"] == "valid"
        and rows["labels"] == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9"
    )
    assert "tiny, 10 classes, 2.02M params, 32 px" in out
    assert "onnxruntime fp32 on cpu" in out and "ok (1 file(s) verified)" in out and rows["runs here"] == "yes"
    code, out, _ = run(["inspect", ort_bundle, "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["checksums"] == "ok" and data["pack"] is False and data["runs_here"] is True
    assert data["manifest"]["model"]["name"] == "tiny" and data["manifest"]["labels"] == [str(i) for i in range(10)]


def test_inspect_modified_invalid_and_unknown(
    bundle_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit_manifest(bundle_copy, valid=False, invalid_reason="top-1 dropped 2.0 points (limit 1.0)")
    # the manifest edit itself is not covered by a checksum; the model file is
    code, out, _ = run(["inspect", bundle_copy], capsys)
    assert code == 0 and "INVALID: top-1 dropped 2.0 points" in out
    flip_byte(bundle_copy / "model.onnx")
    code, out, err = run(["inspect", bundle_copy], capsys)
    assert code == 1 and out == "" and "checksum mismatch" in one_error_line(err)
    code, out, _ = run(["inspect", bundle_copy, "--no-verify"], capsys)
    assert code == 0 and "checksums   skipped" in out
    edit_manifest(bundle_copy, format_version=7)
    code, _, err = run(["inspect", bundle_copy], capsys)
    assert code == 1 and "unknown bundle format version 7" in one_error_line(err)


def test_pack_then_predict_and_inspect(
    ort_bundle: Path, tmp_path: Path, image_dir: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "tiny.bitpack"
    code, out, _ = run(["pack", ort_bundle, out_file], capsys)
    assert code == 0 and out.startswith(f"wrote {out_file}") and out_file.is_file()
    code, out, _ = run(["inspect", out_file], capsys)
    assert code == 0 and "(single-file pack)" in out and "ok (1 file(s) verified)" in out
    code, direct, _ = run(["predict", ort_bundle, image_dir["photo_rgb"], "--json"], capsys)
    code2, packed, _ = run(["predict", out_file, image_dir["photo_rgb"], "--json"], capsys)
    assert code == code2 == 0 and json.loads(direct) == json.loads(packed)
    code, _, err = run(["pack", out_file, tmp_path / "again.bitpack"], capsys)
    assert code == 1 and "already a single-file pack" in one_error_line(err)


def test_help_for_every_runtime_command(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("predict", "inspect", "pack", "serve"):
        code, out, _ = run([cmd, "--help"], capsys)
        assert code == 0 and "Usage:" in out
    assert "--no-verify" in run(["predict", "--help"], capsys)[1]


def _subprocess(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_missing_backend_extra_exits_1_without_traceback(ort_bundle: Path, image_dir: dict[str, Path]) -> None:
    script = (
        "import sys\n"
        "sys.modules['onnxruntime'] = None  # as if bitdeploy[onnxruntime] were not installed\n"
        "from bitdeploy.cli import main\n"
        f"main(['predict', {str(ort_bundle)!r}, {str(image_dir['digit0_L'])!r}])\n"
    )
    proc = _subprocess(script)
    assert proc.returncode == 1 and proc.stdout == ""
    line = one_error_line(proc.stderr)
    assert str(ort_bundle) in line and 'pip install "bitdeploy[onnxruntime]"' in line


def test_python_m_bitdeploy_exit_codes(bundle_copy: Path, image_dir: dict[str, Path]) -> None:
    flip_byte(bundle_copy / "model.onnx")
    proc = subprocess.run(
        [sys.executable, "-m", "bitdeploy", "predict", str(bundle_copy), str(image_dir["text"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "checksum mismatch" in one_error_line(proc.stderr)
    shutil.rmtree(bundle_copy)
