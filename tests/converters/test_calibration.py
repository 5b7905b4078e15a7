"""CalibrationData: seeded draws from the training split, exact inference preprocessing, quantizer adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitdeploy.converters.calibration import CalibrationData, digest, draw_indices, from_image_set, ort_reader
from bitdeploy.core.errors import DatasetError

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def splits():  # type: ignore[no-untyped-def]
    from bitdeploy.training.datasets import load_dataset

    return load_dataset("digits")


def test_draw_is_seeded_from_train_split_and_matches_inference_preprocessing(splits) -> None:  # type: ignore[no-untyped-def]
    from bitdeploy.runtimes.preprocess import input_spec, preprocess

    a = from_image_set(splits.train, 32, size=20, seed=3, source="digits:train")
    b = from_image_set(splits.train, 32, size=20, seed=3, source="digits:train")
    c = from_image_set(splits.train, 32, size=20, seed=4, source="digits:train")
    assert a.samples.shape == (20, 3, 32, 32) and a.samples.dtype == np.float32
    assert a.sha256 == b.sha256 and a.sha256 != c.sha256
    assert a.samples.min() >= -1.0 and a.samples.max() <= 1.0
    # Sample k is train image idx[k] through the runtime's own preprocessing (what a deployed model sees).
    idx = draw_indices(len(splits.train), 20, 3)
    for k in (0, 7, 19):
        expected = preprocess(splits.train[int(idx[k])][0], input_spec(32))
        np.testing.assert_allclose(a.samples[k], expected, atol=1e-6)
    m = a.manifest("minmax")
    assert m == {
        "samples": 20,
        "method": "minmax",
        "seed": 3,
        "sha256": a.sha256,
        "source": "digits:train",
        "split": "train",
    }


def test_size_is_capped_by_the_split_and_validated(splits) -> None:  # type: ignore[no-untyped-def]
    small = splits.train.subset(np.arange(5))
    assert len(from_image_set(small, 16, size=300)) == 5
    with pytest.raises(DatasetError, match="--calib-size"):
        from_image_set(small, 16, size=0)
    with pytest.raises(DatasetError, match="empty"):
        from_image_set(splits.train.subset(np.arange(0)), 16)


def _samples(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, CalibrationData]:
    """Seeded random samples in [-1, 1], and the CalibrationData that holds them."""
    x = np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)
    return x, CalibrationData(x, "test", 0, digest(x))


def _drain(reader: Any) -> list[np.ndarray]:
    """Every batch an ONNX Runtime reader hands out until it answers None."""
    got = []
    while (item := reader.get_next()) is not None:
        got.append(item["input"])
    return got


def test_save_load_roundtrip_is_memory_mapped(tmp_path: Path) -> None:
    _, cal = _samples(0, (6, 3, 8, 8))
    cal.save(tmp_path)
    back = CalibrationData.load(tmp_path, "test", 0, cal.sha256)
    assert isinstance(back.samples, np.memmap)
    assert digest(back.samples) == cal.sha256 and back.resolution == 8
    assert [b.shape[0] for b in back.batches(4)] == [4, 2]


def test_adapters_feed_every_sample_once() -> None:
    x, cal = _samples(0, (5, 3, 8, 8))
    pytest.importorskip("onnxruntime")
    reader = ort_reader(cal, "input", batch_size=2)
    got = _drain(reader)
    assert [g.shape[0] for g in got] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(got), x)
    reader.rewind()
    assert reader.get_next() is not None
    from onnxruntime.quantization import CalibrationDataReader

    assert isinstance(reader, CalibrationDataReader) and len(reader) == 3
    nncf = pytest.importorskip("nncf")
    from bitdeploy.converters.calibration import nncf_dataset

    ds = nncf_dataset(cal)
    items = list(ds.get_inference_data())
    assert isinstance(ds, nncf.Dataset) and [i.shape for i in items] == [(1, 3, 8, 8)] * 5
    np.testing.assert_array_equal(np.concatenate(items), x)
    assert all(i.dtype == np.float32 and i.flags.c_contiguous for i in items)


def test_ort_reader_collects_in_strides() -> None:
    """ONNX Runtime's strided calibration (CalibStridedMinMax) calls set_range(start, end) on batch indices."""
    x, cal = _samples(1, (7, 3, 4, 4))
    pytest.importorskip("onnxruntime")
    reader = ort_reader(cal, "input", batch_size=2)
    strides = []
    for start in range(len(reader)):
        reader.set_range(start, start + 1)
        strides.append(_drain(reader))
    assert [len(s) for s in strides] == [1, 1, 1, 1] and [s[0].shape[0] for s in strides] == [2, 2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([s[0] for s in strides]), x)
    reader.set_range(3, 10)  # past the end: clipped
    assert reader.get_next() is not None and reader.get_next() is None
    with pytest.raises(ValueError, match="batch_size"):
        ort_reader(cal, "input", batch_size=0)


def test_validation_data_digest_covers_samples_and_labels() -> None:
    from bitdeploy.converters.calibration import ValidationData

    x = np.random.default_rng(2).uniform(-1, 1, (4, 3, 4, 4))
    a = ValidationData.from_arrays(x, np.array([0, 1, 2, 3]))
    b = ValidationData.from_arrays(x, np.array([0, 1, 2, 4]))
    assert a.samples.dtype == np.float32 and a.labels.dtype == np.int64 and len(a) == 4
    assert a.sha256 != b.sha256 and a.sha256 == ValidationData.from_arrays(x, np.array([0, 1, 2, 3])).sha256
