"""bitdeploy's INT8/float mix against NNCF's accuracy control: one model, one data draw, one gate, one timing run.

    python benchmarks/experiments/mixed_int8.py [--model m-r50x1] [--resolution 64] [--targets onnx,openvino,litert]
        [--max-accuracy-drop 0] [--min-agreement PCT] [--budget 24] [--calib-size 300] [--calib-method M] [--eval-limit N]
        [--rounds 10] [--queries 20] [--threads N] [--out runs/mixed-int8] [--json PATH]
        [--checkpoint RUN_DIR]

The model is a BiT with a random-init body (GroupNorm affines randomised as in cpu_targets.py, so the engines time
the graph a real checkpoint has) and a closed-form ridge head fitted on its digits features, saved as a bitdeploy
checkpoint (or `--checkpoint`, e.g. a briefly trained `bitdeploy train` run): ~0.9 top-1 whose top-2 logits sit close, so INT8 honestly flips a few validation images (nothing edits
weights afterwards). Over one fresh stage cache, `bitdeploy build` then runs twice (subprocesses, logs in
<out>/logs/): `--int8-fallback none` gives each engine's FP32 and uniform INT8 bundles (the latter `valid: false`
when it fails the gate), `--int8-fallback auto` runs the search and gives the mix. On OpenVINO the anchor is
NNCF's `quantize_with_accuracy_control`, run in this process through bitdeploy's own converter with the build's
ONNX export, calibration draw, validation split and the gate's drop as `max_drop`.

Every row is then opened here (invalid bundles straight from their model file) and timed together in one
interleaved QuickTimer run (batch 1, the order rotating each round); top-1 and agreement are the build's gate
(FP32 PyTorch reference on the validation split), the NNCF row's computed by the same gate function. "p50 / FP32"
is each row's p50 over its engine's FP32 p50 with the [min-max] of the per-round ratios. Search time: bitdeploy's
`int8_mix.search_s` (its rankings, candidates, the answer's report evaluation and its timing run; not the uniform
INT8 conversion before it) vs the wall time of NNCF's `quantize_with_accuracy_control` call (its initial PTQ, its
FP32 and INT8 validations, the ranking and the reverting iterations). NNCF gates on the top-1 drop against
OpenVINO FP32 only: `--min-agreement` binds bitdeploy's search alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ENGINES = {"onnx": "onnxruntime", "openvino": "openvino", "litert": "litert"}
DATASET = "digits"
SEED = 0
FP32, UNIFORM, MIX, NNCF = "FP32", "uniform INT8", "bitdeploy mix", "NNCF accuracy control"
CLI = "import sys; from bitdeploy.cli import main; main(sys.argv[1:])"


def log(msg: str) -> None:
    print(f"... {msg}", file=sys.stderr, flush=True)


# -- the model ------------------------------------------------------------------------------------------------------
def make_checkpoint(model_name: str, resolution: int, out: Path, images: int | None = None, chunk: int = 64) -> Path:
    """A BiT whose body is random (norm affines randomised) and whose head is a ridge fit on its digits features at
    `resolution` (the first `images` training images; None: all), saved as a bitdeploy checkpoint in `out`."""
    import torch

    if str(HERE) not in sys.path:  # the scripts import one another by file name
        sys.path.insert(0, str(HERE))
    from cpu_targets import randomise_norms

    from bitdeploy.core.catalog import get_variant
    from bitdeploy.training import checkpoint
    from bitdeploy.training.bit import create_model
    from bitdeploy.training.data import eval_batch
    from bitdeploy.training.datasets import load_dataset

    torch.manual_seed(SEED)
    splits = load_dataset(DATASET)
    model = create_model(get_variant(model_name), len(splits.classes)).eval()
    randomise_norms(model, SEED)
    h: Any = model.head  # nn.Sequential: its members are typed Module | Tensor
    feats, ys = [], []
    n = len(splits.train) if images is None else min(images, len(splits.train))
    with torch.no_grad():
        for lo in range(0, n, chunk):
            x, y = eval_batch(splits.train, resolution, range(lo, min(lo + chunk, n)))
            f = h.avg(h.relu(h.gn(model.body(model.root(torch.from_numpy(x))))))
            feats.append(f.flatten(1).double().numpy())
            ys.append(y)
    f, y = np.concatenate(feats), np.concatenate(ys)
    k = len(splits.classes)
    mu = f.mean(0)
    fc = f - mu
    gram = fc.T @ fc
    ridge = 1e-2 * np.trace(gram) / len(gram)
    w = np.linalg.solve(gram + ridge * np.eye(len(gram)), fc.T @ (np.eye(k)[y] - 1.0 / k))
    with torch.no_grad():
        h.conv.weight.copy_(torch.from_numpy(w.T.reshape(k, -1, 1, 1)).float())
        h.conv.bias.copy_(torch.from_numpy(-(mu @ w)).float())
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "model_name": model_name,
        "num_classes": k,
        "labels": splits.classes,
        "resolution": resolution,
        "step": 0,
        "model": model.state_dict(),
    }
    checkpoint.save(out, payload)
    return out


# -- the builds -----------------------------------------------------------------------------------------------------
def gate_flags(args: argparse.Namespace) -> list[str]:
    flags = []
    if args.max_accuracy_drop is not None:
        flags += ["--max-accuracy-drop", f"{args.max_accuracy_drop:g}"]
    if args.min_agreement is not None:
        flags += ["--min-agreement", f"{args.min_agreement:g}"]
    return flags


def build_args(args: argparse.Namespace, ckpt: Path, cache: Path, out: Path, fallback: str) -> list[str]:
    argv = [
        "build",
        "--model",
        args.model,
        "--weights",
        str(ckpt),
        "--no-finetune",
        "--dataset",
        DATASET,
        "--resolution",
        str(args.resolution),
        "--seed",
        str(SEED),
        "--target",
        ",".join(args.targets),
        "--precision",
        "fp32,int8",
        "--calib-size",
        str(args.calib_size),
        "--int8-fallback",
        fallback,
        "--int8-search-budget",
        str(args.budget),
        "--no-report",
        "--no-baseline",
        "--cache-dir",
        str(cache),
        "--out",
        str(out),
        *gate_flags(args),
    ]
    if args.eval_limit is not None:
        argv += ["--eval-limit", str(args.eval_limit)]
    if args.calib_method is not None:
        argv += ["--calib-method", args.calib_method]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    return argv


def run_build(argv: list[str], logfile: Path, stamps: list[tuple[float, str]] | None = None) -> tuple[int, float]:
    """`bitdeploy ARGV` in a subprocess, everything it prints to `logfile`, its row lines to stderr; (exit code,
    seconds). Exit 1 is expected: a uniform INT8 bundle that fails the gate fails the build. `stamps`, when given,
    gets each line with the seconds since the start at which it arrived (the CLI's log lines are flushed)."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with logfile.open("w", encoding="utf-8") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLI, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if stamps is not None:
                stamps.append((time.perf_counter() - started, line.rstrip()))
            if line.startswith(("[", "error", "warning")):
                log(line.rstrip())
        code = proc.wait()
    return code, time.perf_counter() - started


def read_bundle(out: Path, target: str, precision: str) -> tuple[Path, dict[str, Any]] | None:
    bundle = out / f"{target}-{precision}"
    path = bundle / "manifest.json"
    return (bundle, json.loads(path.read_text(encoding="utf-8"))) if path.exists() else None


# -- the NNCF anchor ------------------------------------------------------------------------------------------------
@contextmanager
def timing_nncf_call(name: str) -> Iterator[list[float]]:
    """Record the wall time of each call of `nncf.<name>` while inside (the converter imports nncf at call time)."""
    import nncf

    real = getattr(nncf, name)
    seconds: list[float] = []

    def timed(*a: Any, **kw: Any) -> Any:
        began = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            seconds.append(time.perf_counter() - began)

    setattr(nncf, name, timed)
    try:
        yield seconds
    finally:
        setattr(nncf, name, real)


def find_export(cache: Path, sha256: str) -> Path:
    """The build's folded FP32 export in the stage cache: the `export` entry whose file has the manifest's digest."""
    from bitdeploy.builder.stages import EXPORT_FILE
    from bitdeploy.core.cache import file_sha256

    for path in sorted((cache / "export").glob(f"*/{EXPORT_FILE}")):
        if file_sha256(path) == sha256:
            return path
    raise RuntimeError(f"no ONNX export with sha256 {sha256[:12]} under {cache / 'export'}")


def nncf_anchor(
    args: argparse.Namespace, ckpt: Path, cache: Path, manifest: dict[str, Any], work: Path
) -> dict[str, Any]:
    """NNCF accuracy-controlled INT8 through bitdeploy's OpenVINO converter on the build's export, calibration draw
    and validation split, gated like the build; the IR goes to `work`."""
    from bitdeploy.converters import calibration, gate, openvino_convert
    from bitdeploy.converters.base import ConvertOptions, bind
    from bitdeploy.core.options import DEFAULT_MAX_DROP_PP, GateSpec
    from bitdeploy.training.datasets import load_dataset
    from bitdeploy.training.weights import load_model

    res = args.resolution
    splits = load_dataset(DATASET, seed=SEED)
    calib = calibration.from_image_set(splits.train, res, args.calib_size, SEED, f"{DATASET}:train")
    if calib.sha256 != manifest["calibration"]["sha256"]:
        raise RuntimeError("the calibration draw differs from the build's (sha256); the comparison would be unfair")
    data = gate.from_image_set(splits.val, res, args.eval_limit, SEED, f"{DATASET}:val")
    labels = data.labels()
    assert labels is not None  # from_image_set keeps the split's labels
    validation = calibration.ValidationData.from_arrays(np.concatenate([x for x, _ in data.batches()]), labels)
    reference = gate.torch_logits(load_model(args.model, weights=str(ckpt)).model, data)
    spec = GateSpec(args.max_accuracy_drop, args.min_agreement)
    drop = spec.drop_allowance if spec.drop_allowance is not None else DEFAULT_MAX_DROP_PP
    onnx = find_export(cache, manifest["export"]["sha256"])
    options = ConvertOptions(
        threads=args.threads,
        calib_method=args.calib_method,
        extras=openvino_convert.OpenVinoOptions(accuracy_control=True, max_accuracy_drop=drop, validation=validation),
    )
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    log(f"NNCF quantize_with_accuracy_control, max_drop {drop:g} pp on {len(validation)} validation images")
    with timing_nncf_call("quantize_with_accuracy_control") as seconds:
        artifact = bind("openvino", "int8", options).convert(onnx, work, calib)
    backend = _open("openvino", work / artifact.model_file, artifact.target.to_dict(), args.threads)
    try:
        logits = gate.run_logits(backend.infer, data)
    finally:
        backend.close()
    result = gate.gate(logits, reference, labels, spec)
    return {
        "model_file": str(work / artifact.model_file),
        "target": artifact.target.to_dict(),
        "accuracy": result.to_dict(),
        "max_drop_pp": drop,
        "search_s": round(seconds[0], 1) if seconds else None,
    }


def ov_float_convs(xml: Path) -> tuple[list[str], int]:
    """(the layers whose Convolution has float weights, how many convolutions): a weight is INT8 when its path back
    through Convert/Multiply/Subtract/Reshape reaches a FakeQuantize/FakeConvert or an 8-bit (or narrower) integer
    Constant, as NNCF's compressed weights do."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    passthrough = {"Convert", "Multiply", "Subtract", "Reshape", "Transpose", "Unsqueeze", "Squeeze"}
    narrow = {"i8", "u8", "i4", "u4"}

    def quantized(node: Any) -> bool:
        todo, seen = [node], set()
        while todo:
            n = todo.pop()
            if n.get_name() in seen:  # names, not id(): the Python wrappers are temporaries
                continue
            seen.add(n.get_name())
            kind = n.get_type_name()
            if kind in ("FakeQuantize", "FakeConvert"):
                return True
            if kind == "Constant":
                if n.get_output_element_type(0).get_type_name() in narrow:
                    return True
            elif kind in passthrough:
                todo += [v.get_node() for v in n.input_values()]
        return False

    from bitdeploy.converters import layers

    convs = [op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    floats = [layers.layer_of(op.get_friendly_name()) for op in convs if not quantized(op.input_value(1).get_node())]
    return floats, len(convs)


# -- timing ---------------------------------------------------------------------------------------------------------
def _open(backend: str, model_file: Path, target: dict[str, Any], threads: int | None) -> Any:
    """A backend on a model file with the target record it was built with, whatever the bundle's validity (runtimes
    refuse invalid bundles through `load`, not through `open_backend`)."""
    from bitdeploy.runtimes.bundle.manifest import Manifest, TargetInfo
    from bitdeploy.runtimes.engines.base import open_backend

    info = TargetInfo.from_dict(target)
    return open_backend(backend, model_file, Manifest(target=info), device=info.device, threads=threads)


def time_rows(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Every row with a model file timed in one interleaved QuickTimer run; p50, spread and per-round p50s added."""
    from bitdeploy.benchmarks.quick import QuickTimer, quick_interleaved

    todo = [r for r in rows if r.get("model_file")]
    opened = []
    try:
        for r in todo:
            try:
                opened.append((r, _open(ENGINES[r["engine"]], Path(r["model_file"]), r["target"], args.threads)))
            except Exception as exc:  # an SDK's own error type: this row is shown untimed, the others go on
                r["not_timed"] = (
                    f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
                )
                log(f"warning: {r['engine']} {r['variant']} not timed: {r['not_timed']}")
        size = (3, args.resolution, args.resolution)
        timers = [
            QuickTimer(b, size, iterations=args.rounds * args.queries, throughput_batches=[], rounds=args.rounds)
            for _, b in opened
        ]
        log(f"timing {len(timers)} models: {args.rounds} interleaved rounds x {args.queries} batch-1 calls")
        results = quick_interleaved(timers)
    finally:
        for _, b in opened:
            b.close()
    for (r, _), t, res in zip(opened, timers, results):
        r["p50_ms"], r["p50_spread"] = res["p50_ms"], res["p50_spread"]
        r["round_p50_ms"] = [x["p50_ms"] for x in t.ss_rounds]
        r["disturbed"] = res["disturbed"]
    for r in todo:
        base = next((x for x in todo if x["engine"] == r["engine"] and x["variant"] == FP32), None)
        if base is None or not r.get("round_p50_ms"):
            continue
        per_round = [a / b for a, b in zip(r["round_p50_ms"], base["round_p50_ms"])]
        r["vs_fp32"] = r["p50_ms"] / base["p50_ms"]
        r["vs_fp32_spread"] = [min(per_round), max(per_round)]


