"""`bitdeploy build`: weights [-> fine-tune] -> ONNX -> bundle(s) for every registered target.

The shared flags are written out here; each target's own flags come from its record's options class
(`bitdeploy.converters.base.option` fields), read when the command runs (as `choices` reads --target), so a target
registered at any time brings its flags without an edit to this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from bitdeploy.cli import choices
from bitdeploy.cli.cmd_bench import quiet_check_option
from bitdeploy.converters.base import Flag, TargetOptions, options_class
from bitdeploy.core.targets import PRECISIONS, TARGETS, Target

CALIB_HELP = "; ".join(
    f"{t.name}: {'|'.join(t.calib_methods)} (default {t.calib_methods[0]})" for t in TARGETS.values() if t.calib_methods
)
TARGET_HELP = ", ".join(f"{t.name} ({t.title})" for t in TARGETS.values())
DEVICE_HELP = "; ".join(f"{t.name}: {t.devices}" for t in TARGETS.values() if t.devices)


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


def _resolutions(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    out: list[int] = []
    for v in str(value).split(","):
        if not v.strip():
            continue
        try:
            px = int(v)
        except ValueError:
            raise click.BadParameter(f"{v.strip()!r} is not a whole number of pixels, e.g. 64 or 64,96,128") from None
        if not 16 <= px <= 2048:
            raise click.BadParameter(f"{px} px is outside 16..2048")
        out.append(px)
    return list(dict.fromkeys(out)) or None


def _precisions(values: tuple[str, ...]) -> list[str] | None:
    out: list[str] = []
    for v in values:
        for p in v.split(","):
            p = p.strip().lower()
            if not p:
                continue
            if p not in PRECISIONS:
                raise click.BadParameter(f"{p!r} is not one of {', '.join(PRECISIONS)}", param_hint="--precision")
            if p not in out:
                out.append(p)
    return out or None


@click.command("build", cls=BuildCommand)
@click.option(
    "--model",
    "model_name",
    required=True,
    metavar="NAME[,NAME...]",
    help="Model name (see `bitdeploy models`), e.g. m-r50x1; a comma list builds a grid (with --resolution lists).",
)
@click.option(
    "--weights",
    default="auto",
    show_default=True,
    help="auto (official, cached) | none (random init) | PATH (.npz, checkpoint.pt or training dir).",
)
@click.option(
    "--target",
    type=choices.TargetList(),
    default="onnx",
    show_default=True,
    help=f"{TARGET_HELP}; a comma list, or all (every target this machine supports).",
)
@click.option(
    "--precision",
    "precision",
    multiple=True,
    metavar="fp32|fp16|int8",
    help="Repeatable or comma list [default: fp32; with --target all: all three].",
)
@click.option(
    "--resolution",
    callback=_resolutions,
    default=None,
    metavar="PX[,PX...]",
    help="Square input size in px [default: the fine-tune's or checkpoint's, else 128]; a comma list builds a grid.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="One bundle: the bundle directory; several: a directory of <target>-<precision> bundles [default: runs/<model>-<target>].",
)
@click.option(
    "--dataset",
    default=None,
    help="digits | ImageFolder dir | CIFAR-10/100 binary: fine-tuning, calibration (train split) and the accuracy gate (val split).",
)
@click.option(
    "--val-split",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Validation fraction where the dataset has no split [default 0.2].",
)
@click.option(
    "--finetune/--no-finetune",
    default=None,
    help="Fine-tune on --dataset first [default: yes unless --weights is a trained checkpoint].",
)
@click.option("--shots", type=click.IntRange(min=1), default=None, help="Fine-tune on K seeded examples per class.")
@click.option(
    "--steps", type=click.IntRange(min=1), default=None, help="Fine-tuning steps [default: the BiT-HyperRule's]."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Fine-tuning batch [default 512].")
@click.option("--lr", type=float, default=None, help="Fine-tuning peak learning rate [default 0.003 x batch/512].")
@click.option(
    "--hflip/--no-hflip",
    default=True,
    show_default=True,
    help="Fine-tuning: random horizontal flips [rule: on]; turn off for digits and text.",
)
@click.option(
    "--train-device", default="auto", show_default=True, help="Where fine-tuning runs: auto | cpu | cuda | xla."
)
@click.option(
    "--calib-size",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    help="INT8 calibration images, drawn (seeded) from the training split.",
)
@click.option("--calib-method", default=None, help=f"INT8 range estimation; {CALIB_HELP}.")
@click.option(
    "--max-accuracy-drop",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Largest top-1 drop vs the FP32 PyTorch model, in percentage points, for a bundle to be valid.",
)
@click.option("--device", default=None, help=f"Deployment device; {DEVICE_HELP}.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Inference threads for evaluation and timing [default: the runtime's].",
)
@click.option(
    "--select",
    type=click.Choice(["fastest", "most-accurate"]),
    default=None,
    help="Pick among the bundles that passed the accuracy gate (and every --verify-on CPU) and mark it in the report "
    "[default with a budget: most-accurate; with --min-top1 alone: fastest].",
)
@click.option(
    "--latency-budget",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="MS",
    help="Select the most accurate valid bundle whose batch-1 p50 fits; none fits: exit 1 naming the fastest.",
)
@click.option(
    "--min-top1",
    type=click.FloatRange(1, 100),
    default=None,
    metavar="PCT",
    help="Select the fastest valid bundle with top-1 at least PCT percent (needs --dataset).",
)
@click.option(
    "--memory-budget",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="MB",
    help="Only bundles whose runtime process peaks within MB while serving batch 1 (measured per bundle).",
)
@click.option(
    "--shard",
    default=None,
    metavar="I/N",
    help="Grid: build only every N-th (model, resolution) cell from the I-th (0-based) over a shared --cache-dir; "
    "then run the build without --shard to assemble (docs/choosing.md).",
)
@click.option(
    "--max-hours",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Grid: stop before a cell that would end past this many hours, keeping what finished; rerun to continue.",
)
@click.option(
    "--verify-on",
    default=None,
    metavar="CPU[,CPU...]",
    help="After the gate, run each valid bundle's self-test on each emulated CPU, e.g. cortex-a72,neoverse-n1,haswell "
    "(`bitdeploy devices` lists them; the kit: `bitdeploy devices setup`, $BITDEPLOY_KIT).",
)
@click.option(
    "--eval-limit",
    type=click.IntRange(min=1),
    default=None,
    help="Evaluate the gate on a seeded subset of N validation images [default: all].",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seeds fine-tuning, calibration draw and evaluation subset."
)
@click.option("--opset", type=click.IntRange(13, 20), default=17, show_default=True, help="ONNX opset of the export.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Stage cache [default: $BITDEPLOY_CACHE/stages or ~/.cache/bitdeploy/stages].",
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Neither reuse nor store cached stages (export, fine-tune, calibration, conversions).",
)
@click.option("--no-report", is_flag=True, help="Do not time the bundles or write the report.")
@click.option(
    "--baseline/--no-baseline",
    default=True,
    show_default=True,
    help="Time the PyTorch FP32 baselines (eager and torch.compile) for the report's speed-up column.",
)
@click.option(
    "--bench-iterations",
    type=click.IntRange(min=5),
    default=100,
    show_default=True,
    help="Batch-1 queries timed per bundle for the table (use `bitdeploy bench` for full runs).",
)
@quiet_check_option
@click.pass_context
def build(
    ctx: click.Context,
    model_name: str,
    weights: str,
    target: str,
    precision: tuple[str, ...],
    resolution: list[int] | None,
    out: Path | None,
    dataset: str | None,
    val_split: float | None,
    finetune: bool | None,
    shots: int | None,
    steps: int | None,
    batch_size: int | None,
    lr: float | None,
    train_device: str,
    calib_size: int,
    calib_method: str | None,
    max_accuracy_drop: float,
    device: str | None,
    threads: int | None,
    select: str | None,
    latency_budget: float | None,
    min_top1: float | None,
    memory_budget: float | None,
    shard: str | None,
    max_hours: float | None,
    verify_on: str | None,
    eval_limit: int | None,
    seed: int,
    opset: int,
    cache_dir: Path | None,
    no_cache: bool,
    no_report: bool,
    baseline: bool,
    bench_iterations: int,
    quiet_check: str,
    hflip: bool,
    **flags: Any,
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
    from bitdeploy.builder.grid import parse_shard, plan_cells, run_grid
    from bitdeploy.builder.run import BuildOptions, run_build

    precisions = _precisions(precision)
    models = list(dict.fromkeys(m.strip() for m in model_name.split(",") if m.strip()))
    if not models:
        raise click.BadParameter("give a model name, e.g. m-r50x1", param_hint="--model")
    sizes: list[int | None] = list(resolution) if resolution else [None]
    cells = plan_cells(models, sizes)
    grid = len(cells) > 1 or shard is not None or max_hours is not None
    if out is None and grid:
        out = Path("runs") / "grid"
    elif out is None:
        tail = f"-{precisions[0]}" if precisions and len(precisions) == 1 and target != "all" else ""
        out = Path("runs") / f"{models[0]}-{target.replace(',', '-')}{tail}"
    debug = bool((ctx.find_root().obj or {}).get("debug"))
    opts = BuildOptions(
        model=models[0],
        out=out,
        weights=weights,
        target=target,
        precisions=precisions,
        resolution=resolution[0] if resolution else None,
        dataset=dataset,
        val_split=val_split,
        shots=shots,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        finetune=finetune,
        train_device=train_device,
        hflip=hflip,
        calib_size=calib_size,
        calib_method=calib_method,
        max_accuracy_drop=max_accuracy_drop,
        device=device,
        threads=threads,
        select=select,
        latency_budget=latency_budget,
        min_top1=min_top1,
        memory_budget=memory_budget,
        verify_on=verify_on,
        eval_limit=eval_limit,
        seed=seed,
        opset=opset,
        cache_dir=cache_dir,
        cache=not no_cache,
        report=not no_report,
        baseline=baseline,
        bench_iterations=bench_iterations,
        quiet_check=quiet_check,
        debug=debug,
        target_options=target_options(flags),
    )
    log = lambda msg: click.echo(msg, err=True)  # noqa: E731
    if grid:
        run_grid(opts, cells, parse_shard(shard) if shard else None, max_hours, log=log, show=click.echo)
    else:
        run_build(opts, log=log, show=click.echo)
