"""The self-test every bundle carries: a golden set and the criteria the device must meet.

At build time a small set of validation inputs goes into the bundle (`golden.npz`, checksummed like every file)
with the FP32 PyTorch logits for them and, where known, their labels. The pass criteria come from what the
build measured on those same inputs (top-1 agreement with FP32, max relative logit error), widened by a margin
for another CPU class's rounding. `run` repeats the measurement on the device; a bundle whose engine computes
something else there (a saturating INT8 kernel, a bf16 fallback, a broken driver) fails with one line.
Stdlib + numpy; the golden file is read with allow_pickle=False.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.core.errors import BundleError
from bitdeploy.runtimes.bundle import compare
from bitdeploy.runtimes.bundle.manifest import InputSpec, Manifest, SelfTestSpec
from bitdeploy.runtimes.preprocess import mean_std, normalize

GOLDEN_FILE = "golden.npz"
MAX_IMAGES = 64
MIN_IMAGES = 8
MAX_BYTES = 32 << 20  # the golden set stays small beside the model, even at 480 px
# Floor of the allowed relative logit error per precision: what another CPU class's kernels may round differently.
REL_ERROR_FLOOR = {"fp32": 1e-3, "fp16": 2e-2, "int8": 2e-2}
REL_ERROR_MARGIN = 2.0  # allowed = max(floor, margin x what the build host measured)
EXTRA_FLIPS_FRACTION = 0.02  # top-1 flips allowed beyond the build host's: max(1, 2 % of the set)


@dataclass
class SelfTestResult:
    passed: bool
    images: int
    agreement: float
    min_agreement: float
    max_rel_error: float
    allowed_rel_error: float
    golden_top1: float | None
    build_top1: float | None
    failures: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        top1 = "" if self.golden_top1 is None else f", golden top-1 {self.golden_top1 * 100:.1f}%"
        return (
            f"{'PASS' if self.passed else 'FAIL'}: {self.images} golden inputs, top-1 agreement with FP32 {self.agreement * 100:.1f}% "
            f"(needs >= {self.min_agreement * 100:.1f}%), max relative logit error {self.max_rel_error:.3g} (allowed <= {self.allowed_rel_error:.3g}){top1}"
        )


def select(samples: int, resolution: int, seed: int = 0) -> np.ndarray:
    """Which validation samples form the golden set: seeded, at most MAX_IMAGES and MAX_BYTES of float32."""
    fit = MAX_BYTES // (3 * resolution * resolution * 4)
    n = min(samples, MAX_IMAGES, max(MIN_IMAGES, fit))
    return np.sort(np.random.default_rng(seed).permutation(samples)[:n])


def _as_pixels(x: np.ndarray, input_spec: InputSpec | None) -> np.ndarray | None:
    """The uint8 HWC images `x` was normalised from, when `normalize` reproduces `x` exactly (real images)."""
    mean, std = mean_std(input_spec)
    pixels = np.clip(
        np.rint((x.transpose(0, 2, 3, 1) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)) * 255.0), 0, 255
    ).astype(np.uint8)
    return pixels if np.array_equal(normalize(pixels, mean, std), x) else None


def write(
    bundle_dir: Path,
    inputs: np.ndarray,
    reference: np.ndarray,
    labels: np.ndarray | None,
    bundle_logits: np.ndarray,
    precision: str,
    input_spec: InputSpec | None = None,
) -> SelfTestSpec:
    """Write golden.npz into `bundle_dir` and return the manifest's `self_test` record (`input_spec`: the
    manifest's `input`, whose mean/std turn stored pixels back into the exact inputs)."""
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    reference = np.asarray(reference, dtype=np.float32)
    pixels = _as_pixels(inputs, input_spec)
    arrays: dict[str, np.ndarray] = {"reference": reference}
    arrays.update({"pixels": pixels} if pixels is not None else {"inputs": inputs})
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    tmp = bundle_dir / f".{GOLDEN_FILE}.tmp.npz"
    np.savez_compressed(tmp, allow_pickle=False, **arrays)
    tmp.replace(bundle_dir / GOLDEN_FILE)

    n = len(inputs)
    agreement = compare.agreement(bundle_logits, reference)
    matches = round(agreement * n)
    measured = compare.rel_error(bundle_logits, reference)
    flips = max(1, round(EXTRA_FLIPS_FRACTION * n))
    floor = REL_ERROR_FLOOR.get(precision, REL_ERROR_FLOOR["int8"])
    return SelfTestSpec(
        images=n,
        min_agreement=max(0.0, (matches - flips) / n) if n else 0.0,
        max_rel_error=max(floor, REL_ERROR_MARGIN * measured),
        measured_agreement=agreement,
        measured_rel_error=measured,
        measured_top1=compare.top1(bundle_logits, labels) if labels is not None and n else None,
        file=GOLDEN_FILE,
        stored_as="uint8 pixels (exact)" if pixels is not None else "float32 inputs",
        labelled=labels is not None,
        rule=f"agreement >= the build's minus max(1, {EXTRA_FLIPS_FRACTION:.0%}) images; relative error <= max({floor}, {REL_ERROR_MARGIN:g} x the build's)",
    )


