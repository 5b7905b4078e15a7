"""Accuracy measurement: top-k, label mapping, agreement, and the torch-free ImageFolder path."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bitdeploy.benchmarks import accuracy
from bitdeploy.core.errors import DatasetError
from bitdeploy.runtimes.preprocess import input_spec


def test_agreement_with_a_reference() -> None:
    logits = np.array([[3, 2, 1, 0], [0, 1, 3, 2], [1, 0, 2, 3]], np.float32)
    ag = accuracy.agreement(logits, logits + np.array([[0, 0, 0, 5], [0, 0, 0, 0], [0, 0, 0, 0]], np.float32))
    assert ag["agreement"] == pytest.approx(2 / 3) and ag["max_abs_logit_diff"] == 5


def test_label_map() -> None:
    assert accuracy.label_map(["a", "b"], ["a", "b"])[1] == "identical"
    mapping, how = accuracy.label_map(["cat", "dog", "fox"], ["dog", "cat"])
    assert how == "by name" and list(mapping) == [1, 0]
    assert accuracy.label_map(["0", "1"], ["x", "y"])[1].startswith("by index")
    with pytest.raises(DatasetError, match="evaluate on the dataset the bundle was built for"):
        accuracy.label_map(["0", "1", "2"], ["x", "y"])


def _folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("dog", "cat"):
        (root / "val" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(root / "val" / cls / f"{i}.png")
    (root / "val" / "cat" / "notes.txt").write_text("not an image")


def test_torch_free_image_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("bitdeploy.training.data", "bitdeploy.training.datasets"):  # as on a device without the train extra
        monkeypatch.setitem(sys.modules, module, None)
    _folder(tmp_path)
    ev = accuracy.load_eval_set(str(tmp_path))
    assert ev.split == "val" and ev.classes == ["cat", "dog"] and len(ev) == 6
    assert ev.encoded(2)[0][:4] == b"\x89PNG"  # the files themselves, for end-to-end timing

    def infer(x: np.ndarray) -> np.ndarray:  # "predicts" cat for bright images
        assert x.shape[1:] == (3, 16, 16) and x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
        return np.stack([np.full(len(x), 1.0), np.zeros(len(x))], 1).astype(np.float32)

    res = accuracy.measure(infer, input_spec(16), ["cat", "dog"], ev, reference=("same", infer), batch_size=4)
    assert res["samples"] == 6 and res["top1"] == pytest.approx(0.5) and res["top5"] == 1.0
    assert res["reference"]["agreement"] == 1.0 and res["label_mapping"] == "identical"
    with pytest.raises(DatasetError, match="only ImageFolder directories"):
        accuracy.load_eval_set("digits")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        accuracy.load_eval_set(str(tmp_path / "empty"))


def test_digits_through_training_data() -> None:
    pytest.importorskip("sklearn")
    ev = accuracy.load_eval_set("digits")
    assert ev.split == "val" and len(ev.classes) == 10 and len(ev) > 100
    x, y = next(accuracy.batches(ev, input_spec(32), batch_size=8))
    assert x.shape == (8, 3, 32, 32) and y.dtype == np.int64
