"""Uniform INT8 (PTQ), bitdeploy's INT8/float mix and its quantization-aware fine-tune (QAT) on one low-margin model:
one data draw, one gate, one set of report images, one timing run.

    python benchmarks/experiments/qat_vs_ptq.py [--checkpoint RUN_DIR --model m-r50x1 --resolution 32]
        [--targets onnx,openvino,litert] [--min-agreement 99.5] [--max-accuracy-drop PP] [--qat-steps N]
        [--budget 24] [--calib-size 300] [--calib-method M] [--eval-limit N] [--train-steps 150]
        [--rounds 10] [--queries 20] [--threads N] [--cache-dir DIR] [--no-nncf] [--out runs/qat-vs-ptq]
        [--json PATH]

Without `--checkpoint` the issue's low-margin case is trained first, into <out>/checkpoint (`bitdeploy train --model
m-r50x1 --weights none --dataset digits --resolution 32 --steps 150 --batch-size 32 --lr 0.01 --no-hflip`: 87.47 %
top-1). `bitdeploy build --weights CKPT --no-finetune --dataset digits --precision fp32,int8` (mixed_int8.build_args,
the gate `--min-agreement 99.5` unless told otherwise) then runs three times over one stage cache (<out>/cache, fresh
each run unless `--cache-dir`), subprocesses logging to <out>/logs/: `--int8-fallback none`, `search` and `qat`
(`--qat-steps` passed through). The rows of each engine:

- FP32: the engine's FP32 bundle.
- uniform INT8: the `none` build's INT8 bundle, the engine's own post-training quantization (valid or not).
- bitdeploy mix: the `search` build's INT8/float mix, or why there is none (uniform INT8 passed; no mix passed).
- QAT: the `qat` build's bundle of the fine-tune distilled from the checkpoint on the training split (every
  quantized convolution INT8), or why there is none.
- NNCF QAT (OpenVINO, an anchor, in this process): `nncf.quantize` (performance preset, the head float) of the
  PyTorch model with its weight standardisation folded, on the build's calibration draw in batches of 32; then a
  plain distillation loop (bitdeploy's loss; the bitdeploy fine-tune's steps, batch size and peak rate, held
  constant; training images with the eval transform), exported with `openvino.convert_model`. Skipped, with one line
  saying why, when `nncf.torch` does not import, OpenVINO is not a target, there is no QAT row to match, or
  `--no-nncf`. (The first `nncf.torch` run on a machine compiles its CPU extension: minutes, counted in its time.)

Figures are on the validation split's report images only: the seeded (0), label-stratified share sized for the gate
(`search_data.sizes`, `search_data.stratified`, the split the search makes) on which the search never ranks nor
chooses; the fine-tune trains on the training split. Every bundle, invalid ones too, is opened here from its model
file and run on the validation split as the build draws it (`gate.from_image_set`, seed 0); its logits on the report
images are gated with `converters.gate.gate` against the FP32 PyTorch reference (the checkpoint through
`gate.torch_logits`, as the build computes it): top-1 with its 95 % Wilson interval and its change from the
reference, agreement with FP32 and its interval, and the gate's verdict on those images (the builds' own verdicts,
QAT's without a search on all validation images, stay in the manifests and the JSON).

Every row is timed in one interleaved QuickTimer run in this process (mixed_int8.time_rows: batch 1, the order
rotating each round): p50 with the [min-max] of the per-round p50s, and p50 / FP32 per engine with the spread of the
per-round ratios. Layers in float: the bundle's convolutions left float (the quantization record's float_layers,
plus the mix's int8_mix.float_layers) of all convolutions in the export. Time spent: the mix's int8_mix.search_s; QAT's
train_seconds (its manifest record) + the build's wall time from the fine-tune's end to the row's QAT verdict (export,
Q/DQ model, the engine's conversion, its gate: the log lines' arrival times); NNCF's wall time of quantize, fine-tune
and export. With `--cache-dir`, stages the cache holds are read back, not rerun: the times are then those of a cache
read, train_seconds the run's that made it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the scripts import one another by file name

import mixed_int8 as mi8  # noqa: E402

DATASET, SEED, ENGINES = mi8.DATASET, mi8.SEED, mi8.ENGINES
FP32, UNIFORM, MIX = mi8.FP32, mi8.UNIFORM, mi8.MIX
QAT, NNCF_QAT = "QAT", "NNCF QAT"
NNCF_CALIB_BATCH = 32  # NNCF's torch statistics collection runs per call: single images take minutes on a CPU
FALLBACKS = {"none": "uniform", "search": "search", "qat": "qat"}  # --int8-fallback -> its build's folder
TRAIN = ["--weights", "none", "--dataset", DATASET, "--batch-size", "32", "--lr", "0.01", "--no-hflip"]
log = mi8.log


# -- the builds -----------------------------------------------------------------------------------------------------
def train_checkpoint(args: argparse.Namespace, out: Path) -> Path:
    """The issue's low-margin case, trained into `out` (a `bitdeploy train` subprocess, its log in <out>/../logs)."""
    argv = ["train", "--model", args.model, "--resolution", str(args.resolution), "--steps", str(args.train_steps)]
    argv += [*TRAIN, "--out", str(out)]
    log(f"bitdeploy {' '.join(argv)}")
    code, seconds = mi8.run_build(argv, out.parent / "logs" / "train.log")
    if code != 0 or not (out / "checkpoint.pt").is_file():
        raise SystemExit(f"error: bitdeploy train failed (exit {code}); see {out.parent / 'logs' / 'train.log'}")
    log(f"trained in {seconds:.0f} s")
    return out