# -- the rows -------------------------------------------------------------------------------------------------------
def bundle_row(engine: str, variant: str, bundle: Path, m: dict[str, Any]) -> dict[str, Any]:
    q = (m["target"].get("quantization") or {}) if variant != FP32 else {}
    return {
        "engine": engine,
        "variant": variant,
        "bundle": str(bundle),
        "model_file": str(bundle / m["model_file"]),
        "target": m["target"],
        "valid": m["valid"],
        "accuracy": m.get("accuracy"),
        "default_float_layers": list(q.get("float_layers") or []),
    }


def engine_rows(
    target: str, uniform_out: Path, auto_out: Path, quantizable: dict[str, int]
) -> tuple[list[dict[str, Any]], list[str]]:
    """FP32, uniform INT8 and the mix of one engine (a row without a model file says why), and notes."""
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    fp32 = read_bundle(auto_out, target, "fp32") or read_bundle(uniform_out, target, "fp32")
    uniform = read_bundle(uniform_out, target, "int8")
    auto = read_bundle(auto_out, target, "int8")
    if fp32 is None:
        notes.append(f"{target}: no FP32 bundle (see the build logs)")
    else:
        rows.append(bundle_row(target, FP32, *fp32))
    if uniform is None:
        notes.append(f"{target}: no uniform INT8 bundle (see the build logs)")
        return rows, notes
    u = bundle_row(target, UNIFORM, *uniform)
    rows.append(u)
    conv_total = quantizable.get("all", 0)
    u["float_layers"] = 0
    u["quantizable_layers"] = conv_total - len(u["default_float_layers"]) if conv_total else None
    if auto is None:
        rows.append({"engine": target, "variant": MIX, "why": "no INT8 bundle from the auto build (see its log)"})
        return rows, notes
    bundle, m = auto
    mix = m.get("int8_mix")
    if mix is None:
        why = "not searched: uniform INT8 passes the gate" if uniform[1]["valid"] else "the search did not run"
        rows.append({"engine": target, "variant": MIX, "why": why})
        return rows, notes
    u["quantizable_layers"] = mix["quantizable_layers"]
    base = {
        "search_s": mix.get("search_s"),
        "evaluations": mix.get("evaluations"),
        "budget": mix.get("budget"),
        "granularity": mix.get("granularity"),
        "quantizable_layers": mix["quantizable_layers"],
        "candidates": mix.get("candidates"),
        "sensitivity": mix.get("sensitivity"),
        "search_fp32_p50_ms": mix.get("fp32_p50_ms"),
    }
    chosen = next((c for c in mix.get("candidates") or [] if c.get("chosen")), None)
    if chosen is None or not m["valid"]:
        short, detail = no_mix_reason(mix)
        rows.append({"engine": target, "variant": MIX, "why": f"no mix: {short}", **base})
        notes.append(f"{target}: the search kept no mix: {detail}")
        return rows, notes
    row = bundle_row(target, MIX, bundle, m)
    row.update(base, float_layers=len(mix["float_layers"]), float_layer_names=mix["float_layers"])
    row["chosen"] = chosen
    rows.append(row)
    return rows, notes


