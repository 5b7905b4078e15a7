"""`bitdeploy models`: exactly the 12 released names, sizes from the catalog, cache state, and no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bitdeploy.cli import cli
from bitdeploy.core.catalog import count_params, get_variant

OFFICIAL = {f"{u}-r{d}x{w}" for u in "sm" for d, w in ((50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4))}


def test_json_lists_exactly_the_12_released_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITDEPLOY_CACHE", str(tmp_path))
    result = CliRunner().invoke(cli, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == 12 and {r["name"] for r in rows} == OFFICIAL
    by_name = {r["name"]: r for r in rows}
    r50 = by_name["s-r50x1"]
    assert r50["params"] == 25_549_352  # timm's resnetv2_50x1_bit with the 1000-class head
    assert abs(r50["gmacs_128"] - 1.337) < 0.01  # docs/measurements.md, quiet-machine figures
    assert (
        by_name["m-r50x1"]["params"] == count_params(get_variant("m-r50x1"))
        and by_name["m-r50x1"]["upstream_classes"] == 21843
    )
    assert by_name["m-r152x4"]["weights_file"] == "BiT-M-R152x4.npz" and by_name["m-r152x4"]["url"].endswith(
        "/BiT-M-R152x4.npz"
    )
    assert not any(r["cached"] for r in rows)


def test_table_and_cached_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITDEPLOY_CACHE", str(tmp_path))
    (tmp_path / "BiT-M-R101x1.npz").write_bytes(b"x")
    result = CliRunner().invoke(cli, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["name", "upstream", "data"]
    rows = {line.split()[0]: line for line in lines[1:13]}
    assert set(rows) == OFFICIAL
    assert rows["m-r101x1"].rstrip().endswith("yes") and rows["m-r50x1"].rstrip().endswith("no")
    assert "tiny" not in result.output
    cached = {r["name"] for r in json.loads(CliRunner().invoke(cli, ["models", "--json"]).output) if r["cached"]}
    assert cached == {"m-r101x1"}


def test_models_runs_without_torch(tmp_path: Path) -> None:
    code = "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None; from bitdeploy.cli import main; main(['models', '--json'])"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"BITDEPLOY_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == 12
