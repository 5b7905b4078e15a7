"""bitdeploy's runtime against OpenVINO's own `benchmark_app`, on the same IR, in one run.

    python -m bitdeploy.benchmarks.runtime_vs_benchmark_app MODEL.xml|BUNDLE [--threads 2] [--rounds 3]

bitdeploy side: the bundle (or IR) opened through `bitdeploy.runtimes` (OpenVINO backend, LATENCY hint,
inference precision pinned), timed by `bitdeploy bench`'s single-stream loop (batch 1, median of N queries).
benchmark_app side: `benchmark_app -m MODEL.xml -d CPU -hint latency -data_shape input[1,3,R,R] -niter N
-infer_precision P` (sync API, one request, one pre-filled tensor; the IR's dynamic batch kept, as bitdeploy
compiles it). Runs alternate, order flipped each round. benchmark_app accepts
`-nthreads` only with `-hint none` (REFERENCE D), so to keep `-hint latency` this process restricts its CPU
affinity to `--threads` cores before anything starts; both sides inherit it. If benchmark_app still reports
another INFERENCE_NUM_THREADS, it is rerun as `-hint none -nthreads T -nstreams 1 -nireq 1 -api sync`.
Acceptance: the two medians within `--tolerance` (10%).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bitdeploy.benchmarks.latency import single_stream


def benchmark_app_command() -> list[str]:
    """The installed benchmark_app (it ships with the openvino wheel), else the same tool through Python."""
    exe = shutil.which("benchmark_app") or str(Path(sys.executable).with_name("benchmark_app"))
    if Path(exe).is_file():
        return [exe]
    return [sys.executable, "-c", "import sys; from openvino.tools.benchmark.main import main; sys.argv[0] = 'benchmark_app'; main()"]


def parse_benchmark_app(text: str) -> dict[str, Any]:
    """The figures of benchmark_app's console report (it prints latencies in ms, or in us below 1 ms)."""

    def grab(pattern: str) -> str | None:
        m = re.search(pattern, text)
        return m.group(1) if m else None

    def latency_ms(label: str) -> float | None:
        m = re.search(label + r":\s+([0-9.]+)\s*(ms|us)", text)
        return None if m is None else float(m.group(1)) / (1000.0 if m.group(2) == "us" else 1.0)

    median = latency_ms("Median")
    if median is None:
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise RuntimeError(f"benchmark_app printed no median latency: {tail}")
    return {
        "median_ms": median,
        "mean_ms": latency_ms("Average"),
        "count": int(grab(r"Count:\s+(\d+)") or 0),
        "threads": int(t) if (t := grab(r"INFERENCE_NUM_THREADS:\s+(\d+)")) else None,
        "precision": grab(r"INFERENCE_PRECISION_HINT:\s+<Type: '(\w+)'>"),
        "sync": "synchronously" in text,
    }


def open_target(path: Path, threads: int) -> tuple[Any, Path, tuple[int, int, int], str]:
    """(something with infer(), the IR path, CHW shape, input name) for a bundle directory or a .xml file."""
    from bitdeploy import runtimes

    if path.is_dir():
        pred = runtimes.load(path, backend="openvino", threads=threads)
        model_file = path / pred.manifest["model_file"]
        shape = pred.manifest["input"]["shape"]
        return pred, model_file, (int(shape[1]), int(shape[2]), int(shape[3])), str(pred.manifest["input"].get("name", "input"))
    import openvino as ov

    from bitdeploy.runtimes.ov import OpenVinoBackend
    from bitdeploy.runtimes.preprocess import input_spec

    inp = ov.Core().read_model(str(path)).inputs[0]
    dims = [d.get_length() if d.is_static else -1 for d in inp.get_partial_shape()]
    manifest = {"target": {"backend": "openvino", "precision": "fp32", "precision_used": "f32"}, "input": input_spec(dims[2])}
    return OpenVinoBackend(path, manifest, device="CPU", threads=threads), path, (dims[1], dims[2], dims[3]), inp.get_any_name()


