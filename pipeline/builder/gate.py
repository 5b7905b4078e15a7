"""The gate: a converted artifact run on the gate's inputs and compared with the FP32 PyTorch reference
(`bitdeploy.converters.gate`). `candidate` converts and evaluates one candidate; a row runs it once, the INT8
search once per mix it tries.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.builder.bundle import draft_manifest
from bitdeploy.builder.convert import convert
from bitdeploy.builder.options import BuildOptions
from bitdeploy.builder.plan import RowPlan
from bitdeploy.builder.prepare import BuildContext
from bitdeploy.converters.base import Artifact
from bitdeploy.core.cache import StageCache
from bitdeploy.core.resources import guarded
from bitdeploy.core.targets import onnx_evaluator
from bitdeploy.runtimes.bundle.manifest import GateResult, Manifest

EVAL_BATCH = 32


@dataclass
class Evaluated:
    """One converted and evaluated candidate: where its files are, what it is, how it did against FP32."""

    work: Path
    artifact: Artifact
    manifest: Manifest  # drafted: invalid until the row records the gate
    result: GateResult
    runs_here: bool  # its own runtime ran it (False: an ONNX stand-in did; it cannot be timed here)
    device: str | None  # the device it ran on, to time it there
    described: dict[str, Any]
    logits: np.ndarray
    float_layers: tuple[str, ...] = ()

    @property
    def model_path(self) -> Path:
        return self.work / self.artifact.model_file


def candidate(
    plan: RowPlan, ctx: BuildContext, opts: BuildOptions, cache: StageCache, float_layers: tuple[str, ...] = ()
) -> Evaluated:
    """Convert (cached) and evaluate one candidate of a row."""
    work, artifact = convert(plan, ctx, cache, float_layers)
    return evaluate(plan, ctx, opts, work, artifact, float_layers)


def evaluate(
    plan: RowPlan,
    ctx: BuildContext,
    opts: BuildOptions,
    work: Path,
    artifact: Artifact,
    float_layers: tuple[str, ...] = (),
) -> Evaluated:
    """Run the artifact (or, where its own runtime cannot run here, its ONNX stand-in on the CPU) on the gate's
    inputs and judge it against the FP32 reference."""
    from bitdeploy.converters import gate
    from bitdeploy.runtimes.engines.base import backend_available, open_backend

    manifest = draft_manifest(artifact, ctx, plan.precision)
    backend_name, model_file, stand_in = artifact.backend, artifact.model_file, None
    if (artifact.target.engine_pending or not backend_available(backend_name)) and artifact.eval_model_file:
        evaluator = onnx_evaluator()
        backend_name, model_file = evaluator.backend, artifact.eval_model_file
        stand_in = f"{artifact.eval_model_file} on {evaluator.title} CPU"
    device = (artifact.target.device or opts.engine.device) if stand_in is None else "cpu"
    with guarded(Path(opts.out), "pass --out DIR", f"{plan.bundle_name} evaluation", "evaluate"):
        backend = open_backend(backend_name, work / model_file, manifest, device=device, threads=opts.engine.threads)
        try:
            logits = gate.run_logits(backend.infer, ctx.data, EVAL_BATCH)
            if ctx.dataset is not None and ctx.label_ids is not None:
                result = gate.gate(logits, ctx.reference, ctx.label_ids, opts.gate.spec())
                result = replace(result, dataset=ctx.dataset, split="val")
            else:
                result = gate.validate_unlabelled(logits, ctx.reference, plan.precision, ctx.data.source)
            described = backend.describe()
            ran = stand_in or f"{backend_name} ({described.get('device')})"
            result = replace(result, evaluated_with=ran)
        finally:
            backend.close()
    return Evaluated(work, artifact, manifest, result, stand_in is None, device, described, logits, float_layers)
