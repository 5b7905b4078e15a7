"""Devices you don't own, without running an emulator: the CPU table, the minimum-CPU guard, what a missing or
old QEMU / kit says, and how --verify-on results reach the table, the selection, the manifest and the report.
The emulated runs themselves are in tests/runtimes/test_emulation_devices.py."""

from __future__ import annotations

import json
import os
import platform
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bitdeploy.benchmarks.ranking import Criteria, SelectionError
from bitdeploy.benchmarks.schema import Timing
from bitdeploy.builder.finish import select
from bitdeploy.builder.result import RowResult
from bitdeploy.builder.table import table
from bitdeploy.core import devices
from bitdeploy.core.errors import BitdeployError
from bitdeploy.emulation.guest import summarize_failures
from bitdeploy.runtimes.bundle.manifest import Manifest
from tests.clirun import one_error_line, run_cli
from tests.rows import row as make_row


def fake_qemu(kit: Path, name: str, version: str) -> None:
    """A `<kit>/bin/NAME` that only answers --version, as QEMU does."""
    (kit / "bin").mkdir(parents=True, exist_ok=True)
    script = kit / "bin" / name
    script.write_text(f"#!/bin/sh\necho '{name} version {version} (fake)'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_cpu_names_are_checked_in_one_line() -> None:
    assert [c.name for c in devices.find("Cortex-A72, neoverse-n1,cortex-a72")] == ["cortex-a72", "neoverse-n1"]
    with pytest.raises(BitdeployError, match=r"unknown CPU model 'pi4'; choose from cortex-a53, .*bitdeploy devices"):
        devices.find("cortex-a72,pi4")
    boards = {c.name: c.board for c in devices.CPUS}
    assert boards["cortex-a72"] == "Raspberry Pi 4" and boards["neoverse-v1"] == "AWS Graviton3"


@pytest.mark.parametrize(
    ("cpu", "numpy_version", "missing"),
    [
        ("penryn", (2, 4), "lacks SSE4.2, POPCNT"),
        ("nehalem", (2, 4), None),
        ("sandybridge", (2, 4), None),
        ("penryn", (2, 3), None),  # numpy < 2.4 needs SSE3 only
        ("cortex-a53", (2, 4), None),
    ],
)
def test_minimum_cpu_guard(
    monkeypatch: pytest.MonkeyPatch, cpu: str, numpy_version: tuple[int, int], missing: str | None
) -> None:
    monkeypatch.setenv(devices.EMULATED_ENV, cpu)
    monkeypatch.setattr(devices, "_numpy_version", lambda: numpy_version)
    why = devices.below_floor()
    if missing is None:
        assert why is None
    else:
        assert why is not None and missing in why and "numpy 2.4" in why and "Nehalem" in why


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the x86-64 guard")
def test_cli_refuses_a_cpu_below_the_floor_before_numpy(tmp_path: Path) -> None:
    """What a Core 2 user sees instead of an Illegal instruction: one line, exit 1, numpy never imported."""
    if (devices._numpy_version() or (0, 0)) < (2, 4):
        pytest.skip("numpy < 2.4 runs on SSE3: nothing to refuse")
    code = "import sys; from bitdeploy.cli import main\ntry:\n    main(['models'])\nfinally:\n    print('numpy' in sys.modules)"
    env = {**os.environ, devices.EMULATED_ENV: "penryn"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and proc.stdout.strip() == "False", proc.stdout + proc.stderr
    assert "penryn (x86 SSE4.1, Core 2: below the floor) lacks SSE4.2, POPCNT" in one_error_line(proc.stderr)


def test_without_qemu_emulate_and_verify_on_say_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("BITDEPLOY_KIT", str(tmp_path / "kit"))
    bundle = tmp_path / "b"
    bundle.mkdir()
    code, _, err = run_cli(["verify", str(bundle), "--emulate", "cortex-a72"], capsys)
    line = one_error_line(err)
    assert code == 1 and "qemu-aarch64 not found; install QEMU >= 8.1" in line and "bookworm-backports" in line
    out = tmp_path / "out"
    code, _, err = run_cli(["build", "--model", "tiny", "--out", str(out), "--verify-on", "sandybridge"], capsys)
    assert code == 1 and "qemu-x86_64 not found; install qemu-user" in one_error_line(err)
    assert not out.exists()  # refused before anything was built


def test_old_qemu_and_missing_kit_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kit = tmp_path / "kit"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    fake_qemu(kit, "qemu-aarch64", "7.2.22")
    bundle = tmp_path / "b"
    bundle.mkdir()
    code, _, err = run_cli(["verify", str(bundle), "--emulate", "cortex-a76", "--kit-dir", str(kit)], capsys)
    assert code == 1 and "is QEMU 7.2; ARM emulation needs >= 8.1" in one_error_line(err)
    code, _, err = run_cli(["devices", "setup", "arm64", "--kit-dir", str(kit)], capsys)
    assert code == 1 and "is QEMU 7.2" in one_error_line(err)

    fake_qemu(kit, "qemu-aarch64", "10.0.2")
    code, _, err = run_cli(["verify", str(bundle), "--emulate", "neoverse-n1", "--kit-dir", str(kit)], capsys)
    assert code == 1 and one_error_line(err).endswith("run: bitdeploy devices setup arm64")
    code, out, _ = run_cli(["devices", "--kit-dir", str(kit), "--json"], capsys)
    table_ = json.loads(out)
    ready = {r["cpu"]: r["ready"] for r in table_["cpus"]}
    assert code == 0 and not ready["cortex-a72"] and "setup arm64" in table_["missing"]["arm64"]


def test_devices_table_names_boards_and_readiness(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["devices", "--kit-dir", str(tmp_path)], capsys)
    assert code == 0
    for text in ("cortex-a76", "Raspberry Pi 5", "neoverse-n1", "AWS Graviton2", "sandybridge", "numerics, not speed"):
        assert text in out


def row(name: str, p50: float, devices_: dict[str, str]) -> RowResult:
    return make_row(name, timing=Timing(p50_ms=p50), bundle=f"/x/{name}", devices=devices_)


def test_verify_on_results_reach_table_and_selection() -> None:
    rows = [
        row("onnx-int8", 1.0, {"cortex-a72": "pass", "haswell": "FAIL: top-1 agreement 80% < 95%"}),
        row("openvino-int8", 2.0, {"cortex-a72": "pass", "haswell": "pass"}),
    ]
    text = table(rows)
    header = text.splitlines()[0]
    assert header.split()[-2:] == ["cortex-a72", "haswell"]
    assert "FAIL" in text.splitlines()[2] and "80%" not in text  # the reason is logged, the cell stays short
    pick = select(rows, Criteria("fastest"))
    assert pick is not None and pick[0].name == "openvino-int8"  # the faster one fails on haswell
    assert "failing on a --verify-on CPU: onnx-int8" in pick[1]
    with pytest.raises(SelectionError):
        select(rows[:1], Criteria("fastest"))


def test_summary_line_names_bundle_and_cpu() -> None:
    matrix = {
        "cortex-a72": [{"bundle": "/r/onnx-int8", "passed": True}],
        "haswell": [{"bundle": "/r/onnx-int8", "passed": False, "error": "the guest died: Illegal instruction"}],
    }
    assert summarize_failures(matrix) == (
        "1 of 2 emulated self-tests failed: onnx-int8 on haswell: the guest died: Illegal instruction"
    )
    assert summarize_failures({"haswell": [{"bundle": "/r/x", "passed": True}]}) is None


def test_manifest_keeps_where_it_was_verified() -> None:
    entry = {"cpu": "cortex-a72", "board": "Raspberry Pi 4", "passed": True, "features": ["asimd"]}
    manifest = Manifest.from_dict({"valid": True, "verified_on": [entry]})
    assert manifest.verified_on == [entry] and manifest.to_dict()["verified_on"] == [entry]
    assert Manifest.from_dict({"valid": True}).verified_on is None
    with pytest.raises(BitdeployError, match="verified_on must be a list of objects"):
        Manifest.from_dict({"verified_on": "cortex-a72"})


def test_report_shows_the_device_matrix() -> None:
    from bitdeploy.benchmarks.report_render import device_matrix

    doc = {"settings": {"verified_on": {"onnx-int8": {"cortex-a72": "pass", "haswell": "FAIL: x"}}}}
    assert device_matrix([doc]) == (
        ["bundle", "cortex-a72 (emulated)", "haswell (emulated)"],
        [["onnx-int8", "pass", "FAIL: x"]],
    )
    assert device_matrix([{"settings": {}}]) == ([], [])


def test_ort_auto_scheme_holds_on_every_named_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from bitdeploy.converters import ort_convert

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert ort_convert.auto_scheme("cpu", ())[0] == "s8s8"
    assert ort_convert.auto_scheme("cpu", ("arm64",))[0] == "s8s8"
    scheme, why = ort_convert.auto_scheme("cpu", ("arm64", "x86_64"))
    assert scheme == "u8s8-7bit" and "verified on (arm64, x86_64)" in why
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert ort_convert.auto_scheme("cpu", ("arm64",))[0] == "u8s8-7bit"
    assert ort_convert.auto_scheme("cuda", ("x86_64",))[0] == "s8s8"


def test_a_guest_that_dies_becomes_one_line() -> None:
    from bitdeploy.emulation.guest import _death

    assert _death(-4, "qemu: uncaught target signal 4 (Illegal instruction) - core dumped").startswith(
        "the guest died: Illegal instruction"
    )
    assert _death(139, "") == "the guest died (SIGSEGV)"
    assert _death(1, "noise\nerror: lacks SSE4.2; fix\n") == "lacks SSE4.2; fix"


def test_the_guest_starts_without_host_variables_that_pin_cpu_kernels() -> None:
    from bitdeploy.emulation.guest import guest_environment

    host = {
        "OPENBLAS_CORETYPE": "Haswell",
        "OPENBLAS_L2_SIZE": "1048576",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX",
        "DNNL_MAX_CPU_ISA": "AVX2",
        "QEMU_CPU": "max",
        "PATH": "/usr/bin",
        "HOME": "/root",
        "OMP_NUM_THREADS": "2",
    }
    env, dropped = guest_environment(host)
    pins = [
        "DNNL_MAX_CPU_ISA",
        "MKL_ENABLE_INSTRUCTIONS",
        "ONEDNN_MAX_CPU_ISA",
        "OPENBLAS_CORETYPE",
        "OPENBLAS_L2_SIZE",
    ]
    assert dropped == pins
    assert env == {"PATH": "/usr/bin", "HOME": "/root", "OMP_NUM_THREADS": "2"}
    assert guest_environment({"PATH": "/bin"}) == ({"PATH": "/bin"}, [])
