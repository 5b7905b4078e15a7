"""Argument groups: the commands take records, not flat flag lists; each shared flag is declared once."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from bitdeploy.cli import groups, groups_build, groups_run
from bitdeploy.cli.cmd_bench import bench
from bitdeploy.cli.cmd_build import build
from bitdeploy.cli.cmd_runtime import predict, serve
from bitdeploy.cli.cmd_select import select
from bitdeploy.cli.cmd_train import train
from bitdeploy.cli.cmd_verify import verify
from bitdeploy.core import options
from bitdeploy.core.errors import BitdeployError

ALL_GROUPS = [g for module in (groups_build, groups_run) for g in vars(module).values() if isinstance(g, groups.Group)]
COMMANDS = [build, bench, train, serve, predict, verify, select]


@pytest.mark.parametrize("command", [build, bench, train, serve], ids=lambda c: c.name)
def test_the_big_commands_take_at_most_twelve_parameters(command: click.Command) -> None:
    assert command.callback is not None
    assert len(inspect.signature(command.callback).parameters) <= 12


def test_every_group_parses_into_a_frozen_record_with_validate() -> None:
    assert len(ALL_GROUPS) >= 9
    for group in ALL_GROUPS:
        command = click.Command("x", params=[click.Option(list(decls), **attrs) for decls, attrs in group.flags])
        args = ["--model", "tiny"] if group is groups_build.GRID else []
        defaults = command.make_context("x", args).params  # the defaults, through each flag's callback
        record = group.make(**defaults)
        assert dataclasses.is_dataclass(record) and type(record).__dataclass_params__.frozen, group.param  # type: ignore[attr-defined]
        record.validate()
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, dataclasses.fields(record)[0].name, None)


def test_a_shared_flag_is_one_declaration() -> None:
    """A flag that two groups (or a group and a command) take is the same object from `groups`, not a copy."""
    shared = {v[0][0]: v for v in vars(groups).values() if _is_flag(v)}
    for group in ALL_GROUPS:
        for decls, attrs in group.flags:
            base = shared.get(decls[0])
            if base is not None:
                assert decls == base[0] and attrs.get("type") is base[1].get("type"), (group.param, decls[0])


def test_no_flag_is_declared_twice_within_a_command() -> None:
    for command in COMMANDS:
        names = [o for p in command.params for o in p.opts]
        assert len(names) == len(set(names)), command.name


def test_validate_runs_before_the_command_and_usage_errors_exit_2() -> None:
    result = CliRunner().invoke(bench, ["x", "--iterations", "5", "--duration", "1"])
    assert result.exit_code == 2 and "either --iterations or --duration" in result.output
    with pytest.raises(BitdeployError, match="--finetune needs --dataset"):
        options.TrainingArgs(finetune=True).validate()
    with pytest.raises(BitdeployError, match="--calib-size must be >= 1"):
        options.CalibrationArgs(calib_size=0).validate()


def test_build_options_compose_the_groups() -> None:
    from bitdeploy.builder.options import BuildOptions

    names = {f.name for f in dataclasses.fields(BuildOptions)}
    assert {"export", "engine", "training", "calibration", "gate", "timing", "selection", "cache"} <= names
    opts = BuildOptions(model="tiny", out=Path("x"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.out = None  # type: ignore[misc]


def _is_flag(value: object) -> bool:
    return (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], tuple)
        and bool(value[0])
        and isinstance(value[1], dict)
    )
