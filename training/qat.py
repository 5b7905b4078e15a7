"""Quantization-aware fine-tuning distilled from the FP32 model: `bitdeploy train --qat` and the build's
`--int8-fallback qat|auto` escalation.

The student is the FP32 fine-tune with fake quantization where bitdeploy's converters quantize, in the scheme every
engine runs as written (`bitdeploy.converters.qat_qdq.SCHEME`): each body convolution's input and output through a
UINT8 per-tensor quantizer, its standardised weight through a per-output-channel symmetric 7-bit one. GroupNorm, the
residual adds and the head stay float. The activation quantizers start from calibrated ranges (the mean of per-batch
min/max, NNCF's mean_minmax) and learn their scale and zero point with the weights (LSQ+); weight scales follow
max |w| per channel. The loss is the KL divergence from the teacher's softmax at temperature `TEMPERATURE` (the gate
measures agreement with the FP32 model), plus `task_weight` x cross-entropy on the labels when asked.

Quantizers hang off each `StdConv2d` as `qat_input` / `qat_output`, so the float weights keep their BiT names: the
checkpoint's `model` is an ordinary BiT state dict (exported like any fine-tune) and `qat` the quantizers' state.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitdeploy.training.bit import StdConv2d
from bitdeploy.training.feeder import Batch, to_model_input
from bitdeploy.training.fused_ws import fused_standardized_weight
from bitdeploy.training.qat_params import SCHEME, WEIGHT_QMAX, ConvQuant, QatParams, TensorQuant
from bitdeploy.training.step import Stepper, autocast

TEMPERATURE = 2.0
STEPS_SHARE = 0.1  # default length: a tenth of the FP32 fine-tune's steps
MIN_STEPS = 20
LR_SHARE = 0.1  # default peak learning rate: a tenth of the FP32 fine-tune's
CALIBRATION_IMAGES = 256
QAT_PREFIX = "qat_"
RECIPE = 2  # bump when the fine-tune computes something else: the build's `qat` stage is keyed by it
STEM = "root.conv"  # reads the preprocessed 8-bit image


class ActQuant(nn.Module):
    """UINT8 per-tensor fake quantization with a learnable scale and zero point (LSQ+), set by `calibrate` first."""

    observed: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.zero_point = nn.Parameter(torch.zeros(1))
        self.register_buffer("observed", torch.zeros(3))  # calibration: sum of batch minima, maxima, batches
        self.calibrating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            d = x.detach().float()
            self.observed += torch.stack(
                [d.amin().clamp(max=0), d.amax().clamp(min=0), torch.ones((), device=d.device)]
            )
            return x
        grad = 1.0 / (x.numel() * 255) ** 0.5
        return torch._fake_quantize_learnable_per_tensor_affine(x, self.scale, self.zero_point, 0, 255, grad)

    def fix_for_pixels(self) -> None:
        """The stem's input: 8-bit pixels as x / 127.5 - 1. The calibrated grid (scale 2/255, zero point 128) puts
        every pixel exactly on a rounding tie, which engines break differently (OpenVINO rounds a third of them the
        other way); scale 1/127 with zero point 127 keeps every pixel at least 0.002 of a step from a tie."""
        with torch.no_grad():
            self.scale.fill_(1.0 / 127.0)
            self.zero_point.fill_(127.0)
        self.scale.requires_grad_(False)
        self.zero_point.requires_grad_(False)

    def settle(self) -> None:
        """Scale and zero point from the calibrated range (a fixed grid keeps its own)."""
        if not self.scale.requires_grad:
            return
        lo, hi, n = (float(v) for v in self.observed)
        lo, hi = lo / max(n, 1.0), hi / max(n, 1.0)
        scale = max((hi - lo) / 255.0, 1e-8)
        with torch.no_grad():
            self.scale.fill_(scale)
            self.zero_point.fill_(float(min(255, max(0, round(-lo / scale)))))

    def quantizer(self) -> TensorQuant:
        zp = int(min(255, max(0, round(float(self.zero_point.detach())))))
        return TensorQuant(abs(float(self.scale.detach())), zp)


def weight_scales(w: torch.Tensor) -> torch.Tensor:
    return (w.detach().abs().amax(dim=(1, 2, 3)) / WEIGHT_QMAX).clamp(min=1e-8)


def quantizers_of(conv: nn.Module) -> tuple[ActQuant, ActQuant]:
    """A prepared convolution's (input, output) quantizers."""
    q_in, q_out = getattr(conv, "qat_input", None), getattr(conv, "qat_output", None)
    if not (isinstance(q_in, ActQuant) and isinstance(q_out, ActQuant)):
        raise TypeError(f"{type(conv).__name__} has no QAT quantizers; call training.qat.prepare first")
    return q_in, q_out


