"""The INT8 search's images: a seeded split of the validation set, stratified by label, into the search's images
(ranking and choosing) and the report's (the shipped bundle's gate verdict and every figure shown), made only when a
search runs; and the search's continuous measure (KL divergence from FP32).

Sizes: the report set gets at least half the images and at least what the gate needs to mean something (the images
at which it allows one disagreement, or a one-image drop: 200 for 99.5 % agreement, 100 for a 1 pp drop); the search
set the rest, at least `MIN_SEARCH_IMAGES`. Fewer images than both need: no search, and one line says what would do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from bitdeploy.builder.gate import Evaluated
from bitdeploy.builder.prepare import BuildContext
from bitdeploy.converters import gate as gates
from bitdeploy.core.options import GateSpec
from bitdeploy.runtimes.bundle.manifest import GateResult

MIN_SEARCH_IMAGES = 100  # the KL ranking still holds across draws there (docs/building.md, the INT8 search)
REPORT_SHARE = 0.5  # the report set's least share of the validation images
SEARCH_CONFIDENCE = 0.6  # the search's own verdict: the gate met at this two-sided level's bounds (80 % one-sided)


def gate_images(spec: GateSpec) -> int:
    """The fewest images on which the gate allows one disagreement (agreement) or a one-image drop (drop): below
    that it demands perfection, whatever it says. A drop allowance of 0 asks that anyway, so it needs no size."""
    need = 1
    if spec.min_agreement_pct is not None and spec.min_agreement_pct < 100:
        need = max(need, math.ceil(100.0 / (100.0 - spec.min_agreement_pct) - 1e-9))
    allowance = spec.drop_allowance
    if allowance is not None and allowance > 0:
        need = max(need, math.ceil(100.0 / allowance - 1e-9))
    return need


@dataclass(frozen=True)
class Part:
    """One role's images: their indices into the validation set and a context whose data, reference and labels
    are those images only (the gate, the bundle's self-test and the search read it as they read the build's)."""

    name: str  # "search" | "report"
    idx: np.ndarray
    ctx: BuildContext

    @property
    def size(self) -> int:
        return len(self.idx)


@dataclass(frozen=True)
class Split:
    search: Part
    report: Part
    total: int
    seed: int

    def describe(self) -> str:
        return f"validation split stratified by label, seed {self.seed}"


def stratified(labels: np.ndarray, n_report: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(search, report) indices, disjoint, sorted: within each label in a seeded order, every image whose share of
    the report quota crosses an integer goes to the report set, so each label is split in the same proportion."""
    order = np.random.default_rng(seed).permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]  # grouped by label, seeded within each
    i = np.arange(len(order))
    to_report = np.floor((i + 1) * n_report / len(order)) > np.floor(i * n_report / len(order))
    return np.sort(order[~to_report]), np.sort(order[to_report])


def sizes(total: int, spec: GateSpec) -> tuple[int, int] | str:
    """(search, report) sizes for `total` validation images, or the line saying they are too few."""
    need = gate_images(spec)
    report = max(math.ceil(total * REPORT_SHARE), need)
    if total - report >= MIN_SEARCH_IMAGES:
        return total - report, report
    enough = max(need, MIN_SEARCH_IMAGES) + MIN_SEARCH_IMAGES
    return (
        f"the {total} validation images are too few to search on some and report on the others: the gate "
        f"({spec.describe()}) needs {need} report images to allow one disagreement and the search "
        f"{MIN_SEARCH_IMAGES}; {enough} would do (a larger --val-split or --eval-limit), or build FP32, fp16 or bf16"
    )


def split(ctx: BuildContext, spec: GateSpec, seed: int) -> Split | str:
    """The validation set split into the search's and the report's images, or the line why it cannot be."""
    labels = ctx.label_ids
    if labels is None:
        return "the search needs a labelled validation split"
    counts = sizes(len(labels), spec)
    if isinstance(counts, str):
        return counts
    search_idx, report_idx = stratified(labels, counts[1], seed)
    return Split(
        Part("search", search_idx, subset(ctx, search_idx, "search")),
        Part("report", report_idx, subset(ctx, report_idx, "report")),
        len(labels),
        seed,
    )


