"""One optimiser step of the BiT recipe: SGD momentum 0.9, no weight decay, MixUp loss, micro-batch accumulation,
autocast (bf16, or fp16 with loss scaling), channels_last on CUDA, DDP gradient averaging across processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from bitdeploy.core.errors import BitdeployError
from bitdeploy.training.distributed import Context
from bitdeploy.training.feeder import Batch, to_model_input
from bitdeploy.training.fused_ws import use_fused_standardization
from bitdeploy.training.hyperrule import MOMENTUM, WEIGHT_DECAY

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(ctx: Context, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.kind, dtype=AMP_DTYPES[precision])


def is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (
        isinstance(exc, (torch.OutOfMemoryError, MemoryError))
        or "out of memory" in text
        or "can't allocate memory" in text
    )


@contextlib.contextmanager
def oom_hint(ctx: Context, micro: int, crop: int, split: int) -> Iterator[None]:
    """Turn an out-of-memory failure into one line naming the flags that help."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if not is_oom(exc):
            raise
        raise BitdeployError(
            f"out of memory on {ctx.kind} with micro-batches of {micro} images at {crop}px; "
            f"raise --batch-split (e.g. --batch-split {split * 2}, same results) or lower --batch-size"
        ) from exc


class Stepper:
    """Owns the model on its device, the optimiser, the loss scaler and (under torchrun) the DDP wrapper."""

    def __init__(self, model: nn.Module, ctx: Context, precision: str = "fp32", batch_split: int = 1) -> None:
        self.ctx, self.precision, self.split = ctx, precision, batch_split
        self.channels_last = ctx.kind == "cuda"
        use_fused_standardization(model)
        self.model = model.to(  # type: ignore[call-overload]  # Module.to takes memory_format; the stubs omit it
            ctx.device, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format
        )
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.0, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        self.net: nn.Module = self.model
        if ctx.distributed:
            self.net = DistributedDataParallel(
                self.model,
                device_ids=[ctx.local_rank] if ctx.kind == "cuda" else None,
                gradient_as_bucket_view=ctx.kind == "xla",
            )
        if ctx.kind == "cuda":
            torch.backends.cudnn.benchmark = True

    def state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])

    def loss(self, b: Batch, lo: int, hi: int) -> torch.Tensor:
        """MixUp cross-entropy of samples lo..hi: lam * CE(y) + (1 - lam) * CE(partner's y)."""
        dev = self.ctx.device
        x = to_model_input(b.images[lo:hi], dev, self.channels_last)
        if b.partner_images is not None:
            x = b.lam * x + (1.0 - b.lam) * to_model_input(b.partner_images[lo:hi], dev, self.channels_last)
        with autocast(self.ctx, self.precision):
            logits = self.net(x)
        logits = logits.float()
        loss = F.cross_entropy(logits, b.labels[lo:hi].to(dev))
        if b.partner_labels is not None:
            loss = b.lam * loss + (1.0 - b.lam) * F.cross_entropy(logits, b.partner_labels[lo:hi].to(dev))
        return loss

    def step(self, b: Batch, lr: float) -> torch.Tensor:
        """One update from this process's slice `b`; returns its mean loss (detached, still on the device)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.net.train()
        n = len(b.labels)
        micro = n // self.split
        total = torch.zeros((), device=self.ctx.device)
        for k in range(self.split):
            # DDP all-reduces on the last micro-batch only; each micro-batch loss is scaled so the sum is the mean.
            last = k == self.split - 1
            ddp = self.net if isinstance(self.net, DistributedDataParallel) else None
            sync = contextlib.nullcontext() if last or ddp is None else ddp.no_sync()
            with sync:
                loss = self.loss(b, k * micro, (k + 1) * micro)
                self.scaler.scale(loss / self.split).backward()
            total += loss.detach() / self.split
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ctx.kind == "xla":
            import torch_xla.core.xla_model as xm

            xm.mark_step()
        return total