def run_builds(
    args: argparse.Namespace, ckpt: Path, cache: Path, out: Path
) -> tuple[dict[str, Any], list[tuple[float, str]]]:
    """The three builds; their records and the qat build's log lines with their arrival times."""
    builds: dict[str, Any] = {}
    qat_lines: list[tuple[float, str]] = []
    for fallback, folder in FALLBACKS.items():
        argv = mi8.build_args(args, ckpt, cache, out / folder, fallback)
        if fallback == "qat" and args.qat_steps is not None:
            argv += ["--qat-steps", str(args.qat_steps)]
        log(f"bitdeploy {' '.join(argv)}")
        stamps = qat_lines if fallback == "qat" else None
        code, seconds = mi8.run_build(argv, out / "logs" / f"build-{fallback}.log", stamps)
        builds[fallback] = {"argv": argv, "exit_code": code, "seconds": round(seconds, 1)}
        log(f"build --int8-fallback {fallback}: exit {code} in {seconds:.0f} s")
    return builds, qat_lines


def after_fine_tune(lines: list[tuple[float, str]], target: str) -> float | None:
    """Seconds from the fine-tune's end (its stage cached or read back) to the row's QAT verdict in the build's log."""
    verdict = next((i for i, (_, s) in enumerate(lines) if s.startswith(f"[qat] {target}-int8:")), None)
    if verdict is None:
        return None
    ends = [t for t, s in lines[:verdict] if "quantization-aware fine-tune (qat/" in s]
    return lines[verdict][0] - ends[-1] if ends else None


def qat_row(target: str, out: Path, lines: list[tuple[float, str]]) -> dict[str, Any]:
    """The qat build's row of one engine: its bundle when the fine-tune made it, else why not."""
    found = mi8.read_bundle(out, target, "int8")
    if found is None:
        return {"engine": target, "variant": QAT, "why": "no INT8 bundle from the qat build (see its log)"}
    bundle, m = found
    q = m["target"].get("quantization") or {}
    record = q.get("qat")
    if not record:
        why = "not fine-tuned: uniform INT8 passes the gate" if m["valid"] else "not fine-tuned (see the qat log)"
        return {"engine": target, "variant": QAT, "why": why}
    row = mi8.bundle_row(target, QAT, bundle, m)
    row.update(
        qat=record,
        float_layer_names=[],
        train_s=record.get("train_seconds"),
        after_s=after_fine_tune(lines, target),
    )
    return row


