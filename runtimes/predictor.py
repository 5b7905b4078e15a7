"""The Predictor: a loaded bundle that turns images into labelled probabilities.

`predict` = decode + preprocess (exactly as the manifest says) + `infer` + softmax + top-k. `infer` calls the
backend, which checks the batch against the manifest's input spec, and checks the logits against the labels. All
methods are thread-safe: the backends are, and the predictor keeps no per-call state except a thread-local
`last_timing`.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from bitdeploy.core import targets
from bitdeploy.core.errors import BitdeployError, BundleError, MissingDependencyError
from bitdeploy.runtimes import preprocess as pre
from bitdeploy.runtimes.bundle import selftest
from bitdeploy.runtimes.bundle.fingerprint import device_class, host_fingerprint
from bitdeploy.runtimes.bundle.manifest import InputSpec
from bitdeploy.runtimes.bundle.pack import OpenedBundle, open_bundle
from bitdeploy.runtimes.bundle.selftest import SelfTestResult
from bitdeploy.runtimes.engines.base import Backend, backend_available, backend_class, expected_input

DEFAULT_MAX_BATCH = 32

Prediction = list[tuple[str, float]]


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds spent in each stage of one `predict` call."""

    images: int
    preprocess_s: float  # decode + RGB + resize + normalise
    infer_s: float
    postprocess_s: float  # softmax + top-k

    @property
    def total_s(self) -> float:
        return self.preprocess_s + self.infer_s + self.postprocess_s

    def as_dict(self) -> dict[str, float]:
        return {
            "images": self.images,
            "preprocess_ms": self.preprocess_s * 1e3,
            "infer_ms": self.infer_s * 1e3,
            "postprocess_ms": self.postprocess_s * 1e3,
            "total_ms": self.total_s * 1e3,
        }


def _batch_images(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:  # N x H x W x C uint8
        return list(images)
    return [images]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class Predictor:
    """A loaded bundle. Use `bitdeploy.runtimes.load(path)` to create one; close it (or use `with`) to free it."""

    def __init__(self, opened: OpenedBundle, backend: Backend, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.bundle = opened
        self.manifest = opened.manifest
        self.backend: Backend | None = backend
        self.input_spec, self._shape, self._dtype = _check_input_spec(opened)
        self.max_batch = self._shape[0] or max(1, int(max_batch))
        self.labels: list[str] = list(self.manifest.labels) or [str(i) for i in range(self.manifest.num_classes)]
        self.name: str = self.manifest.name or opened.source.name
        self.last_self_test: SelfTestResult | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _release, backend, opened)

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls, path: str | os.PathLike[str], backend: str | None = None, *, verify: bool = True, **options: Any
    ) -> Predictor:
        """`bitdeploy.runtimes.load`, which documents the arguments; `options` holds `device`, `threads`,
        `self_test` and the backend's own options."""
        device, threads, self_test = (
            options.pop("device", None),
            options.pop("threads", None),
            options.pop("self_test", False),
        )
        opened = open_bundle(path, verify=verify)
        engine: Backend | None = None
        try:
            _check_input_spec(opened)  # fail before the (slow) engine load
            engine = _open_backend(opened, backend, device, threads, options)
            predictor = cls(opened, engine)
            if self_test:
                result = predictor.self_test()
                if not result.passed:
                    raise BundleError(
                        f"{opened.source}: self-test failed on this device ({'; '.join(result.failures)}); run `bitdeploy verify` for details"
                    )
            return predictor
        except BaseException:
            if engine is not None:
                engine.close()
            opened.cleanup()
            raise

    # -- the three stages -------------------------------------------------------------------------------
    def preprocess(self, images: Any) -> np.ndarray:
        """Images (one or a list) -> the NCHW batch the model takes, exactly as the manifest specifies."""
        items = _batch_images(images)
        if not items:
            raise BitdeployError("no images given; pass at least one image")
        batch = np.stack([pre.preprocess(item, self.input_spec) for item in items])
        return batch if batch.dtype == self._dtype else batch.astype(self._dtype)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed NCHW batch -> (N, classes) float32 logits. The backend checks shape and dtype against the
        manifest (`Backend.infer`); the predictor checks the logits against the labels."""
        backend = self.backend
        if backend is None:
            raise BitdeployError(f"{self.bundle.source}: predictor is closed; load the bundle again")
        logits = backend.infer(batch)
        if self.labels and logits.shape[1] != len(self.labels):
            raise BundleError(
                f"{self.bundle.source}: the model returned shape {tuple(logits.shape)} but the manifest has {len(self.labels)} labels; rebuild the bundle"
            )
        return logits

    def infer_padded(self, batch: np.ndarray) -> np.ndarray:
        """`infer` for up to `max_batch` rows; pads the batch for a fixed-batch engine and drops the padding after."""
        n, fixed = batch.shape[0], self._shape[0]
        if fixed is None or n == fixed:
            return self.infer(batch)
        if n > fixed:
            raise BitdeployError(f"batch of {n} is larger than this engine's fixed batch {fixed}; split it")
        pad = np.zeros((fixed - n, *batch.shape[1:]), batch.dtype)
        return self.infer(np.concatenate([batch, pad]))[:n]

    def postprocess(self, logits: np.ndarray, top_k: int = 5) -> list[Prediction]:
        """Logits -> per row the top-k (label, probability) pairs, most probable first."""
        k = min(_check_top_k(top_k), logits.shape[1])
        probs = softmax(logits)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.labels[j], float(row[j])) for j in idx] for row, idx in zip(probs, top)]

    def predict(self, images: Any, top_k: int = 5, return_timing: bool = False) -> Any:
        """One image or a list of them -> a list (one entry per image) of top-k (label, probability) pairs.

        Images may be paths, bytes, PIL images or uint8 HxW / HxWxC arrays. With `return_timing=True` the
        result is `(predictions, Timing)`; the timing of this thread's last call is also in `last_timing`.
        """
        _check_top_k(top_k)
        items = _batch_images(images)
        results: list[Prediction] = []
        t_pre = t_inf = t_post = 0.0
        for start in range(0, len(items), self.max_batch):
            chunk = items[start : start + self.max_batch]
            t0 = time.perf_counter()
            batch = self.preprocess(chunk)
            t1 = time.perf_counter()
            logits = self.infer_padded(batch)
            t2 = time.perf_counter()
            results.extend(self.postprocess(logits, top_k))
            t3 = time.perf_counter()
            t_pre, t_inf, t_post = t_pre + t1 - t0, t_inf + t2 - t1, t_post + t3 - t2
        timing = Timing(len(items), t_pre, t_inf, t_post)
        self._local.timing = timing
        return (results, timing) if return_timing else results

    @property
    def last_timing(self) -> Timing | None:
        """Timing of the calling thread's most recent `predict`."""
        timing: Timing | None = getattr(self._local, "timing", None)
        return timing

    def self_test(self) -> SelfTestResult:
        """Run the bundle's golden set on this device and judge it by the criteria the build derived."""
        result = selftest.run(self.infer_padded, self.bundle.root, self.manifest, batch_size=min(8, self.max_batch))
        self.last_self_test = result
        return result

    # -- description and lifetime -------------------------------------------------------------------------
    @property
    def backend_name(self) -> str:
        return self.backend.name if self.backend is not None else ""

    def describe(self) -> dict[str, Any]:
        """What runs: model, backend, device, precision, threads, and the device class beside the one the
        bundle was validated on."""
        info: dict[str, Any] = {"model": self.name, "bundle": str(self.bundle.source), "labels": len(self.labels)}
        info["precision"] = self.manifest.target.precision
        if self.backend is not None:
            info.update(self.backend.describe())
        validated_on = self.manifest.validated_on
        device = host_fingerprint()
        info["device_fingerprint"] = device
        info["validated_on"] = validated_on
        info["same_device_class"] = device_class(validated_on) == device_class(device) if validated_on else None
        if self.last_self_test is not None:
            info["self_test"] = self.last_self_test.as_dict()
        return info

    @property
    def closed(self) -> bool:
        return self.backend is None

    def close(self) -> None:
        """Free the session and remove a pack's temporary directory. Safe to call twice."""
        with self._lock:
            self.backend = None
            self._finalizer()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.backend_name
        return f"Predictor({self.name!r}, {state}, {len(self.labels)} labels)"


