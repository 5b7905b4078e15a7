"""Progress for long runs: durations as people read them, the ETA and one line per step."""

from __future__ import annotations

import time
from collections.abc import Callable


def duration_text(seconds: float) -> str:
    """40 s, 1 min 20 s, 2 h 05 min."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def eta_s(elapsed_s: float, done: int, total: int) -> float | None:
    """Seconds left: the mean time per finished step times the steps left; None before a step finished."""
    if done <= 0:
        return None
    return elapsed_s / done * max(0, total - done)


def progress_line(step: int, total: int, what: str, elapsed_s: float) -> str:
    """`[7/48] round 2/3 m-r50x1-32/onnx-int8, elapsed 40 s, ETA 1 min 20 s`: the line as step `step` starts (the
    steps before it finished in `elapsed_s`)."""
    left = eta_s(elapsed_s, step - 1, total)
    eta = duration_text(left) if left is not None else "-"
    return f"[{step}/{total}] {what}, elapsed {duration_text(elapsed_s)}, ETA {eta}"


class Progress:
    """Counts bench's steps (open, each round, end-to-end + accuracy, serving memory, per bundle) for the ETA line.
    `total` shrinks when a bundle fails and its remaining steps will not run."""

    def __init__(self, total: int, log: Callable[[str], None]) -> None:
        self.total, self.done, self.log = total, 0, log
        self.started = time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        self.total = max(self.total, self.done)
        self.log(progress_line(self.done, self.total, what, time.perf_counter() - self.started))
