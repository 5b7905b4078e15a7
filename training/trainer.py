"""Fine-tuning with the BiT-HyperRule: `train(TrainConfig) -> Path`, the engine behind `bitdeploy train`.

SGD (momentum 0.9, no weight decay) with the rule's warmup and /10 steps, zero-initialised head, random
crop + flip, MixUp for large datasets. One process or many (torchrun, DDP): each process takes its slice of
every global batch and gradients are averaged, so N processes train the same weights as one. Batches are a
pure function of (seed, step) and checkpoints hold the full state, so a killed run resumes exactly.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bitdeploy.core.errors import BitdeployError
from bitdeploy.training import checkpoint, distributed, planner, qat
from bitdeploy.training.data import ImageSet, eval_batch
from bitdeploy.training.feeder import Feeder
from bitdeploy.training.hyperrule import lr_at
from bitdeploy.training.planner import TrainConfig
from bitdeploy.training.qat_params import PARAMS_FILE
from bitdeploy.training.runlog import RunLog, write_summary
from bitdeploy.training.step import Stepper, autocast, oom_hint

__all__ = ["TrainConfig", "evaluate", "train"]


def evaluate(
    model: torch.nn.Module,
    val: ImageSet,
    resolution: int,
    ctx: distributed.Context,
    batch: int = 64,
    precision: str = "fp32",
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1 and mean loss on a validation set with the runtime's eval transform, sharded across processes."""
    model.eval()
    indices = np.arange(ctx.rank, len(val), ctx.world)
    correct, loss_sum = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(indices), batch):
            x, y = eval_batch(val, resolution, indices[start : start + batch])
            xt = (
                torch.from_numpy(x)
                .to(ctx.device)
                .contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            )
            yt = torch.from_numpy(y).to(ctx.device)
            with autocast(ctx, precision):
                logits = model(xt).float()
            correct += float((logits.argmax(1) == yt).sum())
            loss_sum += float(F.cross_entropy(logits, yt, reduction="sum"))
    correct, loss_sum, total = distributed.all_reduce_sum(ctx, [correct, loss_sum, float(len(indices))])
    return {"val_top1": correct / max(total, 1.0), "val_loss": loss_sum / max(total, 1.0), "val_samples": int(total)}


def _build_model(
    config: TrainConfig, classes: list[str], resumed: dict[str, Any] | None
) -> tuple[torch.nn.Module, dict[str, Any], str]:
    from bitdeploy.training.weights import load_model

    if resumed is not None:
        loaded = load_model(config.model, "none", len(classes))
        loaded.model.load_state_dict(resumed["model"])
        return loaded.model, resumed.get("weights", {}), resumed.get("head", "restored")
    torch.manual_seed(config.seed)  # --weights none: the same random init on every rank and every rerun
    loaded = load_model(config.model, config.weights, len(classes))
    model = loaded.model
    if loaded.weights_info.get("kind") == "checkpoint" and loaded.labels == classes:
        head = "kept from the checkpoint (same classes)"
    else:
        model.zero_head()  # BiT-HyperRule: fine-tune from a zero-initialised head
        head = "zero-initialised"
    return model, dict(loaded.weights_info), head


def _qat_stepper(
    config: TrainConfig,
    model: torch.nn.Module,
    splits: Any,
    plan: dict[str, Any],
    ctx: distributed.Context,
    resumed: dict[str, Any] | None,
) -> tuple[Stepper, int]:
    """--qat: the FP32 teacher from --weights, the student `model` with its quantizers (calibrated, or restored
    from the run being resumed) and the distillation step; also how many images calibrated the quantizers."""
    from bitdeploy.training.weights import load_model

    loaded = load_model(config.model, config.weights, len(splits.classes))
    if loaded.labels != splits.classes:
        raise BitdeployError(
            f"--qat distils from {config.weights}, trained on other classes than --dataset {config.dataset}; "
            "pass the dataset that model was fine-tuned on"
        )
    teacher = qat.teacher_of(loaded.model)
    qat.prepare(model)
    calibrated = 0
    if resumed is not None and resumed.get("qat"):
        model.load_state_dict({**resumed["model"], **resumed["qat"]})
        calibrated = int((resumed.get("qat_record") or {}).get("calibrated_images", 0))
    else:
        calibrated = qat.calibrate(model, qat.calibration_batches(splits.train, plan["crop"], config.seed, "cpu"))
    stepper = qat.DistillStepper(
        model, teacher, config.qat_task_weight, ctx=ctx, precision=config.precision, batch_split=config.batch_split
    )
    return stepper, calibrated


