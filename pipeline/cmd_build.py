"""`bitdeploy build`: weights [-> fine-tune] -> ONNX -> bundle(s) for ONNX Runtime, OpenVINO, TensorRT."""

from __future__ import annotations

from pathlib import Path

import click

from bitdeploy import choices
from bitdeploy.converters.openvino_convert import INFERENCE_PRECISIONS
from bitdeploy.converters.ort_convert import INT8_SCHEMES
from bitdeploy.targets import PRECISIONS, TARGETS

CALIB_HELP = "; ".join(
    f"{t.name}: {'|'.join(t.calib_methods)} (default {t.calib_methods[0]})" for t in TARGETS.values()
)
TARGET_HELP = ", ".join(f"{t.name} ({t.title})" for t in TARGETS.values())
DEVICE_HELP = "; ".join(f"{t.name}: {t.devices}" for t in TARGETS.values() if t.devices)


def _precisions(values: tuple[str, ...]) -> list[str] | None:
    out: list[str] = []
    for v in values:
        for p in v.split(","):
            p = p.strip().lower()
            if not p:
                continue
            if p not in PRECISIONS:
                raise click.BadParameter(f"{p!r} is not one of {', '.join(PRECISIONS)}", param_hint="--precision")
            if p not in out:
                out.append(p)
    return out or None


