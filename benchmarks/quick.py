"""The build's quick timing: one backend measured a round at a time, so that several bundles' rounds interleave.

The measurements themselves (single-stream, offline, how rounds combine) are `bitdeploy.benchmarks.latency`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bitdeploy.benchmarks.latency import (
    DEFAULT_ROUNDS,
    Inferable,
    combine_offline,
    combine_single_stream,
    offline,
    single_stream,
)


class QuickTimer:
    """The build's quick measurement of one backend, one round at a time, so that several bundles' rounds can be
    interleaved (`quick_interleaved`): batch-1 p50/p90 ms, and images/s per batch size of `throughput_batches`
    where memory allows: the first batch size the engine cannot run ends the sweep, and `throughput_stopped` says
    why. `iterations` queries and `throughput_images` images are split over `rounds`; each figure is the median of
    the rounds with its min-max spread, and `interference` says whether the machine was busy meanwhile.

    Good for ranking targets, not for publishing: use `bitdeploy bench` (1000 queries) for the tail.
    """

    def __init__(
        self,
        backend: Inferable,
        shape_chw: Sequence[int],
        iterations: int = 100,
        warmup: int = 10,
        throughput_batches: Sequence[int] = (8,),
        throughput_images: int = 64,
        seed: int = 0,
        rounds: int = DEFAULT_ROUNDS,
    ) -> None:
        self.backend, self.shape, self.warmup, self.seed = backend, tuple(shape_chw), warmup, seed
        self.rounds = max(1, rounds)
        self.per_round = max(1, math.ceil(iterations / self.rounds))
        self.images_per_round = math.ceil(throughput_images / self.rounds)
        self.sweep = list(throughput_batches)
        self.stopped: str | None = None
        self.ss_rounds: list[dict[str, Any]] = []
        self.off_rounds: list[dict[str, Any]] = []
        self.windows: list[dict[str, Any]] = []

    def run_round(self) -> None:
        from bitdeploy.benchmarks.interference import Window

        backend, shape, seed = self.backend, self.shape, self.seed
        with Window() as w:
            self.ss_rounds.append(
                single_stream(backend, shape, iterations=self.per_round, warmup=self.warmup, seed=seed)
            )
            done: list[dict[str, Any]] = []
            for bs in list(self.sweep):
                images = max(2 * bs, self.images_per_round)
                try:
                    off = offline(backend, shape, (bs,), iterations=images, warmup=1, min_batches=2, seed=seed)
                except Exception as exc:  # each engine has its own allocation-failure type (ORT's: Exception only)
                    text = str(exc).strip()
                    self.stopped = f"batch {bs}: {text.splitlines()[0][:200] if text else type(exc).__name__}"
                    self.sweep = self.sweep[: self.sweep.index(bs)]
                    done = [x for x in done if x["batch_size"] in self.sweep]
                    break
                done.extend(off["results"])
            self.off_rounds.append({"results": done})
        self.windows.append(w.record)

    def result(self) -> dict[str, Any]:
        from bitdeploy.benchmarks.interference import judge

        ss = combine_single_stream(self.ss_rounds, keep_raw=False)
        off_rounds = [{"results": [x for x in o["results"] if x["batch_size"] in self.sweep]} for o in self.off_rounds]
        combined = combine_offline(off_rounds) if self.sweep else {"results": []}
        rows = [
            {
                "batch_size": x["batch_size"],
                "images_per_s": x["images_per_s"],
                "images_per_s_spread": x["images_per_s_spread"],
                "batch_p50_ms": x["batch_p50_ms"],
                "images": x["images"],
            }
            for x in combined["results"]
        ]
        best = max(rows, key=lambda x: x["images_per_s"] or 0.0) if rows else None
        verdict = judge(self.windows)
        return {
            "p50_ms": ss["p50_ms"],
            "p90_ms": ss["p90_ms"],
            "p99_ms": ss["p99_ms"],
            "mean_ms": ss["mean_ms"],
            "n": ss["n"],
            "rounds": len(self.ss_rounds),
            "p50_spread": ss["spread"]["p50_ms"],
            "images_per_s": best["images_per_s"] if best else None,
            "images_per_s_spread": best["images_per_s_spread"] if best else None,
            "throughput_batch": best["batch_size"] if best else None,
            "throughput": rows,
            "throughput_stopped": self.stopped,
            "disturbed": verdict["disturbed"],
            "interference": verdict,
        }


def quick(backend: Inferable, shape_chw: Sequence[int], **options: Any) -> dict[str, Any]:
    """`QuickTimer`'s rounds back to back, for one backend alone."""
    timer = QuickTimer(backend, shape_chw, **options)
    for _ in range(timer.rounds):
        timer.run_round()
    return timer.result()


def quick_interleaved(timers: Sequence[QuickTimer]) -> list[dict[str, Any]]:
    """Run every timer's rounds interleaved, in an order that rotates by one each round (A B C, B C A, C A B), so
    slow drift of the machine hits every bundle alike; results in the timers' order."""
    rounds = max((t.rounds for t in timers), default=0)
    for r in range(rounds):
        for i in range(len(timers)):
            timer = timers[(i + r) % len(timers)]
            if len(timer.ss_rounds) < timer.rounds:
                timer.run_round()
    return [t.result() for t in timers]
