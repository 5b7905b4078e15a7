"""The argument groups of `train` (training) and of the runtime commands (runtime, bench's timing, accuracy and
baseline, serving). The mechanism and the shared flags are in `bitdeploy.cli.groups`."""

from __future__ import annotations

import click

from bitdeploy.cli import choices
from bitdeploy.cli.groups import (
    BATCH_SIZE,
    DATASET,
    HFLIP,
    LR,
    MAX_BATCH,
    MAX_DELAY_MS,
    QUIET_CHECK,
    SHOTS,
    STEPS,
    THREADS,
    Group,
    flag,
    record_of,
    varied,
)
from bitdeploy.core import options as records
from bitdeploy.runtimes.serving.serve_options import ServeOptions


def _batch_sizes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 1,8,32") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: batch sizes must be integers >= 1, e.g. 1,8,32")
    return tuple(dict.fromkeys(sizes))


# -- train: the training record (its own --dataset and --val-split join it in `TrainConfig.of`) --------------------
TRAINING = Group(
    "training",
    (
        # the BiT-HyperRule's overrides
        SHOTS,
        STEPS,
        BATCH_SIZE,
        flag(
            "--batch-split",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Accumulate each process's batch in this many micro-batches (same result, less memory).",
        ),
        LR,
        flag(
            "--mixup",
            type=click.FloatRange(min=0),
            default=None,
            help="MixUp alpha [rule: 0.1 from 20k training images, else 0].",
        ),
        HFLIP,
        # how the run executes
        flag(
            "--device",
            type=click.Choice(["auto", "cpu", "cuda", "xla"]),
            default="auto",
            show_default=True,
            help="auto = cuda when available, else cpu.",
        ),
        flag(
            "--precision",
            type=click.Choice(["fp32", "bf16", "fp16"]),
            default="fp32",
            show_default=True,
            help="Autocast precision (fp16 with loss scaling, CUDA only).",
        ),
        flag(
            "--checkpoint-every",
            type=click.IntRange(min=0),
            default=100,
            show_default=True,
            help="Steps between checkpoints (0: only at the end).",
        ),
        flag(
            "--eval-every",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Steps between validation passes (0: only at the end).",
        ),
        flag("--strict", is_flag=True, help="Stop at the first unreadable image instead of skipping and counting it."),
        flag(
            "--num-workers",
            type=click.IntRange(min=1),
            default=None,
            help="Threads that decode and resize images [min(4, CPUs)].",
        ),
        flag("--quiet", is_flag=True, help="No progress bar."),
    ),
    record_of(records.TrainingOptions, quiet="not:progress"),
)


# -- the runtime commands: bench, serve, predict, verify ----------------------------------------------------------
RUNTIME = Group(
    "runtime",
    (
        flag(
            "--backend",
            type=choices.backends(),
            default=None,
            help="Run the bundle on another runtime than it was built for (OpenVINO also reads ONNX bundles).",
        ),
        flag(
            "--device",
            default=None,
            help="Override the bundle's device, e.g. cpu, cuda:0 (ONNX Runtime) or CPU, GPU, AUTO (OpenVINO).",
        ),
        THREADS,
    ),
    records.RuntimeArgs,
)


BENCH_TIMING = Group(
    "timing",
    (
        flag(
            "--batch-sizes",
            default="1,8,32",
            show_default=True,
            callback=_batch_sizes,
            help="Offline batch sizes, comma-separated.",
        ),
        flag(
            "--scenario",
            type=click.Choice(records.SCENARIOS),
            default="both",
            show_default=True,
            help="single-stream: batch-1 latency (MLPerf); offline: images/s per batch size.",
        ),
        flag(
            "--iterations",
            type=click.IntRange(min=1),
            help="Single-stream queries (and images per offline batch size). Default 1000.",
        ),
        flag(
            "--duration",
            type=click.FloatRange(min=0, min_open=True),
            help="Seconds per measurement instead of --iterations.",
        ),
        flag(
            "--warmup",
            type=click.IntRange(min=0),
            default=20,
            show_default=True,
            help="Untimed queries before each single-stream run.",
        ),
        flag(
            "--rounds",
            type=click.IntRange(min=3),
            default=3,
            show_default=True,
            help="Interleaved rounds per bundle (queries are split between them); each figure is their median, with "
            "the min-max spread.",
        ),
        QUIET_CHECK,
        flag(
            "--quiet-wait",
            type=click.FloatRange(min=0),
            default=60.0,
            show_default=True,
            help="Seconds --quiet-check wait waits for a quiet machine before each round.",
        ),
        flag("--no-e2e", is_flag=True, help="Skip the end-to-end (decode + preprocess + infer) measurement."),
        flag(
            "--memory/--no-memory",
            default=True,
            show_default=True,
            help="After the timing, each bundle's serving memory: peak RSS of a fresh process loading it and serving "
            "batch 1.",
        ),
        flag("--no-raw", is_flag=True, help="Do not store every query's latency in the JSON."),
        flag("--no-progress", is_flag=True, help="No progress bar on stderr."),
    ),
    record_of(records.BenchTimingArgs, no_e2e="not:end_to_end", no_raw="not:keep_raw", no_progress="not:progress"),
)