def load_golden(bundle_dir: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(float32 NCHW inputs, reference logits, labels or None) of a bundle's golden set."""
    spec = manifest.self_test
    if not spec:
        raise BundleError(
            f"{bundle_dir}: the bundle carries no self-test (built before bitdeploy 0.2); rebuild it to verify it on a device"
        )
    path = Path(bundle_dir) / spec.file
    try:
        with np.load(path, allow_pickle=False) as data:
            inputs = (
                normalize(data["pixels"], *mean_std(manifest.input))
                if "pixels" in data
                else np.asarray(data["inputs"], np.float32)
            )
            reference = np.asarray(data["reference"], np.float32)
            labels = np.asarray(data["labels"], np.int64) if "labels" in data else None
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"{path}: unreadable golden set ({exc}); rebuild the bundle") from exc
    if len(inputs) != len(reference) or (labels is not None and len(labels) != len(inputs)):
        raise BundleError(f"{path}: golden inputs, logits and labels differ in length; rebuild the bundle")
    return inputs, reference, labels


def run(
    infer: Callable[[np.ndarray], np.ndarray],
    bundle_dir: Path,
    manifest: Manifest,
    batch_size: int = 8,
) -> SelfTestResult:
    """Run the golden set through `infer` and judge it by the manifest's criteria."""
    inputs, reference, labels = load_golden(bundle_dir, manifest)
    spec = manifest.self_test
    assert spec is not None  # load_golden refuses a bundle without one
    outs = [np.asarray(infer(inputs[i : i + batch_size]), np.float32) for i in range(0, len(inputs), batch_size)]
    logits = np.concatenate(outs) if outs else np.zeros_like(reference)
    if logits.shape != reference.shape:
        raise BundleError(
            f"{bundle_dir}: the engine returned logits of shape {logits.shape}, the golden set expects {reference.shape}; rebuild the bundle"
        )
    agreement = compare.agreement(logits, reference)
    err = compare.rel_error(logits, reference)
    min_agreement, allowed = spec.min_agreement, spec.max_rel_error
    failures = []
    if agreement < min_agreement - 1e-9:
        failures.append(f"top-1 agreement with FP32 {agreement * 100:.1f}% < {min_agreement * 100:.1f}%")
    if not err <= allowed:
        failures.append(f"max relative logit error {err:.3g} > {allowed:.3g}")
    top1 = compare.top1(logits, labels) if labels is not None and len(labels) else None
    return SelfTestResult(
        passed=not failures,
        images=len(inputs),
        agreement=agreement,
        min_agreement=min_agreement,
        max_rel_error=err,
        allowed_rel_error=allowed,
        golden_top1=top1,
        build_top1=spec.measured_top1,
        failures=failures,
    )
