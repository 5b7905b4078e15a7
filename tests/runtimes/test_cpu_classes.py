"""INT8 numerics on another CPU class: bundles built here, verified under `qemu-x86_64 -cpu Haswell`.

QEMU's user-mode emulator runs this same Python as an AVX2-only CPU (no AVX-512, no VNNI, no BF16) on any x86
host, so these tests hold whichever CPU the suite lands on. Without qemu-user (Debian `apt-get install
qemu-user`, which .ci/run does) they skip with that reason.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitdeploy.converters.base import ConvertOptions, bind
from bitdeploy.converters.calibration import CalibrationData, digest
from bitdeploy.converters.ort_convert import OrtOptions
from bitdeploy.runtimes.bundle import bundle_writer, fingerprint, read_manifest, selftest, write_manifest
from bitdeploy.runtimes.preprocess import normalize

from .conftest import RES, make_manifest
from .test_selftest import golden_pixels

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
QEMU = shutil.which("qemu-x86_64")
pytestmark = pytest.mark.skipif(
    QEMU is None or platform.machine().lower() not in ("x86_64", "amd64"),
    reason="needs qemu-user (apt-get install qemu-user) on an x86-64 host to emulate an AVX2-only CPU",
)
AVX2_ONLY = "x86-64 AVX2 (no VNNI)"


def emulated(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run `python -m bitdeploy ARGS` as a Haswell (AVX2, no AVX-512/VNNI) CPU."""
    return subprocess.run(
        [QEMU, "-cpu", "Haswell", sys.executable, "-m", "bitdeploy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )  # type: ignore[list-item]


def calibration() -> CalibrationData:
    rng = np.random.default_rng(0)
    x = np.concatenate([normalize(golden_pixels()), rng.uniform(-1, 1, (20, 3, RES, RES)).astype(np.float32)])
    return CalibrationData(x, "digits + uniform (test)", 0, digest(x))


def int8_bundle(tiny_model: dict[str, Any], out: Path, scheme: str) -> Path:
    """An ONNX Runtime INT8 bundle of the tiny model; golden reference = the FP32 model, measured here."""
    work = out.with_name(out.name + "-work")
    work.mkdir(parents=True)
    artifact = bind("onnx", "int8", ConvertOptions(extras=OrtOptions(int8_scheme=scheme))).convert(
        tiny_model["onnx"], work, calibration()
    )
    x = normalize(golden_pixels())
    fp32 = ort.InferenceSession(str(tiny_model["onnx"]), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    here = ort.InferenceSession(str(work / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with bundle_writer(out) as tmp:
        shutil.copy(work / "model.onnx", tmp / "model.onnx")
        spec = selftest.write(tmp, x, fp32, None, here, "int8")
        manifest = make_manifest(
            "onnxruntime",
            "model.onnx",
            "cpu",
            artifact.target.precision_used or "",
            self_test=spec,
            validated_on=fingerprint.host_fingerprint(),
        )
        manifest = replace(
            manifest, target=replace(manifest.target, precision="int8", quantization=artifact.target.quantization)
        )
        write_manifest(tmp, manifest, ["model.onnx", selftest.GOLDEN_FILE])
    return out


def test_emulated_cpu_fingerprint_is_avx2_only(tmp_path: Path) -> None:
    code = "import json; from bitdeploy.runtimes.bundle.fingerprint import host_fingerprint; print(json.dumps(host_fingerprint()))"
    proc = subprocess.run(
        [QEMU, "-cpu", "Haswell", sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )  # type: ignore[list-item]
    cpu = json.loads(proc.stdout)["cpu"]
    assert cpu["class"] == AVX2_ONLY and "avx512f" not in cpu["features"] and "avx_vnni" not in cpu["features"]


def test_default_int8_scheme_verifies_on_an_avx2_only_cpu(tiny_model: dict[str, Any], tmp_path: Path) -> None:
    bundle = int8_bundle(tiny_model, tmp_path / "int8", "auto")
    manifest = read_manifest(bundle)
    assert manifest.target.quantization is not None and manifest.target.quantization.details["scheme"] == "u8s8-7bit"
    proc = emulated(["verify", str(bundle), "--json"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["passed"] and report["device_class"] == AVX2_ONLY
    # 7-bit weights never saturate the int16 pair sums: the AVX2 CPU computes what this host computed.
    native = selftest.run(_session_infer(bundle), bundle, manifest)
    assert report["self_test"]["agreement"] == native.agreement
    assert abs(report["self_test"]["max_rel_error"] - native.max_rel_error) <= 1e-3


def test_full_range_u8s8_fails_verify_without_vnni(tiny_model: dict[str, Any], tmp_path: Path) -> None:
    """The failure the default scheme avoids, caught by the self-test: built on VNNI, run on AVX2."""
    if not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(fingerprint.host_fingerprint()["cpu"]["features"]):
        pytest.skip(
            "needs a build host with VNNI: without it this host saturates too, and the golden set already holds saturated logits"
        )
    bundle = int8_bundle(tiny_model, tmp_path / "u8s8", "u8s8")
    proc = emulated(["verify", str(bundle)])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(lines) == 1 and "self-test failed on x86-64 AVX2 (no VNNI)" in lines[0], (
        proc.stderr[-2000:]
    )


def _session_infer(bundle: Path) -> Any:
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"input": x})[0]


def test_openvino_int8_is_pinned_to_f32_and_verifies_on_an_avx2_only_cpu(
    tiny_model: dict[str, Any], tmp_path: Path
) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from bitdeploy.runtimes.engines.ov import OpenVinoBackend

    work = tmp_path / "work"
    work.mkdir()
    artifact = bind("openvino", "int8", ConvertOptions()).convert(tiny_model["onnx"], work, calibration())
    assert artifact.target.get("inference_precision") == "f32"
    x = normalize(golden_pixels())
    fp32 = ort.InferenceSession(str(tiny_model["onnx"]), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    manifest = make_manifest(
        "openvino",
        "model.xml",
        "CPU",
        artifact.target.precision_used or "",
        validated_on=fingerprint.host_fingerprint(),
    )
    manifest = replace(manifest, target=replace(artifact.target, device="CPU"))
    backend = OpenVinoBackend(work / "model.xml", manifest)
    here = backend.infer(x)
    backend.close()
    bundle = tmp_path / "ov-int8"
    with bundle_writer(bundle) as tmp:
        for name in artifact.files:
            shutil.copy(work / name, tmp / name)
        manifest = replace(manifest, self_test=selftest.write(tmp, x, fp32, None, here, "int8"))
        write_manifest(tmp, manifest, [*artifact.files, selftest.GOLDEN_FILE])
    proc = emulated(["verify", str(bundle), "--json"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["passed"] and report["device_class"] == AVX2_ONLY and report["precision_used"] in ("f32", "float32")
