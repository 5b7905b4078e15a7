"""The steps of a build that do not depend on the target, run once before its rows: dataset, weights or fine-tune,
ONNX export, the FP32 reference logits, calibration data (each cached by `bitdeploy.builder.stages`), and the
PyTorch baselines. What they produce is one `BuildContext` that every row reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitdeploy.builder import plan as build_plan
from bitdeploy.builder.options import BuildOptions
from bitdeploy.builder.plan import RowPlan
from bitdeploy.core.cache import StageCache
from bitdeploy.core.catalog import DEFAULT_RESOLUTION
from bitdeploy.runtimes.bundle.manifest import ModelInfo, WeightsInfo

if TYPE_CHECKING:
    import numpy as np

    from bitdeploy.benchmarks.baseline import QuickBaseline
    from bitdeploy.converters.calibration import CalibrationData
    from bitdeploy.converters.gate import EvalData

EXPORT_FIELDS = ("opset", "max_abs_diff", "nodes", "simplifier", "exporter", "weight_standardization", "sha256")


@dataclass
class BuildContext:
    """The target-independent results every row of a build reads, and the rows' plans."""

    plans: list[RowPlan]  # with the validation split bound where a target asked for it
    onnx: Path  # the folded FP32 export
    export: dict[str, Any]  # the manifest's `export` object
    data: EvalData  # the gate's inputs (validation split, or seeded random inputs)
    label_ids: np.ndarray | None  # `data`'s labels (None for random inputs)
    reference: np.ndarray  # FP32 PyTorch logits on `data`
    labels: list[str]  # class names, in logit order
    resolution: int
    model_info: ModelInfo  # the manifest's `model` record
    dataset: str | None = None  # --dataset; None: the gate compares logits on random inputs
    calibration: CalibrationData | None = None  # INT8 rows only
    training: dict[str, Any] | None = None
    baseline: list[QuickBaseline] | None = None  # PyTorch latencies for the report's speed-up column
    checkpoint: Path | None = None  # the trained checkpoint the weights came from (a QAT distils from it)
    scratch: list[StageCache] = field(default_factory=list)  # uncached conversions' work dirs, removed at the end

    @property
    def row_count(self) -> int:
        return len(self.plans)


def prepare(opts: BuildOptions, plans: list[RowPlan], cache: StageCache, log: Callable[[str], None]) -> BuildContext:
    """Dataset, weights/fine-tune, export, reference logits, calibration, baselines."""
    from bitdeploy.builder import stages
    from bitdeploy.builder.timing import baseline_latency
    from bitdeploy.converters import gate
    from bitdeploy.converters.calibration import ValidationData
    from bitdeploy.core.catalog import WS_EPS, count_params

    splits = None
    if opts.dataset is not None:
        from bitdeploy.training.datasets import load_dataset

        splits = load_dataset(
            opts.dataset, val_split=opts.training.val_split, seed=opts.seed, shots=opts.training.shots
        )
        log(
            f"dataset {opts.dataset}: {len(splits.train)} train / {len(splits.val)} val images, {len(splits.classes)} classes"
        )
    state = stages.resolve_model(opts, splits, cache, log)
    loaded = state.loaded
    resolution = int(opts.resolution or loaded.resolution or DEFAULT_RESOLUTION)
    onnx_path, export_info = stages.export(state, resolution, opts.export.opset, cache)
    log(
        f"ONNX export: {export_info.get('nodes')} nodes, max |diff| vs PyTorch {export_info.get('max_abs_diff', 0):.2e}"
    )

    if splits is not None:
        data = gate.from_image_set(splits.val, resolution, opts.gate.eval_limit, opts.seed, f"{opts.dataset}:val")
    else:
        data = gate.random_inputs(resolution)
    label_ids = data.labels()
    reference = stages.reference(state, data, stages.data_identity(opts), cache)
    building = [p for p in plans if p.skip is None]
    timed_here = [p for p in building if p.deferred is None]  # a ready bundle's engine is timed on the device
    calib = None
    if splits is not None and any(p.precision == "int8" for p in building):
        calib = stages.calibration(opts, splits, resolution, cache)
    if build_plan.wants_validation(plans) and splits is not None and label_ids is not None:
        import numpy as np

        validation = ValidationData.from_arrays(np.concatenate([x for x, _ in data.batches()]), label_ids)
        plans = build_plan.with_validation(plans, opts, validation)

    weights = {k: loaded.weights_info.get(k) for k in ("kind", "source", "sha256")}
    if state.training:
        weights["fine_tuned"] = state.training
    model_info = ModelInfo(
        name=opts.model,
        num_classes=loaded.num_classes,
        params=count_params(loaded.variant, loaded.num_classes),
        resolution=resolution,
        weights=WeightsInfo.from_dict(weights),
        ws_eps=WS_EPS,
        state_sha256=state.state_sha256,
    )
    return BuildContext(
        plans=plans,
        onnx=onnx_path,
        export={k: export_info.get(k) for k in EXPORT_FIELDS},
        data=data,
        label_ids=label_ids,
        reference=reference,
        labels=state.labels,
        resolution=resolution,
        model_info=model_info,
        dataset=opts.dataset,
        calibration=calib,
        training=state.training,
        checkpoint=state.checkpoint,
        baseline=baseline_latency(loaded.model, resolution, opts, log) if len(building) > 1 and timed_here else None,
    )
