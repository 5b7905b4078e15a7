"""The BiT-HyperRule as Google's `bit_hyperrule.py` implements it, plus bitdeploy's overrides.

Pure functions, no torch: the plan can be computed, printed and tested anywhere.

Overrides are explicit and recorded: a plan holds the resolved values, the rule's own values (`rule`),
and one note per deviation, so a user always sees what the rule would have done.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

BASE_LR = 0.003
BASE_BATCH = 512
MOMENTUM = 0.9
WEIGHT_DECAY = 0.0  # "Note: no weight-decay!" (bit_pytorch/train.py)
SMALL_DATASET = 20_000
MEDIUM_DATASET = 500_000
SMALL_AREA = 96 * 96
MIXUP_ALPHA = 0.1

SCHEDULES: dict[str, tuple[int, ...]] = {
    "small": (100, 200, 300, 400, 500),
    "medium": (500, 3000, 6000, 9000, 10_000),
    "large": (500, 6000, 12_000, 18_000, 20_000),
}


def bucket(dataset_size: int) -> str:
    """Schedule bucket by the number of training examples (K x classes for few-shot)."""
    if dataset_size < SMALL_DATASET:
        return "small"
    if dataset_size < MEDIUM_DATASET:
        return "medium"
    return "large"


def get_schedule(dataset_size: int) -> list[int]:
    """The rule's "supports": [warmup end, decay boundaries..., total steps]."""
    return list(SCHEDULES[bucket(dataset_size)])


def scale_schedule(supports: Sequence[int], steps: int) -> list[int]:
    """Stretch a schedule to `steps` total, keeping every boundary at the same fraction of the run."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    total = supports[-1]
    scaled = [max(0, round(s * steps / total)) for s in supports[:-1]] + [steps]
    # Keep boundaries monotone after rounding so a tiny run still has a sane (possibly empty) schedule.
    for i in range(1, len(scaled)):
        scaled[i] = max(scaled[i], scaled[i - 1])
    return scaled


def lr_at(step: int, supports: Sequence[int], base_lr: float) -> float | None:
    """Learning rate for optimiser step `step` (0-based), or None once training is over.

    Linear warmup from 0 over supports[0] steps, then /10 at each inner boundary. The test is `s < step`
    as in Google's code, so each drop takes effect the step *after* its boundary.
    """
    if step < supports[0]:
        return base_lr * step / supports[0]
    if step >= supports[-1]:
        return None
    lr = base_lr
    for s in supports[1:]:
        if s < step:
            lr /= 10
    return lr


def get_lr(step: int, dataset_size: int, base_lr: float = BASE_LR) -> float | None:
    """Google's `get_lr(step, dataset_size, base_lr)`: the rule's schedule for this dataset size."""
    return lr_at(step, get_schedule(dataset_size), base_lr)


def get_mixup(dataset_size: int) -> float:
    return 0.0 if dataset_size < SMALL_DATASET else MIXUP_ALPHA


def get_resolution(original_hw: tuple[int, int]) -> tuple[int, int]:
    """(precrop resize, crop) from the original image area: 160->128 below 96x96, else 512->480."""
    area = original_hw[0] * original_hw[1]
    return (160, 128) if area < SMALL_AREA else (512, 480)


def resize_for_crop(crop: int, rule: tuple[int, int]) -> int:
    """Precrop size for a user-chosen crop, keeping the rule's resize/crop ratio (160/128 or 512/480)."""
    return max(crop, round(crop * rule[0] / rule[1]))


def scaled_lr(batch_size: int, base_lr: float = BASE_LR, base_batch: int = BASE_BATCH) -> float:
    """Linear learning-rate scaling for a batch other than the rule's 512."""
    return base_lr * batch_size / base_batch


def mixup_lambda(alpha: float, rng: random.Random) -> float:
    """One lambda ~ Beta(alpha, alpha) per optimiser step; 1.0 (no mixing) when alpha is 0."""
    return rng.betavariate(alpha, alpha) if alpha > 0 else 1.0


