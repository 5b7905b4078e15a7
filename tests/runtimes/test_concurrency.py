"""8 threads x 100 predict calls give exactly the sequential results (ONNX Runtime and OpenVINO)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitdeploy.runtimes import load

from .conftest import VALID

THREADS, CALLS = 8, 100


def hammer(model: Any, inputs: list[Any], top_k: int = 3) -> tuple[list[list[Any]], list[BaseException]]:
    """Each thread predicts CALLS inputs (its own rotation of the list); returns per-thread results and errors."""
    results: list[list[Any]] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(CALLS):
                item = inputs[(t + i) % len(inputs)]
                results[t].append(model.predict(item, top_k=top_k)[0])
                assert model.last_timing is not None and model.last_timing.images == 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "a predict thread hung"
    return results, errors


def check_equal(model: Any, inputs: list[Any]) -> None:
    sequential = [model.predict(item, top_k=3)[0] for item in inputs]
    results, errors = hammer(model, inputs)
    assert not errors, errors[:3]
    for t in range(THREADS):
        assert len(results[t]) == CALLS
        for i, got in enumerate(results[t]):
            assert got == sequential[(t + i) % len(inputs)], f"thread {t} call {i} differs"


@pytest.mark.parametrize("fixture", ["ort_bundle", "ov_bundle"])
def test_threads_equal_sequential(fixture: str, request: pytest.FixtureRequest, image_dir: dict[str, Path]) -> None:
    bundle: Path = request.getfixturevalue(fixture)
    inputs: list[Any] = [image_dir[k] for k in VALID]
    inputs += [image_dir["photo_rgb"].read_bytes(), np.full((9, 13, 3), 77, np.uint8)]
    with load(bundle) as model:  # the engine's default threading, as a user gets it
        check_equal(model, inputs)


def test_openvino_pool_larger_than_one(ov_bundle: Path, image_dir: dict[str, Path]) -> None:
    with load(ov_bundle, hint="THROUGHPUT", num_requests=3) as model:
        assert model.describe()["infer_requests"] == 3
        check_equal(model, [image_dir[k] for k in VALID])


def test_infer_from_threads_matches(ort_bundle: Path, tiny_model: dict[str, Any]) -> None:
    x = tiny_model["x"]
    with load(ort_bundle) as model:
        expect = model.infer(x)
        out: list[np.ndarray] = []
        lock = threading.Lock()

        def work() -> None:
            for _ in range(20):
                y = model.infer(x)
                with lock:
                    out.append(y)

        threads = [threading.Thread(target=work) for _ in range(THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert len(out) == THREADS * 20 and all(np.array_equal(y, expect) for y in out)
