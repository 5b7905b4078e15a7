"""Datasets: digits, ImageFolder, CIFAR binary, few-shot, unreadable images, and the shared eval transform."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bitdeploy.core.errors import DatasetError
from bitdeploy.runtimes.preprocess import input_spec, preprocess
from bitdeploy.training.data import eval_batch, few_shot, resized_images
from bitdeploy.training.datasets import load_dataset


def write_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (20, 24), mode: str = "RGB") -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).convert(mode).save(root / name / f"{i:03d}.png")


def test_digits_split_is_fixed_stratified_and_rgb() -> None:
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=7)
    assert (len(a.train), len(a.val)) == (1438, 359)
    assert a.classes == [str(i) for i in range(10)]
    assert np.array_equal(a.train.labels, b.train.labels)  # the split ignores --seed
    img, label = a.train[0]
    assert img.dtype == np.uint8 and img.shape == (8, 8, 3) and 0 <= label < 10
    assert np.array_equal(img[..., 0], img[..., 2]) and img.max() > 200
    assert set(np.bincount(a.val.labels)) <= {35, 36, 37}


def test_eval_batch_is_the_runtime_preprocessing(tmp_path: Path) -> None:
    write_folder(tmp_path / "ds", {"a": 3, "b": 3}, size=(37, 23), mode="L")
    splits = load_dataset(tmp_path / "ds", val_split=0.34)
    x, y = eval_batch(splits.val, 32)
    assert x.shape == (len(splits.val), 3, 32, 32) and x.dtype == np.float32
    for i in range(len(splits.val)):
        expected = preprocess(splits.val.path(i), input_spec(32))  # type: ignore[arg-type]
        np.testing.assert_array_equal(x[i], expected)
    assert list(y) == list(splits.val.labels)
    digits = load_dataset("digits")
    xd, _ = eval_batch(digits.val, 16, [0, 1])
    np.testing.assert_array_equal(xd[0], preprocess(digits.val[0][0], input_spec(16)))


def test_imagefolder_seeded_split(tmp_path: Path) -> None:
    write_folder(tmp_path, {"cat": 10, "dog": 5})
    s0 = load_dataset(tmp_path, seed=0)
    s0b = load_dataset(tmp_path, seed=0)
    s1 = load_dataset(tmp_path, seed=1)
    assert s0.classes == ["cat", "dog"]
    assert (len(s0.train), len(s0.val)) == (12, 3)
    assert [s0.train.name(i) for i in range(12)] == [s0b.train.name(i) for i in range(12)]
    assert [s0.val.name(i) for i in range(3)] != [s1.val.name(i) for i in range(3)]
    assert s0.train.image_hw() == (24, 20)


def test_imagefolder_train_val_folders(tmp_path: Path) -> None:
    write_folder(tmp_path / "train", {"a": 4, "b": 4, "c": 2})
    write_folder(tmp_path / "val", {"a": 1, "c": 2})
    s = load_dataset(tmp_path, val_split=0.5)
    assert s.classes == ["a", "b", "c"]
    assert (len(s.train), len(s.val)) == (10, 3)
    assert sorted(s.val.labels.tolist()) == [0, 2, 2]
    assert s.val_source == "folder val/" and any("ignored" in n for n in s.notes)
    write_folder(tmp_path / "val", {"zebra": 1})
    with pytest.raises(DatasetError, match="zebra"):
        load_dataset(tmp_path)


def test_bad_datasets_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images found"):
        load_dataset(tmp_path / "empty")
    write_folder(tmp_path / "one", {"only": 5})
    with pytest.raises(DatasetError, match="only one class"):
        load_dataset(tmp_path / "one")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(DatasetError, match="not a dataset"):
        load_dataset(tmp_path / "file.txt")


def test_unreadable_images_skipped_or_strict(tmp_path: Path) -> None:
    write_folder(tmp_path, {"a": 6, "b": 6})
    (tmp_path / "a" / "broken.jpg").write_text("not an image")
    (tmp_path / "b" / "empty.png").write_bytes(b"")
    listed = load_dataset(tmp_path)
    assert len(listed.train) + len(listed.val) == 14
    s = load_dataset(tmp_path, verify=True)
    assert len(s.train) + len(s.val) == 12 and len(s.skipped) == 2
    assert any("broken.jpg" in m for m in s.skipped)
    with pytest.raises(DatasetError, match=r"broken\.jpg|empty\.png"):
        load_dataset(tmp_path, verify=True, strict=True)


def test_few_shot_is_seeded_and_per_class(tmp_path: Path) -> None:
    a = load_dataset("digits", shots=5, seed=3)
    b = load_dataset("digits", shots=5, seed=3)
    c = load_dataset("digits", shots=5, seed=4)
    assert len(a.train) == 50 and np.all(np.bincount(a.train.labels) == 5)
    assert [a.train.name(i) for i in range(50)] == [b.train.name(i) for i in range(50)]
    assert [a.train.name(i) for i in range(50)] != [c.train.name(i) for i in range(50)]
    assert len(a.val) == 359  # few-shot never touches the validation split
    with pytest.raises(DatasetError, match="fewer than --shots"):
        few_shot(np.array([0, 0, 1]), 2, 0, ["x", "y"])


def cifar_records(n: int, label_bytes: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10 if label_bytes == 1 else 100, n).astype(np.uint8)
    planes = images.transpose(0, 3, 1, 2).reshape(n, -1)
    head = labels[:, None] if label_bytes == 1 else np.stack([labels // 5, labels], axis=1)
    return np.concatenate([head, planes], axis=1).astype(np.uint8).tobytes(), images, labels


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_cifar10_binary_tarball_and_folder(tmp_path: Path) -> None:
    b1, img1, lab1 = cifar_records(12, 1, 0)
    b2, _, _ = cifar_records(8, 1, 1)
    bt, imgt, labt = cifar_records(6, 1, 2)
    names = "\n".join(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]) + "\n"
    tarpath = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(tarpath, "w:gz") as tar:
        add_member(tar, "cifar-10-batches-bin/data_batch_1.bin", b1)
        add_member(tar, "cifar-10-batches-bin/data_batch_2.bin", b2)
        add_member(tar, "cifar-10-batches-bin/test_batch.bin", bt)
        add_member(tar, "cifar-10-batches-bin/batches.meta.txt", names.encode())
    s = load_dataset(tarpath)
    assert s.name == "cifar10" and s.classes[0] == "airplane" and s.val_source.startswith("official")
    assert (len(s.train), len(s.val)) == (20, 6)
    np.testing.assert_array_equal(s.train[0][0], img1[0])
    assert s.train[3][1] == lab1[3] and s.val[5][1] == labt[5]
    np.testing.assert_array_equal(s.val[1][0], imgt[1])
    hostile = tmp_path / "hostile.tar"
    with tarfile.open(hostile, "w") as tar:
        add_member(tar, "cifar-10-batches-bin/data_batch_1.bin", b1)
        add_member(tar, "../../escape/data_batch_2.bin", b2)
    with pytest.raises(DatasetError, match="unsafe member path"):
        load_dataset(hostile)
    assert not (tmp_path.parent / "escape").exists()
    folder = tmp_path / "extracted" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    (folder / "data_batch_1.bin").write_bytes(b1)
    (folder / "test_batch.bin").write_bytes(bt)
    s2 = load_dataset(tmp_path / "extracted")
    assert (len(s2.train), len(s2.val)) == (12, 6) and s2.classes[0] == "0"


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    tr, _, labels = cifar_records(10, 2, 0)
    te, _, _ = cifar_records(4, 2, 1)
    (tmp_path / "train.bin").write_bytes(tr)
    (tmp_path / "test.bin").write_bytes(te)
    s = load_dataset(tmp_path)
    assert s.name == "cifar100" and len(s.classes) == 100
    assert s.train.labels.tolist() == labels.astype(int).tolist()


def test_cifar_refuses_pickled_and_truncated(tmp_path: Path) -> None:
    pickled = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(pickled, "w:gz") as tar:
        add_member(tar, "cifar-10-batches-py/data_batch_1", b"\x80\x04not unpickled")
    with pytest.raises(DatasetError, match="pickled"):
        load_dataset(pickled)
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "data_batch_1.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset(tmp_path / "trunc")
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DatasetError, match="unreadable tarball"):
        load_dataset(bad)


def test_resized_images_threads_match(tmp_path: Path) -> None:
    s = load_dataset("digits")
    one = resized_images(s.train, 40, range(20), threads=1)
    many = resized_images(s.train, 40, range(20), threads=3)
    assert one.shape == (20, 40, 40, 3) and np.array_equal(one, many)
