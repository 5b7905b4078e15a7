"""`bitdeploy engine`: build a ready TensorRT bundle's engine on the device, self-test it there and reseal the bundle."""

from __future__ import annotations

from pathlib import Path

import click

from bitdeploy.cli import groups


@click.command("engine")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the resealed bundle goes [default: in place; a pack is unpacked beside it, model.bitpack -> model/].",
)
@click.option("--device", default=None, metavar="cuda:N", help="The GPU [default: the bundle's, else cuda:0].")
@groups.option(groups.CACHE_DIR)
@click.option("--no-timing-cache", is_flag=True, help="Neither read nor write TensorRT's timing cache.")
def engine(bundle: Path, out: Path | None, device: str | None, cache_dir: Path | None, no_timing_cache: bool) -> None:
    """Build the TensorRT engine of BUNDLE (a directory or a `bitdeploy pack` file) on this machine's GPU.

    A `bitdeploy build --target trt` on a host without TensorRT or an NVIDIA GPU writes a ready bundle: the
    TensorRT-ready ONNX, its golden self-test and the accuracy gate's result on that ONNX. Run this on the device
    (a Jetson, a GPU server): it builds the engine with the recorded batch profile and workspace, reads back the
    precision TensorRT built, runs the golden self-test on the GPU against the build's FP32 logits, records the
    TensorRT version and GPU, and reseals the bundle atomically, valid or not. It also rebuilds the engine of a
    bundle built for another GPU or TensorRT version. Exits 1 with one line without TensorRT or a GPU, or when the
    self-test fails (the bundle is then resealed invalid, saying why).

    \b
    Examples:
      bitdeploy engine runs/trt/trt-int8
      bitdeploy engine trt-int8.bitpack --out /opt/models/bit
    """
    from bitdeploy.builder.engine import build_engine
    from bitdeploy.core.cache import default_root
    from bitdeploy.core.errors import BitdeployError

    timing_cache = None if no_timing_cache else Path(cache_dir or default_root())
    outcome = build_engine(bundle, out, device, timing_cache, log=lambda line: click.echo(line, err=True))
    if not outcome.manifest.valid:
        raise BitdeployError(outcome.line)
    click.echo(outcome.line)
