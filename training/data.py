"""Datasets for fine-tuning, calibration and accuracy gates: one `load_dataset(SPEC)` for every source.

SPEC is `digits` (sklearn's 8x8 handwritten digits, offline), an ImageFolder directory, or CIFAR-10/100 in
the official *binary* format (tarball or extracted folder). Every split is an image set: `len()`, and
`[i] -> (uint8 HWC RGB array, int label)`. `eval_batch` turns a set into model input with exactly the
runtime's preprocessing (`bitdeploy.runtimes.preprocess`), so evaluation here and inference on a device agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.core.errors import DatasetError, ImageError
from bitdeploy.runtimes.preprocess import decode, normalize, resize_to_array

DEFAULT_VAL_SPLIT = 0.2
DIGITS_SPLIT_SEED = 0  # the digits split never moves, so results stay comparable across --seed values


class ImageSet:
    """A labelled list of images. Subclasses implement `image(i)`; `labels` is an int64 array."""

    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.image(int(i)), int(self.labels[i])

    def image(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def name(self, i: int) -> str:
        return f"#{i}"

    def path(self, i: int) -> Path | None:
        """The image file behind item i, or None for in-memory images."""
        return None

    def image_hw(self, sample: int = 64, seed: int = 0) -> tuple[int, int]:
        """Typical original (height, width): the median over a seeded sample (headers only for files)."""
        raise NotImplementedError

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        return Subset(self, np.asarray(indices, dtype=np.int64))


class ArrayImageSet(ImageSet):
    """Images held in memory as one uint8 (N, H, W, 3) array."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def image(self, i: int) -> np.ndarray:
        return self.images[i]

    def image_hw(self, sample: int = 64, seed: int = 0) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])


class FileImageSet(ImageSet):
    """Image files decoded on access with the runtime's decoder (any Pillow mode -> RGB)."""

    def __init__(self, paths: Sequence[Path], labels: np.ndarray | Sequence[int]) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)

    def image(self, i: int) -> np.ndarray:
        try:
            return np.asarray(decode(self.paths[i]), dtype=np.uint8)
        except ImageError as exc:
            raise DatasetError(f"{exc} (in the dataset; fix or remove the file)") from exc

    def name(self, i: int) -> str:
        return str(self.paths[i])

    def path(self, i: int) -> Path | None:
        return self.paths[i]

    def image_hw(self, sample: int = 64, seed: int = 0) -> tuple[int, int]:
        from PIL import Image

        order = np.random.default_rng(seed).permutation(len(self.paths))[:sample]
        sizes = []
        for i in order:
            try:
                with Image.open(self.paths[i]) as img:  # reads the header only
                    sizes.append((img.height, img.width))
            except (OSError, ValueError, SyntaxError):
                continue
        if not sizes:
            raise DatasetError(
                f"none of {len(order)} sampled images could be opened (e.g. {self.paths[order[0]]}); check the dataset files"
            )
        areas = sorted(sizes, key=lambda hw: hw[0] * hw[1])
        return areas[len(areas) // 2]


class Subset(ImageSet):
    def __init__(self, base: ImageSet, indices: np.ndarray) -> None:
        self.base = base
        self.indices = indices
        self.labels = base.labels[indices]

    def image(self, i: int) -> np.ndarray:
        return self.base.image(int(self.indices[i]))

    def name(self, i: int) -> str:
        return self.base.name(int(self.indices[i]))

    def path(self, i: int) -> Path | None:
        return self.base.path(int(self.indices[i]))

    def image_hw(self, sample: int = 64, seed: int = 0) -> tuple[int, int]:
        return self.base.image_hw(sample, seed)


@dataclass
class Splits:
    """A dataset resolved from SPEC: train and validation image sets plus class names."""

    train: ImageSet
    val: ImageSet
    classes: list[str]
    name: str
    val_source: str
    skipped: list[str] = field(default_factory=list)  # "path: reason" of unreadable images left out
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "train_size": len(self.train),
            "val_size": len(self.val),
            "num_classes": len(self.classes),
            "val_source": self.val_source,
            "skipped_images": len(self.skipped),
        }


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: round(n * fraction) of each class (at least 1 when it has 2+) goes to val."""
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"--val-split must be between 0 and 1 (got {val_fraction}); e.g. --val-split 0.2")
    rng = np.random.default_rng(seed)
    train_idx: list[np.ndarray] = []
    val_idx: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = min(len(idx) - 1, max(1, round(len(idx) * val_fraction))) if len(idx) >= 2 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def few_shot(labels: np.ndarray, shots: int, seed: int, class_names: Sequence[str] | None = None) -> np.ndarray:
    """K seeded examples per class, as in BiT's few-shot experiments (indices into `labels`, sorted)."""
    if shots < 1:
        raise DatasetError(f"--shots must be >= 1 (got {shots})")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < shots:
            name = class_names[int(c)] if class_names else str(c)
            raise DatasetError(
                f"class {name!r} has only {len(idx)} training images, fewer than --shots {shots}; lower --shots"
            )
        chosen.append(idx[np.sort(rng.choice(len(idx), shots, replace=False))])
    return np.sort(np.concatenate(chosen))