def _progress(config: TrainConfig, ctx: distributed.Context, total: int, start: int) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=start,
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.05,
        disable=not (config.progress and ctx.main),
        desc="qat" if config.qat else "train",
    )


def train(config: TrainConfig) -> Path:
    """Fine-tune as configured; returns the output directory (checkpoint.pt, metrics.jsonl, summary.json)."""
    if config.out is None:
        raise BitdeployError("no output directory; pass --out DIR")
    if Path(config.out).exists() and not Path(config.out).is_dir():
        raise BitdeployError(f"--out {config.out} is a file; pass a directory (it is created if missing)")
    config.validate()
    if config.qat:
        config = qat.run_defaults(config)
    started = time.perf_counter()
    ctx = distributed.setup(config.device)
    try:
        return _train(config, Path(config.out or "."), ctx, started)
    finally:
        distributed.teardown(ctx)


def _train(config: TrainConfig, out: Path, ctx: distributed.Context, started: float) -> Path:
    if config.precision == "fp16" and ctx.kind != "cuda":
        raise BitdeployError(
            f"--precision fp16 needs a CUDA device (this run uses {ctx.kind}); use --precision bf16 or fp32"
        )
    splits, hw = planner.describe_dataset(config, verify=True)
    plan = planner.resolve(config, len(splits.train), len(splits.classes), hw, ctx.world)
    identity = {**config.identity(), "dataset_size": len(splits.train), "labels": splits.classes}
    identity.update(
        {k: plan[k] for k in ("steps", "schedule", "base_lr", "batch_size", "resize", "crop", "mixup_alpha", "hflip")}
    )
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.clean_stale(out)
    total, batch, split = plan["steps"], plan["batch_size"], config.batch_split
    resumed = checkpoint.load_for_resume(out, identity) if ctx.main else None
    finished = bool(resumed and resumed["step"] >= total and (out / "summary.json").is_file())
    resumed, finished = distributed.broadcast_object(ctx, (resumed, finished))  # rank 0 decides for all
    start = int(resumed["step"]) if resumed else 0
    log = RunLog(out, ctx.main, start)
    if finished:
        log.say(
            f"{out} already holds a finished run of {total} steps; see {out / 'summary.json'} (use a new --out to train again)"
        )
        return out

    model, weights_info, head = _build_model(config, splits.classes, resumed)
    if config.qat:
        stepper, calibrated = _qat_stepper(config, model, splits, plan, ctx, resumed)
        run_qat = qat.record(config, plan, len(splits.train), calibrated)
    else:
        stepper, run_qat = Stepper(model, ctx, config.precision, split), None
    if resumed:
        stepper.load_state(resumed)
        checkpoint.set_rng_state(resumed.get("rng") or {})
    channels_last = stepper.channels_last

    per_rank = batch // ctx.world
    lo, hi = ctx.rank * per_rank, (ctx.rank + 1) * per_rank
    micro = plan["micro_batch"]
    eval_bs = max(16, min(2 * micro, 256))
    budget = config.cache_mb * (1 << 20) // max(1, ctx.local_world)
    feeder = Feeder(
        splits.train,
        plan["resize"],
        plan["crop"],
        config.seed,
        plan["mixup_alpha"],
        budget,
        config.workers,
        plan["hflip"],
    )
    run_info = {
        "plan": plan,
        "head": head,
        "weights": weights_info,
        "skipped_images": splits.skipped[:20],
        "skipped_count": len(splits.skipped),
    }
    log.start(plan, splits, feeder.in_memory, resumed is not None, config)

    def payload(step: int, images: int, seconds: float) -> dict[str, Any]:
        weights, quantizers = qat.split_state(model)
        return {
            "model_name": config.model,
            "num_classes": len(splits.classes),
            "labels": splits.classes,
            "resolution": plan["crop"],
            "step": step,
            "model": weights,
            **({"qat": quantizers, "qat_record": run_qat} if run_qat is not None else {}),
            **stepper.state(),
            "rng": checkpoint.rng_state(),
            "config": identity,
            "plan": plan,
            "weights": weights_info,
            "head": head,
            "images_seen": images,
            "train_seconds": seconds,
        }

    images_seen = int(resumed.get("images_seen", 0)) if resumed else 0
    train_seconds = float(resumed.get("train_seconds", 0.0)) if resumed else 0.0
    session_images, session_seconds = 0, 0.0
    bar = _progress(config, ctx, total, start)
    window_loss, window_n, window_t0, window_images = torch.zeros((), device=ctx.device), 0, time.perf_counter(), 0
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            lr = lr_at(step, plan["schedule"], plan["base_lr"]) or 0.0
            with oom_hint(ctx, micro, plan["crop"], split):
                window_loss += stepper.step(feeder.get(step, batch, lo, hi, prefetch_next=step + 1 < total), lr)
            done = step + 1
            window_n += 1
            window_images += batch
            dt = time.perf_counter() - t0
            session_seconds += dt
            session_images += batch
            bar.update(1)
            if done % config.log_every == 0 or done == total:
                mean_loss = distributed.all_reduce_sum(ctx, [float(window_loss) / window_n])[0] / ctx.world
                if not np.isfinite(mean_loss):
                    raise BitdeployError(
                        f"the loss became {mean_loss} by step {done}; lower --lr (now {plan['base_lr']:g}) or use --precision fp32"
                    )
                ips = window_images / max(time.perf_counter() - window_t0, 1e-9)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}", refresh=False)
                log.metric(
                    {
                        "step": done,
                        "loss": round(mean_loss, 6),
                        "lr": lr,
                        "images_per_second": round(ips, 2),
                        "elapsed_s": round(train_seconds + session_seconds, 3),
                    }
                )
                window_loss.zero_()
                window_n, window_t0, window_images = 0, time.perf_counter(), 0
            if config.eval_every and done % config.eval_every == 0 and done < total:
                log.metric(
                    {
                        "step": done,
                        **evaluate(model, splits.val, plan["crop"], ctx, eval_bs, config.precision, channels_last),
                    }
                )
                window_t0 = time.perf_counter()
            if ctx.main and (done == total or (config.checkpoint_every and done % config.checkpoint_every == 0)):
                t_ck = time.perf_counter()
                checkpoint.save(out, payload(done, images_seen + session_images, train_seconds + session_seconds))
                window_t0 += time.perf_counter() - t_ck  # keep checkpoint writes out of the images/s figure
    finally:
        bar.close()
        feeder.close()
    all_images, all_seconds = images_seen + session_images, train_seconds + session_seconds
    result = evaluate(model, splits.val, plan["crop"], ctx, eval_bs, config.precision, channels_last)
    if ctx.main and run_qat is not None:
        done_record = {**run_qat, "val_top1_simulated": result["val_top1"], "train_seconds": round(all_seconds, 2)}
        qat.params(model, done_record).save(out / PARAMS_FILE)
    if ctx.main:
        log.metric({"step": total, **result})
        summary = {
            "model": config.model,
            "dataset": splits.name,
            "num_classes": len(splits.classes),
            "labels": splits.classes,
            "steps": total,
            **result,
            "images_per_second": round(all_images / all_seconds, 2) if all_seconds else None,
            "train_seconds": round(all_seconds, 2),
            "wall_seconds": round(time.perf_counter() - started, 2),
            "images_seen": all_images,
            "resumed_from_step": start if resumed else None,
            "world_size": ctx.world,
            "device": str(ctx.device),
            "precision": config.precision,
            "resolution": plan["crop"],
            "train_size": len(splits.train),
            "val_source": splits.val_source,
            **run_info,
            **({"qat": run_qat, "qat_params": PARAMS_FILE} if run_qat is not None else {}),
            "checkpoint": "checkpoint.pt",
        }
        write_summary(out, summary)
        log.say(
            f"val top-1 {result['val_top1']:.4f} ({round(result['val_top1'] * result['val_samples'])}/{result['val_samples']}) after {total} steps -> {out}"
        )
    distributed.barrier(ctx)
    return out
