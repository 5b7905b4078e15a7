"""The conformance test template every runtime backend runs (as NNCF and Polygraphy test their backends).

`BackendConformance` holds the tests; pytest collects them only through a subclass named `Test...` that
provides a class-scoped `case` fixture returning a `Case` (see tests/runtimes/test_backend_contract.py):

    class TestMyBackend(BackendConformance):
        @pytest.fixture(scope="class")
        def case(self) -> Case:
            return Case(factory=lambda: MyBackend(path, manifest), x=x, expected=reference_logits, atol=1e-5)

What is checked is the contract of `bitdeploy.runtimes.engines.base.Backend`: bad batches (wrong dtype, ndim, fixed
dimension, not an array, no rows) are one-line BitdeployErrors; batch 1 and 3 give (N, classes) float32 logits
that agree with the reference and that the caller owns; four threads get what serial calls get; `describe()`
names the backend and device; `close()` is safe twice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from bitdeploy.core.errors import BitdeployError
from bitdeploy.runtimes.engines.base import Backend


@dataclass
class Case:
    """One backend under test: how to open it, a valid batch (at least 3 rows), what it should return for it."""

    factory: Callable[[], Backend]
    x: np.ndarray
    expected: np.ndarray  # reference logits for x
    atol: float = 1e-5
    rtol: float = 0.0


def _one_line_error(backend: Backend, batch: Any) -> str:
    with pytest.raises(BitdeployError) as err:
        backend.infer(batch)
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


class BackendConformance:
    """The tests; a subclass provides the `case` fixture (class scope) and names the registered backend it covers
    (every registered backend needs one: tests/pipeline/test_registry.py checks)."""

    covers: str | None = None  # the registered backend (its record's `backend`) this subclass tests

    @pytest.fixture(scope="class")
    def case(self) -> Case:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    @pytest.fixture(scope="class")
    def backend(self, case: Case) -> Iterator[Backend]:
        backend = case.factory()
        try:
            yield backend
        finally:
            backend.close()

    # -- the input checks -------------------------------------------------------------------------------------
    def test_wrong_dtype_is_one_line(self, backend: Backend, case: Case) -> None:
        other = np.float64 if backend.input_dtype != np.float64 else np.float32
        msg = _one_line_error(backend, case.x[:2].astype(other))
        assert str(backend.input_dtype) in msg and np.dtype(other).name in msg

    def test_wrong_ndim_is_one_line(self, backend: Backend, case: Case) -> None:
        _one_line_error(backend, case.x[0])  # one CHW image, no batch axis
        _one_line_error(backend, case.x[:2, None])  # 5-D

    def test_wrong_fixed_dim_is_one_line(self, backend: Backend, case: Case) -> None:
        fixed = [i for i, d in enumerate(backend.input_shape) if i > 0 and d is not None]
        if not fixed:
            pytest.skip("the manifest fixes no input dimension")
        for axis in fixed:
            shape = list(case.x[:2].shape)
            shape[axis] += 1
            msg = _one_line_error(backend, np.zeros(shape, backend.input_dtype))
            assert str(tuple(shape)) in msg

    def test_non_array_is_one_line(self, backend: Backend, case: Case) -> None:
        msg = _one_line_error(backend, case.x[:1].tolist())
        assert "list" in msg
        _one_line_error(backend, None)

    def test_empty_batch_is_one_line(self, backend: Backend, case: Case) -> None:
        _one_line_error(backend, case.x[:0])

    # -- the results ------------------------------------------------------------------------------------------
    @pytest.mark.parametrize("n", [1, 3])
    def test_batch_returns_float32_logits_matching_the_reference(self, backend: Backend, case: Case, n: int) -> None:
        out = backend.infer(case.x[:n])
        assert isinstance(out, np.ndarray) and out.shape == (n, case.expected.shape[1]) and out.dtype == np.float32
        np.testing.assert_allclose(out, case.expected[:n], atol=case.atol, rtol=case.rtol)

    def test_non_contiguous_batch_is_accepted(self, backend: Backend, case: Case) -> None:
        strided = case.x[:3][::-1]  # negative stride: Backend.infer hands the engine a contiguous copy
        np.testing.assert_allclose(backend.infer(strided), case.expected[:3][::-1], atol=case.atol, rtol=case.rtol)

    def test_output_is_caller_owned(self, backend: Backend, case: Case) -> None:
        first = backend.infer(case.x[:2])
        kept = first.copy()
        first[:] = np.nan  # the caller scribbles on its result ...
        again = backend.infer(case.x[:2])  # ... and the next call does not see it
        np.testing.assert_allclose(again, kept, rtol=1e-6, atol=1e-6)
        other = backend.infer(case.x[1:3])
        np.testing.assert_allclose(again, kept, rtol=1e-6, atol=1e-6)  # nor does an earlier result change
        assert not np.shares_memory(again, other)

    def test_concurrent_calls_equal_serial_calls(self, backend: Backend, case: Case) -> None:
        batches = [case.x[i % len(case.x) : i % len(case.x) + 1 + i % 3] for i in range(12)]
        serial = [backend.infer(b) for b in batches]
        results: dict[int, list[np.ndarray]] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(4)

        def work(k: int) -> None:
            try:
                start.wait()
                results[k] = [backend.infer(b) for b in batches[k:] + batches[:k]]
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert not errors, errors
        for k, outs in results.items():
            for got, want in zip(outs, serial[k:] + serial[:k]):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert len(results) == 4

    # -- description and lifetime -----------------------------------------------------------------------------
    def test_describe_names_backend_and_device(self, backend: Backend) -> None:
        info = backend.describe()
        assert info["backend"] == backend.name and backend.name
        assert info.get("device")

    def test_close_twice_is_safe(self, case: Case) -> None:
        backend = case.factory()
        backend.close()
        backend.close()
        with case.factory() as other:  # the context manager closes too, and a closed one closes again safely
            assert other.infer(case.x[:1]).shape == (1, case.expected.shape[1])
        other.close()