def load_digits_splits(val_split: float | None = None) -> Splits:
    """sklearn's 1,797 real 8x8 digits as uint8 RGB; a stratified split with the fixed seed 0 (20% val)."""
    from bitdeploy.core.errors import require

    datasets = require("sklearn.datasets", "train", "scikit-learn")
    digits = datasets.load_digits()
    gray = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = np.repeat(gray[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int64)
    fraction = DEFAULT_VAL_SPLIT if val_split is None else val_split
    tr, va = stratified_split(labels, fraction, DIGITS_SPLIT_SEED)
    full = ArrayImageSet(images, labels)
    return Splits(
        full.subset(tr),
        full.subset(va),
        [str(i) for i in range(10)],
        "digits",
        f"stratified {fraction:g} split, seed {DIGITS_SPLIT_SEED} (fixed)",
    )


def verify_images(image_set: ImageSet, strict: bool, threads: int = 4) -> tuple[ImageSet, list[str]]:
    """Decode every file of a set once; drop (or, with strict, refuse) the unreadable ones."""
    if len(image_set) == 0 or image_set.path(0) is None:
        return image_set, []

    def check(i: int) -> str | None:
        try:
            path = image_set.path(i)
            assert path is not None  # a set of files, as path(0) showed
            decode(path)
            return None
        except ImageError as exc:
            return str(exc)

    with ThreadPoolExecutor(threads) as pool:
        errors = list(pool.map(check, range(len(image_set))))
    bad = [e for e in errors if e is not None]
    if bad and strict:
        raise DatasetError(
            f"unreadable image {bad[0]} ({len(bad)} in all); fix or remove it, or drop --strict to skip unreadable images"
        )
    if not bad:
        return image_set, []
    keep = [i for i, e in enumerate(errors) if e is None]
    return image_set.subset(keep), bad


def eval_batch(
    image_set: ImageSet, resolution: int, indices: Sequence[int] | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 NCHW in [-1, 1], int64 labels): a plain resize to `resolution`, exactly as the runtime does."""
    idx = range(len(image_set)) if indices is None else indices
    arrays, labels = [], []
    for i in idx:
        arr, label = image_set[int(i)]
        arrays.append(resize_to_array(decode(arr), (resolution, resolution)))
        labels.append(label)
    if not arrays:
        return np.zeros((0, 3, resolution, resolution), np.float32), np.zeros((0,), np.int64)
    return normalize(np.stack(arrays)), np.asarray(labels, dtype=np.int64)


def resized_images(
    image_set: ImageSet, size: int, indices: Sequence[int] | np.ndarray | None = None, threads: int = 1
) -> np.ndarray:
    """uint8 (N, size, size, 3): the training precrop resize (the same bilinear resize as evaluation)."""
    idx = list(range(len(image_set))) if indices is None else [int(i) for i in indices]

    def one(i: int) -> np.ndarray:
        return resize_to_array(decode(image_set.image(i)), (size, size))

    if threads > 1 and len(idx) > 1:
        with ThreadPoolExecutor(threads) as pool:
            out = list(pool.map(one, idx))
    else:
        out = [one(i) for i in idx]
    if not out:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack(out)
