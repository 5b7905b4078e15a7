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

from bitdeploy.errors import DatasetError

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
        return {"samples": len(self), "method": method, "seed": self.seed, "sha256": self.sha256, "source": self.source, "split": "train"}

    def save(self, directory: Path) -> Path:
        path = Path(directory) / SAMPLES_FILE
        np.save(path, np.ascontiguousarray(self.samples, dtype=np.float32), allow_pickle=False)
        return path

    @classmethod
    def load(cls, directory: Path, source: str, seed: int, sha256: str) -> CalibrationData:
        samples = np.load(Path(directory) / SAMPLES_FILE, mmap_mode="r", allow_pickle=False)
        return cls(samples, source, seed, sha256)


def digest(samples: np.ndarray) -> str:
    h = hashlib.sha256(f"{samples.dtype.str}{tuple(samples.shape)}".encode())
    for i in range(0, samples.shape[0], 64):
        h.update(np.ascontiguousarray(samples[i : i + 64], dtype=np.float32).tobytes())
    return h.hexdigest()


def draw_indices(n: int, size: int, seed: int) -> np.ndarray:
    """`size` distinct seeded indices out of n (all of them, shuffled, when n <= size)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n)[: min(size, n)])


def from_image_set(train: Any, resolution: int, size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED, source: str = "train", chunk: int = 64) -> CalibrationData:
    """Draw `size` training images (seeded) and preprocess them exactly as inference does."""
    from bitdeploy.training.data import eval_batch

    if size < 1:
        raise DatasetError(f"--calib-size must be at least 1 (got {size}); 300 is the default")
    n = len(train)
    if n == 0:
        raise DatasetError(f"{source}: the training split is empty, nothing to calibrate on; pass a --dataset with training images")
    idx = draw_indices(n, size, seed)
    samples = np.empty((len(idx), 3, resolution, resolution), np.float32)
    for lo in range(0, len(idx), chunk):
        samples[lo : lo + chunk] = eval_batch(train, resolution, idx[lo : lo + chunk])[0]
    return CalibrationData(samples, source, seed, digest(samples))


class _OrtReader:
    """onnxruntime.quantization.CalibrationDataReader protocol (get_next/rewind), without importing it here."""

    def __init__(self, calibration: CalibrationData, input_name: str, batch_size: int) -> None:
        self.calibration = calibration
        self.input_name = input_name
        self.batch_size = batch_size
        self._it: Iterator[np.ndarray] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self.calibration.batches(self.batch_size)
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._it = None

    def __len__(self) -> int:
        return -(-len(self.calibration) // self.batch_size)


def ort_reader(calibration: CalibrationData, input_name: str = "input", batch_size: int = 1) -> Any:
    """An ONNX Runtime CalibrationDataReader over the samples."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_OrtReader, CalibrationDataReader):  # type: ignore[misc]
        pass

    return Reader(calibration, input_name, batch_size)


def nncf_dataset(calibration: CalibrationData, batch_size: int = 1) -> Any:
    """An nncf.Dataset yielding NCHW batches (NNCF calls the model on each item as is)."""
    import nncf

    return nncf.Dataset(list(calibration.batches(batch_size)))
