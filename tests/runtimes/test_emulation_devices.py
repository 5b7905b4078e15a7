"""Every engine's FP32 and INT8 bundle of the tiny model, self-tested on emulated CPUs it never ran on: a
Raspberry Pi 4 (cortex-a72), a Graviton2 (neoverse-n1) and an AVX-only x86 (SandyBridge).

One `bitdeploy build --verify-on` builds the bundles at 16 px and runs one QEMU guest per CPU over all of them
(the guest's imports take seconds; the tiny model's inference is quick even emulated). The kit comes from
`bitdeploy devices setup arm64` (.ci/run does it); without it these tests skip with what is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bitdeploy.core.devices import EMULATED_ENV
from bitdeploy.emulation.kit import kit_root, readiness

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
CPUS = ("cortex-a72", "neoverse-n1", "sandybridge")
MISSING = [why for arch in ("arm64", "x86_64") if (why := readiness(arch, kit_root())[1])]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"emulation kit not ready: {'; '.join(MISSING)}"),
]
# Makes the ONNX Runtime backend compute something else, but only inside an emulated guest (the host's gate and
# the checksummed files stay as built): what a broken kernel on one CPU looks like to the self-test.
WRONG_NUMERICS = f"""
import os
if os.environ.get("{EMULATED_ENV}"):
    from bitdeploy.runtimes.engines import ort
    _infer = ort.OrtBackend._infer
    ort.OrtBackend._infer = lambda self, batch: _infer(self, batch) * 1.5
