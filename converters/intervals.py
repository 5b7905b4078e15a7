"""Confidence intervals for the gate's figures: the same images are scored, so one image in n moves a figure by
100/n percentage points and every figure carries its interval.

- a proportion (top-1, top-1 agreement with FP32): the Wilson score interval (Wilson 1927; Newcombe 1998a, method 3);
- the top-1 drop against FP32, a difference of two proportions measured on the same images: Newcombe's hybrid
  score interval for paired data (Newcombe 1998b, "Improved confidence intervals for the difference between
  binomial proportions based on paired data", Stat. Med. 17:2635-2650, method 10): each top-1's Wilson interval,
  combined with the correlation of the pairs (its phi, with Newcombe's n/2 correction), as in Fagerland, Lydersen &
  Laake (2017), "Statistical Analysis of Contingency Tables", ch. 8 (the "Newcombe square-and-add" interval).

It reads only the discordant pairs and the margins: b images the FP32 model gets right and the artifact wrong, c the
reverse, of n. Stdlib only (`statistics.NormalDist` for the normal quantile).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

DEFAULT_LEVEL = 0.95


def z_value(level: float = DEFAULT_LEVEL) -> float:
    """The two-sided normal quantile of a confidence level (1.959964 for 0.95)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"a confidence level is in (0, 1) (got {level})")
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def wilson(k: int, n: int, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials, as fractions (n must be > 0)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"a proportion needs 0 <= k <= n and n > 0 (got {k}/{n})")
    z = z_value(level)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def paired_counts(first: np.ndarray, second: np.ndarray) -> tuple[int, int, int, int]:
    """(a, b, c, d) of two boolean outcomes on the same items: both true, only the first, only the second, neither."""
    x, y = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    return int(np.sum(x & y)), int(np.sum(x & ~y)), int(np.sum(~x & y)), int(np.sum(~x & ~y))


def paired_difference(a: int, b: int, c: int, d: int, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Newcombe's method 10 interval for p1 - p2 = (b - c) / n, where p1 = (a + b) / n and p2 = (a + c) / n are two
    proportions measured on the same n = a + b + c + d items (fractions, within [-1, 1])."""
    n = a + b + c + d
    if n <= 0 or min(a, b, c, d) < 0:
        raise ValueError(f"a paired table needs non-negative counts and n > 0 (got {a}, {b}, {c}, {d})")
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, level)
    l2, u2 = wilson(a + c, n, level)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = 0.0
    if margins:
        cross = a * d - b * c
        corrected = cross - n / 2 if cross > n / 2 else 0.0 if cross >= 0 else cross  # Newcombe's correction
        phi = corrected / math.sqrt(margins)
    diff = p1 - p2
    below = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    above = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return max(-1.0, diff - math.sqrt(max(below, 0.0))), min(1.0, diff + math.sqrt(max(above, 0.0)))
