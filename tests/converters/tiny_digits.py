"""A tiny BiT fine-tuned on digits, shared by the converter tests (trained once per test process).

The INT8/FP16 accuracy gates only mean something on a trained model: random weights give near-random
top-1 on both sides. 60 SGD steps on 32 px digits reach ~0.88 validation top-1 in about 20 s on 2 cores.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RESOLUTION = 32


@dataclass
class TinyDigits:
    onnx: Path  # folded FP32 export
    model: Any  # the trained ResNetV2 (eval mode)
    val_x: np.ndarray
    val_y: np.ndarray
    train: Any  # the digits training ImageSet (for calibration)
    reference_top1: float
    reference_logits: np.ndarray


def _train(steps: int, batch: int, seed: int) -> Any:
    import torch

    from bitdeploy.core.catalog import get_variant
    from bitdeploy.training.bit import create_model
    from bitdeploy.training.data import eval_batch
    from bitdeploy.training.datasets import load_dataset

    torch.manual_seed(seed)
    splits = load_dataset("digits")
    x, y = (torch.from_numpy(a) for a in eval_batch(splits.train, RESOLUTION))
    model = create_model(get_variant("tiny"), num_classes=10, zero_head=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), splits


@functools.cache
def tiny_digits(steps: int = 60, batch: int = 32, seed: int = 0) -> TinyDigits:
    import torch

    from bitdeploy.converters.onnx_export import export_onnx
    from bitdeploy.training.data import eval_batch

    model, splits = _train(steps, batch, seed)
    root = Path(tempfile.mkdtemp(prefix="bitdeploy-tiny-digits-"))
    atexit.register(shutil.rmtree, root, True)
    export_onnx(model, RESOLUTION, root / "tiny.onnx")
    vx, vy = eval_batch(splits.val, RESOLUTION)
    with torch.inference_mode():
        logits = model(torch.from_numpy(vx)).numpy()
    top1 = float((logits.argmax(1) == vy).mean())
    return TinyDigits(root / "tiny.onnx", model, vx, vy, splits.train, top1, logits)


@functools.cache
def tiny_export(resolution: int = RESOLUTION, seed: int = 0) -> Path:
    """The folded FP32 export of an untrained tiny BiT (random head, 10 classes): what a converter's contract
    needs, in a few seconds (no training; its logits are not meaningful, only finite)."""
    import torch

    from bitdeploy.converters.onnx_export import export_onnx
    from bitdeploy.core.catalog import get_variant
    from bitdeploy.training.bit import create_model

    torch.manual_seed(seed)
    model = create_model(get_variant("tiny"), num_classes=10).eval()
    root = Path(tempfile.mkdtemp(prefix="bitdeploy-tiny-export-"))
    atexit.register(shutil.rmtree, root, True)
    export_onnx(model, resolution, root / "tiny.onnx")
    return root / "tiny.onnx"
