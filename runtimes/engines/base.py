"""The backend contract and its registry.

A backend runs one model file: `infer(batch)` takes preprocessed NCHW float32 and returns float32 logits
that the caller owns. `Backend.infer` checks the batch against the manifest's input spec (one-line
BitdeployError) and the result's shape, so a backend implements only `_infer` and never sees a bad batch.
Backends import their SDK lazily, inside `open`, so `bitdeploy.runtimes` imports with only numpy and
Pillow installed.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.core import targets
from bitdeploy.core.errors import BitdeployError, BundleError, MissingDependencyError
from bitdeploy.runtimes.bundle.manifest import Manifest


def expected_input(manifest: Manifest) -> tuple[tuple[int | None, ...], np.dtype[Any]]:
    """The batch a bundle's model takes: its NCHW shape (None = any size) and dtype.

    The one place a backend reads the manifest's `input` spec. A non-positive or non-int dimension means any
    size; a manifest without an input spec (or without a 4-D shape) means 4-D of any size; dtype defaults to
    float32. An unknown dtype is a one-line BundleError.
    """
    spec = manifest.input
    dims: tuple[int | None, ...] = (None,) * 4
    if spec.shape is not None and len(spec.shape) == 4:
        dims = tuple(d if d is not None and d > 0 else None for d in spec.shape)
    try:
        dtype = np.dtype(spec.dtype)
    except TypeError as exc:
        raise BundleError(f"manifest input dtype {spec.dtype!r} is unknown; rebuild the bundle") from exc
    return dims, dtype


class Backend(ABC):
    """One loaded model. Subclasses build their session in `open`, run it in `_infer` and free it in close()."""

    name: str = ""  # the record's `backend`; set from the record that names the class (a class may set its own)
    default_device: str | None = None  # the device when the caller names none

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        record = targets.find_runtime(f"{cls.__module__}:{cls.__qualname__}")
        if record is not None and "name" not in cls.__dict__:
            cls.name = record.backend

    def __init__(
        self,
        model_path: Path,
        manifest: Manifest,
        device: str | None = None,
        threads: int | None = None,
        **options: Any,
    ) -> None:
        self.model_path = Path(model_path)
        self.manifest = manifest
        self.device = self.pick_device(device)
        self.threads = threads
        self.input_shape, self.input_dtype = expected_input(self.manifest)
        self.open(**options)

    def pick_device(self, device: str | None) -> str | None:
        """The device this backend runs on: the caller's, else `default_device`, in the engine's spelling."""
        return device or self.default_device

    def open(self) -> None:  # noqa: B027 - optional hook
        """Load the model from `self.model_path`; a subclass may take its engine's own keyword options."""

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """NCHW batch -> (N, classes) float32 logits that the caller owns. Safe to call from several threads.

        The batch must be an ndarray of `input_dtype`, 4-D, with at least one row and every fixed dimension of
        `input_shape`; anything else is a one-line BitdeployError before the engine sees it.
        """
        want_shape, want_dtype = self.input_shape, self.input_dtype
        if (
            not isinstance(batch, np.ndarray)
            or batch.dtype != want_dtype
            or batch.ndim != 4
            or batch.shape[0] < 1
            or any(want is not None and got != want for got, want in zip(batch.shape, want_shape))
        ):
            got = f"{batch.dtype} {tuple(batch.shape)}" if isinstance(batch, np.ndarray) else type(batch).__name__
            want = "x".join("N" if d is None else str(d) for d in want_shape)
            raise BitdeployError(
                f"infer expects a {want_dtype} NCHW array of shape {want} (got {got}); use predict() for images or preprocess() first"
            )
        out = self._infer(np.ascontiguousarray(batch))
        if not isinstance(out, np.ndarray) or out.ndim != 2 or out.shape[0] != batch.shape[0]:
            shape = tuple(out.shape) if isinstance(out, np.ndarray) else type(out).__name__
            raise BundleError(
                f"{self.model_path}: the model returned shape {shape} for a batch of {batch.shape[0]} (expected ({batch.shape[0]}, classes)); rebuild the bundle"
            )
        return out if out.dtype == np.float32 else out.astype(np.float32)

    @abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray:
        """Run a checked, C-contiguous batch (4-D, `input_dtype`, N >= 1, fixed dims as the manifest says) ->
        (N, classes) logits the caller may keep (never a buffer the backend reuses). Thread-safe."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the session; the backend is unusable afterwards."""

    def describe(self) -> dict[str, Any]:
        """What actually runs (device, precision, threads), for benchmarks and manifests."""
        return {"backend": self.name, "device": self.device, "threads": self.threads}

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def backend_available(name: str) -> bool:
    """The backend is registered and its SDK is installed (checked without importing it)."""
    record = targets.find_backend(name)
    if record is None:
        return False
    try:
        return importlib.util.find_spec(record.runtime_module) is not None
    except (ImportError, ValueError):
        return False


def backend_class(name: str) -> type[Backend]:
    """Import a backend class by its record; a missing SDK becomes a one-line MissingDependencyError."""
    record = targets.for_backend(name)
    if not backend_available(name):
        raise MissingDependencyError(f"the {name} runtime ({record.runtime_module})", record.runtime_extra)
    cls: type[Backend] = targets.import_object(record.runtime)
    return cls


def open_backend(
    name: str,
    model_path: Path,
    manifest: Manifest,
    device: str | None = None,
    threads: int | None = None,
) -> Backend:
    return backend_class(name)(model_path, manifest, device=device, threads=threads)
