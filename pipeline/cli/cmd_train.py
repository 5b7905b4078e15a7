"""`bitdeploy train`: fine-tune a BiT model with the BiT-HyperRule (torch is imported only when training runs)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("train")
@click.option("--model", "model_name", required=True, help="Model name (see `bitdeploy models`), e.g. m-r50x1.")
@click.option(
    "--dataset",
    required=True,
    help="digits | ImageFolder DIR (DIR/<class>/*, or DIR/train + DIR/val) | CIFAR-10/100 binary tarball or folder.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output directory; running the same command again resumes from its checkpoint. Required unless --plan.",
)
@click.option(
    "--weights",
    default="auto",
    show_default=True,
    help="auto (official upstream) | none (random init) | PATH (.npz, checkpoint.pt or training dir).",
)
@click.option(
    "--shots", type=click.IntRange(min=1), default=None, help="Few-shot: K seeded training examples per class."
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Total steps [rule: 500 / 10k / 20k by dataset size]; warmup and decays keep their fractions.",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=None, help="Global batch, split across processes [rule: 512]."
)
@click.option(
    "--batch-split",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Accumulate each process's batch in this many micro-batches (same result, less memory).",
)
@click.option("--lr", type=float, default=None, help="Peak learning rate, used as is [rule: 0.003 x batch/512].")
@click.option(
    "--resolution",
    type=click.IntRange(min=16),
    default=None,
    help="Training crop and evaluation size [rule: 128 below 96x96 images, else 480].",
)
@click.option(
    "--mixup",
    type=click.FloatRange(min=0),
    default=None,
    help="MixUp alpha [rule: 0.1 from 20k training images, else 0].",
)
@click.option(
    "--hflip/--no-hflip",
    default=True,
    show_default=True,
    help="Random horizontal flips [rule: on]; turn off for digits, text and other chiral images.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda", "xla"]),
    default="auto",
    show_default=True,
    help="auto = cuda when available, else cpu.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    show_default=True,
    help="Autocast precision (fp16 with loss scaling, CUDA only).",
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Steps between checkpoints (0: only at the end).",
)
@click.option(
    "--eval-every",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Steps between validation passes (0: only at the end).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seeds data order, augmentation, MixUp, splits, few-shot draws and random init.",
)
@click.option(
    "--val-split",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Validation fraction for datasets without their own split [0.2].",
)
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image instead of skipping and counting it.")
@click.option(
    "--num-workers",
    type=click.IntRange(min=1),
    default=None,
    help="Threads that decode and resize images [min(4, CPUs)].",
)
@click.option(
    "--plan", "plan_only", is_flag=True, help="Print the resolved plan as one JSON object and exit without training."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(
    model_name: str,
    dataset: str,
    out: Path | None,
    weights: str,
    shots: int | None,
    steps: int | None,
    batch_size: int | None,
    batch_split: int,
    lr: float | None,
    resolution: int | None,
    mixup: float | None,
    hflip: bool,
    device: str,
    precision: str,
    checkpoint_every: int,
    eval_every: int,
    seed: int,
    val_split: float | None,
    strict: bool,
    num_workers: int | None,
    plan_only: bool,
    quiet: bool,
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
    """
    from bitdeploy.training.planner import TrainConfig, make_plan

    config = TrainConfig(
        model=model_name,
        dataset=dataset,
        out=out,
        weights=weights,
        shots=shots,
        steps=steps,
        batch_size=batch_size,
        batch_split=batch_split,
        lr=lr,
        resolution=resolution,
        mixup=mixup,
        hflip=hflip,
        device=device,
        precision=precision,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
        seed=seed,
        val_split=val_split,
        strict=strict,
        progress=not quiet,
    )
    if num_workers is not None:
        config.num_workers = num_workers
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
    from bitdeploy.training.trainer import train as run

    with guarded(out, "pass --out DIR", "training run", "finetune"):
        run(config)
