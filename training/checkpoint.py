"""Training checkpoints: `DIR/checkpoint.pt`, written atomically, readable with `torch.load(weights_only=True)`.

Keys: format, version, model_name, num_classes, labels, resolution, step, model (ResNetV2 state_dict),
optimizer, scaler, rng (torch CPU/CUDA generator states as uint8 tensors), config (what must match to
resume), plan, weights (provenance of the starting weights), images_seen, train_seconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from bitdeploy.core.errors import BitdeployError, WeightsError
from bitdeploy.core.fsutil import temp_name
from bitdeploy.training.weights import CHECKPOINT_FORMAT, CHECKPOINT_NAME, CHECKPOINT_VERSION, read_checkpoint

# Settings that define the run: resuming with any of them changed would silently train something else.
RESUME_KEYS = (
    "model",
    "dataset",
    "dataset_size",
    "labels",
    "shots",
    "seed",
    "weights",
    "steps",
    "schedule",
    "base_lr",
    "batch_size",
    "resize",
    "crop",
    "mixup_alpha",
    "hflip",
    "qat",
    "qat_task_weight",
)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if isinstance(state.get("torch"), torch.Tensor):
        torch.set_rng_state(state["torch"])
    if (
        torch.cuda.is_available()
        and isinstance(state.get("cuda"), list)
        and len(state["cuda"]) == torch.cuda.device_count()
    ):
        torch.cuda.set_rng_state_all(state["cuda"])


def save(out: Path, payload: dict[str, Any]) -> Path:
    """torch.save to a temp file in `out`, fsync, then rename over checkpoint.pt: never half a checkpoint."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    final = out / CHECKPOINT_NAME
    tmp = temp_name(final)
    try:
        with open(tmp, "xb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def clean_stale(out: Path) -> None:
    """Remove temp files a killed run left behind mid-write."""
    for f in out.glob(f".{CHECKPOINT_NAME}.*.tmp"):
        f.unlink(missing_ok=True)


def load_for_resume(out: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint in `out` if there is one and it belongs to this run, else None (fresh start)."""
    file = out / CHECKPOINT_NAME
    if not file.is_file():
        return None
    try:
        _, ck = read_checkpoint(file)
    except WeightsError as exc:
        raise BitdeployError(f"cannot resume: {exc}; delete {file} to start over, or use a new --out") from exc
    if ck.get("model_name") != config["model"]:
        raise BitdeployError(
            f"{file} is a checkpoint of model {ck.get('model_name')!r}, not {config['model']!r}; pass --model {ck.get('model_name')} to resume it, or use a new --out"
        )
    saved = ck.get("config") or {}
    diffs = [f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in RESUME_KEYS if saved.get(k) != config.get(k)]
    if diffs:
        more = f" (+{len(diffs) - 2} more)" if len(diffs) > 2 else ""
        raise BitdeployError(
            f"{out} holds a different run ({'; '.join(diffs[:2])}{more}); rerun the original command to resume it, or use a new --out"
        )
    for key in ("model", "optimizer"):
        if not isinstance(ck.get(key), dict):
            raise BitdeployError(f"{file}: no {key} state to resume from; use a new --out")
    return ck