"""


def bitdeploy(
    args: list[str], timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bitdeploy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`bitdeploy ARGS` started, not waited for: a guest is one single-threaded QEMU process, so a test with two
    independent guests runs them side by side (`finish` collects each)."""
    return subprocess.Popen(
        [sys.executable, "-m", "bitdeploy", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def finish(proc: subprocess.Popen[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def build_args(out: Path, target: str, precisions: str, verify_on: str) -> list[str]:
    return [
        "build", "--model", "tiny", "--weights", "none", "--dataset", "digits", "--resolution", "16",
        "--steps", "30", "--batch-size", "32", "--lr", "0.05", "--no-hflip", "--eval-limit", "64",
        "--calib-size", "32", "--max-accuracy-drop", "100", "--no-report", "--no-cache",
        "--target", target, "--precision", precisions, "--verify-on", verify_on, "--out", str(out),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("emulated") / "tiny"
    proc = bitdeploy(build_args(out, "all", "fp32,int8", ",".join(CPUS)), timeout=1200)
    return out, proc


def manifests(out: Path) -> dict[str, dict[str, Any]]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/manifest.json"))}


def test_every_engine_fp32_and_int8_passes_on_each_emulated_cpu(
    built: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, proc = built
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("target"))
    assert header.split()[-3:] == list(CPUS)
    found = manifests(out)
    expected = {f"{t}-{p}" for t in ("onnx", "openvino", "litert") for p in ("fp32", "int8")}
    assert expected - {"litert-fp32", "litert-int8"} <= set(found), sorted(found)
    for name, manifest in found.items():
        if name.startswith("trt-"):  # a ready bundle: its engine runs on an NVIDIA GPU, which no CPU guest emulates
            assert manifest["target"]["engine"]["status"] == "pending" and not manifest.get("verified_on"), name
            continue
        verified = {v["cpu"]: v for v in manifest["verified_on"]}
        assert set(verified) == set(CPUS), name
        assert all(v["passed"] and v["error"] is None for v in verified.values()), (name, verified)
        # what the runtime saw inside each emulator
        assert verified["cortex-a72"]["class"] == "arm64 (no dotprod)" and verified["cortex-a72"]["features"] == [
            "asimd"
        ]
        assert verified["neoverse-n1"]["class"] == "arm64 dotprod" and "fphp" in verified["neoverse-n1"]["features"]
        assert verified["sandybridge"]["class"] == "x86-64 (no AVX2)"
        if name.startswith("openvino"):  # OpenVINO's default is f16 on neoverse-n1: the pinned f32 held
            assert {v["precision_used"] for v in verified.values()} == {"f32"}, verified
    # the bundles still load as built: the manifest was rewritten through the one writer, checksums and all
    assert bitdeploy(["verify", str(out / "onnx-int8")]).returncode == 0


def test_verify_emulate_json_shows_arm_features_and_compute_precision(
    built: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, _ = built
    proc = bitdeploy(["verify", str(out / "openvino-fp32"), "--emulate", "neoverse-n1,neoverse-v1", "--json"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert "numerics, not speed" in report["note"]
    n1, v1 = report["checks"]
    cpu = n1["fingerprint"]["cpu"]
    assert n1["passed"] and n1["emulated"]["cpu"] == "neoverse-n1" and n1["precision_used"] == "f32"
    assert cpu["arch"] == "aarch64" and {"asimd", "dotprod", "fphp"} <= set(cpu["features"])
    assert cpu["emulated"] == "neoverse-n1" and n1["self_test"]["max_rel_error"] < 1e-3
    # Graviton3: what numpy does not probe (i8mm, bf16) comes from the kernel's hwcaps that QEMU sets
    cpu = v1["fingerprint"]["cpu"]
    assert v1["passed"] and cpu["class"] == "arm64 dotprod i8mm bf16" and "sve" in cpu["features"]


def test_numerics_that_do_not_hold_on_a_cpu_fail_there_in_one_line(
    built: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = built
    (tmp_path / "sitecustomize.py").write_text(WRONG_NUMERICS)
    wrong = {"PYTHONPATH": str(tmp_path)}
    verify = start(["verify", str(out / "onnx-fp32"), "--emulate", "sandybridge"], env=wrong)  # beside the step below

    # the build's --verify-on step on a copy of that bundle: marked FAIL, recorded, one line for the build
    from bitdeploy.benchmarks.schema import Timing
    from bitdeploy.builder.verify_on import failure, run
    from tests.rows import row

    copy = tmp_path / "onnx-fp32"
    shutil.copytree(out / "onnx-fp32", copy)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    rows = [row("onnx-fp32", timing=Timing(p50_ms=1.0), bundle=str(copy))]
    run(rows, "sandybridge", None, log=lambda _: None)
    assert rows[0].devices["sandybridge"].startswith("FAIL: max relative logit error")
    line = failure(rows, selected=False)
    assert line is not None and "onnx-fp32 is valid here but fails its self-test on sandybridge" in line
    (entry,) = json.loads((copy / "manifest.json").read_text())["verified_on"]
    assert entry["cpu"] == "sandybridge" and not entry["passed"] and entry["error"].startswith("max relative")

    proc = finish(verify)  # `bitdeploy verify --emulate` on the bundle itself
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "onnx-fp32 on sandybridge: max relative logit error" in errors[0]
    assert "FAIL" in proc.stdout and "numerics, not speed" in proc.stdout


def test_a_host_kernel_pin_does_not_reach_the_guest(built: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = built  # OPENBLAS_CORETYPE=Haswell on an SSE4.2 guest would make numpy die of Illegal instruction
    pinned = {"OPENBLAS_CORETYPE": "Haswell"}
    bundles = [str(out / "onnx-int8"), str(out / "litert-int8")]
    as_json = start(["verify", *bundles, "--emulate", "nehalem", "--json"], env=pinned)
    as_text = start(["verify", bundles[0], "--emulate", "nehalem"], env=pinned)  # the two guests side by side
    proc = finish(as_json)
    assert proc.returncode == 0, proc.stderr[-2000:]
    checks = json.loads(proc.stdout)["checks"]
    assert len(checks) == 2 and all(c["passed"] for c in checks), checks
    assert all("OPENBLAS_CORETYPE" in c["emulated"]["dropped_env"] for c in checks)  # the host may pin more
    text = finish(as_text)
    assert text.returncode == 0, text.stderr[-2000:]
    assert "guest started without" in text.stdout and "OPENBLAS_CORETYPE" in text.stdout, text.stdout


def test_a_cpu_below_the_floor_is_one_line_not_a_core_dump(
    built: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    from bitdeploy.core.devices import _numpy_version

    if (_numpy_version() or (0, 0)) < (2, 4):
        pytest.skip("numpy < 2.4 runs on SSE4.1: Penryn is not below its floor")
    out, _ = built
    proc = bitdeploy(["verify", str(out / "onnx-int8"), "--emulate", "penryn"])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-2000:]
    assert "onnx-int8 on penryn: penryn (x86 SSE4.1, Core 2: below the floor) lacks SSE4.2, POPCNT" in errors[0]
