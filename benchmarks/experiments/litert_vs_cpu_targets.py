"""LiteRT beside ONNX Runtime and OpenVINO on this CPU: accuracy from each bundle's gate, speed A/B interleaved.

    python benchmarks/experiments/litert_vs_cpu_targets.py BUNDLE... [--reference NAME] [--rounds 5] [--queries 40]

Every bundle is opened once in this process; each round times `--queries` batch-1 calls and then `--batch` images
as one batch on every bundle in turn (the order rotates each round), so load from other jobs hits all of them
alike. The table reports the median over rounds of each round's p50, and its ratio to the reference bundle (the
first one unless --reference names another) in the same rounds: ratios hold on a noisy machine where absolute
times do not. Accuracy columns are the bundle's own gate (manifest `accuracy`): top-1 on the validation split vs
FP32 PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np


def _open(bundle: Path, threads: int) -> tuple[Any, dict[str, Any]]:
    from bitdeploy.runtimes.bundle import read_manifest
    from bitdeploy.runtimes.engines.base import open_backend

    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    typed = read_manifest(bundle)
    backend = open_backend(
        typed.target.backend, bundle / typed.model_file, typed, device=typed.target.device, threads=threads
    )
    return backend, manifest


def _p50_ms(backend: Any, x: np.ndarray, queries: int) -> float:
    times = []
    for _ in range(queries):
        t = time.perf_counter_ns()
        backend.infer(x)
        times.append((time.perf_counter_ns() - t) / 1e6)
    return float(np.median(times))


def measure(bundles: list[Path], threads: int, rounds: int, queries: int, batch: int) -> list[dict[str, Any]]:
    opened = [_open(b, threads) for b in bundles]
    res = int(opened[0][1]["input"]["shape"][-1])
    rng = np.random.default_rng(0)
    x1 = rng.uniform(-1, 1, (1, 3, res, res)).astype(np.float32)
    xb = rng.uniform(-1, 1, (batch, 3, res, res)).astype(np.float32)
    for backend, _ in opened:  # warm-up: first-call allocations, XNNPACK/oneDNN kernel setup
        for _ in range(3):
            backend.infer(x1)
        backend.infer(xb)
    p50: list[list[float]] = [[] for _ in opened]
    batch_ms: list[list[float]] = [[] for _ in opened]
    for r in range(rounds):
        order = list(range(len(opened)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            p50[i].append(_p50_ms(opened[i][0], x1, queries))
            batch_ms[i].append(_p50_ms(opened[i][0], xb, max(3, queries // 8)))
    rows = []
    for (backend, manifest), path, lat, bat in zip(opened, bundles, p50, batch_ms):
        acc = manifest.get("accuracy") or {}
        target = manifest["target"]
        rows.append(
            {
                "bundle": path.name,
                "backend": target["backend"],
                "precision": target["precision"],
                "precision_used": target.get("precision_used"),
                "top1": acc.get("top1"),
                "reference_top1": acc.get("reference_top1"),
                "agreement": acc.get("agreement"),
                "size_mb": sum((path / f).stat().st_size for f in manifest.get("files", {}) if f != "golden.npz") / 1e6,
                "p50_rounds_ms": lat,
                "batch_rounds_ms": bat,
            }
        )
        backend.close()
    return rows


def table(rows: list[dict[str, Any]], reference: str, batch: int) -> str:
    ref = next(r for r in rows if r["bundle"] == reference)
    lines = [
        f"| bundle | runs | top-1 | Δ vs FP32 PyTorch (pp) | agreement | size MB | batch-1 p50 ms | vs {reference} | batch-{batch} images/s | vs {reference} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p50 = float(np.median(r["p50_rounds_ms"]))
        speed = float(np.median(np.array(ref["p50_rounds_ms"]) / np.array(r["p50_rounds_ms"])))
        ips = batch * 1000.0 / float(np.median(r["batch_rounds_ms"]))
        tput = float(np.median(np.array(ref["batch_rounds_ms"]) / np.array(r["batch_rounds_ms"])))
        top1 = f"{r['top1'] * 100:.2f}%" if r["top1"] is not None else "-"
        drop = f"{(r['top1'] - r['reference_top1']) * 100:+.2f}" if r["top1"] is not None else "-"
        agree = f"{r['agreement'] * 100:.1f}%" if r["agreement"] is not None else "-"
        lines.append(
            f"| {r['bundle']} | {r['backend']} {r['precision_used']} | {top1} | {drop} | {agree} | {r['size_mb']:.1f} | {p50:.2f} | {speed:.2f}x | {ips:.0f} | {tput:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--reference", help="bundle directory name the ratios divide by (default: the first)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the raw per-round figures here")
    args = parser.parse_args(argv)
    from bitdeploy.runtimes.bundle.fingerprint import host_fingerprint

    load_before = os.getloadavg()[0]
    rows = measure(args.bundles, args.threads, args.rounds, args.queries, args.batch)
    load_after = os.getloadavg()[0]
    info = host_fingerprint().get("cpu") or {}
    cpu = f"{info.get('model', 'unknown CPU')}, {info.get('class', info.get('arch', '?'))}, {os.cpu_count()} cores"
    print(table(rows, args.reference or args.bundles[0].name, args.batch))
    print(
        f"\nCPU: {cpu}; {args.threads} threads; {args.rounds} rounds x {args.queries} batch-1 queries, interleaved; load average {load_before:.1f} -> {load_after:.1f}"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"cpu": cpu, "load_average": [load_before, load_after], "rows": rows}, indent=1, default=str)
            + "\n",
            encoding="utf-8",
        )


if __name__ == "__main__":
    main()
