"""Training batches that are a pure function of (seed, step): order, crops, flips and MixUp.

Nothing depends on how many batches were drawn before, so a resumed run sees exactly the batches an
uninterrupted run would, and N processes that each take their slice of a global batch see exactly what
one process sees. The sample order is an endless stream of seeded per-epoch permutations (a subset smaller
than the batch simply repeats, like BiT's sampling with replacement for few-shot).
"""

from __future__ import annotations

import random
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from bitdeploy.training.data import ImageSet, resized_images
from bitdeploy.training.hyperrule import mixup_lambda

ORDER_STREAM, AUGMENT_STREAM = 1, 2


@dataclass
class Batch:
    """One process's slice of one global batch: uint8 NHWC images, labels, and the MixUp partners."""

    images: torch.Tensor
    labels: torch.Tensor
    partner_images: torch.Tensor | None
    partner_labels: torch.Tensor | None
    lam: float


class Feeder:
    """Builds augmented batches from a set resized once to the precrop size (kept in memory when it fits)."""

    def __init__(
        self,
        image_set: ImageSet,
        resize: int,
        crop: int,
        seed: int,
        mixup_alpha: float,
        memory_budget: int,
        threads: int = 2,
        hflip: bool = True,
    ) -> None:
        self.set = image_set
        self.resize, self.crop, self.seed, self.alpha, self.hflip = resize, crop, seed, mixup_alpha, hflip
        self.threads = max(1, threads)
        self.labels = image_set.labels
        self.cache: np.ndarray | None = None
        if len(image_set) * resize * resize * 3 <= memory_budget:
            self.cache = resized_images(image_set, resize, threads=self.threads)
        self._perms: dict[int, np.ndarray] = {}
        self._pool = ThreadPoolExecutor(1)
        self._ahead: tuple[tuple[int, int, int, int], Future[Batch]] | None = None

    @property
    def in_memory(self) -> bool:
        return self.cache is not None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, ORDER_STREAM, epoch]).permutation(len(self.labels))
        return self._perms[epoch]

    def global_indices(self, step: int, batch: int) -> np.ndarray:
        """Dataset indices of global batch `step`: positions step*batch .. +batch of the epoch stream."""
        n = len(self.labels)
        pos = np.arange(step * batch, (step + 1) * batch, dtype=np.int64)
        out = np.empty(batch, dtype=np.int64)
        for epoch in np.unique(pos // n):
            sel = pos // n == epoch
            out[sel] = self.permutation(int(epoch))[pos[sel] % n]
        return out

    def _pixels(self, indices: np.ndarray) -> np.ndarray:
        if self.cache is not None:
            return self.cache[indices]
        return resized_images(self.set, self.resize, indices, threads=self.threads)

    def _augment(self, pixels: np.ndarray, offsets: np.ndarray, flips: np.ndarray) -> np.ndarray:
        c = self.crop
        out = np.empty((len(pixels), c, c, 3), dtype=np.uint8)
        for k in range(len(pixels)):
            y, x = offsets[k]
            patch = pixels[k, y : y + c, x : x + c]
            out[k] = patch[:, ::-1] if flips[k] else patch
        return out

    def build(self, step: int, batch: int, lo: int, hi: int) -> Batch:
        """Samples lo..hi (this process's slice) of global batch `step`, augmented."""
        idx = self.global_indices(step, batch)
        rng = np.random.default_rng([self.seed, AUGMENT_STREAM, step])
        span = self.resize - self.crop + 1
        offsets = rng.integers(0, span, size=(batch, 2))
        flips = (rng.random(batch) < 0.5) & self.hflip  # drawn either way, so --no-hflip changes nothing else
        lam = mixup_lambda(self.alpha, random.Random(int(rng.integers(2**62))))
        own = slice(lo, hi)
        images = self._augment(self._pixels(idx[own]), offsets[own], flips[own])
        labels = torch.from_numpy(self.labels[idx[own]])
        if lam >= 1.0:
            return Batch(torch.from_numpy(images), labels, None, None, 1.0)
        # Partners are other members of the same global batch, augmented exactly as they are there.
        perm = rng.permutation(batch)[own]
        partner = self._augment(self._pixels(idx[perm]), offsets[perm], flips[perm])
        return Batch(
            torch.from_numpy(images), labels, torch.from_numpy(partner), torch.from_numpy(self.labels[idx[perm]]), lam
        )

    def get(self, step: int, batch: int, lo: int, hi: int, prefetch_next: bool = True) -> Batch:
        """`build`, with the next step's slice prepared in a background thread meanwhile."""
        key = (step, batch, lo, hi)
        if self._ahead is not None and self._ahead[0] == key:
            result = self._ahead[1].result()
        else:
            result = self.build(*key)
        self._ahead = (
            ((step + 1, batch, lo, hi), self._pool.submit(self.build, step + 1, batch, lo, hi))
            if prefetch_next
            else None
        )
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def to_model_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1] on the device (x/127.5 - 1, as the eval transform)."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    x = x.mul_(2.0 / 255.0).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
