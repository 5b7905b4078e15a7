"""The self-test every bundle carries, `bitdeploy verify`, `load(self_test=True)` and the device fingerprint.

The failing cases make the runtime compute something else (the backend's `infer` is patched); the bundle's
checksummed files are never edited.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitdeploy.core.errors import BundleError
from bitdeploy.runtimes import load
from bitdeploy.runtimes.bundle import bundle_writer, fingerprint, read_manifest, selftest, write_manifest
from bitdeploy.runtimes.engines.ort import OrtBackend
from bitdeploy.runtimes.preprocess import normalize
from tests.clirun import one_error_line
from tests.clirun import run_cli as run

from .conftest import RES, digit_images, make_manifest

ort = pytest.importorskip("onnxruntime")


def golden_pixels(n: int = 12) -> np.ndarray:
    """Real digits as the uint8 HWC images preprocessing produces (resized to RES)."""
    from PIL import Image

    return np.stack(
        [np.asarray(Image.fromarray(d, "L").convert("RGB").resize((RES, RES), Image.BILINEAR)) for d in digit_images(n)]
    )


def make_bundle(onnx_path: Path, out: Path, precision: str = "fp32", inputs: np.ndarray | None = None) -> Path:
    """An ONNX Runtime bundle whose golden set holds this host's logits as the 'FP32 reference'."""
    x = normalize(golden_pixels()) if inputs is None else inputs
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": x})[0]
    labels = np.arange(len(x)) % 10
    with bundle_writer(out) as tmp:
        shutil.copy(onnx_path, tmp / "model.onnx")
        spec = selftest.write(tmp, x, logits, labels, logits, precision)
        manifest = make_manifest(
            "onnxruntime", "model.onnx", "cpu", precision, self_test=spec, validated_on=fingerprint.host_fingerprint()
        )
        manifest = replace(manifest, target=replace(manifest.target, precision=precision))
        write_manifest(tmp, manifest, ["model.onnx", selftest.GOLDEN_FILE])
    return out


@pytest.fixture(scope="module")
def golden_bundle(tiny_model: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tiny_model["onnx"], tmp_path_factory.mktemp("golden") / "bundle")


