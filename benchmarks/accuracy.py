"""Accuracy of a bundle on a labelled dataset: top-1, top-5, and agreement with a reference bundle.

Datasets come from `bitdeploy.training.datasets.load_dataset` (digits, ImageFolder, CIFAR; its validation split,
preprocessed with the runtime's own functions). Without the training extra, an ImageFolder directory is read
here, torch-free, and every file goes through the runtime's decode + preprocess, as `predict` would do it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.core.errors import DatasetError
from bitdeploy.runtimes.bundle import compare
from bitdeploy.runtimes.bundle.manifest import InputSpec

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class FolderSet:
    """A torch-free ImageFolder (root/<class>/<image>): `len()`, `[i] -> (uint8 HWC, label)`, `.paths`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        self.paths: list[Path] = []
        self.labels: list[int] = []
        for label, cls in enumerate(self.classes):
            for f in sorted((root / cls).rglob("*")):
                if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                    self.paths.append(f)
                    self.labels.append(label)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        from bitdeploy.runtimes.preprocess import decode

        return np.asarray(decode(self.paths[i]), dtype=np.uint8), self.labels[i]


class EvalSet:
    """What the accuracy and end-to-end measurements need: images, labels, class names, and where they came from."""

    def __init__(self, images: Any, classes: list[str], source: str, split: str) -> None:
        self.images = images
        self.classes = classes
        self.source = source
        self.split = split

    def __len__(self) -> int:
        return len(self.images)

    def encoded(self, count: int, fmt: str = "PNG") -> list[bytes]:
        """The first `count` images as encoded files (files as they are on disk where there are files)."""
        from PIL import Image

        out = []
        for i in range(min(count, len(self.images))):
            if isinstance(self.images, FolderSet):
                out.append(self.images.paths[i].read_bytes())
                continue
            arr, _ = self.images[i]
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(arr)).save(buf, format=fmt)
            out.append(buf.getvalue())
        return out


def load_eval_set(spec: str, seed: int = 0) -> EvalSet:
    """The validation split of a dataset spec (digits, an ImageFolder, CIFAR), as the build's accuracy gate uses it."""
    try:
        from bitdeploy.training.datasets import load_dataset
    except ImportError:  # without the training extra: ImageFolder directories only
        pass
    else:
        splits = load_dataset(spec, seed=seed)
        return EvalSet(splits.val, list(splits.classes), spec, "val")
    root = Path(spec)
    if not root.is_dir():
        raise DatasetError(
            f'{spec}: without the training extra only ImageFolder directories can be read; pass a directory or install it: pip install "bitdeploy[train]"'
        )
    split = "val" if (root / "val").is_dir() else "all"
    folder = FolderSet(root / "val" if split == "val" else root)
    if len(folder) == 0:
        raise DatasetError(
            f"{root}: no images found in class sub-folders; use root/<class>/<image> or root/val/<class>/<image>"
        )
    return EvalSet(folder, folder.classes, str(root), split)


def batches(eval_set: EvalSet, input_spec: InputSpec, batch_size: int = 32, limit: int | None = None) -> Any:
    """Yield (float32 NCHW, int64 labels), preprocessed exactly as the bundle's manifest says."""
    from PIL import Image

    from bitdeploy.runtimes.preprocess import mean_std, normalize, resize_to_array, to_rgb

    n = len(eval_set) if limit is None else min(limit, len(eval_set))
    if input_spec.resize is None:
        raise DatasetError("the bundle's input spec has no resize; rebuild the bundle")
    h, w = input_spec.resize
    mean, std = mean_std(input_spec)
    interp = input_spec.interpolation
    for start in range(0, n, batch_size):
        xs, ys = [], []
        for i in range(start, min(n, start + batch_size)):
            arr, label = eval_set.images[i]
            img = to_rgb(Image.fromarray(np.ascontiguousarray(arr)))
            xs.append(normalize(resize_to_array(img, (h, w), interp), mean, std))
            ys.append(label)
        yield np.stack(xs), np.asarray(ys, dtype=np.int64)


def run_logits(
    infer: Callable[[np.ndarray], np.ndarray],
    eval_set: EvalSet,
    input_spec: InputSpec,
    batch_size: int = 32,
    limit: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    from bitdeploy.benchmarks.latency import _progress

    n = len(eval_set) if limit is None else min(limit, len(eval_set))
    bar = _progress(n, "accuracy", progress, "img")
    logits, labels = [], []
    try:
        for x, y in batches(eval_set, input_spec, batch_size, limit):
            logits.append(np.asarray(infer(x), dtype=np.float32))
            labels.append(y)
            bar.update(len(y))
    finally:
        bar.close()
    if not logits:
        raise DatasetError(
            f"{eval_set.source}: the {eval_set.split} split is empty; use a dataset with validation images"
        )
    return np.concatenate(logits), np.concatenate(labels)


def label_map(bundle_labels: Sequence[str] | None, classes: Sequence[str]) -> tuple[np.ndarray, str]:
    """Index i of the dataset -> the bundle's output index for the same class name, and how it was matched."""
    if bundle_labels is None or list(bundle_labels) == list(classes):
        return np.arange(len(classes)), "identical"
    if set(classes) <= set(bundle_labels):
        pos = {name: j for j, name in enumerate(bundle_labels)}
        return np.asarray([pos[c] for c in classes]), "by name"
    if len(bundle_labels) == len(classes):
        return np.arange(len(classes)), "by index (class names differ)"
    raise DatasetError(
        f"dataset has {len(classes)} classes {list(classes)[:5]}... but the bundle's labels are {list(bundle_labels)[:5]}... ({len(bundle_labels)}); evaluate on the dataset the bundle was built for"
    )


def agreement(logits: np.ndarray, ref: np.ndarray) -> dict[str, float | None]:
    """The reference comparison `bench` reports (`bitdeploy.runtimes.bundle.compare`, as the build's gate computes it)."""
    d = compare.logit_diff(logits, ref)
    return {"agreement": d.agreement, "max_abs_logit_diff": d.max_abs, "mean_abs_logit_diff": d.mean_abs}


def measure(
    infer: Callable[[np.ndarray], np.ndarray],
    input_spec: InputSpec,
    bundle_labels: Sequence[str] | None,
    eval_set: EvalSet,
    reference: tuple[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, Any]:
    """top-1/top-5 on the eval set; with a (name, infer) reference, its top-1 and the agreement of both."""
    mapping, how = label_map(bundle_labels, eval_set.classes)
    logits, labels = run_logits(infer, eval_set, input_spec, batch_size, limit, progress)
    target = mapping[labels]
    out: dict[str, Any] = {
        "dataset": eval_set.source,
        "split": eval_set.split,
        "samples": int(labels.size),
        "top1": compare.topk(logits, target, 1),
        "top5": compare.topk(logits, target, 5),
        "label_mapping": how,
        "reference": None,
    }
    if reference is not None:
        name, ref_infer = reference
        ref_logits, _ = run_logits(ref_infer, eval_set, input_spec, batch_size, limit, progress)
        if ref_logits.shape != logits.shape:
            raise DatasetError(
                f"reference {name} gives logits of shape {ref_logits.shape}, the bundle {logits.shape}; pass a reference built for the same classes"
            )
        out["reference"] = {"name": name, "top1": compare.topk(ref_logits, target, 1), **agreement(logits, ref_logits)}
    return out
