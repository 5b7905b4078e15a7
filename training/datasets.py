"""The datasets `--dataset` names: digits (scikit-learn's, embedded), an ImageFolder directory or a CIFAR-10/100
binary tarball or folder, resolved into train/val splits (`bitdeploy.training.data`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bitdeploy.core.errors import DatasetError
from bitdeploy.training import cifar, imagefolder
from bitdeploy.training.data import DEFAULT_VAL_SPLIT, Splits, few_shot, load_digits_splits, verify_images


def load_dataset(
    spec: str | os.PathLike[str],
    val_split: float | None = None,
    seed: int = 0,
    shots: int | None = None,
    strict: bool = False,
    verify: bool = False,
) -> Splits:
    """Resolve SPEC into train/val image sets.

    Args:
        spec: `digits`, an ImageFolder directory, or a CIFAR-10/100 binary tarball or folder.
        val_split: validation fraction where the source has no validation split of its own (default 0.2).
        seed: seeds that split (not the digits one, which is fixed) and the few-shot draw.
        shots: keep K seeded training examples per class.
        strict: with `verify`, an unreadable image is an error instead of being skipped and counted.
        verify: decode every image file once and drop unreadable ones (before the few-shot draw).
    """
    text = str(spec)
    if text == "digits":
        splits = load_digits_splits(val_split)
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise DatasetError(
                f"dataset {text!r} not found; pass `digits`, an ImageFolder directory, or a CIFAR-10/100 binary tarball/folder"
            )
        if cifar.is_cifar(path):
            splits = cifar.load(path, val_split if val_split is not None else DEFAULT_VAL_SPLIT, seed)
        elif path.is_dir():
            splits = imagefolder.load(path, val_split, seed)
        else:
            raise DatasetError(
                f"{path}: not a dataset; pass an ImageFolder directory (one sub-folder per class) or a CIFAR-10/100 *binary* tarball (cifar-10-binary.tar.gz)"
            )
    if verify:
        splits.train, bad_train = verify_images(splits.train, strict)
        splits.val, bad_val = verify_images(splits.val, strict)
        splits.skipped = bad_train + bad_val
    check_classes(splits)
    if shots is not None:
        splits.train = splits.train.subset(few_shot(splits.train.labels, shots, seed, splits.classes))
        splits.notes.append(f"{shots}-shot: {shots} seeded (seed {seed}) training examples per class")
    return splits


def check_classes(splits: Splits) -> None:
    name = splits.name
    if len(splits.train) == 0:
        raise DatasetError(f"{name}: no training images; add images under one sub-folder per class")
    present = np.unique(splits.train.labels)
    if len(present) < 2:
        only = splits.classes[int(present[0])] if len(present) else "?"
        raise DatasetError(
            f"{name}: only one class ({only!r}) has training images; a classifier needs at least 2 classes"
        )
    if len(splits.val) == 0:
        raise DatasetError(f"{name}: the validation split is empty; add images or raise --val-split")