ACCURACY = Group(
    "accuracy",
    (
        varied(DATASET, help=f"Measure top-1/top-5 on this dataset's validation split: {DATASET[1]['help']}"),
        flag("--samples", type=click.IntRange(min=1), help="Evaluate at most this many validation images."),
        flag(
            "--reference",
            type=click.Path(),
            help="A bundle whose predictions the others are compared with (needs --dataset).",
        ),
    ),
    records.AccuracyArgs,
)


def _pytorch_baseline(
    pytorch_baseline: bool, baseline_weights: str, compile_timeout: float
) -> records.PyTorchBaselineArgs:
    return records.PyTorchBaselineArgs(compile_timeout, baseline_weights if pytorch_baseline else None)


PYTORCH_BASELINE = Group(
    "baseline",
    (
        flag(
            "--pytorch-baseline",
            is_flag=True,
            help="Also time PyTorch FP32 three ways: eager with Google's weight standardisation every call, eager "
            "with it folded, torch.compile of the folded model; the speed-up column divides by the fastest. Needs "
            "the train extra.",
        ),
        flag(
            "--baseline-weights",
            default="auto",
            show_default=True,
            metavar="auto|none|PATH",
            help="Weights of the PyTorch baseline; auto: the bundle's own checkpoint/.npz if it is a local file, "
            "else random (latency only).",
        ),
        flag(
            "--compile-timeout",
            type=click.FloatRange(min=0),
            default=records.COMPILE_TIMEOUT_S,
            show_default=True,
            help="Seconds allowed for torch.compile of the baseline (0: skip that form); past it the row says so.",
        ),
    ),
    _pytorch_baseline,
)


def _serving(
    model_name: str | None,
    max_batch: int,
    max_delay_ms: float,
    workers: int,
    max_body_mb: float,
    timeout: float,
    max_connections: int,
    access_log: bool,
) -> ServeOptions:
    return ServeOptions(
        model_name=model_name,
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        workers=workers,
        max_body=int(max_body_mb * (1 << 20)),
        timeout=timeout,
        max_connections=max_connections,
        keep_alive=timeout,
        drain_timeout=timeout,
        access_log=access_log,
    )


SERVING = Group(
    "serving",
    (
        flag(
            "--model-name",
            default=None,
            help="The name clients use in /v2/models/NAME (default: the bundle's model name).",
        ),
        MAX_BATCH,
        MAX_DELAY_MS,
        flag(
            "--workers",
            type=click.IntRange(min=1),
            default=2,
            show_default=True,
            help="Threads that parse, decode and preprocess requests (one more thread runs the engine).",
        ),
        flag(
            "--max-body-mb",
            type=click.FloatRange(min=0, min_open=True),
            default=16.0,
            show_default=True,
            help="Largest accepted request body; larger ones get 413.",
        ),
        flag(
            "--timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=30.0,
            show_default=True,
            help="Seconds to receive a body, and to wait for the engine (then 408 / 503); also the idle keep-alive "
            "and the SIGTERM drain limit.",
        ),
        flag(
            "--max-connections",
            type=click.IntRange(min=1),
            default=64,
            show_default=True,
            help="Open connections plus requests in flight; beyond it, 503.",
        ),
        flag("--access-log", is_flag=True, help="Log every request to stderr."),
    ),
    _serving,
)
