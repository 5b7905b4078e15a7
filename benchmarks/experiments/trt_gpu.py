"""TensorRT FP16 / INT8 engines against PyTorch CUDA eager FP16, in one run on one NVIDIA GPU.

    python benchmarks/experiments/trt_gpu.py [--model m-r50x1] [--resolution 128] [--weights none|PATH]
                                           [--device cuda:0] [--iters 300] [--json OUT]

Builds, with bitdeploy's TensorRT converter, a latency engine (profile 1,1,1) and a throughput engine
(profile 1,128,128) per precision; INT8 is the explicit-Q/DQ ONNX calibrated on the digits training split.
Reports p50/p99 batch-1 latency and images/s at batch 32 and 128, host to host (input copied to the GPU,
logits copied back), for the engines through bitdeploy's TensorRT runtime and for PyTorch eager FP16 (weight
standardisation computed every call, as Google's and timm's code run it). Needs TensorRT, cuda-python or a
CUDA build of torch, and a GPU: elsewhere it exits 1 with one line saying what is missing. Typically 3-6 min.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

THROUGHPUT_BATCHES = (32, 128)


def preflight(device: str) -> str | None:
    """Why this benchmark cannot run here, as one line; None when it can."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return 'TensorRT is not installed; on a machine with an NVIDIA GPU run: pip install "bitdeploy[tensorrt]"'
    if importlib.util.find_spec("torch") is None:
        return 'PyTorch is not installed (the FP16 eager baseline needs it); run: pip install "bitdeploy[train]" with a CUDA build of torch'
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA GPU visible to PyTorch ({torch.__version__}); run on a machine with an NVIDIA GPU and a CUDA build of torch"
    from bitdeploy.runtimes.engines.trt import parse_device

    index = parse_device(device)
    if index >= torch.cuda.device_count():
        return f"{device} does not exist: {torch.cuda.device_count()} GPU(s) visible; pass --device cuda:N"
    return None


def latency(fn: Callable[[], Any], iters: int, warmup: int = 20) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    t = np.empty(iters)
    for i in range(iters):
        s = time.perf_counter()
        fn()
        t[i] = time.perf_counter() - s
    return {
        "p50_ms": float(np.median(t) * 1e3),
        "p99_ms": float(np.percentile(t, 99) * 1e3),
        "mean_ms": float(t.mean() * 1e3),
    }


