"""bitdeploy's folded export against a naive one, in ONNX Runtime and OpenVINO, in one run.

    python benchmarks/experiments/export_naive_vs_folded.py [--model m-r50x1] [--resolution 128] [--threads 2]

folded: `bitdeploy.converters.onnx_export.export_onnx` (weight standardisation folded into plain conv weights,
onnxslim). naive: `torch.onnx.export` of the model as written (StdConv2d computes mean/var of its weights on
every call), as generic exporters do. Both at opset 17 with the TorchScript exporter, random weights (latency
does not depend on them). Compared: file size, node count, Conv weights that are constants vs computed,
ONNX Runtime session creation and OpenVINO compile time, batch-1 latency (A/B interleaved in rounds, medians),
and what ONNX Runtime's static INT8 quantizer (QDQ, Conv only, per-channel) makes of the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.benchmarks.latency import make_inputs, timed_loop


def conv_weight_sources(path: Path) -> dict[str, int]:
    """How each Conv gets its weight: an initializer/Constant, an int8 constant through DequantizeLinear, or computed."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    out: Counter[str] = Counter()
    for n in g.node:
        if n.op_type != "Conv":
            continue
        src = producer.get(n.input[1])
        if n.input[1] in inits or (src is not None and src.op_type == "Constant"):
            out["float constant"] += 1
        elif src is not None and src.op_type == "DequantizeLinear":
            q = src.input[0]
            qsrc = producer.get(q)
            out[
                "int8 constant"
                if q in inits or (qsrc is not None and qsrc.op_type == "Constant")
                else "quantized at run time"
            ] += 1
        else:
            out["computed at run time"] += 1
    return dict(out)


def graph_stats(path: Path) -> dict[str, Any]:
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    ops = Counter(n.op_type for n in g.node)
    return {
        "file_mb": path.stat().st_size / 1e6,
        "nodes": len(g.node),
        "ops": dict(ops.most_common()),
        "conv_weights": conv_weight_sources(path),
    }


def _export_naive(model: Any, resolution: int, path: Path) -> None:
    from bitdeploy.converters.onnx_export import torch_export

    torch_export(model, resolution, path)


def _ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _ov_compile(path: Path, threads: int) -> Any:
    import openvino as ov

    core = ov.Core()
    # f32 pinned: a CPU with bf16 units would otherwise run bf16; LATENCY = one stream, MLPerf single-stream.
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
    return core.compile_model(core.read_model(str(path)), "CPU", config)


