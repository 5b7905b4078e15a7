"""What the runtime adds over the raw engine call, and what preprocessing costs, in one run.

    python benchmarks/experiments/runtime_overhead.py BUNDLE... [--threads 2] [--rounds 40] [--block 25]

For each bundle, at batch 1:
  * `Predictor.infer(x)` against the raw engine call on the same loaded model (ONNX Runtime
    `session.run([out], {in: x})[0]`; OpenVINO `request.infer({0: x}, share_inputs=True)[0]` on a second infer
    request of the same compiled model), interleaved in blocks whose order alternates, median of each;
  * the predictor's own cost, timed on a null engine (noise-free: the overhead above is a difference of two
    noisy medians on a busy machine);
  * `Predictor.predict(image)` on an encoded 640x480 JPEG, with preprocessing (decode, RGB, resize, normalise),
    inference and postprocessing timed separately.
Prints the overhead in percent; `--max-overhead P` exits 1 when a bundle's infer overhead exceeds P percent.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.core.errors import BitdeployError
from bitdeploy.runtimes import load
from bitdeploy.runtimes.bundle.manifest import Manifest
from bitdeploy.runtimes.engines.base import Backend
from bitdeploy.runtimes.predictor import Predictor


def raw_call(model: Predictor) -> tuple[str, Callable[[np.ndarray], Any]]:
    """The engine's own call on the model the predictor loaded (no checks, no pool)."""
    backend = model.backend
    if backend is None:
        raise BitdeployError("predictor is closed")
    if backend.name == "onnxruntime":
        session = backend.session  # type: ignore[attr-defined]
        inp, out = session.get_inputs()[0].name, [session.get_outputs()[0].name]
        return "session.run", lambda x: session.run(out, {inp: x})[0]
    if backend.name == "openvino":
        request = backend.compiled.create_infer_request()  # type: ignore[attr-defined]
        return "infer_request.infer", lambda x: request.infer({0: x}, share_inputs=True)[0]
    raise BitdeployError(f"no raw-call comparison for the {backend.name} backend")


def interleaved(a: Callable[[], Any], b: Callable[[], Any], rounds: int, block: int) -> tuple[list[float], list[float]]:
    """Per-call seconds of a and b, measured in alternating blocks so drifts in machine state hit both."""
    ta: list[float] = []
    tb: list[float] = []
    for r in range(rounds):
        for fn, sink in ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta)):
            for _ in range(block):
                t0 = time.perf_counter_ns()
                fn()
                sink.append((time.perf_counter_ns() - t0) * 1e-9)
    return ta, tb


class _NullBackend(Backend):
    """Returns fixed logits at once: timing Predictor.infer on it isolates the checks around the engine (the
    backend's input checks in Backend.infer and the predictor's logits check)."""

    name = "null"

    def __init__(self, logits: np.ndarray, manifest: Manifest) -> None:
        super().__init__(Path("null"), manifest)
        self.logits = logits

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self.logits


def checks_cost(model: Predictor, x: np.ndarray, calls: int = 20000) -> float:
    """Median microseconds Predictor.infer spends outside the engine (shape/dtype checks, output check)."""
    shell = Predictor(dataclasses.replace(model.bundle, _tmp=None), _NullBackend(model.infer(x), model.manifest))
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        shell.infer(x)
        times.append(time.perf_counter_ns() - t0)
    shell.close()
    return statistics.median(times) / 1e3


def sample_jpeg(width: int = 640, height: int = 480) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], axis=-1) + rng.integers(
        0, 20, (height, width, 3)
    )
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def measure(
    bundle: str, threads: int | None, backend: str | None, rounds: int, block: int, warmup: int, predict_iters: int
) -> dict[str, Any]:
    with load(bundle, backend=backend, threads=threads) as model:
        spec = [d or -1 for d in model.input_spec.shape or (-1, 3, -1, -1)]
        x = np.random.default_rng(0).uniform(-1, 1, (1, *spec[1:])).astype(np.float32)
        name, raw = raw_call(model)
        np.testing.assert_allclose(model.infer(x), raw(x), atol=1e-5)  # same model, same answer
        for _ in range(warmup):
            raw(x)
            model.infer(x)
        t_raw, t_infer = interleaved(lambda: raw(x), lambda: model.infer(x), rounds, block)
        jpeg = sample_jpeg()
        for _ in range(max(1, warmup // 5)):
            model.predict(jpeg)
        stages: dict[str, list[float]] = {"preprocess_ms": [], "infer_ms": [], "postprocess_ms": [], "total_ms": []}
        for _ in range(predict_iters):
            _, timing = model.predict(jpeg, return_timing=True)
            for key, value in timing.as_dict().items():
                if key in stages:
                    stages[key].append(value)
        raw_ms, infer_ms = statistics.median(t_raw) * 1e3, statistics.median(t_infer) * 1e3
        return {
            "bundle": bundle,
            "backend": model.backend_name,
            "raw_call": name,
            "calls": len(t_raw),
            "raw_ms": raw_ms,
            "infer_ms": infer_ms,
            "overhead_pct": (infer_ms / raw_ms - 1.0) * 100.0,
            "checks_us": checks_cost(model, x),
            "predict": {k: statistics.median(v) for k, v in stages.items()},
            "describe": model.describe(),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python benchmarks/experiments/runtime_overhead.py", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("bundles", nargs="+", metavar="BUNDLE")
    ap.add_argument("--threads", type=int, default=2, help="engine threads (default 2)")
    ap.add_argument("--backend", default=None, help="override the bundle's backend")
    ap.add_argument("--rounds", type=int, default=40, help="alternating rounds (default 40)")
    ap.add_argument("--block", type=int, default=25, help="calls per block (default 25)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--predict-iters", type=int, default=200)
    ap.add_argument(
        "--max-overhead", type=float, default=None, help="exit 1 if infer's overhead exceeds this many percent"
    )
    args = ap.parse_args(argv)
    failed = False
    print(
        f"{'bundle':<32} {'backend':<12} {'raw call':<20} {'raw ms':>8} {'infer ms':>9} {'overhead':>9} {'checks':>9}   "
        f"{'predict: preprocess':>20} {'infer':>8} {'post':>7} {'total ms':>9}"
    )
    for bundle in args.bundles:
        try:
            r = measure(bundle, args.threads, args.backend, args.rounds, args.block, args.warmup, args.predict_iters)
        except BitdeployError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed = True
            continue
        p = r["predict"]
        print(
            f"{bundle[-32:]:<32} {r['backend']:<12} {r['raw_call']:<20} {r['raw_ms']:8.3f} {r['infer_ms']:9.3f} {r['overhead_pct']:+8.2f}% {r['checks_us']:6.1f} us   "
            f"{p['preprocess_ms']:17.3f} ms {p['infer_ms']:8.3f} {p['postprocess_ms']:7.3f} {p['total_ms']:9.3f}"
        )
        if args.max_overhead is not None and r["overhead_pct"] > args.max_overhead:
            print(
                f"FAIL: {bundle}: infer adds {r['overhead_pct']:.2f}% over {r['raw_call']} (limit {args.max_overhead}%)",
                file=sys.stderr,
            )
            failed = True
    print(
        f"(batch 1, {args.threads} thread(s), median of {args.rounds * args.block} calls each, interleaved; "
        "checks = Predictor.infer's own time on a null engine; predict on a 640x480 JPEG, medians per stage)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
