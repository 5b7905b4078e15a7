"""`bitdeploy inspect` of a bundle the INT8 search made: the manifest's `int8_mix` as one summary line and the
sensitivity table (text), whole in `--json`. The bundles hold a stand-in model file: inspect reads the manifest
and checks checksums, it never opens the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bitdeploy.runtimes.bundle import amend_manifest, bundle_writer, write_manifest
from bitdeploy.runtimes.bundle.manifest import Int8Mix, TargetInfo
from bitdeploy.runtimes.bundle.mix_text import COLUMNS, summary, table
from tests.clirun import run_cli as run
from tests.int8_mix_sample import FLOAT_GROUPS, UNMEASURED, failed_mix, sample_mix

from .conftest import make_manifest

INDENT = " " * 12  # inspect's field column


@pytest.fixture()
def int8_bundle(tmp_path: Path) -> Path:
    """A sealed INT8 bundle without a search record (`amend_manifest` adds one, keeping the seal)."""
    out = tmp_path / "onnx-int8"
    with bundle_writer(out) as tmp:
        (tmp / "model.onnx").write_bytes(b"stand-in model bytes")
        manifest = make_manifest(
            "onnxruntime", "model.onnx", "cpu", "int8", target=TargetInfo("onnxruntime", "int8", "int8", "cpu")
        )
        write_manifest(tmp, manifest, ["model.onnx"])
    return out


def _rows(out: str) -> dict[str, str]:
    return {line[:12].strip(): line[12:] for line in out.splitlines() if line[:12].strip()}


def test_inspect_shows_the_summary_and_the_table(int8_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    amend_manifest(int8_bundle, int8_mix=sample_mix())
    code, out, err = run(["inspect", int8_bundle], capsys)
    assert code == 0 and err == ""
    rows = _rows(out)
    line = rows["int8 mix"]
    assert line == summary(sample_mix())
    assert line.startswith("onnxruntime, gate agreement >= 99.5 %: 6 of 48 layers kept in fp32 (2 most sensitive")
    assert "top-1 79.90%, agreement 99.61% vs uniform INT8's 97.00%" in line
    assert "granularity unit, 7/8 evaluations in 123 s; p50 mix 1.10 ms vs FP32 2.40 ms" in line
    assert rows["checksums"] == "ok (1 file(s) verified)"  # the amendment kept the seal
    lines = out.splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith("int8 mix"))
    shown = lines[at + 1 : at + 7]  # the header and five groups, under the summary, in the value column
    assert all(x.startswith(INDENT) for x in shown) and [x[12:] for x in shown] == table(sample_mix())
    assert shown[0].split() == ["rank", "group", "layers", "error", "removed", "agreement", "gain", "in", "mix"]
    assert shown[1].split() == ["1", FLOAT_GROUPS[0], "3", "41.2%", "+1.30", "pp", "float"]
    assert shown[2].split()[1::5] == [FLOAT_GROUPS[1], "float"]
    assert shown[4].split() == ["4", "head.conv", "1", "-1.2%", "-0.05", "pp", "INT8"]
    assert shown[5].split() == ["5", UNMEASURED, "4", "not", "measured", "-", "INT8"]
    assert lines[at + 7].startswith("provenance")


def test_inspect_json_holds_the_record(int8_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    amend_manifest(int8_bundle, int8_mix=sample_mix(uniform_p50=0.9))
    code, out, _ = run(["inspect", int8_bundle, "--json"], capsys)
    data = json.loads(out)["manifest"]["int8_mix"]
    assert code == 0 and data == sample_mix(uniform_p50=0.9).to_dict()
    assert Int8Mix.from_dict(data) == sample_mix(uniform_p50=0.9)
    code, out, _ = run(["inspect", int8_bundle], capsys)
    assert "p50 mix 1.10 ms vs uniform INT8 0.90 ms vs FP32 2.40 ms" in _rows(out)["int8 mix"]


def test_a_failed_search_and_no_search(int8_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["inspect", int8_bundle], capsys)
    assert code == 0 and "int8 mix" not in out
    code, out, _ = run(["inspect", int8_bundle, "--json"], capsys)
    assert "int8_mix" not in json.loads(out)["manifest"]
    amend_manifest(int8_bundle, int8_mix=failed_mix())
    code, out, _ = run(["inspect", int8_bundle], capsys)
    line = _rows(out)["int8 mix"]
    assert code == 0 and line.startswith("openvino, gate agreement >= 99.5 %: no mix chosen, all 2 layers INT8")
    assert "(the bundle is uniform INT8, agreement 95.00%)" in line and line.endswith(
        "0/8 evaluations in 0 s; not timed"
    )
    assert "error removed" not in out  # no group measured: no table


def test_every_group_unmeasured_or_unranked() -> None:
    from bitdeploy.runtimes.bundle.manifest_mix import LayerCost

    mix = Int8Mix(engine="openvino", sensitivity=[LayerCost(name="root", layers=1), LayerCost(name="head.conv")])
    lines = table(mix)
    assert lines[0].split()[:2] == list(COLUMNS[:2])
    assert [x.split() for x in lines[1:]] == [
        ["-", "root", "1", "not", "measured", "-", "INT8"],
        ["-", "head.conv", "-", "not", "measured", "-", "INT8"],
    ]
    assert (
        summary(mix)
        == "openvino: no mix chosen, all 0 layers INT8 (the bundle is uniform INT8); granularity layer, 0/0 evaluations; not timed"
    )


def test_the_text_helpers_are_light() -> None:
    """What inspect imports for the record needs neither torch nor matplotlib (the runtime stays torch-free)."""
    code = (
        "import sys\n"
        "for name in ('torch', 'onnx', 'matplotlib'):\n"
        "    sys.modules[name] = None\n"
        "import bitdeploy.runtimes.bundle.mix_text\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'matplotlib') and sys.modules[m]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
