"""`bitdeploy export-repo`: bundles as a Triton or OpenVINO Model Server model repository."""

from __future__ import annotations

from pathlib import Path

import click

from bitdeploy.cli import groups


@click.command("export-repo")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="BUNDLE...")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["triton", "ovms"]),
    required=True,
    help="triton: config.pbtxt per model; ovms: one config.json.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="The repository directory to write (replaced atomically).",
)
@click.option(
    "--name", "names", multiple=True, help="Model name per BUNDLE, in order (default: each bundle's model name)."
)
@groups.option(groups.varied(groups.MAX_BATCH, help="Triton max_batch_size (capped by a TensorRT profile's maximum)."))
@groups.option(groups.varied(groups.MAX_DELAY_MS, help="Triton dynamic_batching max_queue_delay."))
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def export_repo(
    bundles: tuple[Path, ...],
    fmt: str,
    out: Path,
    names: tuple[str, ...],
    max_batch: int,
    max_delay_ms: float,
    force: bool,
) -> None:
    """Write BUNDLE... (directories or .bitpack files) as a model repository for Triton or OVMS.

    Each bundle is verified, then copied as OUT/NAME/1/<model file>; Triton gets OUT/NAME/config.pbtxt
    and labels.txt (for its classification extension), OVMS gets OUT/config.json. Tensor names stay
    `input` -> `logits`, so clients of `bitdeploy serve`'s FP32 route work unchanged.

    \b
    Example:
      bitdeploy export-repo runs/digits/onnx-fp32 runs/digits/openvino-int8 --name digits-ort --name digits-ov --format triton --out repo
      docker run --rm -p 8000:8000 -v $PWD/repo:/models nvcr.io/nvidia/tritonserver:24.08-py3 tritonserver --model-repository=/models
    """
    from bitdeploy.core.resources import guarded
    from bitdeploy.runtimes.export.model_repo import export_repo as write

    with guarded(out.absolute().parent, "pass --out DIR", "model repository"):
        written = write(list(bundles), fmt, out, list(names) or None, max_batch, round(max_delay_ms * 1000), force)
    for m in written:
        click.echo(f"{m.name}: {m.backend} {', '.join(m.model_files)}")
    click.echo(f"wrote a {fmt} repository of {len(written)} model(s) to {out}")
