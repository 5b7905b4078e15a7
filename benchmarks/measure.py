"""Time one target the way `bitdeploy bench` does: its options, interleavable rounds and their summary, and the end-to-end
run from encoded images. Shared by the bench and the PyTorch baselines' child process (`baseline.time_target`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bitdeploy.benchmarks import interference, latency
from bitdeploy.benchmarks.memory import DEFAULT_QUERIES, METHOD
from bitdeploy.core.options import COMPILE_TIMEOUT_S
from bitdeploy.runtimes.bundle.manifest import InputSpec

QUIET_CHECKS = ("warn", "wait", "fail")


@dataclass
class BenchOptions:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    scenario: str = "both"
    iterations: int | None = None
    duration: float | None = None
    warmup: int = latency.DEFAULT_WARMUP
    threads: int | None = None
    device: str | None = None
    backend: str | None = None
    dataset: str | None = None
    samples: int | None = None
    reference: str | None = None
    pytorch_baseline: str | None = None  # None: no baseline; "auto" | "none" | PATH: its weights
    compile_timeout: float = COMPILE_TIMEOUT_S  # seconds allowed for torch.compile of the baseline; 0: skip that form
    end_to_end: bool = True
    keep_raw: bool = True
    progress: bool = True
    seed: int = 0
    rounds: int = latency.DEFAULT_ROUNDS  # interleaved rounds per bundle; each figure is their median
    quiet_check: str = "warn"  # warn | wait | fail: what a disturbed machine does (see QUIET_CHECKS)
    quiet_wait: float = interference.QUIET_WAIT_S  # seconds `wait` waits for a quiet machine before each round
    memory: bool = True  # serving memory per bundle, in a fresh process after the timing rounds (benchmarks.memory)
    extra: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        iterations = self.iterations if (self.iterations or self.duration) else latency.DEFAULT_ITERATIONS
        return {
            "scenario": self.scenario,
            "batch_sizes": list(self.batch_sizes),
            "iterations": iterations,
            "duration_s": self.duration,
            "warmup": self.warmup,
            "threads": self.threads,
            "device": self.device,
            "backend": self.backend,
            "dataset": self.dataset,
            "samples": self.samples,
            "reference": self.reference,
            "pytorch_baseline": self.pytorch_baseline,
            "compile_timeout_s": self.compile_timeout if self.pytorch_baseline is not None else None,
            "end_to_end": self.end_to_end,
            "seed": self.seed,
            "rounds": self.rounds,
            "quiet_check": self.quiet_check,
            "interference_limits": interference.limits(),
            "serving_memory": {"queries": DEFAULT_QUERIES, "method": METHOD} if self.memory else None,
            "percentiles": "nearest-rank",
            "timer": "time.perf_counter_ns around infer(); gc paused while timing",
            **self.extra,
        }


def time_round(target: Any, shape: tuple[int, int, int], opts: BenchOptions) -> dict[str, Any]:
    """One round: single-stream and offline with this round's share of the queries, inside one Window."""
    rounds = max(1, opts.rounds)
    iterations = opts.iterations if (opts.iterations or opts.duration) else latency.DEFAULT_ITERATIONS
    per_round = None if iterations is None else max(1, -(-iterations // rounds))
    duration = None if opts.duration is None else opts.duration / rounds
    out: dict[str, Any] = {}
    with interference.Window() as w:
        if opts.scenario in ("single-stream", "both"):
            out["single_stream"] = latency.single_stream(
                target, shape, per_round, duration, opts.warmup, True, opts.progress, opts.seed
            )
        if opts.scenario in ("offline", "both"):
            out["offline"] = latency.offline(
                target, shape, opts.batch_sizes, per_round, duration, progress=opts.progress, seed=opts.seed
            )
    out["window"] = w.record
    return out


def combine(rounds: list[dict[str, Any]], opts: BenchOptions) -> dict[str, Any]:
    """A row's figures from its rounds, with the interference verdict and the single-stream/offline check."""
    out: dict[str, Any] = {}
    if any("single_stream" in r for r in rounds):
        out["single_stream"] = latency.combine_single_stream([r["single_stream"] for r in rounds], opts.keep_raw)
    if any("offline" in r for r in rounds):
        out["offline"] = latency.combine_offline([r["offline"] for r in rounds])
    verdict = interference.judge([r["window"] for r in rounds])
    flags = list(verdict["reasons"])
    mismatch = latency.consistency(out.get("single_stream"), out.get("offline"))
    if mismatch:
        flags.append(mismatch)
    out.update(interference=verdict, disturbed=bool(flags), flags=flags)
    return out


def measure_latency(
    target: Any,
    shape: tuple[int, int, int],
    opts: BenchOptions,
    images: list[bytes] | None,
    input_spec: InputSpec | None,
) -> dict[str, Any]:
    """`opts.rounds` rounds back to back (the PyTorch baselines: nothing to interleave with), then end-to-end."""
    out = combine([time_round(target, shape, opts) for _ in range(max(1, opts.rounds))], opts)
    if opts.end_to_end and images and input_spec is not None:
        out["end_to_end"] = end_to_end(target, images, input_spec, opts)
    return out


def end_to_end(target: Any, images: list[bytes], input_spec: InputSpec, opts: BenchOptions) -> dict[str, Any]:
    with interference.Window() as w:
        out = latency.end_to_end(
            target, images, input_spec, opts.iterations, opts.duration, keep_raw=False, progress=opts.progress
        )
    verdict = interference.judge([w.record])
    out.update(interference=verdict, disturbed=verdict["disturbed"])
    return out
