"""Devices and process groups: one process, or several under `torchrun` (CPU/gloo, CUDA/nccl, TPU/xla).

The same `bitdeploy train` command runs alone or as `torchrun --nproc-per-node N --no-python bitdeploy train ...`;
torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK, ...) switch on data parallelism.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from bitdeploy.core.errors import BitdeployError

XLA_HINT = "install the torch_xla build that matches torch (https://github.com/pytorch/xla), or use --device cpu|cuda"


@dataclass
class Context:
    """Where this process trains and which slice of every global batch it owns."""

    device: torch.device
    kind: str  # "cpu" | "cuda" | "xla"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise BitdeployError(
            f"environment variable {name}={value!r} is not an integer; launch with torchrun or unset it"
        ) from None


def resolve_kind(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BitdeployError(
            f"--device cuda: no CUDA device is visible to torch {torch.__version__}; use --device cpu or install a CUDA build of torch"
        )
    if device == "xla":
        try:
            import torch_xla  # noqa: F401
        except ImportError:
            raise BitdeployError(f"--device xla needs torch_xla, which is not installed; {XLA_HINT}") from None
    if device not in ("cpu", "cuda", "xla"):
        raise BitdeployError(f"unknown --device {device!r}; choose cpu, cuda, xla or auto")
    return device


def setup(device: str = "auto") -> Context:
    """Pick the device and, under torchrun, join the process group (gloo on CPU, nccl on CUDA, xla on TPU)."""
    kind = resolve_kind(device)
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise BitdeployError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices; lower torchrun --nproc-per-node"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    elif kind == "xla":
        import torch_xla.core.xla_model as xm

        dev = xm.xla_device()
    else:
        dev = torch.device("cpu")
        # Processes on one machine share its cores; oversubscribing threads slows every rank down.
        if local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized():
        if kind == "xla":
            import torch_xla.distributed.xla_backend  # noqa: F401  registers the "xla" backend

            dist.init_process_group("xla", init_method="xla://")
        else:
            dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return Context(dev, kind, rank, world, local_rank, local_world)


def all_reduce_sum(ctx: Context, values: list[float]) -> list[float]:
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device if ctx.kind != "cpu" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


def broadcast_object(ctx: Context, obj: Any) -> Any:
    """Rank 0's object on every rank (used for resume state, so --out need not be on a shared filesystem)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=ctx.device if ctx.kind == "cuda" else None)
    return box[0]


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def teardown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
