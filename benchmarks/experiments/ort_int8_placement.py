"""What should stay in float for ONNX Runtime INT8? Latency (and accuracy) of QDQ placements, in one run.

    python benchmarks/experiments/ort_int8_placement.py --model m-r50x1 --resolution 128 --threads 2
    python benchmarks/experiments/ort_int8_placement.py --model m-r50x1 --weights RUN_DIR --dataset digits --resolution 32

Variants (all from the same folded FP32 export, the same calibration samples):
  fp32            the export as is
  s8s8-conv       Conv-only QDQ, int8 activations (S8S8)
  u8s8-conv       Conv-only QDQ, uint8 activations (U8S8): what `bitdeploy build --target onnx --precision int8` uses on x86
  u8s8-conv-head  as u8s8-conv with the classifier conv left in float
  u8s8-conv-add   as u8s8-conv plus the residual Adds (QLinearAdd): the residual stream in 8 bits
  u8s8-conv-pool  as u8s8-conv plus MaxPool / GlobalAveragePool

Batch-1 latency is measured A/B interleaved (rounds x variants) with a fixed thread count, and reported
as medians with the speed-up over fp32; ratios hold on a noisy machine where absolute times do not.
Without --dataset, calibration uses seeded random inputs (latency only: accuracy is then not reported).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np


def _variants(onnx_fp32: Path, work: Path, calib: Any) -> dict[str, Path]:
    import onnx

    from bitdeploy.converters.ort_quant import QdqOptions, quantize_qdq

    model = onnx.load(str(onnx_fp32), load_external_data=False)
    consts = {i.name for i in model.graph.initializer} | {
        n.output[0] for n in model.graph.node if n.op_type == "Constant"
    }
    residual = [n.name for n in model.graph.node if n.op_type == "Add" and not set(n.input) & consts]
    others = [n.name for n in model.graph.node if n.op_type not in ("Conv", "Add", "MaxPool", "GlobalAveragePool")]
    out = {"fp32": onnx_fp32}
    specs: dict[str, dict[str, Any]] = {
        "s8s8-conv": {"activation_type": "int8"},
        "u8s8-conv": {"activation_type": "uint8"},
        "u8s8-conv-head": {"activation_type": "uint8", "exclude_head": True},
        "u8s8-conv-add": {
            "activation_type": "uint8",
            "op_types": ("Conv", "Add"),
            "nodes_to_exclude": [n.name for n in model.graph.node if n.op_type == "Add" and n.name not in residual],
        },
        "u8s8-conv-pool": {
            "activation_type": "uint8",
            "op_types": ("Conv", "MaxPool", "GlobalAveragePool"),
            "nodes_to_exclude": others,
        },
    }
    for name, kw in specs.items():
        path = work / f"{name}.onnx"
        quantize_qdq(onnx_fp32, path, calib, QdqOptions(**kw))
        out[name] = path
    return out


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    o.log_severity_level = 3
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def _infer(session: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(session.run(None, {"input": x})[0])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="m-r50x1")
    ap.add_argument("--weights", default="none", help="none (random, latency only) or a checkpoint / training dir")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dataset", default=None, help="calibrate on its train split and report val top-1")
    ap.add_argument("--calib-size", type=int, default=300)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=10)
    args = ap.parse_args(argv)

    import torch

    from bitdeploy.converters import calibration
    from bitdeploy.converters import gate as accuracy
    from bitdeploy.converters.onnx_export import export_onnx
    from bitdeploy.training.weights import load_model

    torch.manual_seed(0)
    loaded = load_model(args.model, weights=args.weights)
    res = args.resolution
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export_onnx(loaded.model, res, work / "fp32.onnx")
        splits = None
        if args.dataset:
            from bitdeploy.training.datasets import load_dataset

            splits = load_dataset(args.dataset)
            calib = calibration.from_image_set(splits.train, res, args.calib_size, 0, f"{args.dataset}:train")
        else:
            x = np.random.default_rng(0).uniform(-1, 1, (min(args.calib_size, 32), 3, res, res)).astype(np.float32)
            calib = calibration.CalibrationData(x, "random (latency only)", 0, calibration.digest(x))
        paths = _variants(work / "fp32.onnx", work, calib)
        sessions = {k: _session(p, args.threads) for k, p in paths.items()}
        x1 = np.random.default_rng(1).uniform(-1, 1, (1, 3, res, res)).astype(np.float32)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for s in sessions.values():
            for _ in range(5):
                s.run(None, {"input": x1})
        for _ in range(args.rounds):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                for _ in range(args.per_round):
                    s.run(None, {"input": x1})
                times[k].append((time.perf_counter() - t0) * 1000 / args.per_round)
        acc: dict[str, float] = {}
        if splits is not None:
            data = accuracy.from_image_set(splits.val, res, args.eval_limit)
            labels = data.labels()
            for k, s in sessions.items():
                logits = accuracy.run_logits(partial(_infer, s), data)
                acc[k] = float(np.mean(logits.argmax(1) == labels))
        base = float(np.median(times["fp32"]))
        print(
            f"{args.model} @ {res} px, batch 1, {args.threads} threads, {args.rounds}x{args.per_round} interleaved queries; calibration: {calib.source} ({len(calib)})"
        )
        print(
            f"{'variant':16s} {'p50 ms':>8s} {'vs fp32':>8s} {'MB':>7s}"
            + (f" {'top-1':>7s} {'Δ pp':>6s}" if acc else "")
        )
        for k in sessions:
            med = float(np.median(times[k]))
            line = f"{k:16s} {med:8.2f} {base / med:7.2f}x {paths[k].stat().st_size / 1e6:7.1f}"
            if acc:
                line += f" {acc[k] * 100:7.2f} {(acc[k] - acc['fp32']) * 100:+6.2f}"
            print(line)


if __name__ == "__main__":
    main()
