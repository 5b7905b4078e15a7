"""The cached, target-independent steps of a build: weights (+ fine-tune), ONNX export, reference logits,
calibration data. Each is keyed by the content that goes into it (see `bitdeploy.core.cache`).

Imported only by `bitdeploy.builder.prepare` once a build has passed its fast checks; torch is imported inside.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bitdeploy.builder.options import BuildOptions
from bitdeploy.core.cache import StageCache, canonical, file_sha256, stage_key
from bitdeploy.core.errors import BitdeployError, DatasetError

if TYPE_CHECKING:
    from bitdeploy.converters.calibration import CalibrationData
    from bitdeploy.converters.gate import EvalData
    from bitdeploy.training.data import Splits

EXPORT_FILE = "model.onnx"


@dataclass
class ModelState:
    loaded: Any  # bitdeploy.training.weights.LoadedModel
    state_sha256: str  # content hash of the weights actually exported
    labels: list[str]
    training: dict[str, Any] | None  # summary of the fine-tune, when one ran
    checkpoint: Path | None = None  # the trained checkpoint the weights came from (a QAT distils from it)


def dataset_fingerprint(spec: str) -> str:
    """A cheap content identity of a dataset SPEC: the built-in name and its library version, a file's sha256,
    or a directory tree's (relative path, size, mtime) list. Editing, adding or removing a file changes it."""
    if spec == "digits":
        from importlib.metadata import version

        return f"digits:sklearn-{version('scikit-learn')}"
    path = Path(spec).expanduser().resolve()
    if path.is_file():
        return f"file:{file_sha256(path)}"
    if not path.is_dir():
        raise DatasetError(
            f"dataset {spec!r} not found; pass `digits`, an ImageFolder directory, or a CIFAR-10/100 binary tarball/folder"
        )
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            st = p.stat()
            h.update(f"{p.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"tree:{h.hexdigest()}"


def weights_identity(weights: str) -> str:
    """What identifies --weights before loading: the file's sha256, a training dir's checkpoint, or the name."""
    if weights in ("auto", "none"):
        return weights
    p = Path(weights).expanduser()
    if p.is_dir() and (p / "checkpoint.pt").is_file():
        p = p / "checkpoint.pt"
    return f"sha256:{file_sha256(p)}" if p.is_file() else f"path:{p.resolve()}"


def state_sha256(model: Any) -> str:
    """sha256 of a model's state_dict (names, dtypes, shapes and bytes): the export's true input."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        a = t.detach().cpu().contiguous().numpy()
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _read_summary(out: Path) -> dict[str, Any]:
    import json

    try:
        return dict(json.loads((out / "summary.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def resolve_model(
    opts: BuildOptions, splits: Splits | None, cache: StageCache, log: Callable[[str], None]
) -> ModelState:
    """Load --weights, fine-tuning on --dataset first when asked (cached by weights, data and settings)."""
    import torch

    from bitdeploy.training.weights import load_model

    training: dict[str, Any] | None = None
    checkpoint: Path | None = None
    if opts.wants_finetune() and opts.dataset is not None:
        from dataclasses import replace

        from bitdeploy.training.trainer import TrainConfig, train

        config = TrainConfig.of(  # the training record by field name, and what the build holds outside it
            opts.training,
            model=opts.model,
            weights=opts.export.weights,
            resolution=opts.resolution,
            seed=opts.seed,
            progress=opts.timing.progress and opts.training.progress,
        )
        key = stage_key(
            "finetune",
            {"weights": weights_identity(config.weights), "dataset": dataset_fingerprint(config.dataset)},
            config.cache_key(),
        )

        def step(out: Path) -> dict[str, Any]:
            log(
                f"fine-tuning {config.model} on {config.dataset} (the BiT-HyperRule; overrides: steps={config.steps}, batch={config.batch_size}, lr={config.lr})"
            )
            from bitdeploy.core.stdio import stdout_to_stderr

            with stdout_to_stderr():  # the trainer's closing line: the build's stdout is its table
                train(replace(config, out=out))
            return _read_summary(out)

        run_dir, summary, _hit = cache.run(
            "finetune", key, step, what=f"fine-tune of {opts.model} on {opts.dataset}", resumable=True
        )
        training = {"dataset": opts.dataset, "cache_key": key}
        training.update(
            {k: summary[k] for k in ("val_top1", "steps", "images_per_second", "train_seconds") if k in summary}
        )
        loaded, checkpoint = load_model(opts.model, weights=str(run_dir)), run_dir
    else:
        torch.manual_seed(opts.seed)  # --weights none is then the same model every time
        loaded = load_model(opts.model, weights=opts.export.weights)
        if loaded.weights_info.get("kind") == "checkpoint":
            checkpoint = Path(opts.export.weights).expanduser()
        if splits is not None and loaded.num_classes != len(splits.classes):
            raise BitdeployError(
                f"the model has {loaded.num_classes} classes but {opts.dataset} has {len(splits.classes)}; "
                "fine-tune on it (--finetune) or pass --weights of a checkpoint trained on it"
            )
    labels = (
        list(splits.classes)
        if splits is not None
        else (list(loaded.labels) if loaded.labels else [str(i) for i in range(loaded.num_classes)])
    )
    if len(labels) != loaded.num_classes:
        labels = [str(i) for i in range(loaded.num_classes)]
    return ModelState(loaded, state_sha256(loaded.model), labels, training, checkpoint)


def export(state: ModelState, resolution: int, opset: int, cache: StageCache) -> tuple[Path, dict[str, Any]]:
    """The folded FP32 ONNX export, checked against PyTorch (cached by the weights' content)."""
    from bitdeploy.converters.onnx_export import export_onnx

    options = {
        "resolution": resolution,
        "opset": opset,
        "model": state.loaded.variant.name,
        "num_classes": state.loaded.num_classes,
    }
    key = stage_key("export", {"model": state.state_sha256}, options)

    def step(out: Path) -> dict[str, Any]:
        info = export_onnx(state.loaded.model, resolution, out / EXPORT_FILE, opset=opset)
        info["files"] = [Path(f).name for f in info.get("files", [])]
        return info

    directory, info, _hit = cache.run("export", key, step, what=f"ONNX export at {resolution} px")
    return directory / EXPORT_FILE, info


def reference(state: ModelState, data: EvalData, data_id: str, cache: StageCache) -> np.ndarray:
    """FP32 PyTorch logits on the gate's inputs (cached by weights and data)."""
    from bitdeploy.converters.gate import torch_logits

    key = stage_key(
        "reference",
        {"model": state.state_sha256, "data": data_id},
        {"resolution": data.resolution, "samples": data.samples},
    )

    def step(out: Path) -> dict[str, Any]:
        logits = torch_logits(state.loaded.model, data)
        np.save(out / "logits.npy", logits, allow_pickle=False)
        return {"samples": int(logits.shape[0]), "source": data.source}

    directory, _meta, _hit = cache.run("reference", key, step, what="FP32 PyTorch reference logits")
    return np.load(directory / "logits.npy", allow_pickle=False)


def calibration(opts: BuildOptions, splits: Splits, resolution: int, cache: StageCache) -> CalibrationData:
    """Seeded calibration samples from the training split, preprocessed as at inference (cached)."""
    from bitdeploy.converters.calibration import CalibrationData, from_image_set

    if opts.dataset is None:
        raise BitdeployError("INT8 calibration needs --dataset")

    options = {
        "resolution": resolution,
        "size": opts.calibration.calib_size,
        "seed": opts.seed,
        "val_split": opts.training.val_split,
        "shots": opts.training.shots,
    }
    key = stage_key("calibration", {"dataset": dataset_fingerprint(opts.dataset)}, options)
    source = f"{opts.dataset}:train"

    def step(out: Path) -> dict[str, Any]:
        data = from_image_set(splits.train, resolution, opts.calibration.calib_size, opts.seed, source)
        data.save(out)
        return {"sha256": data.sha256, "samples": len(data)}

    directory, meta, _hit = cache.run(
        "calibration", key, step, what=f"calibration data ({opts.calibration.calib_size} images)"
    )
    return CalibrationData.load(directory, source, opts.seed, meta["sha256"])


def data_identity(opts: BuildOptions) -> str:
    """Identity of the gate's inputs (dataset content and how the validation subset is drawn)."""
    if opts.dataset is None:
        return "random"
    return canonical(
        {
            "dataset": dataset_fingerprint(opts.dataset),
            "val_split": opts.training.val_split,
            "limit": opts.gate.eval_limit,
            "seed": opts.seed,
        }
    )
