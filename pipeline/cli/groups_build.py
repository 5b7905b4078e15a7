"""The build's argument groups (and `select`'s selection): grid, export, engine, training, calibration, gate, timing,
selection, cache. The mechanism and the flags shared with other commands are in `bitdeploy.cli.groups`."""

from __future__ import annotations

from typing import Any

import click

from bitdeploy.cli import choices
from bitdeploy.cli.groups import (
    BATCH_SIZE,
    CACHE_DIR,
    DATASET,
    HFLIP,
    LR,
    OPSET,
    QUIET_CHECK,
    SHOTS,
    STEPS,
    THREADS,
    VAL_SPLIT,
    WEIGHTS,
    Group,
    flag,
    record_of,
    varied,
)
from bitdeploy.core import options as records
from bitdeploy.core.targets import PRECISIONS, TARGETS


def _resolutions(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...]:
    out: list[int] = []
    for v in str(value or "").split(","):
        if not v.strip():
            continue
        try:
            px = int(v)
        except ValueError:
            raise click.BadParameter(f"{v.strip()!r} is not a whole number of pixels, e.g. 64 or 64,96,128") from None
        if not 16 <= px <= 2048:
            raise click.BadParameter(f"{px} px is outside 16..2048")
        out.append(px)
    return tuple(dict.fromkeys(out))


def _precisions(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...] | None:
    out: list[str] = []
    for v in values:
        for p in v.split(","):
            p = p.strip().lower()
            if p and p not in PRECISIONS:
                raise click.BadParameter(f"{p!r} is not one of {', '.join(PRECISIONS)}")
            if p and p not in out:
                out.append(p)
    return tuple(out) or None


# -- build ------------------------------------------------------------------------------------------------------
def _grid(model_name: str, resolution: tuple[int, ...], shard: str | None, max_hours: float | None) -> Any:
    models = tuple(dict.fromkeys(m.strip() for m in model_name.split(",") if m.strip()))
    return records.GridArgs(models, resolution, shard, max_hours)


GRID = Group(
    "grid",
    (
        flag(
            "--model",
            "model_name",
            required=True,
            metavar="NAME[,NAME...]",
            help="Model name (see `bitdeploy models`), e.g. m-r50x1; a comma list builds a grid (with --resolution "
            "lists).",
        ),
        flag(
            "--resolution",
            callback=_resolutions,
            default=None,
            metavar="PX[,PX...]",
            help="Square input size in px [default: the fine-tune's or checkpoint's, else 128]; a comma list builds "
            "a grid.",
        ),
        flag(
            "--shard",
            default=None,
            metavar="I/N",
            help="Grid: build only every N-th (model, resolution) cell from the I-th (0-based) over a shared "
            "--cache-dir; then run the build without --shard to assemble (docs/choosing.md).",
        ),
        flag(
            "--max-hours",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            help="Grid: stop before a cell that would end past this many hours, keeping what finished; rerun to "
            "continue.",
        ),
    ),
    _grid,
)

EXPORT = Group(
    "export",
    (
        WEIGHTS,
        OPSET,
    ),
    records.ExportArgs,
)

ENGINE = Group(
    "engine",
    (
        flag(
            "--target",
            type=choices.TargetList(),
            default="onnx",
            show_default=True,
            help=f"{', '.join(f'{t.name} ({t.title})' for t in TARGETS.values())}; a comma list, or all (every target "
            "this machine supports).",
        ),
        flag(
            "--precision",
            "precisions",
            multiple=True,
            callback=_precisions,
            metavar="fp32|fp16|int8",
            help="Repeatable or comma list [default: fp32; with --target all: all three].",
        ),
        flag(
            "--device",
            default=None,
            help=f"Deployment device; {'; '.join(f'{t.name}: {t.devices}' for t in TARGETS.values() if t.devices)}.",
        ),
        THREADS,
    ),
    records.EngineArgs,
)

TRAINING = Group(
    "training",
    (
        varied(
            DATASET,
            help=f"{DATASET[1]['help'][:-1]}: fine-tuning, calibration (train split) and the accuracy gate (val split).",
        ),
        VAL_SPLIT,
        flag(
            "--finetune/--no-finetune",
            default=None,
            help="Fine-tune on --dataset first [default: yes unless --weights is a trained checkpoint].",
        ),
        SHOTS,
        STEPS,
        BATCH_SIZE,
        LR,
        HFLIP,
        flag(
            "--train-device", default="auto", show_default=True, help="Where fine-tuning runs: auto | cpu | cuda | xla."
        ),
    ),
    record_of(records.TrainingArgs, train_device="device"),
)

CALIBRATION = Group(
    "calibration",
    (
        flag(
            "--calib-size",
            type=click.IntRange(min=1),
            default=300,
            show_default=True,
            help="INT8 calibration images, drawn (seeded) from the training split.",
        ),
        flag(
            "--calib-method",
            default=None,
            help="INT8 range estimation; "
            + "; ".join(
                f"{t.name}: {'|'.join(t.calib_methods)} (default {t.calib_methods[0]})"
                for t in TARGETS.values()
                if t.calib_methods
            )
            + ".",
        ),
    ),
    records.CalibrationArgs,
)

