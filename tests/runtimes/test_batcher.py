"""The dynamic batcher: gathers concurrent requests, splits the answers back, never makes a lone request wait."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

from bitdeploy.core.errors import BitdeployError
from bitdeploy.runtimes.serving.batcher import Batcher


class Engine:
    """Logits = the per-row sum of the input (so each row's answer names its row), with a fixed delay per call."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        time.sleep(self.delay)
        return batch.reshape(len(batch), -1).sum(axis=1, keepdims=True).astype(np.float32)


def rows(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32).reshape(n, 1)


@contextmanager
def running(engine: Callable[[np.ndarray], np.ndarray], **settings: Any) -> Iterator[Batcher]:
    """A batcher over `engine`, closed (up to 5 s for its queue) when the block ends, however it ends."""
    batcher = Batcher(engine, **settings)
    try:
        yield batcher
    finally:
        batcher.close(5)


def test_concurrent_requests_share_engine_calls_and_get_their_rows() -> None:
    engine = Engine(delay=0.02)
    with running(engine, max_batch=8, max_delay_s=2.0) as batcher:  # never reached: the batch fills first
        futures = {}
        for _ in range(6):
            batcher.expect()
        for i in range(6):  # six requests of 1-2 rows arrive while nothing runs yet
            futures[i] = batcher.submit(rows(10 * i, 1 + i % 2), expected=True)
        for i, fut in futures.items():
            np.testing.assert_array_equal(fut.result(5).ravel(), rows(10 * i, 1 + i % 2).ravel())
    assert (
        sum(engine.calls) == 9 and max(engine.calls) <= 8 and len(engine.calls) == 2
    )  # 7 rows, then the request that did not fit


def test_a_lone_request_does_not_wait_for_the_delay() -> None:
    with running(Engine(), max_batch=8, max_delay_s=2.0) as batcher:
        for _ in range(3):
            t0 = time.monotonic()
            batcher.expect()
            batcher.submit(rows(0, 1), expected=True).result(5)
            assert time.monotonic() - t0 < 1.0


def test_waits_for_an_announced_request() -> None:
    engine = Engine()
    with running(engine, max_batch=8, max_delay_s=2.0) as batcher:
        batcher.expect()
        batcher.expect()  # a second request is still being decoded
        first = batcher.submit(rows(0, 1), expected=True)
        time.sleep(0.1)
        assert not first.done()
        second = batcher.submit(rows(1, 1), expected=True)
        assert first.result(5).item() == 0 and second.result(5).item() == 1
    assert engine.calls == [2]


def test_forget_withdraws_an_announcement() -> None:
    with running(Engine(), max_batch=8, max_delay_s=5.0) as batcher:
        batcher.expect()
        batcher.forget()  # that request failed to decode: nobody is on the way any more
        t0 = time.monotonic()
        assert batcher.submit(rows(0, 1)).result(10).item() == 0
        assert time.monotonic() - t0 < 2.0


def test_the_delay_bounds_the_wait() -> None:
    with running(Engine(), max_batch=8, max_delay_s=0.05) as batcher:
        batcher.expect()
        batcher.expect()  # announced, but never submitted
        t0 = time.monotonic()
        assert batcher.submit(rows(0, 1), expected=True).result(5).item() == 0
        assert 0.04 <= time.monotonic() - t0 < 2.0


def test_a_request_larger_than_max_batch_is_run_in_chunks() -> None:
    engine = Engine()
    with running(engine, max_batch=4, max_delay_s=0.0) as batcher:
        out = batcher.submit(rows(0, 10)).result(5)
    np.testing.assert_array_equal(out.ravel(), np.arange(10))
    assert engine.calls == [4, 4, 2]


def test_engine_errors_reach_every_request_of_the_batch() -> None:
    def broken(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("engine exploded")

    with running(broken, max_batch=8, max_delay_s=0.0) as batcher:
        fut = batcher.submit(rows(0, 2))
        with pytest.raises(RuntimeError, match="engine exploded"):
            fut.result(5)
        assert batcher.submit(rows(0, 1)).exception(5) is not None  # and the engine thread is still alive


def test_close_finishes_queued_work_then_refuses() -> None:
    engine = Engine(delay=0.05)
    batcher = Batcher(engine, max_batch=1, max_delay_s=0.0)
    futures = [batcher.submit(rows(i, 1)) for i in range(5)]
    batcher.close(10)
    assert [f.result(0).item() for f in futures] == [0, 1, 2, 3, 4]
    with pytest.raises(BitdeployError, match="shutting down"):
        batcher.submit(rows(0, 1))


def test_metrics_hooks_see_batches_and_queue() -> None:
    seen: list[int] = []
    depth: list[int] = []
    lock = threading.Lock()

    def on_batch(n: int, seconds: float) -> None:
        with lock:
            seen.append(n)

    with running(Engine(), max_batch=8, max_delay_s=0.0, on_batch=on_batch, on_queue=depth.append) as batcher:
        batcher.submit(rows(0, 3)).result(5)
    assert seen == [3] and 3 in depth and depth[-1] == 0


def test_bad_settings() -> None:
    with pytest.raises(BitdeployError, match="--max-batch"):
        Batcher(Engine(), max_batch=0)


def test_a_cancelled_request_is_skipped_and_the_engine_thread_survives() -> None:
    engine = Engine(delay=0.2)
    with running(engine, max_batch=1, max_delay_s=0.0) as batcher:
        first = batcher.submit(rows(0, 1))
        time.sleep(0.05)  # the engine is busy with `first`
        gone = batcher.submit(rows(1, 1))
        assert gone.cancel()  # its caller timed out
        assert first.result(5).item() == 0
        assert batcher.submit(rows(2, 1)).result(5).item() == 2
    assert engine.calls == [1, 1]
