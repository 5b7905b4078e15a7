"""One prepared check of bitdeploy's GPU paths, for the day a GPU machine is lent (about 15 minutes, no pip).

    python benchmarks/experiments/gpu_check.py [--out gpu_check_out] [--model m-r50x1] [--resolution 64]
                                             [--steps 8] [--batch 16] [--rows ROW,...] [--list]

Runs from the source tree with the machine's own torch, onnx and onnxruntime (nothing is installed; a missing
module is named in one line, exit 2; no CUDA GPU: one line, exit 1). The rows:

- finetune-cpu-fp32: the reference, the same `--steps` SGD steps (HyperRule momentum 0.9, lr 0.003) on the CPU;
- finetune-cuda-fp32-ieee / -fp32-default (TF32 convolutions) / -bf16 (autocast): the same steps from the same
  weights and batches on the GPU, loss curve and final logits compared with the reference (tolerances and why:
  `gpu_check_lib.TOLERANCES`, docs/development.md "When a GPU is available");
- train-torchrun-1gpu: `bitdeploy train --device cuda --precision bf16` under torchrun with one process;
- build-onnx-cuda: `bitdeploy build --target onnx --device cuda`, gated as usual (skips without onnxruntime-gpu);
- build-trt-fp16 / build-trt-int8: `bitdeploy build --target trt` (skip with the reason when TensorRT is absent).

Writes OUT/gpu_check.json (every figure) and OUT/gpu_check.md (the table); exit 0 when no row failed. About
3-6 minutes on one data-centre GPU with 16 CPU cores (the CPU reference is the slow part).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import gpu_check_lib as lib  # noqa: E402
import source_tree  # noqa: E402

NEEDED = ("numpy", "torch", "onnx", "onnxruntime", "PIL", "click")
FINETUNES = ("fp32-ieee", "fp32-default", "bf16")
ROWS = (
    "finetune-cpu-fp32",
    *(f"finetune-cuda-{p}" for p in FINETUNES),
    "train-torchrun-1gpu",
    "build-onnx-cuda",
    "build-trt-fp16",
    "build-trt-int8",
    "trt-ready-cuda-ep",
    "engine-trt-ready",
)


def preflight(needed: tuple[str, ...] = NEEDED) -> tuple[int, str] | None:
    """(exit code, the one line) when this machine cannot run the check; None when it can."""
    missing = lib.missing_modules(needed)
    if missing:
        return (
            2,
            f"gpu_check: missing module(s) {', '.join(missing)}; this check installs nothing, run it where they are",
        )
    import torch

    if not torch.cuda.is_available():
        return 1, f"gpu_check: no CUDA GPU visible to torch {torch.__version__}; nothing to check on this machine"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="where the JSON and the summary go")
    p.add_argument("--model", default="m-r50x1")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="fine-tune steps compared with the CPU")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of the rows (see --list)")
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    args = p.parse_args(argv)
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        p.error(f"unknown row {unknown[0]!r}; choose from {', '.join(ROWS)}")
    if args.steps < 1 or args.batch < 1 or args.resolution < 16:
        p.error("--steps and --batch must be >= 1 and --resolution >= 16")
    args.rows = wanted
    return args


def _images(data: Path, split: str, resolution: int) -> tuple[Any, Any]:
    import numpy as np
    import torch
    from PIL import Image

    files = sorted((data / split).glob("*/*.png"))
    size = (resolution, resolution)
    arrays = [np.asarray(Image.open(f).convert("RGB").resize(size, Image.Resampling.BILINEAR)) for f in files]
    labels = [int(f.parent.name.removeprefix("class")) for f in files]
    return torch.from_numpy(np.stack(arrays)), torch.tensor(labels)


def _model(model_name: str, classes: int, device: str, mode: str) -> tuple[Any, Any, Any]:
    """(seeded model with a zero head, as the HyperRule starts, on the device; the device; its autocast)."""
    import torch

    from bitdeploy.core.catalog import get_variant
    from bitdeploy.training.bit import create_model

    torch.manual_seed(0)
    model = create_model(get_variant(model_name), num_classes=classes, zero_head=True)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.allow_tf32 = mode != "fp32-ieee"
        torch.backends.cuda.matmul.allow_tf32 = mode == "fp32-default"
    model = model.to(dev).to(memory_format=torch.channels_last if dev.type == "cuda" else torch.contiguous_format)  # type: ignore[call-overload]
    return model, dev, torch.autocast(dev.type, dtype=torch.bfloat16, enabled=mode == "bf16")


def finetune(
    model_name: str, resolution: int, steps: int, batch: int, device: str, mode: str, data: Path
) -> tuple[list[float], dict[str, Any]]:
    """`steps` SGD steps (momentum 0.9, lr 0.003) from seeded weights on the training images in a fixed order, in
    `mode` (fp32-ieee, fp32-default or bf16): (the loss of each step, the trained weights on the CPU)."""
    import torch

    from bitdeploy.training.feeder import to_model_input

    train_x, train_y = _images(data, "train", resolution)
    model, dev, autocast = _model(model_name, int(train_y.max()) + 1, device, mode)
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
    losses = []
    model.train()
    for step in range(steps):
        idx = order[(torch.arange(batch) + step * batch) % len(order)]
        x = to_model_input(train_x[idx], dev, dev.type == "cuda")
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x).float(), train_y[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, {k: v.detach().cpu() for k, v in model.state_dict().items()}


def logits(model_name: str, weights: dict[str, Any], resolution: int, device: str, mode: str, data: Path) -> Any:
    """The validation images' logits of `weights` (the CPU reference's trained weights, so the device's forward
    numerics are compared on the same model: the trained weights themselves drift apart, as a few steps from
    random weights amplify any rounding difference, even between two fp32 CPU runs in different layouts)."""
    import torch

    from bitdeploy.training.feeder import to_model_input

    val_x, _ = _images(data, "val", resolution)
    model, dev, autocast = _model(model_name, int(weights["head.conv.weight"].shape[0]), device, mode)
    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad(), autocast:
        return model(to_model_input(val_x, dev, dev.type == "cuda")).float().cpu().numpy()


def cli(args: list[str]) -> tuple[int, str]:
    """Run `bitdeploy ARGS` from this source tree in a fresh process: (exit code, its last output lines)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    return done.returncode, "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])