GATE = Group(
    "gate",
    (
        flag(
            "--max-accuracy-drop",
            type=click.FloatRange(min=0),
            default=None,
            metavar="PP",
            help="Largest top-1 drop vs the FP32 PyTorch model, in percentage points, for a bundle to be valid "
            "[default: 1; none when --min-agreement is given alone].",
        ),
        flag(
            "--min-agreement",
            type=click.FloatRange(0, 100, min_open=True),
            default=None,
            metavar="PCT",
            help="Smallest top-1 agreement with the FP32 model on the validation split, in percent (e.g. 99: "
            "MLPerf's 99 % of FP32); alone or with --max-accuracy-drop.",
        ),
        flag(
            "--gate-confidence",
            type=float,
            default=None,
            metavar="LEVEL",
            help="Judge the gate on interval bounds at this level (0.5 < LEVEL < 1, e.g. 0.95): valid only when the "
            "top-1 drop's upper bound is within --max-accuracy-drop and agreement's lower bound meets --min-agreement "
            "[default: the point estimates; the table shows 95 % intervals either way].",
        ),
        flag(
            "--int8-fallback",
            type=click.Choice(records.INT8_FALLBACKS),
            default="auto",
            show_default=True,
            help="When uniform INT8 fails the gate: auto keeps the most sensitive layers in float until it passes "
            "(the fastest passing mix, never slower than FP32), and when no mix keeping most layers INT8 passes, "
            "fine-tunes with quantization in the loop (QAT, distilled from FP32); search stops at the mix; qat goes "
            "straight to the fine-tune; none leaves it invalid.",
        ),
        flag(
            "--qat-steps",
            type=click.IntRange(min=1),
            default=None,
            metavar="N",
            help="Steps of the quantization-aware fine-tune [default: a tenth of the FP32 fine-tune's, at least 20].",
        ),
        flag(
            "--int8-search-budget",
            type=click.IntRange(min=2),
            default=24,
            show_default=True,
            metavar="N",
            help="Most conversions + evaluations that search spends per engine (each cached); a smaller budget "
            "searches coarser groups (units, then blocks).",
        ),
        flag(
            "--eval-limit",
            type=click.IntRange(min=1),
            default=None,
            help="Evaluate the gate on a seeded subset of N validation images [default: all].",
        ),
        flag(
            "--verify-on",
            default=None,
            metavar="CPU[,CPU...]",
            help="After the gate, run each valid bundle's self-test on each emulated CPU, e.g. cortex-a72,neoverse-n1,"
            "haswell (`bitdeploy devices` lists them; the kit: `bitdeploy devices setup`, $BITDEPLOY_KIT).",
        ),
    ),
    records.GateArgs,
)


TIMING = Group(
    "timing",
    (
        flag("--no-report", is_flag=True, help="Do not time the bundles or write the report."),
        flag(
            "--baseline/--no-baseline",
            default=True,
            show_default=True,
            help="Time the PyTorch FP32 baselines (eager and torch.compile) for the report's speed-up column.",
        ),
        flag(
            "--bench-iterations",
            type=click.IntRange(min=5),
            default=100,
            show_default=True,
            help="Batch-1 queries timed per bundle for the table (use `bitdeploy bench` for full runs).",
        ),
        QUIET_CHECK,
    ),
    record_of(records.TimingArgs, no_report="not:report"),
)

SELECTION = Group(
    "selection",
    (
        flag(
            "--select",
            type=click.Choice(["fastest", "most-accurate"]),
            default=None,
            help="Pick among the bundles that passed the accuracy gate (and every --verify-on CPU) [default with a "
            "budget: most-accurate; with --min-top1 alone: fastest].",
        ),
        flag(
            "--latency-budget",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            metavar="MS",
            help="The most accurate bundle whose batch-1 p50 fits; none fits: exit 1 naming the fastest.",
        ),
        flag(
            "--min-top1",
            type=click.FloatRange(1, 100),
            default=None,
            metavar="PCT",
            help="The fastest bundle with top-1 at least PCT percent (needs a measured top-1: --dataset).",
        ),
        flag(
            "--memory-budget",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            metavar="MB",
            help="Only bundles whose runtime process peaks within MB while serving batch 1 (measured per bundle).",
        ),
    ),
    records.SelectionArgs,
)

CACHE = Group(
    "cache",
    (
        CACHE_DIR,
        flag(
            "--no-cache",
            is_flag=True,
            help="Neither reuse nor store cached stages (export, fine-tune, calibration, conversions).",
        ),
    ),
    record_of(records.CacheArgs, cache_dir="dir", no_cache="not:enabled"),
)
