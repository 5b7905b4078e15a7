"""The embedded runtime: load a bundle (directory or single-file pack) and classify images, without torch.

    from bitdeploy.runtimes import load
    with load("runs/digits") as model:
        print(model.predict(["a.png", "b.jpg"], top_k=3))

Only the standard library, numpy and Pillow are imported here; a backend's SDK (onnxruntime, openvino,
tensorrt, ai_edge_litert) is imported when a bundle that needs it is loaded.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bitdeploy.runtimes.predictor import Predictor

__all__ = ["Predictor", "load"]


def __getattr__(name: str) -> Any:
    if name == "Predictor":  # lazily, so `import bitdeploy.runtimes` stays cheap
        from bitdeploy.runtimes.predictor import Predictor

        return Predictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load(
    path: str | os.PathLike[str],
    backend: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    verify: bool = True,
    self_test: bool = False,
    **backend_options: Any,
) -> Predictor:
    """Load a bundle directory or a `.bitpack` file and return a Predictor (a context manager).

    Args:
        path: a bundle directory written by `bitdeploy build`, or a pack written by `bitdeploy pack`.
        backend: "onnxruntime", "openvino", "tensorrt" or "litert"; default: the backend the bundle was built for.
        device: e.g. "cpu", "cuda:0" (ONNX Runtime), "CPU", "GPU", "AUTO" (OpenVINO); default: the bundle's.
        threads: intra-op threads for the engine; default: the engine's own choice.
        verify: check every file's sha256 against the manifest before loading (turn off only for debugging).
        self_test: run the bundle's golden set on this device before returning; a BundleError says what failed.
        backend_options: passed to the backend, e.g. `hint="THROUGHPUT"` or `num_requests=4` for OpenVINO.
    """
    from bitdeploy.runtimes.predictor import Predictor

    return Predictor.open(
        path, backend=backend, device=device, threads=threads, verify=verify, self_test=self_test, **backend_options
    )