def no_mix_reason(mix: dict[str, Any]) -> tuple[str, str]:
    """Why the search kept no mix: (a few words for the table, the figures for a note)."""
    cands = mix.get("candidates") or []
    q = mix.get("quantizable_layers")

    def figures(c: dict[str, Any]) -> str:
        return (
            f"{c.get('float_layers')} of {q} layers in float ({c.get('name')}), top-1 {_pct(c.get('top1'))}, "
            f"agreement {_pct(c.get('agreement'))}"
        )

    stop = mix.get("stop") or ""  # the split search (issue 40) records why it ended
    if stop and stop not in ("speed", "passed"):
        best = min(cands, key=lambda c: c.get("kl") or float("inf")) if cands else None
        found = f"; best: {figures(best)}" if best is not None else ""
        return f"stopped: {stop}", f"the search stopped ({stop}) after {len(cands)} candidates{found}"
    passing = [c for c in cands if c.get("passed")]
    if passing:
        timed = [c for c in passing if c.get("p50_ms") is not None]
        best = min(timed, key=lambda c: c["p50_ms"]) if timed else passing[0]
        fp32 = mix.get("fp32_p50_ms")
        speed = f": p50 {best['p50_ms']:.2f} ms vs FP32 {fp32:.2f} ms" if timed and fp32 is not None else ""
        return "none faster than FP32", f"the fastest mix that passes, {figures(best)}, is not faster than FP32{speed}"
    if not cands:
        return "none evaluated", "no candidate was evaluated"
    best = max(cands, key=lambda c: (c.get("agreement") or 0, c.get("top1") or 0))
    return "none passes the gate", f"no candidate passes the gate ({mix.get('gate')}); best found: {figures(best)}"