def subset(ctx: BuildContext, idx: np.ndarray, role: str) -> BuildContext:
    """The context with only the images `idx` of its validation data (their inputs, FP32 logits and labels)."""
    data, labels = ctx.data, ctx.label_ids
    picked = labels[idx] if labels is not None else None
    chosen = None
    if data.samples * 3 * data.resolution**2 * 4 <= gates.MEMO_BYTES:  # kept in memory, as the gate keeps it
        chosen = np.concatenate([x for x, _ in data.batches()])[idx] if data.samples else None

    def make(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray | None]:
        if chosen is not None:
            x = chosen[lo:hi]
        else:  # too large to hold: each image preprocessed again, as the gate does then
            x = np.concatenate([data.make(int(i), int(i) + 1)[0] for i in idx[lo:hi]])
        return x, (picked[lo:hi] if picked is not None else None)

    source = f"{data.source} ({role} set: {len(idx)} of {data.samples})"
    part = gates.EvalData(len(idx), data.resolution, source, make, labelled=data.labelled)
    return replace(ctx, data=part, reference=ctx.reference[idx], label_ids=picked)


def judge(found: Evaluated, part: Part, spec: GateSpec) -> Evaluated:
    """A candidate evaluated on the whole validation set, judged on one part's images (its logits sliced): the
    gate's own verdict on the report's, the search's (`holds`) on the search's."""
    return verdict(replace(found, logits=found.logits[part.idx]), part, spec)


def verdict(found: Evaluated, part: Part, spec: GateSpec) -> Evaluated:
    """A candidate whose logits are on one part's images, judged there (the search's part: `holds`)."""
    ctx = part.ctx
    assert ctx.label_ids is not None
    searching = part.name == "search"
    used = replace(spec, confidence=max(spec.confidence or 0.0, SEARCH_CONFIDENCE)) if searching else spec
    result = gates.gate(found.logits, ctx.reference, ctx.label_ids, used)
    result = replace(result, dataset=found.result.dataset, evaluated_with=found.result.evaluated_with)
    if searching:
        result = replace(result, passed=holds(result, spec))
    return replace(found, result=replace(result, split=role_split(part.name)))


def holds(result: GateResult, spec: GateSpec) -> bool:
    """The search's verdict on its own images: the gate met with a margin, by the one-sided bounds of agreement and
    of the drop at `SEARCH_CONFIDENCE` (or --gate-confidence, when higher), not their points, so the mix it stops at
    is not one lucky image over the line. A drop allowance of 0 is judged on its point: no bound can meet it."""
    drop_ci = result.top1_drop_ci_pp if (spec.drop_allowance or 0.0) > 0 else None
    level = replace(spec, confidence=max(spec.confidence or 0.0, SEARCH_CONFIDENCE))
    finite = result.max_abs_logit_diff is not None
    return finite and level.passes(result.top1_drop_pp or 0.0, result.agreement, drop_ci, result.agreement_ci)


def role_split(role: str) -> str:
    """The manifest's `accuracy.split` of figures on one role's images: "val:search" or "val:report"."""
    return f"val:{role}"


def kl(logits: np.ndarray, reference: np.ndarray) -> float:
    """Mean KL divergence (nats) of the candidate's softmax from FP32's, over the images: continuous, and no single
    image moves it by more than its own share."""
    if not len(logits):
        return 0.0
    ref = reference.astype(np.float64)
    got = logits.astype(np.float64)
    log_p = ref - np.logaddexp.reduce(ref, axis=1, keepdims=True)
    log_q = got - np.logaddexp.reduce(got, axis=1, keepdims=True)
    value = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))
    return value if math.isfinite(value) else math.inf
