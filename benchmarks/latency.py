"""Latency and throughput of anything with `infer(batch) -> logits` (a runtime Backend or Predictor).

Single-stream follows MLPerf's SingleStream scenario: batch 1, the next query is issued when the previous
one returns, and the latency of every query is kept. Offline runs a closed loop of full batches per batch
size and reports images/s. Timing is `perf_counter_ns` around `infer` only; inputs are prepared before the
timed loop (a small pool of seeded random tensors, cycled), warm-up queries are run first and discarded,
and Python's garbage collector is paused while timing so its pauses do not land in the tail.

Percentiles are nearest-rank (MLPerf's definition): p99 is an observed latency, the one at rank ceil(0.99 n).
With n queries, `tail_samples` = n - rank(p99) latencies lie above it; below ~10 the p99 is close to the max
and means little, which is why the default is 1000 queries.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from bitdeploy.runtimes.bundle.manifest import InputSpec

DEFAULT_ITERATIONS = 1000  # single-stream queries when neither iterations nor duration is given
DEFAULT_WARMUP = 20
POOL = 4  # distinct random inputs cycled through the timed loop
PERCENTILES = (50, 90, 99)

DEFAULT_ROUNDS = 3  # interleaved rounds per bundle: each figure is their median, with the min-max spread
# Single-stream and offline batch 1 run the same call; on a quiet machine their images/s agree within ~10%.
# Beyond 1.3x apart, the machine changed between the two windows (or an engine batches differently at 1).
CONSISTENCY_LIMIT = 1.3


class Inferable(Protocol):
    def infer(self, batch: np.ndarray) -> np.ndarray: ...


def percentile(sorted_ms: Sequence[float] | np.ndarray, p: float) -> float:
    """Nearest-rank percentile of an ascending array (an observed value, as MLPerf reports)."""
    n = len(sorted_ms)
    if n == 0:
        return float("nan")
    rank = max(1, math.ceil(p / 100.0 * n))
    return float(sorted_ms[rank - 1])


def summarize(latencies_ms: Sequence[float] | np.ndarray, keep_raw: bool = False) -> dict[str, Any]:
    """p50/p90/p99, mean, std, min, max (all ms) and n of a list of per-query latencies."""
    arr = np.sort(np.asarray(latencies_ms, dtype=np.float64))
    n = int(arr.size)
    out: dict[str, Any] = {"n": n}
    for p in PERCENTILES:
        out[f"p{p}_ms"] = percentile(arr, p)
    out.update(
        mean_ms=float(arr.mean()) if n else float("nan"),
        std_ms=float(arr.std(ddof=1)) if n > 1 else 0.0,
        min_ms=float(arr[0]) if n else float("nan"),
        max_ms=float(arr[-1]) if n else float("nan"),
        tail_samples=n - max(1, math.ceil(0.99 * n)) if n else 0,
    )
    if keep_raw:
        out["latencies_ms"] = [round(float(x), 4) for x in latencies_ms]  # in query order, not sorted
    return out


def make_inputs(shape: Sequence[int], pool: int = POOL, seed: int = 0) -> list[np.ndarray]:
    """Seeded float32 tensors in [-1, 1] (BiT's input range), contiguous, ready to feed."""
    rng = np.random.default_rng(seed)
    return [np.ascontiguousarray(rng.uniform(-1.0, 1.0, size=tuple(shape)).astype(np.float32)) for _ in range(pool)]


@contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _progress(total: int | None, desc: str, enabled: bool, unit: str = "q") -> Any:
    """A tqdm bar on stderr when tqdm is installed and wanted; otherwise a no-op object with the same API."""
    if enabled and sys.stderr.isatty():  # a bar in a log file is noise: only for a terminal
        try:
            from tqdm import tqdm

            return tqdm(
                total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.5
            )
        except ImportError:
            pass

    class _Null:
        def update(self, n: int = 1) -> None: ...
        def close(self) -> None: ...

    return _Null()


def timed_loop(
    fn: Callable[[int], object],
    iterations: int | None = None,
    duration: float | None = None,
    warmup: int = DEFAULT_WARMUP,
    progress: bool = False,
    desc: str = "latency",
    unit: str = "q",
) -> list[float]:
    """Call fn(i) `warmup` times untimed, then until `iterations` calls or `duration` seconds; return ms per call.

    With both given, it stops at whichever comes first. With neither, DEFAULT_ITERATIONS calls.
    """
    if iterations is None and duration is None:
        iterations = DEFAULT_ITERATIONS
    if iterations is not None and iterations < 1:
        raise ValueError("iterations must be >= 1")
    if duration is not None and duration <= 0:
        raise ValueError("duration must be > 0")
    for i in range(max(0, warmup)):
        fn(i)
    out: list[float] = []
    bar = _progress(iterations, desc, progress, unit)
    deadline = None if duration is None else time.perf_counter_ns() + int(duration * 1e9)
    clock = time.perf_counter_ns
    try:
        with _gc_paused():
            i = 0
            while True:
                t0 = clock()
                fn(i)
                t1 = clock()
                out.append((t1 - t0) / 1e6)
                i += 1
                bar.update(1)
                if iterations is not None and i >= iterations:
                    break
                if deadline is not None and t1 >= deadline:
                    break
    finally:
        bar.close()
    return out


def single_stream(
    backend: Inferable,
    shape_chw: Sequence[int],
    iterations: int | None = None,
    duration: float | None = None,
    warmup: int = DEFAULT_WARMUP,
    keep_raw: bool = True,
    progress: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """MLPerf single-stream: batch 1, one query in flight. Returns summarize(...) plus the settings used."""
    inputs = make_inputs((1, *shape_chw), seed=seed)
    lat = timed_loop(
        lambda i: backend.infer(inputs[i % len(inputs)]), iterations, duration, warmup, progress, "single-stream"
    )
    out = summarize(lat, keep_raw=keep_raw)
    out.update(scenario="single-stream", batch_size=1, warmup=warmup, iterations=iterations, duration_s=duration)
    out["images_per_s"] = 1000.0 / out["mean_ms"] if out["mean_ms"] > 0 else None
    return out


def offline(  # noqa: PLR0913 - keyword knobs with defaults, as single_stream's
    backend: Inferable,
    shape_chw: Sequence[int],
    batch_sizes: Sequence[int] = (1, 8, 32),
    iterations: int | None = None,
    duration: float | None = None,
    warmup: int = 3,
    min_batches: int = 3,
    progress: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Throughput per batch size: a closed loop of full batches.

    `iterations` counts images per batch size (ceil(iterations / bs) batches, at least `min_batches`), so every
    batch size does the same work; `duration` is seconds per batch size. Neither: DEFAULT_ITERATIONS images.
    """
    if iterations is None and duration is None:
        iterations = DEFAULT_ITERATIONS
    rows = []
    for bs in batch_sizes:
        if bs < 1:
            raise ValueError(f"batch size must be >= 1 (got {bs})")
        inputs = make_inputs((bs, *shape_chw), pool=2, seed=seed)
        n_batches = None if iterations is None else max(min_batches, math.ceil(iterations / bs))

        def call(i: int, x: list[np.ndarray] = inputs) -> object:
            return backend.infer(x[i % 2])

        lat = timed_loop(
            call,
            n_batches,
            duration,
            warmup,
            progress,
            f"offline bs={bs}",
            "batch",
        )
        total_s = sum(lat) / 1000.0
        stats = summarize(lat)
        rows.append(
            {
                "batch_size": bs,
                "batches": len(lat),
                "images": bs * len(lat),
                "seconds": total_s,
                "images_per_s": bs * len(lat) / total_s if total_s > 0 else None,
                "batch_p50_ms": stats["p50_ms"],
                "batch_p90_ms": stats["p90_ms"],
                "batch_mean_ms": stats["mean_ms"],
            }
        )
    best = max(rows, key=lambda r: r["images_per_s"] or 0.0) if rows else None
    return {
        "scenario": "offline",
        "warmup_batches": warmup,
        "iterations": iterations,
        "duration_s": duration,
        "results": rows,
        "best_images_per_s": best["images_per_s"] if best else None,
        "best_batch_size": best["batch_size"] if best else None,
    }


def end_to_end(
    predictor: Any,
    images: Sequence[bytes],
    input_spec: InputSpec,
    iterations: int | None = None,
    duration: float | None = None,
    warmup: int = 5,
    keep_raw: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Batch-1 decode + preprocess + infer on encoded images (cycled), with the preprocessing time split out.

    `images` are encoded files (PNG/JPEG bytes) so decoding is part of what is timed, as in a real application.
    """
    from bitdeploy.runtimes.preprocess import preprocess

    if not images:
        raise ValueError("end_to_end needs at least one encoded image")
    pre_ms: list[float] = []
    clock = time.perf_counter_ns

    def step(i: int) -> None:
        t0 = clock()
        x = preprocess(images[i % len(images)], input_spec)[None]
        t1 = clock()
        predictor.infer(x)
        pre_ms.append((t1 - t0) / 1e6)

    total = timed_loop(step, iterations, duration, warmup, progress, "end-to-end")
    pre = pre_ms[max(0, warmup) :]
    out = summarize(total, keep_raw=keep_raw)
    out.update(
        scenario="end-to-end",
        batch_size=1,
        images_distinct=len(images),
        preprocess_p50_ms=percentile(np.sort(pre), 50),
        preprocess_mean_ms=float(np.mean(pre)),
        infer_mean_ms=float(np.mean(np.asarray(total) - np.asarray(pre))),
    )
    return out


def _median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def _spread(values: Sequence[float]) -> list[float]:
    return [float(min(values)), float(max(values))]


def combine_single_stream(rounds: Sequence[dict[str, Any]], keep_raw: bool = True) -> dict[str, Any]:
    """One single-stream result from rounds: p50, p90 and mean are medians of the rounds' figures with their
    min-max `spread`; p99, max and `tail_samples` come from all queries pooled (one round's tail is too thin)."""
    raw = [x for r in rounds for x in r["latencies_ms"]]
    out = summarize(raw, keep_raw=keep_raw)
    spread: dict[str, list[float]] = {}
    for key in ("p50_ms", "p90_ms", "mean_ms"):
        values = [float(r[key]) for r in rounds]
        out[key] = _median(values)
        spread[key] = _spread(values)
    first = rounds[0]
    out.update(
        scenario="single-stream",
        batch_size=1,
        warmup=first.get("warmup"),
        iterations=first.get("iterations"),
        duration_s=first.get("duration_s"),
        rounds=len(rounds),
        spread=spread,
        per_round=[{k: r[k] for k in ("n", "p50_ms", "p90_ms", "mean_ms")} for r in rounds],
        p99_from="all rounds pooled",
    )
    out["images_per_s"] = 1000.0 / out["mean_ms"] if out["mean_ms"] > 0 else None
    return out


def combine_offline(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One offline result from rounds: per batch size, the median images/s of the rounds and its spread."""
    by_bs: dict[int, list[dict[str, Any]]] = {}
    for r in rounds:
        for row in r["results"]:
            by_bs.setdefault(int(row["batch_size"]), []).append(row)
    rows = []
    for bs, runs in by_bs.items():
        ips = [float(x["images_per_s"]) for x in runs if x.get("images_per_s")]
        rows.append(
            {
                "batch_size": bs,
                "batches": sum(int(x["batches"]) for x in runs),
                "images": sum(int(x["images"]) for x in runs),
                "seconds": sum(float(x["seconds"]) for x in runs),
                "images_per_s": _median(ips) if ips else None,
                "images_per_s_spread": _spread(ips) if ips else None,
                "batch_p50_ms": _median([float(x["batch_p50_ms"]) for x in runs]),
                "batch_p90_ms": _median([float(x["batch_p90_ms"]) for x in runs]),
                "batch_mean_ms": _median([float(x["batch_mean_ms"]) for x in runs]),
                "rounds": len(runs),
            }
        )
    best = max(rows, key=lambda r: r["images_per_s"] or 0.0) if rows else None
    first = rounds[0]
    return {
        "scenario": "offline",
        "warmup_batches": first.get("warmup_batches"),
        "iterations": first.get("iterations"),
        "duration_s": first.get("duration_s"),
        "rounds": len(rounds),
        "results": rows,
        "best_images_per_s": best["images_per_s"] if best else None,
        "best_batch_size": best["batch_size"] if best else None,
        "best_images_per_s_spread": best["images_per_s_spread"] if best else None,
    }


def consistency(single: dict[str, Any] | None, offline_: dict[str, Any] | None) -> str | None:
    """A flag when single-stream and offline batch 1 (the same call) disagree by more than CONSISTENCY_LIMIT."""
    if not single or not offline_ or not single.get("mean_ms"):
        return None
    bs1 = next((r for r in offline_.get("results") or [] if r["batch_size"] == 1 and r.get("images_per_s")), None)
    if bs1 is None:
        return None
    ss_ips = 1000.0 / float(single["mean_ms"])
    ratio = max(ss_ips, bs1["images_per_s"]) / min(ss_ips, bs1["images_per_s"])
    if ratio <= CONSISTENCY_LIMIT:
        return None
    return (
        f"single-stream ({ss_ips:.1f} images/s from its mean) and offline batch 1 ({bs1['images_per_s']:.1f} images/s)"
        f" are {ratio:.1f}x apart (limit {CONSISTENCY_LIMIT:g}x)"
    )
