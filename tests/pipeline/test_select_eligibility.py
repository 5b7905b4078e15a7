"""One eligibility rule for every selection (`runtimes.bundle.eligibility`): `build --select`, `bitdeploy select`
and `report --select` refuse a bf16 bundle no CPU computing bf16 checked, and a bundle that failed --verify-on on
the device class asked for; their one line names what they excluded and why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bitdeploy.runtimes.bundle.eligibility import BUILD_HOST, UNCHECKED, Checks, excluded
from bitdeploy.runtimes.bundle.manifest import BuildLatency, GateResult, Manifest, TargetInfo
from tests.clirun import run_cli

AVX2 = {"cpu": {"arch": "x86_64", "features": ["avx2", "fma"], "class": "x86-64 AVX2 (no VNNI)"}}
SPR = {"cpu": {"arch": "x86_64", "features": ["avx2", "avx512f", "avx512_bf16", "amx_bf16"], "class": "x86-64 AMX"}}
PI5 = "arm64 dotprod"  # cortex-a76's class, as its guest fingerprints it


def _verified(cpu: str, passed: bool = True, cls: str | None = None) -> dict[str, Any]:
    return {"cpu": cpu, "passed": passed, "class": cls, "error": None if passed else "agreement 80% < 95%"}


def _manifest(
    name: str,
    p50: float,
    top1: float = 0.95,
    float_precision: str | None = None,
    host: dict[str, Any] | None = None,
    verified: list[dict[str, Any]] | None = None,
) -> Manifest:
    backend = "openvino" if float_precision else "onnxruntime"
    details = {"inference_precision": float_precision} if float_precision else {}
    return Manifest(
        valid=True,
        model_file="model.bin",
        target=TargetInfo(backend, "int8", details=details),
        files={"model.bin": f"{name:0>64}"[-64:]},  # distinct checksums: device results match bundles by them
        gate=GateResult("accuracy", True, 359, 0.99, 0.1, 0.01, top1=top1, reference_top1=0.95, top1_drop_pp=0.0),
        build_latency=BuildLatency(batch1_p50_ms=p50, batch1_p50_spread_ms=(p50, p50)),
        validated_on={**(host or AVX2), "evaluated_with": f"{backend} (CPU)"},
        verified_on=verified,
    )


def _folder(root: Path, manifests: dict[str, Manifest]) -> Path:
    for name, m in manifests.items():
        (root / name).mkdir(parents=True)
        (root / name / "manifest.json").write_text(json.dumps(m.to_dict()))
    return root


def test_the_rule_reads_the_manifest() -> None:
    bf16 = _manifest("a", 1.0, float_precision="bf16")
    assert excluded(bf16) is not None and excluded(bf16).group == UNCHECKED  # type: ignore[union-attr]
    assert excluded(_manifest("a", 1.0, float_precision="bf16", host=SPR)) is None  # the gate ran bf16 there
    emulated = {"cpu": {**SPR["cpu"], "emulated": "neoverse-v1"}}
    assert excluded(_manifest("a", 1.0, float_precision="bf16", host=emulated)) is not None
    stand_in = _manifest("a", 1.0, float_precision="bf16", host=SPR)
    stand_in = Manifest.from_dict({**stand_in.to_dict(), "validated_on": {**SPR, "evaluated_with": "m.onnx on ORT"}})
    assert excluded(stand_in) is not None  # an ONNX stand-in ran the gate, not the bf16 engine
    haswell = _manifest("a", 1.0, float_precision="bf16", verified=[_verified("haswell")])
    assert excluded(haswell) is not None  # a haswell check ran its f32 fallback
    assert excluded(_manifest("a", 1.0, float_precision="bf16", verified=[_verified("neoverse-v1")])) is None
    failed = _manifest("a", 1.0, verified=[_verified("cortex-a76", False, PI5), _verified("haswell")])
    assert excluded(failed).detail == "cortex-a76"  # type: ignore[union-attr]
    assert excluded(failed, PI5) is not None and excluded(failed, f"{PI5} + NVIDIA L4 (sm 8.9)") is not None
    assert excluded(failed, "x86-64 AVX2 (no VNNI)") is None  # it failed on a Pi 5, not on this class
    checks = Checks.of(failed)
    assert Checks.from_dict(json.loads(json.dumps(checks.to_dict()))) == checks
    assert [c.cpu for c in checks.checked_on] == [BUILD_HOST, "cortex-a76", "haswell"]


def test_select_refuses_an_unchecked_bf16_bundle_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _folder(
        tmp_path / "grid",
        {
            "ov-int8": _manifest("ov", 1.0, float_precision="bf16", verified=[_verified("haswell")]),
            "ort-int8": _manifest("ort", 2.0),
        },
    )
    code, out, err = run_cli(["select", root, "--select", "fastest"], capsys)
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("selected: "))
    assert line.startswith("selected: ort-int8: fastest")
    assert "excluded, float precision not checked on a CPU that computes it" in line and "ov-int8 (bf16)" in line
    record = json.loads((root / "selection.json").read_text())
    assert record["selected"]["name"] == "ort-int8" and record["excluded"] == {"ov-int8": f"{UNCHECKED}: bf16"}


def _device_doc(root: Path, manifests: dict[str, Manifest], device_class: str) -> dict[str, Any]:
    """`bitdeploy bench ROOT --all --json` as a device of `device_class` writes it: one entry per bundle."""
    from bitdeploy.benchmarks.discovery import bundle_entry
    from bitdeploy.benchmarks.schema import VALID, new_document

    entries = [
        bundle_entry(name, str(root / name), m, VALID, single_stream={"p50_ms": m.build_latency.batch1_p50_ms})  # type: ignore[union-attr]
        for name, m in manifests.items()
    ]
    return new_document(entries, {"hostname": "dev", "device_class": device_class})


def test_select_for_a_class_refuses_a_bundle_that_failed_verify_on_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifests = {
        "ov-int8": _manifest("ov", 1.0, verified=[_verified("cortex-a76", False, PI5)]),
        "ort-int8": _manifest("ort", 2.0, verified=[_verified("cortex-a76", True, PI5)]),
    }
    root = _folder(tmp_path / "grid", manifests)
    pi5 = tmp_path / "pi5.json"
    pi5.write_text(json.dumps(_device_doc(root, manifests, PI5)))
    code, out, err = run_cli(["select", root, "--results", pi5, "--select", "fastest"], capsys)
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("selected: "))
    assert line.startswith("selected: ort-int8") and "failing on a --verify-on CPU: ov-int8 (cortex-a76)" in line
    x86 = tmp_path / "x86.json"  # the same bundles measured on another class: the Pi 5 failure does not count
    x86.write_text(json.dumps(_device_doc(root, manifests, "x86-64 AVX2 (no VNNI)")))
    code, out, err = run_cli(["select", root, "--results", x86, "--select", "fastest"], capsys)
    assert code == 0, err
    assert "selected: ov-int8" in out


def test_report_select_applies_the_same_rule(tmp_path: Path) -> None:
    from bitdeploy.benchmarks.report import select_fastest

    manifests = {
        "ov-bf16": _manifest("ovb", 0.5, float_precision="bf16", verified=[_verified("haswell")]),
        "ov-int8": _manifest("ov", 1.0, verified=[_verified("cortex-a76", False, PI5)]),
        "ort-int8": _manifest("ort", 2.0),
    }
    pi5 = _device_doc(tmp_path, manifests, PI5)
    picked = select_fastest(pi5)
    assert picked is not None and picked["name"] == "ort-int8"
    assert (
        "float precision not checked on a CPU that computes it" in picked["reason"]
        and "ov-bf16 (bf16)" in picked["reason"]
    )
    assert "failing on a --verify-on CPU: ov-int8 (cortex-a76)" in picked["reason"]
    x86 = select_fastest(_device_doc(tmp_path, manifests, "x86-64 AVX2 (no VNNI)"))
    assert x86 is not None and x86["name"] == "ov-int8"  # bf16 still unchecked; the Pi 5 failure is another class
    old = _device_doc(tmp_path, manifests, PI5)
    for e in old["results"]:
        e["build_checks"] = None  # documents from before the field: only the status decides
    assert select_fastest(old)["name"] == "ov-bf16"  # type: ignore[index]


def test_build_select_counts_a_build_host_that_computes_bf16() -> None:
    from bitdeploy.benchmarks.ranking import Criteria
    from bitdeploy.benchmarks.schema import Timing
    from bitdeploy.builder.finish import select
    from tests.rows import row

    def rows(host: dict[str, Any]) -> list[Any]:
        fast = row("openvino-int8", top1=0.9, timing=Timing(1.0), float_precision="bf16", host=host)
        return [fast, row("onnx-int8", top1=0.9, timing=Timing(2.0), host=host)]

    assert select(rows(SPR), Criteria("fastest"))[0].name == "openvino-int8"
    best, line = select(rows(AVX2), Criteria("fastest"))
    assert best.name == "onnx-int8" and "openvino-int8 (bf16)" in line