@pytest.fixture()
def wrong_numerics(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine now computes something else: logits shrunk and the two top classes swapped."""
    real = OrtBackend._infer

    def _infer(self: OrtBackend, batch: np.ndarray) -> np.ndarray:
        out = real(self, batch)
        top2 = np.argsort(-out, axis=1)[:, :2]
        rows = np.arange(len(out))
        swapped = out.copy()
        swapped[rows, top2[:, 0]], swapped[rows, top2[:, 1]] = out[rows, top2[:, 1]], out[rows, top2[:, 0]]
        return swapped * 0.9

    monkeypatch.setattr(OrtBackend, "_infer", _infer)


def test_golden_set_stores_exact_pixels_and_derives_criteria(golden_bundle: Path) -> None:
    manifest = read_manifest(golden_bundle)
    spec = manifest.self_test
    assert spec is not None and spec.stored_as == "uint8 pixels (exact)" and spec.images == 12 and spec.labelled
    assert selftest.GOLDEN_FILE in manifest.files
    inputs, reference, labels = selftest.load_golden(golden_bundle, manifest)
    assert np.array_equal(inputs, normalize(golden_pixels())) and labels is not None and reference.shape == (12, 10)
    # The build host matched itself exactly: one extra flip allowed, the precision's floor for the error.
    assert (spec.min_agreement, spec.max_rel_error) == (11 / 12, selftest.REL_ERROR_FLOOR["fp32"])
    criteria = json.loads((golden_bundle / "manifest.json").read_text())["self_test"]["criteria"]
    assert criteria == {"min_agreement": 11 / 12, "max_rel_error": selftest.REL_ERROR_FLOOR["fp32"]}  # as written


def test_float_inputs_are_kept_when_not_pixels(tiny_model: dict[str, Any], tmp_path: Path) -> None:
    x = np.random.default_rng(0).uniform(-1, 1, (8, 3, RES, RES)).astype(np.float32)
    bundle = make_bundle(tiny_model["onnx"], tmp_path / "b", inputs=x)
    manifest = read_manifest(bundle)
    assert manifest.self_test is not None and manifest.self_test.stored_as == "float32 inputs"
    assert np.array_equal(selftest.load_golden(bundle, manifest)[0], x)


def test_select_caps_the_golden_set_by_count_and_bytes() -> None:
    assert len(selftest.select(1000, 32)) == selftest.MAX_IMAGES
    assert len(selftest.select(20, 32)) == 20
    big = selftest.select(1000, 480)
    assert selftest.MIN_IMAGES <= len(big) < selftest.MAX_IMAGES and len(big) * 3 * 480 * 480 * 4 <= selftest.MAX_BYTES
    assert np.array_equal(selftest.select(500, 64, seed=3), selftest.select(500, 64, seed=3))


def test_verify_passes_and_reports_fingerprint(
    golden_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["verify", golden_bundle], capsys)
    assert code == 0 and err == "", err
    assert out.startswith("self-test   PASS: 12 golden inputs, top-1 agreement with FP32 100.0%")
    assert "this device" in out and fingerprint.host_fingerprint()["cpu"]["class"] in out
    code, out, _ = run(["verify", golden_bundle, "--json", "--record", tmp_path / "log.json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["passed"] and report["self_test"]["agreement"] == 1.0
    assert report["self_test"]["max_rel_error"] < 1e-5 and report["self_test"]["golden_top1"] is not None
    assert report["fingerprint"]["cpu"]["features"] == fingerprint.host_fingerprint()["cpu"]["features"]
    assert report["device_class"] == report["validated_on_class"]
    run(["verify", golden_bundle, "--record", tmp_path / "log.json"], capsys)
    log = json.loads((tmp_path / "log.json").read_text())
    assert len(log) == 2 and all(entry["passed"] for entry in log)


def test_verify_fails_in_one_line_when_the_device_computes_something_else(
    golden_bundle: Path, wrong_numerics: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["verify", golden_bundle], capsys)
    assert code == 1 and "self-test   FAIL" in out
    line = one_error_line(err)
    assert (
        "self-test failed on" in line
        and "top-1 agreement with FP32 0.0% < 91.7%" in line
        and "relative logit error" in line
    )


def test_load_with_self_test(golden_bundle: Path, monkeypatch: pytest.MonkeyPatch, wrong_numerics: None) -> None:
    with load(golden_bundle) as model:  # without the self-test it loads: nothing checks the numerics
        assert model.last_self_test is None
    with pytest.raises(BundleError, match="self-test failed on this device") as err:
        load(golden_bundle, self_test=True)
    assert "\n" not in str(err.value)


def test_describe_has_both_fingerprints_and_the_self_test(golden_bundle: Path) -> None:
    with load(golden_bundle, self_test=True) as model:
        info = model.describe()
    assert info["same_device_class"] is True and info["self_test"]["passed"]
    assert info["device_fingerprint"]["cpu"]["class"] == info["validated_on"]["cpu"]["class"]


def test_verify_bad_inputs_are_one_line(
    ort_bundle: Path, golden_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["verify", ort_bundle], capsys)  # a bundle without a golden set
    assert code == 1 and "carries no self-test" in one_error_line(err)
    bad_log = tmp_path / "log.json"
    bad_log.write_text('{"not": "a list"}')
    code, _, err = run(["verify", golden_bundle, "--record", bad_log], capsys)
    assert code == 1 and "not a bitdeploy verify log" in one_error_line(err)
    assert json.loads(bad_log.read_text()) == {"not": "a list"}


def test_inspect_shows_where_it_was_validated(golden_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["inspect", golden_bundle], capsys)
    assert code == 0
    rows = {line[:12].strip(): line[12:] for line in out.splitlines()}
    assert (
        fingerprint.host_fingerprint()["cpu"]["class"] in rows["validated on"] and "(same class)" in rows["this device"]
    )
    assert "12 golden inputs" in rows["self-test"]


@pytest.mark.parametrize(
    ("arch", "features", "expect"),
    [
        ("x86_64", ["avx2", "fma"], "x86-64 AVX2 (no VNNI)"),
        ("x86_64", ["avx2", "avx_vnni"], "x86-64 AVX2 AVX-VNNI"),
        ("x86_64", ["avx2", "avx512f"], "x86-64 AVX-512 (no VNNI)"),
        ("x86_64", ["avx2", "avx512f", "avx512_vnni"], "x86-64 AVX-512 VNNI"),
        ("x86_64", ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"], "x86-64 AVX-512 VNNI BF16"),
        ("x86_64", ["avx512_vnni", "amx_tile", "amx_int8"], "x86-64 AMX"),
        ("aarch64", ["asimd", "dotprod", "i8mm"], "arm64 dotprod i8mm"),
        ("aarch64", ["asimd"], "arm64 (no dotprod)"),
    ],
)
def test_cpu_class(arch: str, features: list[str], expect: str) -> None:
    assert fingerprint.cpu_class(arch, features) == expect


def test_host_fingerprint_is_consistent_with_cpuid() -> None:
    fp = fingerprint.host_fingerprint()
    assert set(fp) >= {"cpu", "gpus", "engines", "os"} and fp["engines"]["numpy"] == np.__version__
    cpu = fp["cpu"]
    assert cpu["class"] == fingerprint.cpu_class(cpu["arch"], cpu["features"])
    from numpy._core._multiarray_umath import __cpu_features__ as cpuid

    assert ("avx2" in cpu["features"]) == bool(cpuid.get("AVX2")) and ("avx512_vnni" in cpu["features"]) == bool(
        cpuid.get("AVX512VNNI")
    )
    assert fingerprint.device_class(fp).startswith(cpu["class"])


def test_serve_self_test_refuses_to_listen_when_it_fails(
    golden_bundle: Path, wrong_numerics: None, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("starlette")
    code, out, err = run(["serve", golden_bundle, "--port", "0", "--self-test"], capsys)
    assert code == 1 and "serving" not in out
    assert "self-test failed on this device" in one_error_line(err)
