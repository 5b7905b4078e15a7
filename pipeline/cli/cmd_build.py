"""`bitdeploy build`: weights [-> fine-tune] -> ONNX -> bundle(s) for every registered target.

The shared flags are written out here; each target's own flags come from its record's options class
(`bitdeploy.converters.base.option` fields), read when the command runs (as `choices` reads --target), so a target
registered at any time brings its flags without an edit to this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from bitdeploy.cli import groups, groups_build
from bitdeploy.converters.base import Flag, TargetOptions, options_class
from bitdeploy.core.options import (
    CacheArgs,
    CalibrationArgs,
    EngineArgs,
    ExportArgs,
    GateArgs,
    GridArgs,
    SelectionArgs,
    TimingArgs,
    TrainingArgs,
)
from bitdeploy.core.targets import TARGETS, Target


def _param(target: Target, field: str) -> str:
    """The click parameter name of a target's option field (unique across targets)."""
    return f"{target.name}_{field}".replace("-", "_").replace(".", "_")


def _click_kwargs(flag: Flag, default: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"help": flag.help, "metavar": flag.metavar}
    if isinstance(default, bool):
        return {**kwargs, "is_flag": True, "default": default}
    if flag.choices:
        kind: Any = click.Choice(flag.choices)
    elif isinstance(default, int):
        kind = click.IntRange(min=None if flag.minimum is None else int(flag.minimum))
    elif isinstance(default, float) or flag.minimum is not None:
        kind = click.FloatRange(min=flag.minimum)
    else:
        kind = str
    return {**kwargs, "type": kind, "default": default, "show_default": default is not None}


def target_params(taken: set[str]) -> list[click.Parameter]:
    """Every registered target's own flags, in record order (`taken`: the shared flags, which none may reuse)."""
    owner = dict.fromkeys(taken, "build")
    params: list[click.Parameter] = []
    for target in TARGETS.values():
        cls = options_class(target)
        for name, flag, default in cls.flags() if cls is not None else []:
            if flag.flag in owner:
                raise ValueError(f"{flag.flag} of target {target.name!r} is already a flag of {owner[flag.flag]!r}")
            owner[flag.flag] = target.name
            params.append(click.Option([flag.flag, _param(target, name)], **_click_kwargs(flag, default)))
    return params


class BuildCommand(click.Command):
    """`build`: its shared flags, then each registered target's own, collected when the command is used."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = [*self.params, *target_params({o for p in self.params for o in p.opts})]
        help_option = self.get_help_option(ctx)
        return [*params, help_option] if help_option is not None else params


def target_options(values: dict[str, Any]) -> dict[str, TargetOptions]:
    """Each target's options object from the parsed flags (its defaults where a flag was not given)."""
    out = {}
    for target in TARGETS.values():
        cls = options_class(target)
        if cls is not None:
            out[target.name] = cls(**{name: values[_param(target, name)] for name, _, _ in cls.flags()})
    return out


@click.command("build", cls=BuildCommand)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="One bundle: the bundle directory; several: a directory of <target>-<precision> bundles [default: runs/<model>-<target>].",
)
@groups.option(groups.SEED)
@groups.takes(
    groups_build.GRID,
    groups_build.EXPORT,
    groups_build.ENGINE,
    groups_build.TRAINING,
    groups_build.CALIBRATION,
    groups_build.GATE,
    groups_build.TIMING,
    groups_build.SELECTION,
    groups_build.CACHE,
)
def build(  # noqa: PLR0913 - a command: its records are the argument groups
    out: Path | None,
    seed: int,
    grid: GridArgs,
    export: ExportArgs,
    engine: EngineArgs,
    training: TrainingArgs,
    calibration: CalibrationArgs,
    gate: GateArgs,
    timing: TimingArgs,
    selection: SelectionArgs,
    cache: CacheArgs,
    **target_flags: Any,
) -> None:
    """Build deployment bundles: weights [-> fine-tune] -> ONNX -> convert -> accuracy gate -> bundle.

    Each bundle is checked against the FP32 PyTorch model: on --dataset's validation split (top-1 drop at most
    --max-accuracy-drop points), else on seeded random inputs (logit tolerance). A bundle that fails is written
    with "valid": false (runtimes refuse it) and the command exits 1. INT8 needs --dataset for calibration.
    Export, fine-tune, calibration and conversions are cached by content: an identical rebuild reuses them.

    \b
    Examples:
      bitdeploy build --model m-r50x1 --weights none --target onnx --resolution 64 --out runs/r50
      bitdeploy build --model m-r50x1 --weights none --dataset digits --resolution 32 --steps 600 \\
          --batch-size 64 --lr 0.1 --target onnx --precision int8 --out runs/digits-int8
      bitdeploy build --model m-r50x1 --weights runs/digits-train --dataset digits --target all --select fastest --out runs/all
      bitdeploy build --model m-r50x1,m-r101x1 --resolution 64,96,128 --weights none --dataset digits \
          --target openvino,onnx --precision fp32,int8 --latency-budget 5 --out runs/grid
    """
    from bitdeploy.builder.build import run_build
    from bitdeploy.builder.grid import parse_shard, plan_cells, run_grid
    from bitdeploy.builder.options import BuildOptions

    cells = plan_cells(grid.models, list(grid.resolutions) or [None])
    if out is None and grid.is_grid:
        out = Path("runs") / "grid"
    elif out is None:
        precisions = engine.precisions
        tail = f"-{precisions[0]}" if precisions and len(precisions) == 1 and engine.target != "all" else ""
        out = Path("runs") / f"{grid.models[0]}-{engine.target.replace(',', '-')}{tail}"
    root = click.get_current_context().find_root()
    opts = BuildOptions(
        model=grid.models[0],
        out=out,
        resolution=grid.resolutions[0] if grid.resolutions else None,
        seed=seed,
        export=export,
        engine=engine,
        training=training,
        calibration=calibration,
        gate=gate,
        timing=timing,
        selection=selection,
        cache=cache,
        debug=bool((root.obj or {}).get("debug")),
        target_options=target_options(target_flags),
    )
    log = lambda msg: click.echo(msg, err=True)  # noqa: E731
    if grid.is_grid:
        run_grid(opts, cells, parse_shard(grid.shard) if grid.shard else None, grid.max_hours, log=log, show=click.echo)
    else:
        run_build(opts, log=log, show=click.echo)