def timed_create(
    factory: Any, variants: dict[str, Path], repeats: int
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Create each variant `repeats` times, alternating; keep the last object of each. Seconds per creation."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    objs: dict[str, Any] = {}
    names = list(variants)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            objs.pop(name, None)
            t0 = time.perf_counter()
            objs[name] = factory(variants[name])
            times[name].append(time.perf_counter() - t0)
    return times, objs


def interleaved(runners: dict[str, Any], rounds: int, chunk: int, warmup: int) -> dict[str, list[float]]:
    """A/B latency in rounds of `chunk` queries, order flipped every round, so drift hits both alike."""
    lat: dict[str, list[float]] = {k: [] for k in runners}
    for fn in runners.values():
        timed_loop(fn, iterations=1, warmup=warmup)
    names = list(runners)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            lat[name] += timed_loop(runners[name], iterations=chunk, warmup=0)
    return lat


def quantize_int8(src: Path, dst: Path, shape: tuple[int, ...], samples: int) -> dict[str, Any]:
    """ONNX Runtime static QDQ INT8 (S8S8, per-channel, Conv only), calibrated on random inputs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({"input": x} for x in make_inputs(shape, pool=samples, seed=1))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    t0 = time.perf_counter()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a pre-processing suggestion per call
    try:
        quantize_static(
            str(src),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["Conv"],
        )
    except Exception as exc:  # report, do not hide: the point is what the quantizer does with each graph
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    finally:
        root.setLevel(level)
    return {
        "seconds": time.perf_counter() - t0,
        "file_mb": dst.stat().st_size / 1e6,
        "conv_weights": conv_weight_sources(dst),
    }


def _med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from bitdeploy.converters.onnx_export import export_onnx
    from bitdeploy.training.weights import load_model

    torch.manual_seed(0)
    model = load_model(args.model, "none", num_classes=args.num_classes).model.eval()
    paths = {"folded": work / "folded.onnx", "naive": work / "naive.onnx"}
    t0 = time.perf_counter()
    export_onnx(model, args.resolution, paths["folded"])
    t1 = time.perf_counter()
    _export_naive(model, args.resolution, paths["naive"])
    t2 = time.perf_counter()
    del model
    res: dict[str, Any] = {"settings": vars(args), "export_s": {"folded": t1 - t0, "naive": t2 - t1}}
    res["graph"] = {k: graph_stats(p) for k, p in paths.items()}
    shape = (1, 3, args.resolution, args.resolution)
    x = make_inputs(shape, pool=1)[0]

    times, sessions = timed_create(lambda p: _ort_session(p, args.threads), paths, args.repeats)
    runners = {k: (lambda i, s=s: s.run(None, {"input": x})) for k, s in sessions.items()}
    lat = interleaved(runners, args.rounds, args.chunk, args.warmup)
    a, b = sessions["folded"].run(None, {"input": x})[0], sessions["naive"].run(None, {"input": x})[0]
    res["onnxruntime"] = {
        "create_s": {k: _med(v) for k, v in times.items()},
        "p50_ms": {k: _med(v) for k, v in lat.items()},
        "n": {k: len(v) for k, v in lat.items()},
        "max_abs_logit_diff": float(np.abs(a - b).max()),
    }
    del sessions, runners

    if not args.no_openvino:
        times, compiled = timed_create(lambda p: _ov_compile(p, args.threads), paths, args.repeats)
        reqs = {k: c.create_infer_request() for k, c in compiled.items()}
        runners = {k: (lambda i, r=r: r.infer({0: x})) for k, r in reqs.items()}
        lat = interleaved(runners, args.rounds, args.chunk, args.warmup)
        res["openvino"] = {
            "compile_s": {k: _med(v) for k, v in times.items()},
            "p50_ms": {k: _med(v) for k, v in lat.items()},
            "n": {k: len(v) for k, v in lat.items()},
        }
        del reqs, runners, compiled

    if not args.no_quantize:
        res["ort_int8"] = {
            k: quantize_int8(p, work / f"{k}.int8.onnx", shape, args.calib_samples) for k, p in paths.items()
        }
    return res


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(res: dict[str, Any]) -> str:
    g = res["graph"]
    rows = [
        ("file size, MB", g["folded"]["file_mb"], g["naive"]["file_mb"], ".1f"),
        ("ONNX nodes", g["folded"]["nodes"], g["naive"]["nodes"], "d"),
        (
            "Conv weights that are constants",
            g["folded"]["conv_weights"].get("float constant", 0),
            g["naive"]["conv_weights"].get("float constant", 0),
            "d",
        ),
        (
            "Conv weights computed at run time",
            g["folded"]["conv_weights"].get("computed at run time", 0),
            g["naive"]["conv_weights"].get("computed at run time", 0),
            "d",
        ),
        (
            "ORT session creation, s",
            res["onnxruntime"]["create_s"]["folded"],
            res["onnxruntime"]["create_s"]["naive"],
            ".3f",
        ),
        ("ORT batch-1 p50, ms", res["onnxruntime"]["p50_ms"]["folded"], res["onnxruntime"]["p50_ms"]["naive"], ".2f"),
    ]
    if "openvino" in res:
        rows += [
            (
                "OpenVINO read+compile, s",
                res["openvino"]["compile_s"]["folded"],
                res["openvino"]["compile_s"]["naive"],
                ".3f",
            ),
            (
                "OpenVINO f32 batch-1 p50, ms",
                res["openvino"]["p50_ms"]["folded"],
                res["openvino"]["p50_ms"]["naive"],
                ".2f",
            ),
        ]
    for k in ("folded", "naive"):
        q = (res.get("ort_int8") or {}).get(k)
        if q is None:
            break
    else:
        qf, qn = res["ort_int8"]["folded"], res["ort_int8"]["naive"]
        for label in ("int8 constant", "quantized at run time", "float constant", "computed at run time"):
            rows.append(
                (
                    f"ORT INT8: Conv weights {label}",
                    (qf.get("conv_weights") or {}).get(label, 0),
                    (qn.get("conv_weights") or {}).get(label, 0),
                    "d",
                )
            )
    s = res["settings"]
    lines = [
        f"{s['model']} at {s['resolution']} px, {s['num_classes']} classes, random weights, {s['threads']} threads, "
        f"latency: {s['rounds']} interleaved rounds x {s['chunk']} queries each",
        f"{'':42s} {'folded':>10s} {'naive':>10s} {'naive/folded':>13s}",
    ]
    for label, a, b, fmt in rows:
        lines.append(f"{label:42s} {format(a, fmt):>10s} {format(b, fmt):>10s} {_ratio(b, a):>13s}")
    lines.append(f"ORT logits folded vs naive: max abs diff {res['onnxruntime']['max_abs_logit_diff']:.2e}")
    for k, q in (res.get("ort_int8") or {}).items():
        if "error" in q:
            lines.append(f"ORT INT8 of the {k} export failed: {q['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python benchmarks/experiments/export_naive_vs_folded.py", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", default="m-r50x1")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6, help="interleaved A/B rounds")
    p.add_argument("--chunk", type=int, default=50, help="queries per variant per round")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="session creations / compiles per variant")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--no-openvino", action="store_true")
    p.add_argument("--no-quantize", action="store_true")
    p.add_argument("--keep", type=Path, help="keep the ONNX files in this directory")
    p.add_argument("--json", type=Path, help="write the figures as JSON")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bitdeploy-naive-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        res = run(args, work)
    print(report(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