def float_layers(row: dict[str, Any]) -> list[str]:
    """The bundle's convolutions left float: its quantization record's, plus the mix's."""
    return sorted(set(row.get("default_float_layers") or []) | set(row.get("float_layer_names") or []))


# -- the report images ----------------------------------------------------------------------------------------------
def report_images(args: argparse.Namespace, ckpt: Path, spec: Any) -> dict[str, Any]:
    """The validation split as the build draws it, the FP32 PyTorch reference on it, and the report images'
    indices (the search's split: seeded, stratified by label, sized for the gate)."""
    from bitdeploy.builder import search_data
    from bitdeploy.converters import gate
    from bitdeploy.training.datasets import load_dataset
    from bitdeploy.training.weights import load_model

    splits = load_dataset(DATASET, seed=SEED)
    data = gate.from_image_set(splits.val, args.resolution, args.eval_limit, SEED, f"{DATASET}:val")
    labels = data.labels()
    assert labels is not None  # from_image_set keeps the split's labels
    counts = search_data.sizes(len(labels), spec)
    if isinstance(counts, str):
        raise SystemExit(f"error: no report images: {counts}")
    _, report = search_data.stratified(labels, counts[1], SEED)
    log(f"FP32 PyTorch reference on {len(labels)} validation images; {len(report)} report images")
    reference = gate.torch_logits(load_model(args.model, weights=str(ckpt)).model, data)
    return {"splits": splits, "data": data, "labels": labels, "report": report, "reference": reference}


def gate_on_report(rows: list[dict[str, Any]], images: dict[str, Any], spec: Any, threads: int | None) -> None:
    """Each row with a model file run on the validation split, its report images' logits gated against FP32."""
    from bitdeploy.converters import gate

    idx, labels, reference = images["report"], images["labels"], images["reference"]
    for r in rows:
        if not r.get("model_file"):
            continue
        try:
            backend = mi8._open(ENGINES[r["engine"]], Path(r["model_file"]), r["target"], threads)
        except Exception as exc:  # an SDK's own error type: the row is shown without figures
            r["why"] = f"not opened: {type(exc).__name__}: {str(exc).strip()[:160]}"
            continue
        try:
            logits = gate.run_logits(backend.infer, images["data"])
        finally:
            backend.close()
        r["report"] = gate.gate(logits[idx], reference[idx], labels[idx], spec).to_dict()