def _schedule_keys(supports: Sequence[int]) -> dict[str, Any]:
    """A schedule as the rule and the plan both record it: its length, its warmup and its /10 decay steps."""
    return {"steps": supports[-1], "warmup_steps": supports[0], "lr_decay_steps": supports[1:-1]}


def make_plan(  # noqa: PLR0913 - one keyword per HyperRule override
    dataset_size: int,
    num_classes: int,
    image_hw: tuple[int, int],
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    resolution: int | None = None,
    mixup: float | None = None,
    batch_split: int = 1,
    hflip: bool = True,
) -> dict[str, Any]:
    """Resolve the HyperRule for a dataset, apply the user's overrides, and record each one beside the rule.

    Returns a JSON-serialisable dict: the resolved values at the top level, the rule's values under `rule`,
    every deviation under `overrides` ({key: {"rule": ..., "value": ...}}) and a human sentence per
    deviation under `notes`.
    """
    supports = get_schedule(dataset_size)
    rule_resize, rule_crop = get_resolution(image_hw)
    rule = {
        "bucket": bucket(dataset_size),
        **_schedule_keys(supports),
        "base_lr": BASE_LR,
        "batch_size": BASE_BATCH,
        "resize": rule_resize,
        "crop": rule_crop,
        "mixup_alpha": get_mixup(dataset_size),
        "hflip": True,
    }
    notes: list[str] = []
    if steps is not None and steps != supports[-1]:
        supports = scale_schedule(supports, steps)
        notes.append(
            f"schedule stretched from {rule['steps']} to {steps} steps: warmup and /10 decays kept at the same fractions"
        )
    batch = BASE_BATCH if batch_size is None else batch_size
    if lr is not None:
        base_lr = lr
        if lr != BASE_LR or batch != BASE_BATCH:
            notes.append(f"peak lr set by --lr to {lr:g} (used as is, no batch scaling)")
    elif batch != BASE_BATCH:
        base_lr = scaled_lr(batch)
        notes.append(f"peak lr scaled linearly with the batch: {BASE_LR:g} x {batch}/{BASE_BATCH} = {base_lr:.6g}")
    else:
        base_lr = BASE_LR
    crop = rule_crop if resolution is None else resolution
    resize = rule_resize if resolution is None else resize_for_crop(resolution, (rule_resize, rule_crop))
    if resolution is not None and resolution != rule_crop:
        notes.append(
            f"crop {crop} (rule {rule_crop}); precrop resize {resize} keeps the rule's {rule_resize}/{rule_crop} ratio"
        )
    mixup_alpha = rule["mixup_alpha"] if mixup is None else mixup
    if mixup is not None and mixup != rule["mixup_alpha"]:
        notes.append(f"mixup alpha {mixup_alpha:g} (rule {rule['mixup_alpha']:g})")
    if not hflip:
        notes.append("no random horizontal flip (the rule flips; right for text, digits and other chiral images)")
    plan: dict[str, Any] = {
        "dataset_size": dataset_size,
        "num_classes": num_classes,
        "image_size": list(image_hw),
        **_schedule_keys(supports),
        "schedule": supports,
        "base_lr": base_lr,
        "batch_size": batch,
        "batch_split": batch_split,
        "resize": resize,
        "crop": crop,
        "mixup_alpha": mixup_alpha,
        "hflip": hflip,
        "optimizer": "sgd",
        "momentum": MOMENTUM,
        "weight_decay": WEIGHT_DECAY,
        "zero_head": True,
        "epochs": round(supports[-1] * batch / dataset_size, 2) if dataset_size else None,
        "rule": rule,
    }
    plan["overrides"] = {k: {"rule": rule[k], "value": plan[k]} for k in rule if k != "bucket" and plan[k] != rule[k]}
    plan["notes"] = notes
    return plan