def _forward(self: StdConv2d, x: torch.Tensor) -> torch.Tensor:
    q_in, q_out = quantizers_of(self)
    w = fused_standardized_weight(self)
    if not q_in.calibrating:
        s = weight_scales(w)
        w = torch.fake_quantize_per_channel_affine(
            w, s, torch.zeros_like(s, dtype=torch.int32), 0, -WEIGHT_QMAX, WEIGHT_QMAX
        )
    y = F.conv2d(q_in(x), w, self.bias, self.stride, self.padding, self.dilation, self.groups)
    return q_out(y)


def quantized_convs(model: nn.Module) -> dict[str, StdConv2d]:
    """The convolutions the converters quantize, by layer name: every body and stem conv (the head stays float)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, StdConv2d) and not n.startswith("head")}


def prepare(model: nn.Module) -> nn.Module:
    """Fake quantization on `model`'s quantized convolutions, in place; returns the model."""
    for name, conv in quantized_convs(model).items():
        if not isinstance(getattr(conv, "qat_input", None), ActQuant):
            conv.qat_input = ActQuant()
            conv.qat_output = ActQuant()
            if name == STEM:
                conv.qat_input.fix_for_pixels()
        conv.forward = types.MethodType(_forward, conv)  # type: ignore[method-assign]
    return model


def _quantizers(model: nn.Module) -> list[ActQuant]:
    return [m for m in model.modules() if isinstance(m, ActQuant)]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set every activation quantizer from the mean per-batch range over `batches` (float weights); returns images."""
    quantizers = _quantizers(model)
    for q in quantizers:
        q.observed.zero_()
        q.calibrating = True
    model.eval()
    seen = 0
    try:
        for x in batches:
            model(x)
            seen += len(x)
    finally:
        for q in quantizers:
            q.calibrating = False
    for q in quantizers:
        q.settle()
    return seen


def split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the float BiT state dict, the quantizers' state) of a prepared model."""
    state = model.state_dict()
    qat = {k: v for k, v in state.items() if f".{QAT_PREFIX}" in k}
    return {k: v for k, v in state.items() if k not in qat}, qat


def params(model: nn.Module, record: dict[str, Any]) -> QatParams:
    """Every quantized convolution's parameters as the Q/DQ writer reads them."""
    convs = {}
    for name, conv in quantized_convs(model).items():
        q_in, q_out = quantizers_of(conv)
        convs[name] = ConvQuant(
            q_in.quantizer(), tuple(weight_scales(conv.standardized_weight()).tolist()), q_out.quantizer()
        )
    return QatParams(convs, WEIGHT_QMAX, SCHEME, record)


