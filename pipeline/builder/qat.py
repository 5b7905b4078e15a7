"""`--int8-fallback qat|auto`: when no INT8/float mix passes, an INT8 row from a quantization-aware fine-tune.

Once per build (each step a stage-cache entry, so every engine's row shares them): the fine-tune distils from the
build's FP32 checkpoint on the training split (`bitdeploy.training.qat`), its float weights are exported like any
model, and the fine-tune's quantization parameters are written into that export as one Q/DQ model
(`bitdeploy.converters.qat_qdq`). Per row, the target's converter makes its bundle from that model
(`Converter.from_qat`), and the row is gated like every INT8 row against the original FP32 model: on the INT8
search's report images when a search ran first, else on the whole validation split, which the fine-tune never sees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from bitdeploy.builder import search_data
from bitdeploy.builder.gate import Evaluated, evaluate
from bitdeploy.builder.options import BuildOptions
from bitdeploy.builder.plan import RowPlan
from bitdeploy.builder.prepare import BuildContext
from bitdeploy.converters.base import Artifact, QatModel
from bitdeploy.core.cache import StageCache, file_sha256, stage_key
from bitdeploy.core.errors import BitdeployError

QDQ_FILE = "model.qat.onnx"
LABEL = "qat"  # the table's mark: "int8 (qat)"


class NoQat(BitdeployError):
    """The build cannot fine-tune with quantization (the line says why); the row keeps its failed verdict."""


def fine_tune(ctx: BuildContext, opts: BuildOptions, cache: StageCache, log: Callable[[str], None]) -> QatModel:
    """The build's QAT model: fine-tune, export of its float weights, Q/DQ model (each cached)."""
    from bitdeploy.builder import stages
    from bitdeploy.converters.qat_qdq import PARAMS_FILE
    from bitdeploy.core.stdio import stdout_to_stderr
    from bitdeploy.training.planner import TrainConfig
    from bitdeploy.training.qat import RECIPE
    from bitdeploy.training.trainer import train
    from bitdeploy.training.weights import load_model

    if ctx.checkpoint is None or opts.dataset is None:
        raise NoQat(
            "quantization-aware fine-tuning distils from a model trained on --dataset: fine-tune in the build "
            "(--dataset with --finetune) or pass --weights CHECKPOINT"
        )
    config = TrainConfig.of(
        opts.training,
        model=opts.model,
        dataset=opts.dataset,
        weights=str(ctx.checkpoint),
        resolution=ctx.resolution,
        seed=opts.seed,
        steps=opts.gate.qat_steps,
        lr=None,  # a tenth of the FP32 run's (`training.qat.run_defaults`)
        qat=True,
        progress=opts.timing.progress and opts.training.progress,
    )
    key = stage_key(
        "qat",
        {"teacher": stages.weights_identity(config.weights), "dataset": stages.dataset_fingerprint(opts.dataset)},
        {**config.cache_key(), "recipe": RECIPE},
    )

    def step(out: Path) -> dict[str, Any]:
        log(f"quantization-aware fine-tune of {opts.model}, distilled from {ctx.checkpoint} on the training split")
        with stdout_to_stderr():  # the trainer's closing line: the build's stdout is its table
            train(replace(config, out=out))
        return {"params": PARAMS_FILE}

    run_dir, _meta, _hit = cache.run("qat", key, step, what="quantization-aware fine-tune", resumable=True)
    loaded = load_model(opts.model, weights=str(run_dir))
    state = stages.ModelState(loaded, stages.state_sha256(loaded.model), ctx.labels, None, run_dir)
    onnx_fp32, _info = stages.export(state, ctx.resolution, opts.export.opset, cache)
    params = run_dir / PARAMS_FILE
    return QatModel(qdq_model(onnx_fp32, params, cache), onnx_fp32, params, run_dir)


def qdq_model(onnx_fp32: Path, params: Path, cache: StageCache) -> Path:
    """The fine-tune's quantization parameters written into its export (cached by both)."""
    from bitdeploy.converters.qat_qdq import QatParams, write_qdq

    key = stage_key("qat-qdq", {"onnx": file_sha256(onnx_fp32), "params": file_sha256(params)}, {})

    def step(out: Path) -> dict[str, Any]:
        return write_qdq(onnx_fp32, QatParams.load(params), out / QDQ_FILE)

    directory, _meta, _hit = cache.run("qat-qdq", key, step, what="Q/DQ model of the fine-tune")
    return directory / QDQ_FILE


def convert(plan: RowPlan, qat: QatModel, cache: StageCache) -> tuple[Path, Artifact]:
    """The row's bundle files from the QAT model (cached by the Q/DQ model and the row's converter settings)."""
    from bitdeploy.builder.convert import cache_settings

    stage = f"qat-{plan.bundle_name}"
    settings = {"converter": plan.target.converter, **cache_settings(plan.convert)}
    key = stage_key(stage, {"qdq": file_sha256(qat.qdq), "params": file_sha256(qat.params)}, settings)
    converter = plan.converter()
    if not plan.target.cache_conversions:
        cache = StageCache(enabled=False)
    work, meta, _ = cache.run(
        stage, key, lambda out: converter.from_qat(qat, out), what=f"{plan.target.title} QAT bundle"
    )
    return work, Artifact.from_dict(meta)


def row(
    plan: RowPlan, ctx: BuildContext, opts: BuildOptions, cache: StageCache, searched: bool, log: Callable[[str], None]
) -> tuple[Evaluated, BuildContext]:
    """The row's QAT candidate, judged on images neither the search nor the fine-tune chose on; and the context
    whose images it was judged on (its bundle's self-test is drawn from them)."""
    if not plan.converter().takes_qat:
        raise NoQat(f"{plan.target.title} has no route for a quantization-aware fine-tune")
    qat = fine_tune(ctx, opts, cache, log)
    work, artifact = convert(plan, qat, cache)
    found = evaluate(plan, ctx, opts, work, artifact)
    if not searched:
        return found, ctx
    parts = search_data.split(ctx, opts.gate.spec(), opts.seed)
    if isinstance(parts, str):
        return found, ctx
    return search_data.judge(found, parts.report, opts.gate.spec()), parts.report.ctx


def line(found: Evaluated, judged_on: BuildContext) -> str:
    """The one line the build prints for the row's fine-tune."""
    r = found.result
    q = found.artifact.target.quantization
    steps = (q.details.get("qat") or {}).get("steps") if q is not None else None
    verdict = "passes" if r.passed else "fails"
    figures = f"agreement {(r.agreement or 0) * 100:.2f} %, top-1 {(r.top1 or 0) * 100:.2f} %"
    return (
        f"quantization-aware fine-tune ({steps} steps, every convolution INT8) {verdict} the gate on "
        f"{judged_on.data.samples} images it never trained on: {figures}"
    )
