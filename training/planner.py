"""`TrainConfig` (the flags of `bitdeploy train`) and its resolution into a plan: dataset + HyperRule + overrides.

Torch-free, so `bitdeploy train --plan` answers quickly and `bitdeploy build --dataset` can show the plan.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bitdeploy.core.catalog import get_variant
from bitdeploy.core.errors import BitdeployError
from bitdeploy.core.options import KEYED, KEYED_WHEN_SET, TrainingOptions
from bitdeploy.training import hyperrule

DEVICES = ("auto", "cpu", "cuda", "xla")
TRAIN_PRECISIONS = ("fp32", "bf16", "fp16")  # what the fine-tune computes in (not a bundle precision)


@dataclass(frozen=True, kw_only=True)
class TrainConfig(TrainingOptions):
    """Everything `bitdeploy train` accepts: the training options (`bitdeploy.core.options.TrainingOptions`, where
    `None` means "what the BiT-HyperRule says"), and the run's own fields. `TrainConfig.of` makes one from a
    command's training record by field name.

    Attributes:
        model: catalog name, e.g. "m-r50x1".
        dataset: SPEC (required here): "digits", an ImageFolder directory, or a CIFAR-10/100 binary tarball/folder.
        out: output directory (checkpoint.pt, metrics.jsonl, summary.json); rerunning on it resumes.
        weights: "auto" (official upstream weights), "none" (random init), or a PATH (.npz, checkpoint, run dir).
        resolution: the training crop = evaluation size (default by image area: 128 or 480).
        seed: every random draw of the run: few-shot draw, split, init, data order, augmentation.
        cache_mb: the training set is resized once and kept in memory when it needs at most this many MB.
        log_every: steps between the metrics log's training lines.
        qat: quantization-aware fine-tuning distilled from `weights` (a trained FP32 checkpoint): `training.qat`.
        qat_task_weight: with `qat`, the weight of the labels' cross-entropy beside the distillation loss.
    """

    model: str = field(metadata=KEYED)
    dataset: str = field()
    out: Path | None = None
    weights: str = "auto"
    resolution: int | None = field(default=None, metadata=KEYED)
    seed: int = field(default=0, metadata=KEYED)
    cache_mb: int = 4096
    log_every: int = 10
    qat: bool = field(default=False, metadata=KEYED_WHEN_SET)
    qat_task_weight: float = field(default=0.0, metadata=KEYED_WHEN_SET)

    @classmethod
    def of(cls, options: TrainingOptions, **run: Any) -> TrainConfig:
        """The config of `options`' training fields (a build's `TrainingArgs` without its own `finetune`) and of
        `run`, the run's own fields (model, out, weights, ...; later wins), by field name."""
        return cls(**{**{f.name: getattr(options, f.name) for f in fields(TrainingOptions)}, **run})

    @property
    def workers(self) -> int:
        """--num-workers, else min(4, CPUs)."""
        return self.num_workers if self.num_workers is not None else min(4, os.cpu_count() or 1)

    def validate(self) -> None:
        get_variant(self.model)
        checks = [
            (self.steps is not None and self.steps < 1, f"--steps must be >= 1 (got {self.steps})"),
            (self.batch_size is not None and self.batch_size < 1, f"--batch-size must be >= 1 (got {self.batch_size})"),
            (self.batch_split < 1, f"--batch-split must be >= 1 (got {self.batch_split})"),
            (self.lr is not None and not self.lr > 0, f"--lr must be > 0 (got {self.lr})"),
            (
                self.resolution is not None and self.resolution < 16,
                f"--resolution must be >= 16 pixels (got {self.resolution})",
            ),
            (self.mixup is not None and self.mixup < 0, f"--mixup must be >= 0 (got {self.mixup})"),
            (self.device not in DEVICES, f"--device must be one of {', '.join(DEVICES)} (got {self.device!r})"),
            (
                self.precision not in TRAIN_PRECISIONS,
                f"--precision must be one of {', '.join(TRAIN_PRECISIONS)} (got {self.precision!r})",
            ),
            (self.checkpoint_every < 0, f"--checkpoint-every must be >= 0 (got {self.checkpoint_every})"),
            (self.shots is not None and self.shots < 1, f"--shots must be >= 1 (got {self.shots})"),
            (self.qat_task_weight < 0, f"--qat-task-weight must be >= 0 (got {self.qat_task_weight})"),
            (
                self.qat and self.weights in ("auto", "none"),
                "--qat fine-tunes a trained FP32 model: pass --weights CHECKPOINT (a `bitdeploy train` run)",
            ),
        ]
        for bad, message in checks:
            if bad:
                raise BitdeployError(message)

    def identity(self) -> dict[str, Any]:
        """Spec strings made absolute, so a resume from another working directory still matches."""
        dataset = self.dataset if self.dataset == "digits" else str(Path(self.dataset).expanduser().resolve())
        weights = self.weights if self.weights in ("auto", "none") else str(Path(self.weights).expanduser().resolve())
        out = {"model": self.model, "dataset": dataset, "weights": weights, "shots": self.shots, "seed": self.seed}
        return {**out, "qat": True, "qat_task_weight": self.qat_task_weight} if self.qat else out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = None if self.out is None else str(self.out)
        return d


def resolve(
    config: TrainConfig, dataset_size: int, num_classes: int, image_hw: tuple[int, int], world: int = 1
) -> dict[str, Any]:
    """The plan for a dataset of this size and image size; checks that the batch divides across processes."""
    plan = hyperrule.make_plan(
        dataset_size,
        num_classes,
        image_hw,
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        resolution=config.resolution,
        mixup=config.mixup,
        batch_split=config.batch_split,
        hflip=config.hflip,
    )
    batch, parts = plan["batch_size"], world * config.batch_split
    if batch % parts:
        raise BitdeployError(
            f"--batch-size {batch} does not split into {world} process(es) x --batch-split {config.batch_split}; use a multiple of {parts}"
        )
    plan["world_size"] = world
    plan["micro_batch"] = batch // parts
    plan["seed"] = config.seed
    return plan


def describe_dataset(config: TrainConfig, verify: bool) -> tuple[Any, tuple[int, int]]:
    """Load the dataset (listing only unless `verify`) and its typical original image size."""
    from bitdeploy.training.datasets import load_dataset

    splits = load_dataset(config.dataset, config.val_split, config.seed, config.shots, config.strict, verify=verify)
    return splits, splits.train.image_hw(seed=config.seed)


def make_plan(config: TrainConfig, world: int = 1) -> dict[str, Any]:
    """What `--plan` prints: the resolved plan plus the run's context (dataset, model, device, overrides)."""
    config.validate()
    splits, hw = describe_dataset(config, verify=False)
    plan = resolve(config, len(splits.train), len(splits.classes), hw, world)
    return {**context(config, splits), **plan}


def context(config: TrainConfig, splits: Any) -> dict[str, Any]:
    return {
        "model": config.model,
        "weights": config.weights,
        "dataset": splits.name,
        "val_size": len(splits.val),
        "val_source": splits.val_source,
        "shots": config.shots,
        "classes": splits.classes if len(splits.classes) <= 100 else [*splits.classes[:100], "..."],
        "device": config.device,
        "precision": config.precision,
        "dataset_notes": splits.notes,
    }
