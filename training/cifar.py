"""CIFAR-10/100 in the official *binary* format, read from the tarball or an extracted folder.

Records are fixed-size: CIFAR-10 = 1 label byte + 3072 pixel bytes, CIFAR-100 = coarse + fine label bytes +
3072 (R plane, G plane, B plane, 32x32 row-major each). Tarball members are read in place, never extracted,
so a hostile archive cannot write anywhere. The pickled "python version" is refused: it would need unpickling.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bitdeploy.core.errors import DatasetError

if TYPE_CHECKING:
    from bitdeploy.training.data import Splits

PIXELS = 32 * 32 * 3
MAX_MEMBER = 256 << 20  # the largest official file is 150 MB (CIFAR-100 train.bin)
C10_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
C10_TEST = "test_batch.bin"
C100_TRAIN, C100_TEST = "train.bin", "test.bin"
NAMES = {"batches.meta.txt", "fine_label_names.txt"}
DATA = set(C10_TRAIN) | {C10_TEST, C100_TRAIN, C100_TEST}
PICKLED = {"data_batch_1", "test_batch", "batches.meta", "train", "test", "meta"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
BINARY_HINT = "download the binary version (cifar-10-binary.tar.gz / cifar-100-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html)"


def is_tarball(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(TAR_SUFFIXES)


def is_cifar(path: Path) -> bool:
    """A tarball, or a folder holding the CIFAR .bin files (directly or one level down)."""
    if is_tarball(path):
        return True
    if not path.is_dir():
        return False
    return any((d / n).is_file() for d in (path, *[c for c in path.iterdir() if c.is_dir()]) for n in DATA | PICKLED)


def read_members(path: Path) -> dict[str, bytes]:
    """{basename: bytes} of the CIFAR files in a tarball or folder (data files and label-name files only)."""
    wanted = DATA | NAMES
    found: dict[str, bytes] = {}
    seen: set[str] = set()
    if is_tarball(path):
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    parts = member.name.replace("\\", "/").split("/")
                    if member.name.startswith(("/", "\\")) or ".." in parts:
                        raise DatasetError(
                            f"{path}: refusing an archive with the unsafe member path {member.name!r}; download the official tarball again"
                        )
                    base = parts[-1]
                    seen.add(base)
                    if base not in wanted or not member.isfile():  # links, devices, folders: ignored, never followed
                        continue
                    if member.size > MAX_MEMBER:
                        raise DatasetError(
                            f"{path}: member {member.name} is {member.size} bytes, larger than any CIFAR file; {BINARY_HINT}"
                        )
                    f = tar.extractfile(member)
                    if f is not None:
                        found[base] = f.read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DatasetError(f"{path}: unreadable tarball ({exc}); download it again ({BINARY_HINT})") from exc
    else:
        for d in (path, *sorted(c for c in path.iterdir() if c.is_dir())):
            for entry in d.iterdir():
                seen.add(entry.name)
                if entry.name in wanted and entry.is_file() and not entry.is_symlink() and entry.name not in found:
                    if entry.stat().st_size > MAX_MEMBER:
                        raise DatasetError(
                            f"{entry}: {entry.stat().st_size} bytes, larger than any CIFAR file; {BINARY_HINT}"
                        )
                    found[entry.name] = entry.read_bytes()
    if not any(n in found for n in DATA):
        if seen & PICKLED:
            raise DatasetError(
                f"{path}: this is the pickled CIFAR python version, which bitdeploy never unpickles; {BINARY_HINT}"
            )
        raise DatasetError(f"{path}: no CIFAR binary files (data_batch_N.bin / train.bin) found; {BINARY_HINT}")
    return found


def decode_records(blob: bytes, label_bytes: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    record = label_bytes + PIXELS
    if len(blob) == 0 or len(blob) % record:
        raise DatasetError(
            f"{name}: {len(blob)} bytes is not a whole number of {record}-byte CIFAR records; the file is truncated, download it again"
        )
    rows = np.frombuffer(blob, dtype=np.uint8).reshape(-1, record)
    labels = rows[:, label_bytes - 1].astype(np.int64)  # CIFAR-100: the fine label is the second byte
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def label_names(text: bytes | None, count: int) -> list[str]:
    names = [line.strip() for line in (text or b"").decode("utf-8", "replace").splitlines() if line.strip()]
    return names if len(names) == count else [str(i) for i in range(count)]


def load(path: Path, val_split: float, seed: int) -> Splits:
    """CIFAR binary -> Splits: the official test set is the validation split (seeded split if it is missing)."""
    from bitdeploy.training.data import ArrayImageSet, Splits, stratified_split

    files = read_members(path)
    if any(n in files for n in (C100_TRAIN, C100_TEST)):
        name, classes, label_bytes, train_names, test_name = "cifar100", 100, 2, [C100_TRAIN], C100_TEST
        names = label_names(files.get("fine_label_names.txt"), classes)
    else:
        name, classes, label_bytes, train_names, test_name = "cifar10", 10, 1, list(C10_TRAIN), C10_TEST
        names = label_names(files.get("batches.meta.txt"), classes)
    parts = [decode_records(files[n], label_bytes, f"{path}:{n}") for n in train_names if n in files]
    if not parts:
        raise DatasetError(f"{path}: {name} has a test file but no training files; {BINARY_HINT}")
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.max() >= classes:
        raise DatasetError(
            f"{path}: label {int(labels.max())} out of range for {name} ({classes} classes); the file is corrupt, download it again"
        )
    if test_name in files:
        vimages, vlabels = decode_records(files[test_name], label_bytes, f"{path}:{test_name}")
        if vlabels.max() >= classes:
            raise DatasetError(
                f"{path}:{test_name}: label {int(vlabels.max())} out of range for {name}; download it again"
            )
        return Splits(
            ArrayImageSet(images, labels), ArrayImageSet(vimages, vlabels), names, name, f"official {test_name}"
        )
    full = ArrayImageSet(images, labels)
    tr, va = stratified_split(labels, val_split, seed)
    return Splits(
        full.subset(tr), full.subset(va), names, name, f"stratified {val_split:g} split, seed {seed} (no {test_name})"
    )
