"""Conversion: the row's converter (`RowPlan.converter`, bound to its target record) run on the build's FP32
export, or its result reused from the stage cache. The INT8 search converts its candidates here too, each keyed
by the float layers it keeps.
"""

from __future__ import annotations

from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

from bitdeploy.builder.plan import RowPlan
from bitdeploy.builder.prepare import BuildContext
from bitdeploy.converters.base import Artifact, ConvertOptions, Uniform
from bitdeploy.core.cache import StageCache, file_sha256, stage_key


def cache_settings(options: ConvertOptions) -> dict[str, Any]:
    """The options that change a conversion's result, for its cache key (data go in as digests)."""
    keyed: dict[str, Any] = {
        f.name: getattr(options, f.name) for f in fields(options) if f.name not in ("cache_dir", "extras")
    }
    if options.extras is not None:
        keyed["extras"] = options.extras.cache_key()
    return keyed


def conversion_key(plan: RowPlan, ctx: BuildContext, float_layers: tuple[str, ...] = ()) -> tuple[str, str]:
    """(stage, key) of the row's conversion keeping `float_layers` in float: what `convert` caches it under."""
    calib = ctx.calibration if plan.precision == "int8" else None
    inputs = {"onnx": file_sha256(ctx.onnx), "calibration": calib.sha256 if calib is not None else "none"}
    stage = f"convert-{plan.bundle_name}"
    settings = {"converter": plan.target.converter, **cache_settings(plan.convert), "float_layers": list(float_layers)}
    return stage, stage_key(stage, inputs, settings)


def convert(
    plan: RowPlan, ctx: BuildContext, cache: StageCache, float_layers: tuple[str, ...] = ()
) -> tuple[Path, Artifact]:
    """Run (or reuse) the row's converter, INT8 keeping `float_layers` in float too; returns (its work dir, Artifact)."""
    calib = ctx.calibration if plan.precision == "int8" else None
    stage, key = conversion_key(plan, ctx, float_layers)
    step = partial(plan.converter().convert, Path(ctx.onnx), calibration=calib, float_layers=tuple(float_layers))
    what = f"{plan.target.title} {plan.precision} conversion"
    if not plan.target.cache_conversions:  # tied to this machine (TensorRT engines): a scratch dir, removed at the end
        cache = StageCache(enabled=False)
        ctx.scratch.append(cache)
    work, meta, _ = cache.run(stage, key, step, what=what)
    return work, Artifact.from_dict(meta)


def revert(
    plan: RowPlan, ctx: BuildContext, cache: StageCache, uniform: tuple[Path, Artifact], float_layers: tuple[str, ...]
) -> tuple[Path, Artifact]:
    """The INT8 search's candidate made from the row's uniform INT8 conversion (`uniform`: its work dir and
    Artifact) by the converter's `revert`: no calibration runs again. Cached under the uniform conversion's key
    and the float layers."""
    stage, key = revert_key(plan, ctx, float_layers)
    converter, (uniform_dir, artifact) = plan.converter(), uniform

    def step(out: Path) -> Artifact:
        source = Uniform(Path(ctx.onnx), uniform_dir, artifact, ctx.calibration)
        return converter.revert(source, out, tuple(float_layers))

    work, meta, _ = cache.run(stage, key, step, what=f"{plan.target.title} INT8 revert")
    return work, Artifact.from_dict(meta)


def revert_key(plan: RowPlan, ctx: BuildContext, float_layers: tuple[str, ...]) -> tuple[str, str]:
    """(stage, key) `revert` caches a candidate under: the uniform conversion's key and the float layers."""
    _, uniform_key = conversion_key(plan, ctx)
    stage = f"revert-{plan.bundle_name}"
    return stage, stage_key(stage, {"uniform": uniform_key}, {"float_layers": sorted(float_layers)})
