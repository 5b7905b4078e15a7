"""The one comparison of logits: top-k accuracy, top-1 agreement with a reference, and logit error.

The build's accuracy gate, `bitdeploy bench` and a bundle's self-test all judge logits with these functions, so a
figure means the same everywhere. Numpy only (the runtime imports it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def topk(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of rows whose label is among the `k` largest logits (k beyond the classes: every row)."""
    if not len(logits):
        return 0.0
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(1) == labels)) if len(logits) else 0.0


def agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of rows whose top-1 class is the reference's (1.0 for no rows)."""
    return float(np.mean(logits.argmax(1) == reference.argmax(1))) if len(logits) else 1.0


def rel_error(logits: np.ndarray, reference: np.ndarray) -> float:
    """max |logits - reference| / max(1, max |reference|): one number per set (inf when logits are not finite)."""
    if not np.isfinite(logits).all():
        return math.inf
    if not reference.size:
        return 0.0
    scale = max(1.0, float(np.abs(reference).max()))
    return float(np.abs(logits.astype(np.float64) - reference).max()) / scale


@dataclass(frozen=True)
class LogitDiff:
    """How logits differ from a reference; the differences are None when the logits are not finite."""

    samples: int
    agreement: float | None  # None for no rows
    max_abs: float | None
    mean_abs: float | None
    finite: bool


def logit_diff(logits: np.ndarray, reference: np.ndarray) -> LogitDiff:
    if logits.shape != reference.shape:
        raise ValueError(f"logits shape {logits.shape} differs from the reference {reference.shape}")
    finite = bool(np.isfinite(logits).all())
    diff = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
    measured = finite and diff.size > 0
    return LogitDiff(
        samples=int(logits.shape[0]),
        agreement=agreement(logits, reference) if len(logits) else None,
        max_abs=float(diff.max()) if measured else None,
        mean_abs=float(diff.mean()) if measured else None,
        finite=finite,
    )