def _timed(name: str, fn: Callable[[], tuple[str, dict[str, Any], str]]) -> lib.Row:
    start = time.perf_counter()
    try:
        status, figures, reason = fn()
    except Exception as exc:  # a row's failure is recorded, the next row runs
        status, figures, reason = "failed", {}, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return lib.Row(name, status, time.perf_counter() - start, figures, reason)


def trt_skip_reason() -> str | None:
    if lib.missing_modules(["tensorrt"]):
        return "TensorRT is not installed (its wheels come only from NVIDIA's index; the lent machines have none)"
    return None


def onnx_cuda_skip_reason() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (onnxruntime-gpu is not installed)"
    return None


def build_row(args: argparse.Namespace, work: Path, target: str, precision: str) -> tuple[str, dict[str, Any], str]:
    out = work / f"build-{target}-{precision}"
    flags = {"--model": args.model, "--weights": "none", "--target": target, "--precision": precision,
             "--device": "cuda", "--resolution": str(args.resolution), "--out": str(out)}  # fmt: skip
    code, tail = cli(["build", *(v for pair in flags.items() for v in pair)])
    bundles = sorted(p.parent for p in out.rglob("manifest.json"))
    if code != 0 or not bundles:
        return "failed", {"exit_code": code}, f"bitdeploy build exited {code}: {tail}"
    figures, why = lib.bundle_figures(bundles[0])
    return ("failed" if why else "passed"), figures, why


def ready_bundle(args: argparse.Namespace, work: Path) -> Path:
    """A TensorRT-ready bundle (built as on a host without TensorRT: the engine is left to the device)."""
    out = work / "trt-ready"
    if not (out / "manifest.json").is_file():
        flags = {"--model": args.model, "--weights": "none", "--target": "trt", "--precision": "fp16",
                 "--resolution": str(args.resolution), "--out": str(out)}  # fmt: skip
        code, tail = cli(["build", *(v for pair in flags.items() for v in pair)])
        if code != 0:
            raise RuntimeError(f"bitdeploy build --target trt exited {code}: {tail}")
    return out


def trt_ready_cuda_row(args: argparse.Namespace, work: Path) -> tuple[str, dict[str, Any], str]:
    """The ready bundle's model.trt.onnx through ONNX Runtime's CUDA provider against its golden FP32 logits: what a
    GPU without TensorRT can check of the TensorRT path."""
    import numpy as np
    import onnxruntime as ort

    from bitdeploy.runtimes.bundle import compare, read_manifest, selftest

    bundle = ready_bundle(args, work)
    manifest = read_manifest(bundle)
    inputs, reference, _ = selftest.load_golden(bundle, manifest)
    onnx = next(f for f in manifest.files if f.endswith(".trt.onnx"))
    session = ort.InferenceSession(str(bundle / onnx), providers=["CUDAExecutionProvider"])
    name = session.get_inputs()[0].name
    z = np.concatenate([session.run(None, {name: inputs[i : i + 8]})[0] for i in range(0, len(inputs), 8)])
    figures = {
        "provider": session.get_providers()[0],
        "engine": (manifest.target.get("engine") or {}).get("status"),
        "agreement": compare.agreement(z, reference),
        "max_rel_error": compare.rel_error(z, reference),
    }
    ok = figures["provider"] == "CUDAExecutionProvider" and figures["agreement"] >= 0.99
    return ("passed" if ok else "failed"), figures, "" if ok else "the CUDA provider disagrees with FP32"


