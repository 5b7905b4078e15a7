"""Which INT8 scheme holds on every CPU class? Accuracy natively and as an AVX2-only CPU, and speed, in one run.

    python benchmarks/experiments/int8_cpu_classes.py --model m-r50x1 --weights RUN_OR_CHECKPOINT --dataset digits --resolution 32

From one folded FP32 export and one calibration draw it builds ONNX Runtime INT8 in each scheme
(`u8s8-7bit`, `u8s8`, `s8s8`) and OpenVINO INT8 (NNCF, float layers pinned to f32), then reports for each:
  - top-1, top-1 agreement with the FP32 model, logit correlation and max relative logit error, on this CPU;
  - the same on an emulated AVX2-only CPU (`qemu-x86_64 -cpu Haswell`, no AVX-512/VNNI/BF16), when qemu-user
    is installed: x86 without VNNI sums u8 x s8 pairs into saturating int16, which is what this measures;
  - batch-1 p50 latency on this CPU, A/B interleaved with the FP32 model, as a speed-up (ratios hold on a
    noisy machine where absolute times do not). Emulated timings mean nothing and are not reported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SCHEMES = ("u8s8-7bit", "u8s8", "s8s8")


def _backend(path: Path, threads: int) -> Any:
    from bitdeploy.runtimes.bundle.manifest import Manifest, TargetInfo
    from bitdeploy.runtimes.engines.base import open_backend

    if path.suffix == ".xml":
        target = TargetInfo("openvino", "int8", details={"inference_precision": "f32"})
        return open_backend("openvino", path, Manifest(target=target), device="CPU", threads=threads)
    return open_backend(
        "onnxruntime", path, Manifest(target=TargetInfo("onnxruntime", "int8")), device="cpu", threads=threads
    )


def _logits(paths: dict[str, Path], x: np.ndarray, threads: int) -> dict[str, np.ndarray]:
    out = {}
    for name, path in paths.items():
        backend = _backend(path, threads)
        out[name] = np.concatenate([backend.infer(x[i : i + 32]) for i in range(0, len(x), 32)])
        backend.close()
    return out


def _scores(logits: np.ndarray, fp32: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from bitdeploy.runtimes.bundle.compare import rel_error

    return {
        "top1": float((logits.argmax(1) == labels).mean()),
        "agreement": float((logits.argmax(1) == fp32.argmax(1)).mean()),
        "corr": float(np.corrcoef(logits.ravel(), fp32.ravel())[0, 1]),
        "rel_error": rel_error(logits, fp32),
    }


def _emulated(paths: dict[str, Path], x: np.ndarray, threads: int, work: Path) -> dict[str, np.ndarray] | None:
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        print("qemu-x86_64 not found (apt-get install qemu-user): no AVX2-only columns", file=sys.stderr)
        return None
    np.save(work / "x.npy", x)
    (work / "paths.json").write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    cmd = [
        qemu,
        "-cpu",
        "Haswell",
        sys.executable,
        __file__,
        "--worker",
        str(work),
        "--threads",
        str(threads),
    ]
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    with np.load(work / "emulated.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _worker(work: Path, threads: int) -> None:
    paths = {k: Path(v) for k, v in json.loads((work / "paths.json").read_text()).items()}
    logits = _logits(paths, np.load(work / "x.npy", allow_pickle=False), threads)
    # mypy maps **logits onto savez's allow_pickle too; the keys are variant names, never that one
    np.savez(work / "emulated.npz", **logits)  # type: ignore[arg-type]


def _latency(paths: dict[str, Path], x1: np.ndarray, threads: int, rounds: int, per_round: int) -> dict[str, float]:
    backends = {k: _backend(p, threads) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in backends}
    for b in backends.values():
        for _ in range(5):
            b.infer(x1)
    for _ in range(rounds):
        for k, b in backends.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                b.infer(x1)
            times[k].append((time.perf_counter() - t0) * 1000 / per_round)
    for b in backends.values():
        b.close()
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="m-r50x1")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-size", type=int, default=300)
    ap.add_argument("--eval-limit", type=int, default=None, help="validation images (default: all)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--no-emulation", action="store_true")
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        _worker(args.worker, args.threads)
        return

    import torch

    from bitdeploy.converters import calibration
    from bitdeploy.converters import gate as accuracy
    from bitdeploy.converters.base import ConvertOptions, bind
    from bitdeploy.converters.onnx_export import export_onnx
    from bitdeploy.converters.ort_convert import OrtOptions
    from bitdeploy.runtimes.bundle.fingerprint import host_fingerprint
    from bitdeploy.training.datasets import load_dataset
    from bitdeploy.training.weights import load_model

    torch.manual_seed(0)
    loaded = load_model(args.model, weights=args.weights)
    res = args.resolution
    splits = load_dataset(args.dataset)
    calib = calibration.from_image_set(splits.train, res, args.calib_size, 0, f"{args.dataset}:train")
    data = accuracy.from_image_set(splits.val, res, args.eval_limit)
    x, labels = np.concatenate([b for b, _ in data.batches()]), data.labels()
    assert labels is not None  # from_image_set keeps the split's labels
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export_onnx(loaded.model, res, work / "fp32.onnx")
        paths = {"fp32": work / "fp32.onnx"}
        for scheme in SCHEMES:
            (work / scheme).mkdir()
            bind("onnx", "int8", ConvertOptions(extras=OrtOptions(int8_scheme=scheme))).convert(
                work / "fp32.onnx", work / scheme, calib
            )
            paths[f"ort {scheme}"] = work / scheme / "model.onnx"
        (work / "ov").mkdir()
        bind("openvino", "int8", ConvertOptions(threads=args.threads)).convert(work / "fp32.onnx", work / "ov", calib)
        paths["openvino int8"] = work / "ov" / "model.xml"
        native = _logits(paths, x, args.threads)
        emulated = None if args.no_emulation else _emulated(paths, x, args.threads, work)
        ms = _latency(paths, x[:1], args.threads, args.rounds, args.per_round)

    cpu = host_fingerprint()["cpu"]["class"]
    print(
        f"{args.model} @ {res} px, {len(x)} {args.dataset} val images, calibration {len(calib)}; {args.threads} threads; this CPU: {cpu}"
    )
    head = f"{'variant':16s} {'top-1':>7s} {'agree':>7s} {'corr':>8s} {'rel err':>8s}"
    head += f" | {'AVX2: top-1':>11s} {'agree':>7s} {'corr':>8s} {'rel err':>8s}" if emulated else ""
    print(head + f" | {'p50 ms':>7s} {'vs fp32':>7s}")
    for name in paths:
        s = _scores(native[name], native["fp32"], labels)
        line = f"{name:16s} {s['top1'] * 100:6.2f}% {s['agreement'] * 100:6.2f}% {s['corr']:8.5f} {s['rel_error']:8.4f}"
        if emulated:
            e = _scores(emulated[name], native["fp32"], labels)
            line += f" | {e['top1'] * 100:10.2f}% {e['agreement'] * 100:6.2f}% {e['corr']:8.5f} {e['rel_error']:8.4f}"
        print(line + f" | {ms[name]:7.2f} {ms['fp32'] / ms[name]:6.2f}x")


if __name__ == "__main__":
    main()