def _release(backend: Backend, opened: OpenedBundle) -> None:
    try:
        backend.close()
    finally:
        opened.cleanup()


def _check_input_spec(opened: OpenedBundle) -> tuple[InputSpec, list[int | None], np.dtype[Any]]:
    """The manifest's `input` spec, its NCHW shape (None = any size) and dtype, or a one-line BundleError: a
    predictor also preprocesses, so it needs the resize a bare backend does not."""
    spec = opened.manifest.input
    if spec.shape is None or len(spec.shape) != 4 or spec.resize is None:
        raise BundleError(
            f"{opened.source}: manifest has no usable input spec (NCHW shape and resize); rebuild the bundle"
        )
    try:
        dims, dtype = expected_input(opened.manifest)
    except BundleError as exc:
        raise BundleError(f"{opened.source}: {exc}") from exc
    return spec, list(dims), dtype


def _check_top_k(top_k: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise BitdeployError(f"top_k must be a positive integer (got {top_k!r})")
    return int(top_k)


def _open_backend(
    opened: OpenedBundle, name: str | None, device: str | None, threads: int | None, options: dict[str, Any]
) -> Backend:
    manifest = opened.manifest
    target = manifest.target
    built_for = target.backend
    name = name or built_for
    if not name:
        raise BundleError(f"{opened.source}: manifest names no target backend; pass --backend or rebuild the bundle")
    record = targets.for_backend(name)
    model_file = manifest.model_file
    if not model_file or PurePosixPath(model_file).is_absolute() or ".." in PurePosixPath(model_file).parts:
        raise BundleError(f"{opened.source}: manifest has no usable model_file ({model_file!r}); rebuild the bundle")
    model_path = opened.root / model_file
    if not model_path.is_file():
        raise BundleError(f"{opened.source}: model file {model_file} is missing; rebuild the bundle")
    if Path(model_file).suffix.lower() not in record.formats:
        raise BundleError(
            f"{opened.source}: the {name} backend cannot read {model_file}; drop --backend or pass --backend {built_for}"
        )
    if not backend_available(name):
        raise MissingDependencyError(f"the {name} runtime needed by {opened.source}", record.runtime_extra)
    if device is None and name == built_for:
        device = target.device
    return backend_class(name)(model_path, manifest, device=device, threads=threads, **options)