def engine_row(args: argparse.Namespace, work: Path) -> tuple[str, dict[str, Any], str]:
    """`bitdeploy engine` on the ready bundle: the engine built, self-tested on this GPU and the bundle resealed."""
    code, tail = cli(["engine", str(ready_bundle(args, work))])
    return ("passed" if code == 0 else "failed"), {"exit_code": code}, "" if code == 0 else tail


def torchrun_row(args: argparse.Namespace, work: Path, data: Path) -> tuple[str, dict[str, Any], str]:
    out = work / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--standalone",
           str(Path(__file__).resolve()), "--cli", "train", "--model", args.model, "--weights", "none",
           "--dataset", str(data), "--steps", str(args.steps), "--batch-size", str(args.batch), "--resolution",
           str(args.resolution), "--device", "cuda", "--precision", "bf16", "--quiet", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    summary = out / "summary.json"
    if done.returncode != 0 or not summary.is_file():
        tail = " ".join((done.stdout + done.stderr).strip().splitlines()[-2:])
        return "failed", {"exit_code": done.returncode}, f"torchrun exited {done.returncode}: {tail}"
    import json

    s = json.loads(summary.read_text(encoding="utf-8"))
    keys = ("val_top1", "steps", "images_per_second", "world_size", "device", "precision")
    return "passed", {k: s[k] for k in keys if k in s}, ""


def run_rows(args: argparse.Namespace, work: Path) -> list[lib.Row]:
    data = lib.write_image_folder(work / "data", size=max(16, args.resolution))
    rows: list[lib.Row] = []
    reference: dict[str, Any] = {}

    def cpu() -> tuple[str, dict[str, Any], str]:
        reference["losses"], weights = finetune(
            args.model, args.resolution, args.steps, args.batch, "cpu", "fp32-ieee", data
        )
        reference["weights"] = weights
        reference["logits"] = logits(args.model, weights, args.resolution, "cpu", "fp32-ieee", data)
        return "passed", {"losses": [round(v, 6) for v in reference["losses"]]}, ""

    def gpu(mode: str) -> Callable[[], tuple[str, dict[str, Any], str]]:
        def go() -> tuple[str, dict[str, Any], str]:
            if "losses" not in reference:
                return "skipped", {}, "needs finetune-cpu-fp32, which did not run or failed"
            losses, _ = finetune(args.model, args.resolution, args.steps, args.batch, "cuda", mode, data)
            z = logits(args.model, reference["weights"], args.resolution, "cuda", mode, data)
            ok, figures, reason = lib.compare(reference["losses"], losses, reference["logits"], z, lib.TOLERANCES[mode])
            return ("passed" if ok else "failed"), figures, reason

        return go

    def skipped_or(reason: str | None, fn: Callable[[], tuple[str, dict[str, Any], str]]) -> Any:
        return (lambda: ("skipped", {}, reason)) if reason else fn

    plan: dict[str, Callable[[], tuple[str, dict[str, Any], str]]] = {
        "finetune-cpu-fp32": cpu,
        **{f"finetune-cuda-{m}": gpu(m) for m in FINETUNES},
        "train-torchrun-1gpu": lambda: torchrun_row(args, work, data),
        "build-onnx-cuda": skipped_or(onnx_cuda_skip_reason(), lambda: build_row(args, work, "onnx", "fp32")),
        "build-trt-fp16": skipped_or(trt_skip_reason(), lambda: build_row(args, work, "trt", "fp16")),
        "build-trt-int8": skipped_or(trt_skip_reason(), lambda: build_row(args, work, "trt", "int8")),
        "trt-ready-cuda-ep": skipped_or(onnx_cuda_skip_reason(), lambda: trt_ready_cuda_row(args, work)),
        "engine-trt-ready": skipped_or(trt_skip_reason(), lambda: engine_row(args, work)),
    }
    for name in ROWS:
        if name in args.rows:
            rows.append(_timed(name, plan[name]))
            print(f"[gpu_check] {name}: {rows[-1].status} {rows[-1].reason}".rstrip(), flush=True)
    return rows


def environment() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "onnxruntime": ort.__version__,
        "ort_providers": ",".join(ort.get_available_providers()),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    source_tree.install(ROOT)
    if argv[:1] == ["--cli"]:  # one bitdeploy command from this tree (the build rows, torchrun's worker)
        from bitdeploy.cli import main as group

        bitdeploy: Any = group  # a click group
        return int(bitdeploy.main(args=argv[1:], prog_name="bitdeploy", standalone_mode=True) or 0)
    args = parse_args(argv)
    if args.list:
        print("\n".join(ROWS))
        return 0
    refused = preflight()
    if refused is not None:
        print(refused[1], file=sys.stderr)
        return refused[0]
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        rows = run_rows(args, Path(tmp))
    code = 1 if any(r.status == "failed" for r in rows) else 0
    js, md = lib.write_summary(args.out, rows, environment(), code)
    print(md.read_text(encoding="utf-8"))
    print(f"[gpu_check] wrote {js} and {md}")
    return code


if __name__ == "__main__":
    sys.exit(main())
