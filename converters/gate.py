"""The accuracy gate: an artifact's logits against the FP32 PyTorch reference, on the validation split.

With a dataset, the gate is task accuracy (tensor tolerances are for debugging): top-1 of
both, top-1 agreement, max/mean abs logit difference; the build fails when the top-1 drop exceeds
`--max-accuracy-drop` percentage points. Each figure carries its interval (`converters.intervals`: Wilson for
top-1 and agreement, Newcombe's paired interval for the drop), at 95 % or `--gate-confidence`, with which the gate
judges the bounds instead of the points. Without a dataset there is no accuracy to gate, so the artifact is
compared with the reference on seeded random inputs in [-1, 1] against a logit tolerance per precision,
and the manifest says so (`accuracy: null`, a `validation` object instead).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitdeploy.converters import intervals
from bitdeploy.core.options import DEFAULT_MAX_DROP_PP, GateSpec
from bitdeploy.runtimes.bundle import compare
from bitdeploy.runtimes.bundle.manifest import GateResult

# Without labels: allowed max |logit difference| / max(1, max |reference logit|), per precision.
RANDOM_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-1, "int8": 2.5e-1}  # fp16 covers bf16 compute (OpenVINO CPU)
RANDOM_SAMPLES = 32
RANDOM_SEED = 0
MEMO_BYTES = 512 << 20  # preprocessed validation inputs up to this size are kept in memory between passes


@dataclass
class EvalData:
    """Inputs for the gate, produced in chunks (labels None for random inputs).

    make(lo, hi) -> (float32 NCHW inputs, int64 labels or None) for samples lo..hi-1.
    """

    samples: int
    resolution: int
    source: str
    make: Callable[[int, int], tuple[np.ndarray, np.ndarray | None]]
    labelled: bool = True
    _memo: list[tuple[np.ndarray, np.ndarray | None]] | None = field(default=None, repr=False)

    def batches(self, batch_size: int = 32) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        if self._memo is not None:
            yield from self._memo
            return
        keep = self.samples * 3 * self.resolution**2 * 4 <= MEMO_BYTES
        memo = []
        for lo in range(0, self.samples, batch_size):
            item = self.make(lo, min(lo + batch_size, self.samples))
            if keep:
                memo.append(item)
            yield item
        if keep:
            self._memo = memo

    def labels(self) -> np.ndarray | None:
        if not self.labelled:
            return None
        return (
            np.concatenate([y for _, y in self.batches() if y is not None]) if self.samples else np.zeros(0, np.int64)
        )


def from_image_set(val: Any, resolution: int, limit: int | None = None, seed: int = 0, source: str = "val") -> EvalData:
    """The validation split (a seeded subset of `limit` images when given), preprocessed as at inference."""
    from bitdeploy.training.data import eval_batch

    n = len(val)
    idx = np.arange(n) if limit is None or limit >= n else np.sort(np.random.default_rng(seed).permutation(n)[:limit])

    def make(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray | None]:
        x, y = eval_batch(val, resolution, idx[lo:hi])
        return x, y

    return EvalData(len(idx), resolution, source, make)


def random_inputs(resolution: int, samples: int = RANDOM_SAMPLES, seed: int = RANDOM_SEED) -> EvalData:
    """Seeded uniform [-1, 1] inputs (the normalised input range), for builds without a dataset."""
    data = np.random.default_rng(seed).uniform(-1.0, 1.0, (samples, 3, resolution, resolution)).astype(np.float32)
    return EvalData(
        samples,
        resolution,
        f"{samples} x uniform[-1, 1], seed {seed}",
        lambda lo, hi: (data[lo:hi], None),
        labelled=False,
    )


def run_logits(infer: Callable[[np.ndarray], np.ndarray], data: EvalData, batch_size: int = 32) -> np.ndarray:
    outs = [np.asarray(infer(x), dtype=np.float32) for x, _ in data.batches(batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def torch_logits(model: Any, data: EvalData, batch_size: int = 32) -> np.ndarray:
    """The FP32 PyTorch reference (the model as trained: weight standardisation computed in the forward)."""
    import torch

    model.eval()
    with torch.no_grad():
        return run_logits(lambda x: model(torch.from_numpy(np.ascontiguousarray(x))).float().numpy(), data, batch_size)


def gate(
    logits: np.ndarray, reference: np.ndarray, labels: np.ndarray, spec: GateSpec | float = DEFAULT_MAX_DROP_PP
) -> GateResult:
    """The manifest's `accuracy` record: passed when it meets `spec` (a number: the top-1 drop allowed, in pp), with
    each figure's interval at `spec.level` (`_intervals`); with `spec.confidence` the gate judges their bounds."""
    spec = spec if isinstance(spec, GateSpec) else GateSpec(max_drop_pp=float(spec))
    d = compare.logit_diff(logits, reference)
    top1 = compare.top1(logits, labels) if d.finite else 0.0
    ref_top1 = compare.top1(reference, labels)
    drop = (ref_top1 - top1) * 100.0
    cis = _intervals(logits, reference, labels, spec.level) if d.finite and len(labels) else {}
    return GateResult(
        kind="accuracy",
        passed=bool(d.finite and spec.passes(drop, d.agreement, cis.get("top1_drop_ci_pp"), cis.get("agreement_ci"))),
        **_diff_fields(d),
        top1=top1,
        reference_top1=ref_top1,
        top1_drop_pp=round(drop, 6),
        max_accuracy_drop_pp=spec.drop_allowance,
        min_agreement_pct=spec.min_agreement_pct,
        **cis,
        gate_confidence=spec.confidence,
    )