def throughput(fn: Callable[[], Any], batch: int, seconds: float = 3.0, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n * batch / (time.perf_counter() - start)


def run(args: argparse.Namespace, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    import torch
    from cpu_targets import randomise_norms

    from bitdeploy.converters import calibration as calib_mod
    from bitdeploy.converters.base import ConvertOptions, bind
    from bitdeploy.converters.onnx_export import export_onnx
    from bitdeploy.converters.trt_engine import TensorRTOptions
    from bitdeploy.runtimes.bundle.manifest import Manifest
    from bitdeploy.runtimes.engines.trt import TensorRTBackend, parse_device
    from bitdeploy.training.data import eval_batch
    from bitdeploy.training.datasets import load_dataset
    from bitdeploy.training.weights import load_model

    index = parse_device(args.device)
    loaded = load_model(args.model, args.weights, num_classes=None if args.weights != "none" else 10)
    model = loaded.model.eval()
    if args.weights == "none":
        randomise_norms(model, 0)
    res = args.resolution
    splits = load_dataset("digits")
    log(f"exporting {args.model} at {res} px")
    onnx_path = work / "model.onnx"
    export_onnx(model, res, onnx_path)
    calibration = calib_mod.from_image_set(splits.train, res, size=args.calib_size, source="digits:train")
    val_x, _ = eval_batch(splits.val, res, range(128))
    with torch.inference_mode():
        reference = model(torch.from_numpy(val_x)).argmax(1).numpy()

    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(index), "engines": {}, "rows": {}}
    cache = work / "cache"
    backends: dict[str, dict[str, Any]] = {}
    for precision in ("fp16", "int8"):
        for kind, profile in (
            ("latency", "1,1,1"),
            ("throughput", f"1,{max(THROUGHPUT_BATCHES)},{max(THROUGHPUT_BATCHES)}"),
        ):
            out = work / f"{precision}-{kind}"
            out.mkdir()
            log(f"building TensorRT {precision} {kind} engine (profile {profile})")
            options = ConvertOptions(device=args.device, cache_dir=cache, extras=TensorRTOptions(batch=profile))
            art = bind("trt", precision, options).convert(onnx_path, out, calibration if precision == "int8" else None)
            backends.setdefault(precision, {})[kind] = TensorRTBackend(
                out / art.model_file, Manifest(target=art.target)
            )
            results["engines"][f"{precision}-{kind}"] = {
                k: art.target.to_dict().get(k)
                for k in ("precision_used", "layers", "build_seconds", "tensorrt_version")
            }

    torch.cuda.set_device(index)
    half = model.half().to(f"cuda:{index}")

    def torch_infer(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = half(torch.from_numpy(x).to(f"cuda:{index}", non_blocking=True).half())
            return logits.float().cpu().numpy()

    engines: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
        "torch-fp16": (torch_infer, torch_infer),
        "trt-fp16": (backends["fp16"]["latency"].infer, backends["fp16"]["throughput"].infer),
        "trt-int8": (backends["int8"]["latency"].infer, backends["int8"]["throughput"].infer),
    }
    x1 = val_x[:1]
    for name, (lat_fn, tp_fn) in engines.items():
        log(f"timing {name}")
        row: dict[str, Any] = latency(partial(lat_fn, x1), args.iters)
        for b in THROUGHPUT_BATCHES:
            xb = np.ascontiguousarray(np.resize(val_x, (b, *val_x.shape[1:])))
            row[f"images_per_s_b{b}"] = throughput(partial(tp_fn, xb), b)
        preds = np.concatenate([lat_fn(val_x[i : i + 1]).argmax(1) for i in range(len(val_x))])
        row["top1_agreement_vs_fp32"] = float((preds == reference).mean())
        results["rows"][name] = row
    for group in backends.values():
        for b in group.values():
            b.close()
    return results


def report(results: dict[str, Any]) -> None:
    rows = results["rows"]
    print(f"\nGPU: {results['gpu']}")
    for name, e in results["engines"].items():
        print(
            f"  engine {name:16s} TensorRT {e['tensorrt_version']}: {e['precision_used']}, layers {e['layers']['by_precision']}, built in {e['build_seconds']} s"
        )
    head = (
        f"{'engine':11s} {'p50 ms':>8s} {'p99 ms':>8s} "
        + " ".join(f"{'img/s b' + str(b):>11s}" for b in THROUGHPUT_BATCHES)
        + "  agree"
    )
    print(head)
    for name, r in rows.items():
        tp = " ".join(f"{r[f'images_per_s_b{b}']:11.0f}" for b in THROUGHPUT_BATCHES)
        print(f"{name:11s} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {tp}  {r['top1_agreement_vs_fp32']:.3f}")
    base = rows["torch-fp16"]
    print()
    for name in ("trt-fp16", "trt-int8"):
        r = rows[name]
        tp = ", ".join(f"b{b} {r[f'images_per_s_b{b}'] / base[f'images_per_s_b{b}']:.2f}x" for b in THROUGHPUT_BATCHES)
        print(f"{name} vs torch-fp16: latency p50 {base['p50_ms'] / r['p50_ms']:.2f}x faster; throughput {tp}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/experiments/trt_gpu.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="m-r50x1")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--weights", default="none")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--calib-size", type=int, default=300)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from bitdeploy.core.errors import BitdeployError

    try:
        reason = preflight(args.device)
    except BitdeployError as exc:
        reason = str(exc)
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    log = lambda msg: print(f"... {msg}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        with tempfile.TemporaryDirectory(prefix="bitdeploy-trt-gpu-") as tmp:
            results = run(args, Path(tmp), log)
    except BitdeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