@click.command("build")
@click.option("--model", "model_name", required=True, help="Model name (see `bitdeploy models`), e.g. m-r50x1.")
@click.option(
    "--weights",
    default="auto",
    show_default=True,
    help="auto (official, cached) | none (random init) | PATH (.npz, checkpoint.pt or training dir).",
)
@click.option(
    "--target",
    type=choices.targets_or_all(),
    default="onnx",
    show_default=True,
    help=f"{TARGET_HELP}, or all (every target this machine supports).",
)
@click.option(
    "--precision",
    "precision",
    multiple=True,
    metavar="fp32|fp16|int8",
    help="Repeatable or comma list [default: fp32; with --target all: all three].",
)
@click.option(
    "--resolution",
    type=click.IntRange(16, 2048),
    default=None,
    help="Square input size in px [default: the fine-tune's or checkpoint's, else 128].",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="One bundle: the bundle directory; several: a directory of <target>-<precision> bundles [default: runs/<model>-<target>].",
)
@click.option(
    "--dataset",
    default=None,
    help="digits | ImageFolder dir | CIFAR-10/100 binary: fine-tuning, calibration (train split) and the accuracy gate (val split).",
)
@click.option(
    "--val-split",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Validation fraction where the dataset has no split [default 0.2].",
)
@click.option(
    "--finetune/--no-finetune",
    default=None,
    help="Fine-tune on --dataset first [default: yes unless --weights is a trained checkpoint].",
)
@click.option("--shots", type=click.IntRange(min=1), default=None, help="Fine-tune on K seeded examples per class.")
@click.option(
    "--steps", type=click.IntRange(min=1), default=None, help="Fine-tuning steps [default: the BiT-HyperRule's]."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Fine-tuning batch [default 512].")
@click.option("--lr", type=float, default=None, help="Fine-tuning peak learning rate [default 0.003 x batch/512].")
@click.option(
    "--hflip/--no-hflip",
    default=True,
    show_default=True,
    help="Fine-tuning: random horizontal flips [rule: on]; turn off for digits and text.",
)
@click.option(
    "--train-device", default="auto", show_default=True, help="Where fine-tuning runs: auto | cpu | cuda | xla."
)
@click.option(
    "--calib-size",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    help="INT8 calibration images, drawn (seeded) from the training split.",
)
@click.option("--calib-method", default=None, help=f"INT8 range estimation; {CALIB_HELP}.")
@click.option(
    "--max-accuracy-drop",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Largest top-1 drop vs the FP32 PyTorch model, in percentage points, for a bundle to be valid.",
)
@click.option(
    "--accuracy-control",
    is_flag=True,
    help="OpenVINO INT8: NNCF accuracy-controlled quantization within --max-accuracy-drop.",
)
@click.option("--device", default=None, help=f"Deployment device; {DEVICE_HELP}.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Inference threads for evaluation and timing [default: the runtime's].",
)
@click.option(
    "--int8-scheme",
    type=click.Choice(INT8_SCHEMES),
    default="auto",
    show_default=True,
    help="ONNX Runtime INT8 integer scheme; auto: u8s8-7bit on x86 CPUs (exact with and without VNNI), s8s8 elsewhere.",
)
@click.option(
    "--inference-precision",
    type=click.Choice(INFERENCE_PRECISIONS),
    default="f32",
    show_default=True,
    help="OpenVINO: the precision float layers are validated and pinned in on every device (bf16/f16 only where the device has it).",
)
@click.option(
    "--batch",
    "trt_batch",
    default=None,
    metavar="MIN,OPT,MAX",
    help="TensorRT: dynamic-batch optimisation profile [default 1,1,32].",
)
@click.option(
    "--workspace",
    type=click.FloatRange(min=0.0625),
    default=None,
    metavar="GB",
    help="TensorRT: builder workspace limit in GiB [default 4].",
)
@click.option(
    "--select",
    type=click.Choice(["fastest"]),
    default=None,
    help="Pick the fastest bundle that passed the accuracy gate and mark it in the report.",
)
@click.option(
    "--eval-limit",
    type=click.IntRange(min=1),
    default=None,
    help="Evaluate the gate on a seeded subset of N validation images [default: all].",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seeds fine-tuning, calibration draw and evaluation subset."
)
@click.option("--opset", type=click.IntRange(13, 20), default=17, show_default=True, help="ONNX opset of the export.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Stage cache [default: $BITDEPLOY_CACHE/stages or ~/.cache/bitdeploy/stages].",
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Neither reuse nor store cached stages (export, fine-tune, calibration, conversions).",
)
@click.option("--no-report", is_flag=True, help="Do not time the bundles or write the report.")
@click.option(
    "--bench-iterations",
    type=click.IntRange(min=5),
    default=100,
    show_default=True,
    help="Batch-1 queries timed per bundle for the table (use `bitdeploy bench` for full runs).",
)
@click.pass_context
def build(
    ctx: click.Context,
    model_name: str,
    weights: str,
    target: str,
    precision: tuple[str, ...],
    resolution: int | None,
    out: Path | None,
    dataset: str | None,
    val_split: float | None,
    finetune: bool | None,
    shots: int | None,
    steps: int | None,
    batch_size: int | None,
    lr: float | None,
    train_device: str,
    calib_size: int,
    calib_method: str | None,
    max_accuracy_drop: float,
    accuracy_control: bool,
    device: str | None,
    threads: int | None,
    select: str | None,
    eval_limit: int | None,
    seed: int,
    opset: int,
    cache_dir: Path | None,
    no_cache: bool,
    no_report: bool,
    bench_iterations: int,
    hflip: bool,
    int8_scheme: str,
    inference_precision: str,
    trt_batch: str | None,
    workspace: float | None,
) -> None:
    """Build deployment bundles: weights [-> fine-tune] -> ONNX -> convert -> accuracy gate -> bundle.

    Each bundle is checked against the FP32 PyTorch model: on --dataset's validation split (top-1 drop at most
    --max-accuracy-drop points), else on seeded random inputs (logit tolerance). A bundle that fails is written
    with "valid": false (runtimes refuse it) and the command exits 1. INT8 needs --dataset for calibration.
    Export, fine-tune, calibration and conversions are cached by content: an identical rebuild reuses them.

    \b
    Examples:
      bitdeploy build --model m-r50x1 --weights none --target onnx --resolution 64 --out runs/r50
      bitdeploy build --model m-r50x1 --weights none --dataset digits --resolution 32 --steps 600 \\
          --batch-size 64 --lr 0.1 --target onnx --precision int8 --out runs/digits-int8
      bitdeploy build --model m-r50x1 --weights runs/digits-train --dataset digits --target all --select fastest --out runs/all
    """
    from bitdeploy.build import BuildOptions, run_build

    precisions = _precisions(precision)
    if out is None:
        tail = f"-{precisions[0]}" if precisions and len(precisions) == 1 and target != "all" else ""
        out = Path("runs") / f"{model_name}-{target}{tail}"
    debug = bool((ctx.find_root().obj or {}).get("debug"))
    opts = BuildOptions(
        model=model_name,
        out=out,
        weights=weights,
        target=target,
        precisions=precisions,
        resolution=resolution,
        dataset=dataset,
        val_split=val_split,
        shots=shots,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        finetune=finetune,
        train_device=train_device,
        hflip=hflip,
        calib_size=calib_size,
        calib_method=calib_method,
        max_accuracy_drop=max_accuracy_drop,
        accuracy_control=accuracy_control,
        device=device,
        threads=threads,
        select=select,
        eval_limit=eval_limit,
        seed=seed,
        opset=opset,
        cache_dir=cache_dir,
        cache=not no_cache,
        report=not no_report,
        bench_iterations=bench_iterations,
        debug=debug,
        int8_scheme=int8_scheme,
        inference_precision=inference_precision,
        trt_batch=trt_batch,
        trt_workspace_gb=workspace,
    )
    run_build(opts, log=lambda msg: click.echo(msg, err=True), show=click.echo)