def _intervals(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray, level: float) -> dict[str, Any]:
    """A GateResult's interval fields: Wilson for top-1 and agreement, Newcombe's paired interval (method 10) for
    the drop, from the images FP32 and the artifact disagree on (`converters.intervals`)."""
    ours, ref = logits.argmax(1), reference.argmax(1)
    n = len(labels)
    a, b, c, d = intervals.paired_counts(ref == labels, ours == labels)
    lo, hi = intervals.paired_difference(a, b, c, d, level)

    def rounded(pair: tuple[float, float], scale: float = 1.0) -> tuple[float, float]:
        return round(pair[0] * scale, 6), round(pair[1] * scale, 6)

    return dict(
        top1_ci=rounded(intervals.wilson(a + c, n, level)),
        reference_top1_ci=rounded(intervals.wilson(a + b, n, level)),
        top1_drop_ci_pp=rounded((lo, hi), 100.0),
        agreement_ci=rounded(intervals.wilson(int(np.sum(ours == ref)), n, level)),
        discordant=(b, c),
        confidence=level,
    )


def _diff_fields(d: compare.LogitDiff) -> dict[str, Any]:
    """A GateResult's logit-comparison fields, from `compare.logit_diff`."""
    return dict(samples=d.samples, agreement=d.agreement, max_abs_logit_diff=d.max_abs, mean_abs_logit_diff=d.mean_abs)


def validate_unlabelled(logits: np.ndarray, reference: np.ndarray, precision: str, source: str) -> GateResult:
    """The manifest's `validation` record for builds without a dataset (no accuracy can be measured)."""
    d = compare.logit_diff(logits, reference)
    scale = max(1.0, float(np.abs(reference).max())) if reference.size else 1.0
    tol = RANDOM_TOLERANCE.get(precision, RANDOM_TOLERANCE["int8"]) * scale
    return GateResult(
        kind="validation",
        passed=bool(d.finite and d.max_abs is not None and d.max_abs <= tol),
        **_diff_fields(d),
        inputs=source,
        tolerance=tol,
        note="no --dataset: compared with the FP32 PyTorch model on random inputs; accuracy not measured",
    )