# -- the NNCF anchor ------------------------------------------------------------------------------------------------
def nncf_qat(
    args: argparse.Namespace,
    ckpt: Path,
    images: dict[str, Any],
    qat: dict[str, Any],
    target: dict[str, Any],
    work: Path,
) -> dict[str, Any]:
    """NNCF's quantization-aware training of the checkpoint, exported to OpenVINO IR in `work`: `nncf.quantize` of
    the model with its weight standardisation folded (as the builds export it; the head kept float, as bitdeploy
    keeps it) on the build's calibration draw in batches of `NNCF_CALIB_BATCH`, then `qat`'s steps, batch size and
    peak rate (constant, SGD with momentum 0.9) of KL distillation from FP32 on eval-transformed training images."""
    import nncf
    import openvino as ov
    import torch

    from bitdeploy.converters import calibration
    from bitdeploy.training.bit import fold_weight_standardization
    from bitdeploy.training.data import eval_batch
    from bitdeploy.training.qat import distillation_loss
    from bitdeploy.training.weights import load_model

    torch.manual_seed(SEED)
    train = images["splits"].train
    calib = calibration.from_image_set(train, args.resolution, args.calib_size, SEED, f"{DATASET}:train")
    teacher = load_model(args.model, weights=str(ckpt)).model.eval()
    student = fold_weight_standardization(teacher)  # a copy: plain convolutions with the standardised weights
    began = time.perf_counter()
    batches = list(calib.batches(NNCF_CALIB_BATCH))
    dataset = nncf.Dataset(batches, torch.from_numpy)
    model = nncf.quantize(
        student,
        dataset,
        preset=nncf.QuantizationPreset.PERFORMANCE,  # bitdeploy's OpenVINO INT8: symmetric activations
        subset_size=len(batches),  # NNCF counts the dataset's items: every calibration image
        ignored_scope=nncf.IgnoredScope(patterns=[".*head.*"], validate=False),
    )
    quantized_s = time.perf_counter() - began
    steps, batch, lr = int(qat["steps"]), int(qat["batch_size"]), float(qat["base_lr"])
    log(f"NNCF QAT: quantized in {quantized_s:.0f} s; {steps} steps of distillation, batch {batch}, lr {lr:g}")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    rng = np.random.default_rng(SEED)
    model.train()
    last = None
    for _ in range(steps):
        x = torch.from_numpy(eval_batch(train, args.resolution, np.sort(rng.choice(len(train), batch, False)))[0])
        with torch.no_grad():
            target_logits = teacher(x)
        loss = distillation_loss(model(x), target_logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        last = float(loss.detach())
    model.eval()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    with torch.no_grad():
        ir = ov.convert_model(model, example_input=torch.zeros(1, 3, args.resolution, args.resolution))
    ov.save_model(ir, str(work / "model.xml"))
    seconds = time.perf_counter() - began
    floats, convs = mi8.ov_float_convs(work / "model.xml")
    floats = [re.sub(r"^__module\.|[./]aten::.*$", "", f) for f in floats]  # the PyTorch frontend's names
    return {
        "engine": "openvino",
        "variant": NNCF_QAT,
        "model_file": str(work / "model.xml"),
        "target": target,
        "float_layer_names": floats,
        "convolutions": convs,
        "nncf_s": round(seconds, 1),
        "nncf_quantize_s": round(quantized_s, 1),
        "steps": steps,
        "last_loss": last,
    }


def nncf_reason(args: argparse.Namespace) -> str | None:
    """Why the NNCF anchor cannot run, or None."""
    if args.no_nncf:
        return "--no-nncf"
    if "openvino" not in args.targets:
        return "OpenVINO is not a target"
    try:
        import nncf.torch  # noqa: F401
    except Exception as exc:  # its import fails in many ways (torch versions, missing extensions)
        return f"nncf.torch does not import: {type(exc).__name__}: {exc}"
    return None


# -- output ---------------------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.2f} %"


def _ci(pair: list[float] | tuple[float, float] | None) -> str:
    return "" if not pair else f" [{pair[0] * 100:.1f}–{pair[1] * 100:.1f}]"


def _spent(r: dict[str, Any]) -> str:
    if r["variant"] == MIX and r.get("search_s") is not None:
        evals = f", {r['evaluations']}/{r['budget']} evaluations" if r.get("budget") else ""
        return f"{r['search_s']:.0f} s search{evals}"
    if r["variant"] == QAT and "qat" in r:
        train = "?" if r.get("train_s") is None else f"{r['train_s']:.0f}"
        after = "?" if r.get("after_s") is None else f"{r['after_s']:.0f}"
        return f"{train} s fine-tune ({r['qat'].get('steps')} steps) + {after} s export, conversion, gate"
    if r["variant"] == NNCF_QAT and r.get("nncf_s") is not None:
        return f"{r['nncf_s']:.0f} s quantize, {r['steps']} steps, export (wall)"
    return "—"


def cells(r: dict[str, Any]) -> list[str]:
    if "report" not in r:
        return [r["engine"], r["variant"], r.get("why") or "—", "—", "—", "—", "—", "—", _spent(r)]
    acc = r["report"]
    drop = acc.get("top1_drop_pp")
    top1 = _pct(acc.get("top1")) + _ci(acc.get("top1_ci"))
    if drop is not None and r["variant"] != FP32:
        top1 += f" ({0.0 - drop:+.2f} pp)"
    agreement = _pct(acc.get("agreement")) + _ci(acc.get("agreement_ci"))
    p50, ratio = mi8.speed_cells(r)
    if r["variant"] == FP32:
        floats = "all"
    else:
        names = float_layers(r)
        floats = f"{len(names)} of {r.get('convolutions') or '?'}" + (
            f" ({', '.join(names)})" if 0 < len(names) <= 2 else ""
        )
    gate = "pass" if acc.get("passed") else "fail"
    return [r["engine"], r["variant"], top1, agreement, gate, p50, ratio, floats, _spent(r)]


HEADER = ["engine", "variant", "top-1 on report images [CI] (Δ vs FP32)", "agreement [CI]", "passes gate"]
HEADER += ["p50 ms [min-max]", "p50 / FP32", "layers in float", "time spent"]


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    return lines + ["| " + " | ".join(cells(r)) + " |" for r in rows]


def checks(rows: list[dict[str, Any]], images: dict[str, Any]) -> list[str]:
    """Notes where this script's figures and the builds' should agree and do not: the reference's top-1 on the whole
    split, and a row the build judged on the report images."""
    from bitdeploy.runtimes.bundle import compare

    notes = []
    ref_top1 = compare.top1(images["reference"], images["labels"])
    for r in rows:
        built = r.get("accuracy") or {}
        ref = built.get("reference_top1") if built.get("split") == "val" else None
        if ref is not None and abs(ref - ref_top1) > 1e-9:
            notes.append(f"{r['engine']} {r['variant']}: the build's FP32 top-1 {_pct(ref)}")
        if built.get("split") == "val:report" and "report" in r and built.get("agreement") != r["report"]["agreement"]:
            notes.append(
                f"{r['engine']} {r['variant']}: the build's agreement on the report images "
                f"{_pct(built.get('agreement'))}, here {_pct(r['report']['agreement'])}"
            )
    if notes:
        notes.insert(0, f"figures differ from the builds' (this script's FP32 top-1 on the split: {_pct(ref_top1)})")
    return notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/experiments/qat_vs_ptq.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="a bitdeploy training run (default: train one)")
    p.add_argument("--model", default="m-r50x1")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=150, help="steps of the run trained without --checkpoint")
    p.add_argument("--targets", default="onnx,openvino,litert", help="comma list of onnx, openvino, litert")
    p.add_argument("--min-agreement", type=float, default=99.5, metavar="PCT")
    p.add_argument("--max-accuracy-drop", type=float, default=None, metavar="PP")
    p.add_argument("--qat-steps", type=int, default=None, help="the fine-tune's steps (default: the build's)")
    p.add_argument("--budget", type=int, default=24, help="--int8-search-budget of the search build")
    p.add_argument("--calib-size", type=int, default=300)
    p.add_argument("--calib-method", default=None, help="--calib-method of every build (default: each engine's)")
    p.add_argument("--eval-limit", type=int, default=None, help="validation images (default: all)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    p.add_argument("--queries", type=int, default=20, help="batch-1 calls per model per round")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: each engine's own)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="the builds' stage cache, kept and reused (default: <out>/cache, emptied first so every stage runs)",
    )
    p.add_argument("--no-nncf", action="store_true", help="skip NNCF's QAT anchor")
    p.add_argument("--out", type=Path, default=Path("runs/qat-vs-ptq"))
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = mi8.parse_targets(p, argv)

    from bitdeploy.converters import layers
    from bitdeploy.core.options import GateSpec
    from bitdeploy.runtimes.bundle.fingerprint import host_fingerprint

    started = time.perf_counter()
    out: Path = args.out
    for d in ["logs", "nncf", *FALLBACKS.values()] + ([] if args.cache_dir else ["cache"]):
        shutil.rmtree(out / d, ignore_errors=True)
    if args.checkpoint is not None:
        ckpt, source = args.checkpoint.expanduser(), f"checkpoint {args.checkpoint}"
    else:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
        ckpt = train_checkpoint(args, out / "checkpoint")
        source = f"trained here: {args.train_steps} steps ({out / 'checkpoint'})"
    cache = args.cache_dir.expanduser() if args.cache_dir else out / "cache"
    spec = GateSpec(args.max_accuracy_drop, args.min_agreement)
    builds, qat_lines = run_builds(args, ckpt, cache, out)

    some = next((b for t in args.targets for b in [mi8.read_bundle(out / "uniform", t, "int8")] if b), None)
    if some is None:
        print(f"error: the builds wrote no INT8 bundle; see {out / 'logs'}", file=sys.stderr)
        return 1
    convs = len(layers.conv_layers(mi8.find_export(cache, some[1]["export"]["sha256"])))
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for target in args.targets:
        got, said = mi8.engine_rows(target, out / "uniform", out / "search", {"all": convs})
        rows += [*got, qat_row(target, out / "qat", qat_lines)]
        notes += said
    for r in rows:
        r["convolutions"] = convs
    images = report_images(args, ckpt, spec)

    why_not = nncf_reason(args)
    qat_ov = next((r for r in rows if r["engine"] == "openvino" and r["variant"] == QAT and "qat" in r), None)
    uniform_ov = next((r for r in rows if r["engine"] == "openvino" and r["variant"] == UNIFORM), None)
    if why_not is None and (qat_ov is None or uniform_ov is None):
        why_not = "no bitdeploy QAT row on OpenVINO to match its steps and rate"
    if why_not is None and qat_ov is not None and uniform_ov is not None:
        try:
            anchor = nncf_qat(args, ckpt, images, qat_ov["qat"], uniform_ov["target"], out / "nncf")
            at = rows.index(qat_ov) + 1
            rows.insert(at, anchor)
        except Exception as exc:  # NNCF's own errors: the other rows still print
            why_not = f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc) else ''}"
    gate_on_report(rows, images, spec, args.threads)
    mi8.time_rows(rows, args)

    fp = host_fingerprint()
    cpu = fp["cpu"]
    n_report = len(images["report"])
    print(
        f"\n{args.model} @ {args.resolution} px, {source}; {DATASET} val: figures on {n_report} of "
        f"{len(images['labels'])} images (the report half, stratified, seed {SEED}); calibration {args.calib_size}"
        f"{f' ({args.calib_method})' if args.calib_method else ''}; gate: {spec.describe()} vs FP32 PyTorch; search "
        f"budget {args.budget}; batch 1, {args.threads or 'engine default'} threads, {args.rounds} interleaved "
        f"rounds x {args.queries} calls"
    )
    print(f"CPU class: {cpu['class']} ({cpu['model']})\n")
    for line in table(rows):
        print(line)
    if why_not is not None:
        print(f"\nNNCF QAT anchor: not run ({why_not})")
    notes += checks(rows, images)
    if any(r.get("disturbed") for r in rows):
        notes.append("the machine was busy during some timing rounds: trust the ratios more than the times")
    if args.cache_dir:
        notes.append(f"stage cache {cache} reused: cached stages were read back, their times not measured")
    for n in notes:
        print(f"\nnote: {n}", end="")
    took = time.perf_counter() - started
    print(f"\n\nwhole run {took / 60:.1f} min")
    if args.json is not None:
        found = {"report_images": images["report"].tolist(), "qat_steps": args.qat_steps, "cpu": cpu}
        found.update({"builds": builds, "rows": rows, "nncf_not_run": why_not, "notes": notes})
        mi8.write_json(args, source, spec, found, took)
    return 0


if __name__ == "__main__":
    sys.exit(main())
