"""Dynamic batching: requests that arrive close together run as one engine call, and each gets its rows back.

One engine thread takes the queued batches, concatenates up to `max_batch` rows, calls the engine once and
splits the logits back into each request's future. Callers preprocess on their own threads, so decoding the
next requests overlaps with inference.

When to wait for more: a batch waits at most `max_delay_s` (counted from its first request's arrival, or from
when the engine became free if that is later), and only while fewer requests are queued than were recently in
flight at once, or one is announced and still being decoded. A lone client therefore never waits, and 8
clients that fall out of step are gathered into one batch again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from bitdeploy.core.errors import BitdeployError

PEAK_WINDOW_S = 1.0  # how long a burst of concurrency is remembered


@dataclass
class _Job:
    batch: np.ndarray
    future: Future[np.ndarray] = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


def _no_op(*_: object) -> None:
    return None


class Batcher:
    """Runs `infer(batch) -> logits` on one thread for batches gathered from many callers."""

    def __init__(
        self,
        infer: Callable[[np.ndarray], np.ndarray],
        max_batch: int = 8,
        max_delay_s: float = 0.005,
        on_batch: Callable[[int, float], None] = _no_op,
        on_queue: Callable[[int], None] = _no_op,
    ) -> None:
        if max_batch < 1 or max_delay_s < 0:
            raise BitdeployError("--max-batch must be at least 1 and --max-delay-ms at least 0")
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self._infer = infer
        self._on_batch = on_batch  # (rows, seconds) per engine call
        self._on_queue = on_queue  # rows waiting
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._rows = 0
        self._arriving = 0  # announced by expect(), not yet submitted
        self._running = 0  # requests in the engine call now
        self._peak = 0
        self._peak_since = time.monotonic()
        self._free_since = 0.0  # when the engine last finished a batch
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="bitdeploy-batcher", daemon=True)
        self._thread.start()

    # -- callers ----------------------------------------------------------------------------------------
    def expect(self) -> None:
        """Announce a request that is still being read or decoded, so a forming batch may wait for it."""
        with self._cond:
            self._arriving += 1
            self._note_peak()

    def forget(self) -> None:
        """Withdraw an `expect()` whose request failed before `submit`."""
        with self._cond:
            self._arriving = max(0, self._arriving - 1)
            self._cond.notify_all()

    def submit(self, batch: np.ndarray, expected: bool = False) -> Future[np.ndarray]:
        """Queue a preprocessed NCHW batch; the future gets its (rows, classes) logits or the engine's error."""
        job = _Job(batch)
        with self._cond:
            if expected:
                self._arriving = max(0, self._arriving - 1)
            if self._closed:
                raise BitdeployError("the server is shutting down; retry on another replica")
            self._queue.append(job)
            self._rows += len(batch)
            self._note_peak()
            self._on_queue(self._rows)
            self._cond.notify_all()
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued requests, then stop the engine thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- the engine thread --------------------------------------------------------------------------------
    def _note_peak(self) -> None:
        now = time.monotonic()
        inflight = self._arriving + len(self._queue) + self._running
        if now - self._peak_since > PEAK_WINDOW_S:
            self._peak, self._peak_since = inflight, now
        self._peak = max(self._peak, inflight)

    def _should_wait(self) -> bool:
        if self._closed or self._rows >= self.max_batch:
            return False
        return self._arriving > 0 or len(self._queue) < self._peak

    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            # Requests that queued while the engine was busy still wait for the rest of their cohort, or two
            # groups of clients would alternate in half-size batches forever.
            deadline = max(self._queue[0].queued_at, self._free_since) + self.max_delay_s
            while self._should_wait():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            jobs = [self._queue.popleft()]
            rows = len(jobs[0].batch)
            while self._queue and rows + len(self._queue[0].batch) <= self.max_batch:
                rows += len(self._queue[0].batch)
                jobs.append(self._queue.popleft())
            self._rows -= rows
            jobs = [
                j for j in jobs if j.future.set_running_or_notify_cancel()
            ]  # a caller that timed out cancelled its own
            self._running = len(jobs)
            self._note_peak()
            self._on_queue(self._rows)
            return jobs

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            if jobs:
                self._run(jobs)

    def _done(self) -> None:
        with self._cond:  # before the answers go out: a client's next request must not count as concurrency
            self._running = 0
            self._free_since = time.monotonic()

    def _run(self, jobs: list[_Job]) -> None:
        try:
            batch = jobs[0].batch if len(jobs) == 1 else np.concatenate([j.batch for j in jobs])
            parts = []
            for start in range(0, len(batch), self.max_batch):  # a single request may exceed max_batch
                chunk = batch[start : start + self.max_batch]
                t0 = time.perf_counter()
                parts.append(self._infer(chunk))
                self._on_batch(len(chunk), time.perf_counter() - t0)
            logits = parts[0] if len(parts) == 1 else np.concatenate(parts)
        except BaseException as exc:
            self._done()
            for job in jobs:
                job.future.set_exception(exc)
            return
        self._done()
        start = 0
        for job in jobs:
            n = len(job.batch)
            job.future.set_result(logits[start : start + n])
            start += n
