"""Training throughput: bitdeploy's trainer against a plain fp32 eager PyTorch loop, same model, same run.

    python benchmarks/experiments/train_throughput.py [--model m-r50x1] [--resolution 128] [--batch-size 32]

Plain loop, as Google's bit_pytorch/train.py runs it: per-sample PIL resize to the precrop size, random crop,
flip, to tensor, normalise, every step; StdConv2d standardising weights with var_mean; NCHW fp32.
bitdeploy: the trainer's own Feeder (resized once, crops and flips per batch, next batch prepared in a
thread) and Stepper (fused weight standardisation; on CUDA bf16 autocast and channels_last).
Both start from the same weights; rounds alternate A and B so machine-state drift hits both alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from typing import Any

import numpy as np


def plain_batch(
    images: list[np.ndarray], labels: np.ndarray, rng: random.Random, resize: int, crop: int
) -> tuple[Any, Any]:
    import torch
    from PIL import Image

    xs = []
    for arr in images:
        img = Image.fromarray(arr).resize((resize, resize), Image.Resampling.BILINEAR)
        top, left = rng.randint(0, resize - crop), rng.randint(0, resize - crop)
        img = img.crop((left, top, left + crop, top + crop))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        xs.append((t - 0.5) / 0.5)
    return torch.stack(xs), torch.from_numpy(labels)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="m-r50x1")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--resolution", type=int, default=128, help="training crop (precrop keeps the rule's ratio)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and side")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="bitdeploy side; auto = bf16 on CUDA, fp32 on CPU",
    )
    p.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from bitdeploy.training import distributed, hyperrule
    from bitdeploy.training.datasets import load_dataset
    from bitdeploy.training.feeder import Feeder
    from bitdeploy.training.step import Stepper
    from bitdeploy.training.weights import load_model

    ctx = distributed.Context(
        torch.device("cuda" if distributed.resolve_kind(args.device) == "cuda" else "cpu"),
        distributed.resolve_kind(args.device),
    )
    precision = args.precision if args.precision != "auto" else ("bf16" if ctx.kind == "cuda" else "fp32")
    splits = load_dataset(args.dataset)
    rule = hyperrule.get_resolution(splits.train.image_hw())
    crop, resize = args.resolution, hyperrule.resize_for_crop(args.resolution, rule)
    torch.manual_seed(0)
    plain = load_model(args.model, "none", len(splits.classes)).model.to(ctx.device).train()
    ours = Stepper(copy.deepcopy(plain), ctx, precision)
    opt = torch.optim.SGD(plain.parameters(), lr=1e-4, momentum=0.9)
    feeder = Feeder(splits.train, resize, crop, seed=0, mixup_alpha=0.0, memory_budget=4 << 30)
    n, bs = len(splits.train), args.batch_size
    rng = random.Random(0)

    def sync() -> None:
        if ctx.kind == "cuda":
            torch.cuda.synchronize()

    def plain_step(step: int) -> None:
        idx = np.random.default_rng(step).integers(0, n, bs)
        x, y = plain_batch([splits.train.image(int(i)) for i in idx], splits.train.labels[idx], rng, resize, crop)
        loss = F.cross_entropy(plain(x.to(ctx.device)), y.to(ctx.device))
        opt.zero_grad()
        loss.backward()
        opt.step()

    def our_step(step: int) -> None:
        ours.step(feeder.get(step, bs, 0, bs), 1e-4)

    def timed(fn: Any, first: int) -> float:
        sync()
        t = time.perf_counter()
        for s in range(first, first + args.steps):
            fn(s)
        sync()
        return args.steps * bs / (time.perf_counter() - t)

    plain_step(0)
    our_step(0)  # warm-up: allocator, oneDNN/cuDNN algorithm choice
    rows = []
    print(
        f"{args.model} {resize}->{crop}px batch {bs} on {ctx.device} ({torch.get_num_threads()} threads), torch {torch.__version__}; bitdeploy precision {precision}",
        file=sys.stderr,
    )
    print(f"{'round':>5} {'plain fp32 img/s':>17} {'bitdeploy img/s':>16} {'ratio':>6}")
    for r in range(args.rounds):
        a = timed(plain_step, 1 + r * args.steps)
        b = timed(our_step, 1 + r * args.steps)
        rows.append(
            {
                "round": r,
                "plain_images_per_second": round(a, 2),
                "bitdeploy_images_per_second": round(b, 2),
                "ratio": round(b / a, 3),
            }
        )
        print(f"{r:>5} {a:>17.1f} {b:>16.1f} {b / a:>6.2f}")
    feeder.close()
    med = statistics.median(row["ratio"] for row in rows)
    result = {
        "model": args.model,
        "resolution": crop,
        "resize": resize,
        "batch_size": bs,
        "device": str(ctx.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bitdeploy_precision": precision,
        "channels_last": ours.channels_last,
        "rounds": rows,
        "median_ratio": med,
        "plain_images_per_second": statistics.median(row["plain_images_per_second"] for row in rows),
        "bitdeploy_images_per_second": statistics.median(row["bitdeploy_images_per_second"] for row in rows),
    }
    print(
        f"median: plain {result['plain_images_per_second']:.1f} img/s, bitdeploy {result['bitdeploy_images_per_second']:.1f} img/s, ratio {med:.2f}x"
    )
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
