"""CPU targets side by side: PyTorch eager FP32 vs ONNX Runtime and OpenVINO in FP32 / bf16 / INT8.

    python benchmarks/experiments/cpu_targets.py [--model m-r50x1] [--resolution 128] [--threads 2]
                                               [--weights none|PATH] [--rounds 15] [--iters 10]

Batch 1, one process, every engine timed in interleaved rounds (A B C ... A B C ...), so a machine that
slows down or speeds up mid-run shifts all of them alike: trust the ratios more than the absolute times.
The INT8 models are built by bitdeploy's own converters, calibrated on the digits training split through
the inference preprocessing, and run through bitdeploy's runtime backends. The interleaved PyTorch eager engine
is the model as Google's and timm's code run it: weight standardisation computed on every call (the speed-up
goals in TARGETS are defined against it). Before any engine session exists, the three PyTorch baselines of
`benchmarks.baseline` (Google's form, folded, torch.compile of the folded model) are also timed on their own,
and each engine's p50 is divided by the fastest of them too: in the same process ONNX Runtime's spinning
threads slow PyTorch, so the interleaved PyTorch figure flatters the engines.

With `--weights none` the weights are random, and the GroupNorm scale/shift are randomised too: at their
initial values (1 and 0) both ONNX Runtime and OpenVINO delete the per-channel Mul/Add, which would time a
cheaper graph than any real checkpoint has.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

# (faster, slower, minimum speed-up) pairs checked at the end: the project's speed-up goals.
TARGETS = (("ov-int8", "torch-fp32", 6.0), ("ov-int8", "ov-fp32", 2.2), ("ort-int8", "ort-fp32", 1.6))


def randomise_norms(model: Any, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def build_engines(
    args: argparse.Namespace, work: Path, log: Callable[[str], None]
) -> tuple[dict[str, Callable[[np.ndarray], Any]], dict[str, str], np.ndarray, list[dict[str, Any]]]:
    """Time the PyTorch baselines, then export, convert and load every engine; returns name -> infer(batch),
    name -> what runs, one input, and the baselines (`baseline.measure_forms`)."""
    import torch

    from bitdeploy.converters import calibration as calib_mod
    from bitdeploy.converters.base import ConvertOptions, bind
    from bitdeploy.converters.onnx_export import export_onnx
    from bitdeploy.runtimes.bundle.manifest import Manifest
    from bitdeploy.runtimes.engines.base import open_backend
    from bitdeploy.training.data import eval_batch
    from bitdeploy.training.datasets import load_dataset
    from bitdeploy.training.weights import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, args.weights, num_classes=None if args.weights != "none" else 10)
    model = loaded.model.eval()
    if args.weights == "none":
        randomise_norms(model, args.seed)
    res = args.resolution
    splits = load_dataset("digits")
    x = eval_batch(splits.val, res, [0])[0]
    from bitdeploy.benchmarks.baseline import measure_forms

    timing = {
        "kind": "quick",
        "kwargs": {"iterations": args.rounds * args.iters, "warmup": 5, "throughput_batches": []},
    }
    baselines = measure_forms(model, (3, res, res), timing, log=log)  # before the export's ONNX Runtime check runs
    log(f"exporting {args.model} at {res} px")
    onnx_path = work / "model.onnx"
    export_onnx(model, res, onnx_path)
    log(f"calibrating on {args.calib_size} digits training images")
    calibration = calib_mod.from_image_set(
        splits.train, res, size=args.calib_size, seed=args.seed, source="digits:train"
    )

    engines: dict[str, Callable[[np.ndarray], Any]] = {}
    what: dict[str, str] = {}

    def torch_infer(batch: np.ndarray) -> Any:
        with torch.inference_mode():
            return model(torch.from_numpy(batch))

    engines["torch-fp32"], what["torch-fp32"] = torch_infer, f"PyTorch {torch.__version__} eager fp32, WS every call"
    opts = ConvertOptions(threads=args.threads)
    for name, target_name, precision, backend in (
        ("ort-fp32", "onnx", "fp32", "onnxruntime"),
        ("ort-int8", "onnx", "int8", "onnxruntime"),
        ("ov-fp32", "openvino", "fp32", "openvino"),
        ("ov-int8", "openvino", "int8", "openvino"),
    ):
        out = work / name
        out.mkdir()
        log(f"building {name}")
        art = bind(target_name, precision, opts).convert(onnx_path, out, calibration if precision == "int8" else None)
        target = replace(art.target, precision=precision)
        b = open_backend(backend, out / art.model_file, Manifest(target=target), threads=args.threads)
        engines[name], what[name] = b.infer, f"{backend} {target.precision_used}"
        if backend == "openvino":
            # The same IR with the device's default float precision (bf16 on CPUs with AVX512-BF16 or AMX): what
            # `--inference-precision bf16` opts into; bundles are pinned to f32 by default.
            d = open_backend(
                "openvino",
                out / art.model_file,
                Manifest(target=replace(target, precision="fp16", precision_used="", details={})),
                threads=args.threads,
            )
            engines[f"{name}-devdef"], what[f"{name}-devdef"] = (
                d.infer,
                f"openvino {d.describe().get('precision_used')} float layers (device default, opt-in)",
            )
    return engines, what, x, baselines


def time_interleaved(
    engines: dict[str, Callable[[np.ndarray], Any]], x: np.ndarray, rounds: int, iters: int, warmup: int = 5
) -> dict[str, list[float]]:
    for fn in engines.values():
        for _ in range(warmup):
            fn(x)
    times: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(rounds):
        for name, fn in engines.items():
            for _ in range(iters):
                t = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python benchmarks/experiments/cpu_targets.py", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", default="m-r50x1")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", default="none", help="none (random, default) | PATH (npz, checkpoint, training dir)")
    p.add_argument("--calib-size", type=int, default=300)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    from bitdeploy.core.errors import BitdeployError

    log = lambda msg: print(f"... {msg}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        with tempfile.TemporaryDirectory(prefix="bitdeploy-cpu-targets-") as tmp:
            engines, what, x, baselines = build_engines(args, Path(tmp), log)
            log(
                f"timing {len(engines)} engines: {args.rounds} interleaved rounds x {args.iters} calls, batch 1, {args.threads} threads"
            )
            times = time_interleaved(engines, x, args.rounds, args.iters)
    except BitdeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    # The fastest call is the one the other processes on the machine disturbed least; PyTorch's OpenMP threads
    # degrade far more than the others under contention, so both statistics are shown.
    low = {k: float(np.min(v)) * 1e3 for k, v in times.items()}
    base = med["torch-fp32"]
    print(
        f"\n{args.model} {args.resolution}px, batch 1, {args.threads} threads, {args.rounds * args.iters} calls each (weights: {args.weights})"
    )
    print(f"{'engine':12s} {'p50 ms':>8s} {'p90 ms':>8s} {'min ms':>8s} {'p50 vs torch':>13s}  runs")
    for k, v in times.items():
        print(
            f"{k:12s} {med[k]:8.2f} {np.percentile(v, 90) * 1e3:8.2f} {low[k]:8.2f} {base / med[k]:12.2f}x  {what[k]}"
        )
    ran = [b for b in baselines if b["measured"]]
    best = min(ran, key=lambda b: b["measured"]["p50_ms"]) if ran else None
    print(f"\nPyTorch FP32 baselines, timed alone before any engine session ({args.rounds * args.iters} calls each):")
    for b in baselines:
        took = f", compiled in {b['compile_s']:.1f} s" if b.get("compile_s") else ""
        print(
            f"  {b['form']:16s} "
            + (f"p50 {b['measured']['p50_ms']:8.2f} ms{took}" if b["measured"] else b["status"])
            + f"  ({b['label']})"
        )
    if best is not None:
        p50 = best["measured"]["p50_ms"]
        print(
            f"engine p50 vs the fastest ({best['form']}): "
            + ", ".join(f"{k} {p50 / med[k]:.2f}x" for k in times if not k.startswith("torch"))
        )
    print()
    results = []
    for fast, slow, need in TARGETS:
        ratio, ratio_min = med[slow] / med[fast], low[slow] / low[fast]
        results.append(
            {
                "faster": fast,
                "slower": slow,
                "speedup": round(ratio, 3),
                "speedup_min": round(ratio_min, 3),
                "target": need,
                "met": ratio >= need,
            }
        )
        print(
            f"{fast} vs {slow}: {ratio:5.2f}x on medians, {ratio_min:5.2f}x on minima (target >= {need}x: {'met' if ratio >= need else 'NOT met'})"
        )
    if args.json:
        out = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "median_ms": med,
            "min_ms": low,
            "runs": what,
            "ratios": results,
            "pytorch_baselines": baselines,
        }
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
