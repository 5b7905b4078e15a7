"""Calibration data: one type that feeds every INT8 quantizer (ONNX Runtime, NNCF, TensorRT's QDQ ONNX).

Samples come from the dataset's TRAIN split (the validation split is kept for the accuracy gate), drawn
with a seed, and go through exactly the inference preprocessing (`bitdeploy.training.data.eval_batch`:
RGB, plain bilinear resize, x/127.5 - 1). INT8 is never calibrated on random noise: without a dataset
there is no CalibrationData, and the INT8 routes refuse to run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.core.errors import DatasetError

DEFAULT_SIZE = 300  # NNCF's default subset_size; BiT's GN+ReLU activations are bounded, so more rarely helps
DEFAULT_SEED = 0
SAMPLES_FILE = "calibration.npy"


@dataclass
class CalibrationData:
    """Preprocessed float32 NCHW samples plus where they came from.

    samples: (N, 3, R, R) float32, possibly a read-only memory map of the cached file.
    source: human-readable origin, e.g. "digits:train".
    seed: the seed of the draw.
    sha256: digest of the samples (shape, dtype and bytes), recorded in the manifest.
    """

    samples: np.ndarray
    source: str
    seed: int
    sha256: str

    def __len__(self) -> int:
        return int(self.samples.shape[0])

    @property
    def resolution(self) -> int:
        return int(self.samples.shape[-1])

    def batches(self, batch_size: int = 1) -> Iterator[np.ndarray]:
        for i in range(0, len(self), batch_size):
            yield np.ascontiguousarray(self.samples[i : i + batch_size], dtype=np.float32)

    def manifest(self, method: str | None) -> dict[str, Any]:
        """The manifest `calibration` object."""
        return {
            "samples": len(self),
            "method": method,
            "seed": self.seed,
            "sha256": self.sha256,
            "source": self.source,
            "split": "train",
        }

    def save(self, directory: Path) -> Path:
        path = Path(directory) / SAMPLES_FILE
        np.save(path, np.ascontiguousarray(self.samples, dtype=np.float32), allow_pickle=False)
        return path

    @classmethod
    def load(cls, directory: Path, source: str, seed: int, sha256: str) -> CalibrationData:
        samples = np.load(Path(directory) / SAMPLES_FILE, mmap_mode="r", allow_pickle=False)
        return cls(samples, source, seed, sha256)


@dataclass(frozen=True)
class ValidationData:
    """Labelled validation inputs for a quantizer that measures accuracy itself (NNCF's accuracy control).

    samples: (N, 3, R, R) float32, preprocessed as at inference; labels: (N,) int64; sha256: digest of both.
    """

    samples: np.ndarray
    labels: np.ndarray
    sha256: str

    @classmethod
    def from_arrays(cls, samples: np.ndarray, labels: np.ndarray) -> ValidationData:
        samples, labels = np.ascontiguousarray(samples, np.float32), np.ascontiguousarray(labels, np.int64)
        return cls(samples, labels, hashlib.sha256(digest(samples).encode() + labels.tobytes()).hexdigest())

    def __len__(self) -> int:
        return int(self.samples.shape[0])


def digest(samples: np.ndarray) -> str:
    h = hashlib.sha256(f"{samples.dtype.str}{tuple(samples.shape)}".encode())
    for i in range(0, samples.shape[0], 64):
        h.update(np.ascontiguousarray(samples[i : i + 64], dtype=np.float32).tobytes())
    return h.hexdigest()


def draw_indices(n: int, size: int, seed: int) -> np.ndarray:
    """`size` distinct seeded indices out of n (all of them, shuffled, when n <= size)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n)[: min(size, n)])


def from_image_set(
    train: Any,
    resolution: int,
    size: int = DEFAULT_SIZE,
    seed: int = DEFAULT_SEED,
    source: str = "train",
    chunk: int = 64,
) -> CalibrationData:
    """Draw `size` training images (seeded) and preprocess them exactly as inference does."""
    from bitdeploy.training.data import eval_batch

    if size < 1:
        raise DatasetError(f"--calib-size must be at least 1 (got {size}); 300 is the default")
    n = len(train)
    if n == 0:
        raise DatasetError(
            f"{source}: the training split is empty, nothing to calibrate on; pass a --dataset with training images"
        )
    idx = draw_indices(n, size, seed)
    samples = np.empty((len(idx), 3, resolution, resolution), np.float32)
    for lo in range(0, len(idx), chunk):
        samples[lo : lo + chunk] = eval_batch(train, resolution, idx[lo : lo + chunk])[0]
    return CalibrationData(samples, source, seed, digest(samples))


class _OrtReader:
    """onnxruntime.quantization.CalibrationDataReader protocol (get_next/rewind/set_range), without importing it.

    `set_range` lets ONNX Runtime collect in strides (`CalibStridedMinMax`): the histogram calibrators keep every
    activation of every batch they are fed, so memory stays bounded by the stride, not by the sample count.
    """

    def __init__(self, calibration: CalibrationData, input_name: str, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.calibration, self.input_name, self.batch_size = calibration, input_name, batch_size
        self.batches = -(-len(calibration) // batch_size)
        self.set_range(0, self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it: Iterator[int] = iter(range(start_index, min(end_index, self.batches)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        i = next(self._it, None)
        if i is None:
            return None
        lo = i * self.batch_size
        return {
            self.input_name: np.ascontiguousarray(self.calibration.samples[lo : lo + self.batch_size], dtype=np.float32)
        }

    def rewind(self) -> None:
        self.set_range(0, self.batches)

    def __len__(self) -> int:
        return self.batches


def ort_reader(calibration: CalibrationData, input_name: str = "input", batch_size: int = 1) -> Any:
    """An ONNX Runtime CalibrationDataReader over the samples (strided collection supported)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_OrtReader, CalibrationDataReader):  # type: ignore[misc]
        pass

    return Reader(calibration, input_name, batch_size)


def nncf_dataset(calibration: CalibrationData, batch_size: int = 1) -> Any:
    """An nncf.Dataset yielding NCHW float32 batches (NNCF calls the model on each item as is), batch 1 by default."""
    import nncf

    return nncf.Dataset(list(calibration.batches(batch_size)))