def run_benchmark_app(xml: Path, shape: tuple[int, int, int], name: str, iterations: int, precision: str, threads: int, hint_none: bool) -> dict[str, Any]:
    # -data_shape, not -shape: the IR keeps its dynamic batch, as bitdeploy compiles it (-shape would make it static).
    cmd = [*benchmark_app_command(), "-m", str(xml), "-d", "CPU", "-data_shape", f"{name}[1,{shape[0]},{shape[1]},{shape[2]}]", "-niter", str(iterations), "-infer_precision", precision]
    cmd += ["-hint", "none", "-nthreads", str(threads), "-nstreams", "1", "-nireq", "1", "-api", "sync"] if hint_none else ["-hint", "latency"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark_app failed (exit {proc.returncode}): {(proc.stdout + proc.stderr).strip().splitlines()[-1:]}")
    out = parse_benchmark_app(proc.stdout + proc.stderr)
    out["command"] = " ".join(cmd[-14:] if len(cmd) > 14 else cmd)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bitdeploy.benchmarks.runtime_vs_benchmark_app", description=__doc__.split("\n\n")[0])
    p.add_argument("target", type=Path, help="an OpenVINO bundle directory or a model .xml")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iterations", type=int, default=300, help="queries per run, each side")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="alternating runs per side")
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    cpus = sorted(os.sched_getaffinity(0))
    pinned = None
    if len(cpus) > args.threads:
        pinned = cpus[: args.threads]
        os.sched_setaffinity(0, pinned)  # before OpenVINO starts: both sides see `threads` cores
    target, xml, shape, name = open_target(args.target, args.threads)
    desc = target.describe()
    precision = str(desc.get("precision_used") or "f32")
    ours: list[float] = []
    theirs: list[dict[str, Any]] = []
    hint_none = False
    for r in range(args.rounds):
        for side in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
            if side == "ours":
                res = single_stream(target, shape, iterations=args.iterations, warmup=args.warmup, keep_raw=False)
                ours.append(res["p50_ms"])
            else:
                ba = run_benchmark_app(xml, shape, name, args.iterations, precision, args.threads, hint_none)
                if ba["threads"] not in (None, args.threads) and not hint_none:
                    hint_none = True  # -hint latency took other cores: pin threads the way benchmark_app allows
                    ba = run_benchmark_app(xml, shape, name, args.iterations, precision, args.threads, hint_none)
                theirs.append(ba)
            print(f"round {r + 1} {side}: {ours[-1] if side == 'ours' else theirs[-1]['median_ms']:.2f} ms", file=sys.stderr)
    getattr(target, "close", lambda: None)()

    m_ours = statistics.median(ours)
    m_theirs = statistics.median(b["median_ms"] for b in theirs)
    ratio = m_ours / m_theirs
    ok = abs(ratio - 1.0) <= args.tolerance
    result = {
        "target": str(args.target), "ir": str(xml), "shape": [1, *shape], "threads": args.threads, "affinity": pinned or cpus,
        "precision": precision, "ours_threads": desc.get("threads"), "benchmark_app_threads": theirs[-1]["threads"],
        "benchmark_app_precision": theirs[-1]["precision"], "benchmark_app_sync": theirs[-1]["sync"], "benchmark_app_hint": "none" if hint_none else "latency",
        "iterations": args.iterations, "rounds": args.rounds, "ours_median_ms": ours, "benchmark_app_median_ms": [b["median_ms"] for b in theirs],
        "ours_ms": m_ours, "benchmark_app_ms": m_theirs, "ratio": ratio, "tolerance": args.tolerance, "within_tolerance": ok,
    }  # fmt: skip
    print(f"{xml.name} {result['shape']}, {args.threads} threads (affinity {result['affinity']}), precision {precision}, {args.rounds} alternating rounds x {args.iterations} queries")
    print(f"  bitdeploy single-stream median  {m_ours:8.2f} ms   per round: {', '.join(f'{x:.2f}' for x in ours)}")
    per_round = ", ".join(f"{b['median_ms']:.2f}" for b in theirs)
    print(f"  benchmark_app -hint {result['benchmark_app_hint']:7s} median  {m_theirs:8.2f} ms   per round: {per_round}  (threads {result['benchmark_app_threads']}, {result['benchmark_app_precision']})")
    print(f"  ratio bitdeploy / benchmark_app {ratio:.3f}  ({'within' if ok else 'OUTSIDE'} {args.tolerance:.0%})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
