"""ImageFolder datasets: DIR/<class>/<image> (split seeded), or DIR/train/<class>/... with DIR/val/<class>/...

Listing reads directory entries only; nothing is decoded here (see `data.verify_images`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from bitdeploy.core.errors import DatasetError

if TYPE_CHECKING:
    from bitdeploy.training.data import Splits

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
TRAIN_DIRS = ("train", "training")
VAL_DIRS = ("val", "valid", "validation")


def class_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def list_images(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / f)
    return found


def scan(root: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """(paths, labels, classes) of one split. With `classes` given, labels follow that order."""
    per_class = {d.name: list_images(d) for d in class_dirs(root)}
    if classes is None:
        classes = [name for name, files in per_class.items() if files]
    else:
        unknown = sorted(name for name, files in per_class.items() if files and name not in classes)
        if unknown:
            raise DatasetError(
                f"{root}: class folder(s) {', '.join(unknown[:5])} have no counterpart in the training split; add them to train/ or remove them"
            )
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = per_class.get(name, [])
        paths += files
        labels += [label] * len(files)
    return paths, labels, classes


def find_child(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def load(root: Path, val_split: float | None, seed: int) -> Splits:
    """ImageFolder -> Splits; an explicit val/ folder wins over --val-split."""
    from bitdeploy.training.data import DEFAULT_VAL_SPLIT, FileImageSet, Splits, stratified_split

    train_dir = find_child(root, TRAIN_DIRS)
    val_dir = find_child(root, VAL_DIRS)
    layout_hint = f"expected {root}/<class>/<image> or {root}/train/<class>/<image> (+ {root}/val/<class>/<image>)"
    if train_dir is None and val_dir is not None:
        raise DatasetError(f"{root}: has a {val_dir.name}/ folder but no train/ folder; {layout_hint}")
    notes = []
    if train_dir is not None:
        paths, labels, classes = scan(train_dir)
        if not paths:
            raise DatasetError(f"{train_dir}: no images found; {layout_hint}")
        if val_dir is not None:
            vpaths, vlabels, _ = scan(val_dir, classes)
            if val_split is not None:
                notes.append(f"--val-split ignored: {val_dir} is the validation split")
            return Splits(
                FileImageSet(paths, labels),
                FileImageSet(vpaths, vlabels),
                classes,
                str(root),
                f"folder {val_dir.name}/",
                notes=notes,
            )
    else:
        paths, labels, classes = scan(root)
        if not paths:
            raise DatasetError(f"{root}: no images found ({', '.join(sorted(IMAGE_EXTENSIONS))}); {layout_hint}")
    fraction = DEFAULT_VAL_SPLIT if val_split is None else val_split
    full = FileImageSet(paths, labels)
    tr, va = stratified_split(full.labels, fraction, seed)
    return Splits(
        full.subset(tr), full.subset(va), classes, str(root), f"stratified {fraction:g} split, seed {seed}", notes=notes
    )
