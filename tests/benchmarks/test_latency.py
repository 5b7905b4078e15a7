"""The latency library: percentiles, iteration/duration control, offline throughput, end-to-end split."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest

from bitdeploy.benchmarks import latency
from bitdeploy.benchmarks import quick as quick_timer
from bitdeploy.benchmarks.env import collect, device_label


class Sleeper:
    """A backend whose latency we know: `ms` per call (plus a per-image cost), recording what it was fed."""

    def __init__(self, ms: float = 1.0, per_image_ms: float = 0.0) -> None:
        self.ms, self.per_image_ms = ms, per_image_ms
        self.shapes: list[tuple[int, ...]] = []

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.shapes.append(batch.shape)
        time.sleep((self.ms + self.per_image_ms * batch.shape[0]) / 1000)
        return np.zeros((batch.shape[0], 10), np.float32)


def test_nearest_rank_percentiles() -> None:
    data = np.arange(1, 101, dtype=float)  # 1..100
    assert (
        latency.percentile(data, 50) == 50 and latency.percentile(data, 90) == 90 and latency.percentile(data, 99) == 99
    )
    s = latency.summarize(list(reversed(data)), keep_raw=True)
    assert (s["n"], s["min_ms"], s["max_ms"], s["p99_ms"], s["tail_samples"]) == (100, 1, 100, 99, 1)
    assert s["latencies_ms"][0] == 100  # raw latencies keep query order
    assert latency.summarize(range(1000))["tail_samples"] == 10


def test_single_stream_counts_warmup_separately_and_measures_batch_one() -> None:
    b = Sleeper(2.0)
    r = latency.single_stream(b, (3, 8, 8), iterations=25, warmup=5)
    assert len(b.shapes) == 30 and set(b.shapes) == {(1, 3, 8, 8)}
    assert r["n"] == 25 and r["warmup"] == 5 and len(r["latencies_ms"]) == 25
    assert 1.9 < r["p50_ms"] < 50 and r["min_ms"] >= 1.9  # sleep(2 ms) cannot return sooner
    assert r["images_per_s"] == pytest.approx(1000 / r["mean_ms"])


def test_duration_mode_stops_on_time() -> None:
    t0 = time.perf_counter()
    r = latency.single_stream(Sleeper(1.0), (3, 8, 8), duration=0.3, warmup=0, keep_raw=False)
    assert 0.25 < time.perf_counter() - t0 < 3.0
    # How many 1 ms queries fit in 0.3 s depends on the machine's load; that the loop stops on time does not.
    assert 1 <= r["n"] < 300 and "latencies_ms" not in r and r["duration_s"] == 0.3
    with pytest.raises(ValueError):
        latency.timed_loop(lambda i: None, iterations=0)


def test_offline_does_the_same_work_per_batch_size() -> None:
    b = Sleeper(2.0, per_image_ms=0.1)
    r = latency.offline(b, (3, 8, 8), (1, 4, 16), iterations=32, warmup=1)
    rows = {x["batch_size"]: x for x in r["results"]}
    assert rows[1]["images"] == 32 and rows[4]["images"] == 32 and rows[16]["batches"] == 3  # min_batches
    assert rows[16]["images_per_s"] > rows[4]["images_per_s"] > rows[1]["images_per_s"]  # fixed cost amortised
    assert r["best_batch_size"] == 16
    with pytest.raises(ValueError):
        latency.offline(b, (3, 8, 8), (0,), iterations=4)


def test_end_to_end_splits_preprocessing_on_encoded_images() -> None:
    from PIL import Image

    from bitdeploy.runtimes.preprocess import input_spec

    images = []
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(np.full((64, 48, 3), 40 * i, np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    b = Sleeper(1.0)
    r = latency.end_to_end(b, images, input_spec(32), iterations=12, warmup=2)
    assert set(b.shapes) == {(1, 3, 32, 32)} and r["n"] == 12 and r["images_distinct"] == 3
    assert r["preprocess_mean_ms"] > 0 and r["infer_mean_ms"] >= 0.9
    assert r["mean_ms"] == pytest.approx(r["preprocess_mean_ms"] + r["infer_mean_ms"], rel=0.05)


class NoMemoryAbove(Sleeper):
    """Runs batches up to `limit` images and fails beyond, as an engine out of memory does."""

    def __init__(self, limit: int) -> None:
        super().__init__(1.0, 0.2)
        self.limit = limit

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if batch.shape[0] > self.limit:
            raise RuntimeError("cannot allocate memory for the batch\nC++ context")
        return super().infer(batch)


def test_quick_for_build_table() -> None:
    q = quick_timer.quick(
        Sleeper(1.0), (3, 8, 8), iterations=10, warmup=1, throughput_batches=(4,), throughput_images=8
    )
    # 10 queries split over 3 rounds: 4 each; the p50 is the rounds' median, with their min-max
    assert q["n"] == 12 and q["rounds"] == 3 and q["p50_ms"] >= 0.9 and q["throughput_batch"] == 4
    lo, hi = q["p50_spread"]
    assert lo <= q["p50_ms"] <= hi and q["images_per_s_spread"][0] <= q["images_per_s"] <= q["images_per_s_spread"][1]
    assert len(q["interference"]["windows"]) == 3 and isinstance(q["disturbed"], bool)


def test_quick_interleaved_rotates_the_order_every_round() -> None:
    calls: list[str] = []

    class Named(Sleeper):
        def __init__(self, name: str, ms: float) -> None:
            super().__init__(ms)
            self.name = name

        def infer(self, batch: np.ndarray) -> np.ndarray:
            if not calls or calls[-1] != self.name:
                calls.append(self.name)
            return super().infer(batch)

    timers = [
        quick_timer.QuickTimer(
            Named(n, ms), (3, 8, 8), iterations=6, warmup=1, throughput_batches=(2,), throughput_images=6
        )
        for n, ms in (("a", 1.0), ("b", 8.0), ("c", 4.0))
    ]
    results = quick_timer.quick_interleaved(timers)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # A B C, B C A, C A B
    assert [r["rounds"] for r in results] == [3, 3, 3] and all(len(r["interference"]["windows"]) == 3 for r in results)
    assert results[0]["p50_ms"] < results[2]["p50_ms"] < results[1]["p50_ms"]  # each result is its own backend's


def test_quick_sweeps_batch_sizes_where_memory_allows() -> None:
    b = NoMemoryAbove(8)
    q = quick_timer.quick(b, (3, 8, 8), iterations=5, warmup=1, throughput_batches=(1, 4, 8, 16), throughput_images=8)
    assert [r["batch_size"] for r in q["throughput"]] == [1, 4, 8]
    assert q["throughput_stopped"] == "batch 16: cannot allocate memory for the batch"
    best = max(q["throughput"], key=lambda r: r["images_per_s"])
    assert q["throughput_batch"] == best["batch_size"] and q["images_per_s"] == best["images_per_s"]
    assert {s[0] for s in b.shapes} == {1, 4, 8}


def test_on_a_real_onnx_bundle(onnx_bundle: Path) -> None:
    from bitdeploy import runtimes

    with runtimes.load(onnx_bundle, threads=1) as pred:
        r = latency.single_stream(pred, (3, 32, 32), iterations=20, warmup=2)
        off = latency.offline(pred, (3, 32, 32), (1, 8), iterations=16)
    assert r["n"] == 20 and 0 < r["p50_ms"] < 1000
    assert [x["batch_size"] for x in off["results"]] == [1, 8]


def test_environment() -> None:
    env = collect(threads=2)
    assert env["cpu"]["logical_cores"] >= 1 and env["python"] and "numpy" in env["libraries"]
    assert isinstance(env["cpu"]["flags"], list) and isinstance(env["gpus"], list)
    assert "(2 threads)" in device_label(env, "cpu")
    assert device_label({"gpus": [{"name": "NVIDIA H100"}], "cpu": {}}, "cuda:0") == "NVIDIA H100"