def teacher_of(model: nn.Module) -> nn.Module:
    """A frozen copy of the FP32 model (taken before `prepare`)."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """KL(teacher || student) of the softmax at `temperature`, scaled by T^2 so its gradient keeps its size."""
    t = temperature
    return (
        F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True, reduction="batchmean")
        * t
        * t
    )


class DistillStepper(Stepper):
    """The trainer's step with the distillation loss (MixUp images are distilled as they come; no label mixing)."""

    def __init__(self, model: nn.Module, teacher: nn.Module, task_weight: float = 0.0, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        prepare(self.model)  # again: the Stepper routed every StdConv2d through the plain fused form
        self.teacher = teacher.to(self.ctx.device)
        self.task_weight = task_weight

    def loss(self, b: Batch, lo: int, hi: int) -> torch.Tensor:
        dev = self.ctx.device
        x = to_model_input(b.images[lo:hi], dev, self.channels_last)
        if b.partner_images is not None:
            x = b.lam * x + (1.0 - b.lam) * to_model_input(b.partner_images[lo:hi], dev, self.channels_last)
        with torch.no_grad(), autocast(self.ctx, self.precision):
            target = self.teacher(x).float()
        with autocast(self.ctx, self.precision):
            logits = self.net(x).float()
        loss = distillation_loss(logits, target)
        if self.task_weight:
            loss = loss + self.task_weight * F.cross_entropy(logits, b.labels[lo:hi].to(dev))
        return loss


@torch.no_grad()
def agreement(model: nn.Module, teacher: nn.Module, x: torch.Tensor, batch: int = 64) -> float:
    """The share of images whose top-1 the fake-quantized student shares with the teacher."""
    model.eval()
    same = 0
    for i in range(0, len(x), batch):
        same += int((model(x[i : i + batch]).argmax(1) == teacher(x[i : i + batch]).argmax(1)).sum())
    return same / max(1, len(x))


def run_defaults(config: Any) -> Any:
    """A `--qat` TrainConfig with what it leaves unset taken from the FP32 run it distils from: the resolution and
    batch size as trained, `STEPS_SHARE` of its steps (at least `MIN_STEPS`) and `LR_SHARE` of its peak rate."""
    from dataclasses import replace
    from pathlib import Path

    from bitdeploy.training.hyperrule import BASE_LR
    from bitdeploy.training.weights import read_checkpoint

    _, ck = read_checkpoint(Path(config.weights).expanduser())
    plan = ck.get("plan") or {}
    steps = config.steps or max(MIN_STEPS, round(STEPS_SHARE * int(plan.get("steps") or 0)))
    return replace(
        config,
        steps=steps,
        lr=config.lr or LR_SHARE * float(plan.get("base_lr") or BASE_LR),
        resolution=config.resolution or plan.get("crop") or ck.get("resolution"),
        batch_size=config.batch_size or plan.get("batch_size"),
    )


def calibration_batches(
    train_set: Any, resolution: int, seed: int, device: Any, batch: int = 32
) -> Iterable[torch.Tensor]:
    """`CALIBRATION_IMAGES` seeded training images with the eval transform (never the validation split)."""
    import numpy as np

    from bitdeploy.training.data import eval_batch

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.permutation(len(train_set))[:CALIBRATION_IMAGES])
    for i in range(0, len(idx), batch):
        yield torch.from_numpy(eval_batch(train_set, resolution, idx[i : i + batch])[0]).to(device)


def record(config: Any, plan: dict[str, Any], train_size: int, calibrated: int) -> dict[str, Any]:
    """What the manifest says of the fine-tune."""
    loss = f"KL divergence from the FP32 teacher's softmax at T={TEMPERATURE:g}"
    if config.qat_task_weight:
        loss += f" + {config.qat_task_weight:g} x cross-entropy on the labels"
    return {
        "steps": plan["steps"],
        "batch_size": plan["batch_size"],
        "base_lr": plan["base_lr"],
        "schedule": plan["schedule"],
        "loss": loss,
        "teacher": str(config.weights),
        "scheme": SCHEME,
        "activation_ranges": f"calibrated on {calibrated} training images (mean per-batch min/max), then learned (LSQ+)",
        "calibrated_images": calibrated,
        "split": "train",
        "train_size": train_size,
    }
