"""`bitdeploy export`: one BiT model to a checked, folded, simplified ONNX file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from bitdeploy.cli import groups
from bitdeploy.core.catalog import DEFAULT_RESOLUTION, get_variant


def _progress(message: str) -> None:
    # Only for people watching: scripts and error checks see nothing but the result or the one-line error.
    if sys.stderr.isatty():
        click.echo(message, err=True)


@click.command("export")
@groups.option(groups.MODEL)
@groups.option(groups.WEIGHTS)
@click.option(
    "--resolution",
    type=click.IntRange(16, 2048),
    default=None,
    help=f"Square input size in px [default: the checkpoint's, else {DEFAULT_RESOLUTION}].",
)
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Output .onnx file (written atomically).",
)
@groups.option(
    groups.varied(
        groups.OPSET, help="ONNX opset; 17 keeps GroupNorm as InstanceNormalization, which every backend runs."
    )
)
@click.option(
    "--num-classes",
    type=click.IntRange(min=1),
    default=None,
    help="Head size [default: from the weights]; a different size zero-initialises the head.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the export record as JSON.")
def export(
    model_name: str, weights: str, resolution: int | None, out: Path, opset: int, num_classes: int | None, as_json: bool
) -> None:
    """Export a BiT model to ONNX: input `input` float32 [N,3,R,R] in [-1, 1] (RGB, x/127.5 - 1), output `logits`.

    Weight standardisation is folded into the conv weights; the file is checked against PyTorch on random
    inputs, by onnx.checker and after simplification, before it is written.

    \b
    Example:
      bitdeploy export --model m-r50x1 --weights BiT-M-R50x1.npz --resolution 128 --out m.onnx
    """
    get_variant(model_name)  # an unknown name fails before torch is imported
    from bitdeploy.core.errors import require

    require("torch", "train")
    from bitdeploy.converters.onnx_export import export_onnx
    from bitdeploy.core.resources import guarded
    from bitdeploy.training.weights import load_model

    _progress(f"loading {model_name} weights ({weights})...")
    loaded = load_model(model_name, weights, num_classes=num_classes)
    res = resolution or loaded.resolution or DEFAULT_RESOLUTION
    _progress(f"exporting at {res}x{res}, opset {opset}...")
    with guarded(out.absolute().parent, "pass --out FILE", "ONNX export", "export"):
        info = export_onnx(loaded.model, res, out, opset=opset)
    record = {"model": model_name, "num_classes": loaded.num_classes, "weights": loaded.weights_info, **info}
    if as_json:
        click.echo(json.dumps(record, indent=2, default=str))
        return
    w = loaded.weights_info
    source = w["kind"] if w["kind"] == "none" else f"{w['kind']} {w['source']} (sha256 {str(w['sha256'])[:12]})"
    click.echo(f"exported {model_name} ({loaded.num_classes} classes, {res}x{res}) from {source} -> {out}")
    simp = f" ({info['nodes_before_simplify']} before {info['simplifier']})"
    extra = f" + {info['external_data']}" if info["external_data"] else ""
    click.echo(
        f"  opset {info['opset']}, {info['nodes']} nodes{simp}, {info['size_bytes'] / 1e6:.1f} MB{extra}, dynamic batch"
    )
    click.echo(
        f"  max |onnxruntime - torch| = {info['max_abs_diff']:.2e} on {info['check_inputs']} (allowed {info['tolerance']:.1e})"
    )
