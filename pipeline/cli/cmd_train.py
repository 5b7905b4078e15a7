"""`bitdeploy train`: fine-tune a BiT model with the BiT-HyperRule (torch is imported only when training runs)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from bitdeploy.cli import groups, groups_run
from bitdeploy.core.options import TrainingOptions

QAT_TASK_WEIGHT = "With --qat: weight of the labels' cross-entropy beside the distillation loss [default: 0]."


@click.command("train")
@groups.option(groups.MODEL)
@groups.option(groups.varied(groups.DATASET, required=True, default=None))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output directory; running the same command again resumes from its checkpoint. Required unless --plan.",
)
@groups.option(groups.WEIGHTS)
@click.option(
    "--resolution",
    type=click.IntRange(min=16),
    default=None,
    help="Training crop and evaluation size [rule: 128 below 96x96 images, else 480].",
)
@groups.option(groups.SEED)
@groups.option(groups.VAL_SPLIT)
@click.option(
    "--qat",
    is_flag=True,
    help="Quantization-aware fine-tune of --weights (a trained FP32 checkpoint), distilled from it, in the INT8 scheme "
    "every engine runs; writes DIR/qat_params.json beside the checkpoint [steps: a tenth of the FP32 run's; lr: a tenth].",
)
@click.option("--qat-task-weight", type=click.FloatRange(min=0), default=0.0, help=QAT_TASK_WEIGHT)
@click.option(
    "--plan", "plan_only", is_flag=True, help="Print the resolved plan as one JSON object and exit without training."
)
@groups.takes(groups_run.TRAINING)
def train(  # noqa: PLR0913 - a command: its records are the argument groups
    model_name: str,
    dataset: str,
    out: Path | None,
    weights: str,
    resolution: int | None,
    seed: int,
    val_split: float | None,
    qat: bool,
    qat_task_weight: float,
    plan_only: bool,
    training: TrainingOptions,
) -> None:
    """Fine-tune a BiT model with the BiT-HyperRule (Kolesnikov et al.): SGD momentum 0.9, no weight decay,
    linear warmup then /10 decays, zero-initialised head, random crop + flip, MixUp from 20k images.

    Every override is shown beside the rule's value (--plan prints the whole plan). Writes DIR/checkpoint.pt,
    DIR/metrics.jsonl and DIR/summary.json; rerunning the same command on the same --out resumes.
    Multi-GPU / multi-node: torchrun --nproc-per-node N --no-python bitdeploy train ...

    \b
    Examples:
      bitdeploy train --model m-r50x1 --dataset digits --plan
      bitdeploy train --model m-r50x1 --weights none --dataset digits --resolution 32 --steps 1000 --batch-size 64 --lr 0.01 --no-hflip --out runs/digits
      bitdeploy train --model m-r50x1 --dataset cifar-10-binary.tar.gz --shots 5 --out runs/c10-5shot
      bitdeploy train --model m-r50x1 --dataset digits --weights runs/digits --qat --no-hflip --out runs/digits-qat
    """
    from bitdeploy.training.planner import TrainConfig, make_plan

    config = TrainConfig.of(
        training,
        model=model_name,
        dataset=dataset,
        out=out,
        weights=weights,
        resolution=resolution,
        seed=seed,
        val_split=val_split,
        qat=qat,
        qat_task_weight=qat_task_weight,
    )
    if plan_only:
        import os

        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        click.echo(json.dumps(make_plan(config, world)))
        return
    if out is None:
        raise click.UsageError(
            "missing --out DIR (where the checkpoint, metrics and summary go); or pass --plan to only print the plan"
        )
    from bitdeploy.core.errors import require

    require("torch", "train")
    require("tqdm", "train")
    from bitdeploy.core.resources import guarded
    from bitdeploy.training.trainer import train as run_training

    with guarded(out, "pass --out DIR", "training run", "finetune"):
        run_training(config)
