"""One candidate artifact of a (target, precision) row: convert it (or reuse the stage cache), draft its manifest,
and evaluate it against the FP32 reference. `bitdeploy.builder.row` runs this once per row; the INT8 search
(`bitdeploy.builder.int8_search`) once per mix it tries, each keyed by the float layers it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.builder.context import BuildContext, BuildOptions, convert_options
from bitdeploy.builder.output import provenance
from bitdeploy.converters.base import Artifact, ConvertOptions
from bitdeploy.core.cache import StageCache, file_sha256, stage_key
from bitdeploy.core.resources import guarded
from bitdeploy.core.targets import Target, load_converter, onnx_evaluator
from bitdeploy.runtimes.manifest import CalibrationInfo, ExportInfo, GateResult, Manifest

EVAL_BATCH = 32


def _cache_settings(options: ConvertOptions) -> dict[str, Any]:
    """The options that change a conversion's result, for its cache key (data go in as digests)."""
    keyed: dict[str, Any] = {
        f.name: getattr(options, f.name) for f in fields(options) if f.name not in ("cache_dir", "extras")
    }
    if options.extras is not None:
        keyed["extras"] = options.extras.cache_key()
    return keyed


def convert(
    target: Target,
    precision: str,
    ctx: BuildContext,
    opts: BuildOptions,
    cache: StageCache,
    float_layers: tuple[str, ...] = (),
) -> tuple[Path, Artifact]:
    """Run (or reuse) the converter, INT8 keeping `float_layers` in float too; returns (its work dir, Artifact)."""
    options = replace(convert_options(opts, target, precision, ctx.validation), float_layers=float_layers)
    calib = ctx.calibration if precision == "int8" else None
    inputs = {"onnx": file_sha256(ctx.onnx), "calibration": calib.sha256 if calib is not None else "none"}
    key = stage_key(
        f"convert-{target.name}-{precision}", inputs, {"converter": target.converter, **_cache_settings(options)}
    )
    fn = load_converter(target)

    def step(work: Path) -> dict[str, Any]:
        artifact: Artifact = fn(Path(ctx.onnx), work, precision, calib, options)
        return artifact.to_dict()

    if not target.cache_conversions:
        stage_cache = StageCache(enabled=False)
        work, meta, _ = stage_cache.run(
            f"convert-{target.name}-{precision}", key, step, what=f"{target.title} {precision} conversion"
        )
        ctx.scratch.append(stage_cache)
    else:
        work, meta, _ = cache.run(
            f"convert-{target.name}-{precision}", key, step, what=f"{target.title} {precision} conversion"
        )
    return work, Artifact.from_dict(meta)


def evaluate(
    artifact: Artifact, work: Path, manifest: Manifest, ctx: BuildContext, opts: BuildOptions, precision: str
) -> tuple[GateResult, Timeable | None, dict[str, Any], np.ndarray]:
    """(the gate's result, how to time the bundle or None when its own runtime cannot run here, what ran, the
    artifact's logits) for the artifact."""
    from bitdeploy.converters import gate
    from bitdeploy.runtimes.base import backend_available, open_backend

    backend_name, model_file, evaluated = artifact.backend, artifact.model_file, "artifact"
    if not backend_available(backend_name) and artifact.eval_model_file:
        backend_name, model_file, evaluated = (
            onnx_evaluator().backend,
            artifact.eval_model_file,
            f"{artifact.eval_model_file} on {onnx_evaluator().title} CPU",
        )
    device = (artifact.target.device or opts.engine.device) if backend_name == artifact.backend else "cpu"
    backend = open_backend(backend_name, work / model_file, manifest, device=device, threads=opts.engine.threads)
    try:
        logits = gate.run_logits(backend.infer, ctx.data, EVAL_BATCH)
        if ctx.dataset is not None and ctx.label_ids is not None:
            result = gate.gate(logits, ctx.reference, ctx.label_ids, opts.gate.spec())
            result = replace(result, dataset=ctx.dataset, split="val")
        else:
            result = gate.validate_unlabelled(logits, ctx.reference, precision, ctx.data.source)
        ran = evaluated if evaluated != "artifact" else f"{backend_name} ({backend.describe().get('device')})"
        result = replace(result, evaluated_with=ran)
        described = backend.describe()
    finally:
        backend.close()
    return result, Timeable(device, ctx.resolution) if evaluated == "artifact" else None, described, logits


def draft_manifest(artifact: Artifact, ctx: BuildContext, precision: str) -> Manifest:
    """The row's manifest before the gate: invalid until `build_row` records the result."""
    from bitdeploy.runtimes.preprocess import input_spec

    calib = ctx.calibration if precision == "int8" else None
    quantization = artifact.target.quantization
    method = quantization.method if quantization is not None else None
    return Manifest(
        valid=False,
        invalid_reason="not validated yet",
        model=ctx.model_info,
        target=replace(artifact.target, precision=precision),
        model_file=artifact.model_file,
        input=input_spec(ctx.resolution),
        labels=list(ctx.labels),
        export=ExportInfo.from_dict(ctx.export),
        calibration=CalibrationInfo.from_dict(calib.manifest(method)) if calib is not None else None,
        notes=list(artifact.notes),
        provenance=provenance(),
    )


@dataclass(frozen=True)
class Timeable:
    """A built bundle whose own runtime runs here: the device it was evaluated on, to time it there."""

    device: str | None
    resolution: int


@dataclass
class Evaluated:
    """One converted and evaluated candidate: where its files are, what it is, how it did against FP32."""

    work: Path
    artifact: Artifact
    manifest: Manifest  # drafted: invalid until the row records the gate
    result: GateResult
    timeable: Timeable | None
    described: dict[str, Any]
    logits: np.ndarray
    float_layers: tuple[str, ...] = ()


def try_candidate(
    target: Target,
    precision: str,
    ctx: BuildContext,
    opts: BuildOptions,
    cache: StageCache,
    float_layers: tuple[str, ...] = (),
) -> Evaluated:
    """Convert (cached) and evaluate one candidate of a row."""
    work, artifact = convert(target, precision, ctx, opts, cache, float_layers)
    manifest = draft_manifest(artifact, ctx, precision)
    with guarded(Path(opts.out), "pass --out DIR", f"{target.name}-{precision} evaluation", "evaluate"):
        result, timeable, described, logits = evaluate(artifact, work, manifest, ctx, opts, precision)
    return Evaluated(work, artifact, manifest, result, timeable, described, logits, float_layers)