# -- output ---------------------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.2f} %"


def _cells(r: dict[str, Any]) -> list[str]:
    acc = r.get("accuracy") or {}
    if "why" in r:
        return [r["engine"], r["variant"], "—", "—", "—", "—", "—", r["why"], _search(r)]
    drop = acc.get("top1_drop_pp")
    top1 = _pct(acc.get("top1")) + (f" ({0.0 - drop:+.2f} pp)" if drop is not None and r["variant"] != FP32 else "")
    p50, ratio = speed_cells(r)
    if r["variant"] == FP32:
        floats = "all"
    elif r.get("float_layers") is None:
        floats = "?"
    else:
        floats = f"{r['float_layers']} of {r.get('quantizable_layers') or '?'}"
    gate = "pass" if acc.get("passed") else "fail"
    return [r["engine"], r["variant"], top1, _pct(acc.get("agreement")), p50, ratio, floats, gate, _search(r)]


def parse_targets(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The parsed arguments, --targets as a list of known engines (else the parser's one-line error)."""
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in args.targets if t not in ENGINES]
    if bad or not args.targets:
        p.error(f"--targets: choose from {', '.join(ENGINES)} (got {', '.join(bad) or 'none'})")
    return args


def speed_cells(r: dict[str, Any]) -> tuple[str, str]:
    """A row's "p50 ms [min-max]" and "p50 / FP32 [min-max]" cells."""
    p50 = "—" if r.get("p50_ms") is None else f"{r['p50_ms']:.2f}"
    if r.get("p50_spread"):
        p50 += f" [{r['p50_spread'][0]:.2f}–{r['p50_spread'][1]:.2f}]"
    ratio = "—" if r.get("vs_fp32") is None else f"{r['vs_fp32']:.2f}×"
    if r.get("vs_fp32_spread") and r["variant"] != FP32:
        ratio += f" [{r['vs_fp32_spread'][0]:.2f}–{r['vs_fp32_spread'][1]:.2f}]"
    return p50, ratio


def _search(r: dict[str, Any]) -> str:
    if r.get("search_s") is None:
        return ""
    if r["variant"] == NNCF:
        return f"{r['search_s']:.0f} s (wall time)"
    evals = f", {r['evaluations']}/{r['budget']} evaluations ({r['granularity']} groups)" if r.get("budget") else ""
    return f"{r['search_s']:.0f} s{evals}"


HEADER = ["engine", "variant", "top-1 (vs FP32)", "agreement", "p50 ms [min-max]", "p50 / FP32", "layers in float"]
HEADER += ["gate", "search"]


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    return lines + ["| " + " | ".join(_cells(r)) + " |" for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/experiments/mixed_int8.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="m-r50x1")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--targets", default="onnx,openvino,litert", help="comma list of onnx, openvino, litert")
    p.add_argument(
        "--max-accuracy-drop", type=float, default=None, metavar="PP", help="default 0 (without --min-agreement)"
    )
    p.add_argument("--min-agreement", type=float, default=None, metavar="PCT")
    p.add_argument("--budget", type=int, default=24, help="--int8-search-budget of the auto build")
    p.add_argument("--head-images", type=int, default=None, help="training images the ridge head is fitted on (all)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a bitdeploy training run or checkpoint.pt to use instead of the ridge head (e.g. a briefly trained "
        "`bitdeploy train --steps 120` run)",
    )
    p.add_argument("--calib-size", type=int, default=300)
    p.add_argument(
        "--calib-method",
        default=None,
        help="--calib-method of every build and of the NNCF anchor (e.g. minmax; default: each engine's own)",
    )
    p.add_argument("--eval-limit", type=int, default=None, help="validation images (default: all)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    p.add_argument("--queries", type=int, default=20, help="batch-1 calls per model per round")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: each engine's own)")
    p.add_argument("--out", type=Path, default=Path("runs/mixed-int8"))
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parse_targets(p, argv)
    if args.max_accuracy_drop is None and args.min_agreement is None:
        args.max_accuracy_drop = 0.0

    from bitdeploy.converters import layers
    from bitdeploy.core.options import GateSpec
    from bitdeploy.runtimes.bundle.fingerprint import host_fingerprint

    started = time.perf_counter()
    out: Path = args.out
    owned = [out / d for d in ("checkpoint", "cache", "uniform", "auto", "nncf", "logs")]
    for d in owned:  # a fresh cache: the search's conversions are measured, not read back
        shutil.rmtree(d, ignore_errors=True)
    if args.checkpoint is not None:
        ckpt, source = args.checkpoint, f"checkpoint {args.checkpoint}"
    else:
        log(f"fitting the ridge head of {args.model} at {args.resolution} px on {DATASET} features")
        ckpt = make_checkpoint(args.model, args.resolution, out / "checkpoint", args.head_images)
        source = "ridge head on a random body"
    cache = out / "cache"
    builds: dict[str, Any] = {}
    for fallback, where in (("none", out / "uniform"), ("auto", out / "auto")):
        argv_b = build_args(args, ckpt, cache, where, fallback)
        log(f"bitdeploy {' '.join(argv_b)}")
        code, seconds = run_build(argv_b, out / "logs" / f"build-{fallback}.log")
        builds[fallback] = {"argv": argv_b, "exit_code": code, "seconds": round(seconds, 1)}
        log(f"build --int8-fallback {fallback}: exit {code} in {seconds:.0f} s")

    some = next((b for t in args.targets for b in [read_bundle(out / "uniform", t, "int8")] if b), None)
    if some is None:
        print(f"error: the builds wrote no INT8 bundle; see {out / 'logs'}", file=sys.stderr)
        return 1
    export = find_export(cache, some[1]["export"]["sha256"])
    quantizable = {"all": len(layers.conv_layers(export))}
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for target in args.targets:
        got, said = engine_rows(target, out / "uniform", out / "auto", quantizable)
        rows += got
        notes += said
        if target != "openvino":
            continue
        uniform_ov = next((r for r in got if r["variant"] == UNIFORM), None)
        try:
            anchor = nncf_anchor(args, ckpt, cache, some[1], out / "nncf")
        except Exception as exc:  # NNCF's own errors: the other rows still print
            rows.append({"engine": target, "variant": NNCF, "why": f"failed: {type(exc).__name__}: {exc}"})
            continue
        floats, convs = ov_float_convs(Path(anchor["model_file"]))
        row = {"engine": target, "variant": NNCF, **anchor, "float_conv_layers": floats, "convolutions": convs}
        if uniform_ov is not None:
            default_float, _ = ov_float_convs(Path(uniform_ov["model_file"]))
            row["float_layers"] = len(set(floats) - set(default_float))
            row["quantizable_layers"] = convs - len(default_float)
            row["float_layer_names"] = sorted(set(floats) - set(default_float))
            mix_ov = next((r for r in got if r["variant"] == MIX and r.get("model_file")), None)
            if mix_ov is not None:  # the same count on bitdeploy's mix: it must match its manifest
                counted = len(set(ov_float_convs(Path(mix_ov["model_file"]))[0]) - set(default_float))
                if counted != mix_ov["float_layers"]:
                    notes.append(f"openvino mix: {counted} float convolutions in its IR vs {mix_ov['float_layers']}")
        rows.append(row)

    time_rows(rows, args)
    spec = GateSpec(args.max_accuracy_drop, args.min_agreement)
    fp = host_fingerprint()
    cpu = fp["cpu"]
    threads = args.threads or "engine default"
    print(
        f"\n{args.model} @ {args.resolution} px, {source}; {DATASET} val "
        f"{next((r['accuracy']['samples'] for r in rows if r.get('accuracy')), '?')} images, calibration "
        f"{args.calib_size}{f' ({args.calib_method})' if args.calib_method else ''}; gate: {spec.describe()} vs FP32 PyTorch; search budget {args.budget}; "
        f"batch 1, {threads} threads, {args.rounds} interleaved rounds x {args.queries} calls"
    )
    print(f"CPU class: {cpu['class']} ({cpu['model']})\n")
    for line in table(rows):
        print(line)
    nncf_row = next((r for r in rows if r["variant"] == NNCF and "why" not in r), None)
    if nncf_row is not None:
        notes.append(
            f"NNCF: max_drop {nncf_row['max_drop_pp']:g} pp (absolute top-1, against OpenVINO FP32); its float "
            f"layers are the convolutions whose weights stay float in the IR, beyond uniform INT8's"
        )
    if args.min_agreement is not None:
        notes.append("--min-agreement gates bitdeploy's rows; NNCF's accuracy control knows only the top-1 drop")
    if any(r.get("disturbed") for r in rows):
        notes.append("the machine was busy during some timing rounds: trust the ratios more than the times")
    for n in notes:
        print(f"\nnote: {n}", end="")
    took = time.perf_counter() - started
    print(
        f"\n\nsearch time: bitdeploy = int8_mix.search_s; NNCF = wall time of quantize_with_accuracy_control; "
        f"whole run {took / 60:.1f} min"
    )
    if args.json is not None:
        write_json(args, source, spec, {"cpu": cpu, "builds": builds, "rows": rows, "notes": notes}, took)
    return 0


def write_json(args: argparse.Namespace, source: str, spec: Any, found: dict[str, Any], took: float) -> None:
    """The run's settings, `found` and its wall time as one JSON object at --json."""
    settings = ("model", "resolution", "budget", "calib_size", "calib_method", "eval_limit", "threads", "rounds")
    result = {
        **{k: getattr(args, k) for k in settings},
        "queries": args.queries,
        "weights": source,
        "gate": spec.describe(),
        **found,
        "seconds": round(took, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
