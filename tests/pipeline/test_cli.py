"""CLI-wide behaviour: --version, --help on every command, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from bitdeploy import __version__
from bitdeploy.cli import COMMANDS, cli


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_on_every_command(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and command in result.output


def test_top_level_help_lists_commands() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


def test_usage_error_exits_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bitdeploy", "build", "--target", "nonsense"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_unknown_model_is_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bitdeploy", "export", "--model", "r9000", "--weights", "none", "--out", "x.onnx"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown model" in lines[0], proc.stderr
