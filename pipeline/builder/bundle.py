"""Bundling: a row's manifest, drafted after its conversion, and the bundle written atomically with the artifact's
files, its golden self-test and the sealed manifest (`bitdeploy.runtimes.bundle.write_manifest`).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bitdeploy import __version__
from bitdeploy.core.fsutil import copy_files
from bitdeploy.core.resources import guarded
from bitdeploy.runtimes.bundle import selftest
from bitdeploy.runtimes.bundle.fingerprint import LIBRARIES, host_fingerprint, package_versions
from bitdeploy.runtimes.bundle.manifest import (
    CalibrationInfo,
    ExportInfo,
    InputSpec,
    Manifest,
    Provenance,
    SelfTestSpec,
)

if TYPE_CHECKING:
    from bitdeploy.builder.prepare import BuildContext
    from bitdeploy.converters.base import Artifact


def provenance(extra: dict[str, Any] | None = None) -> Provenance:
    return Provenance(
        bitdeploy=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        versions=package_versions(LIBRARIES),
        details=extra or {},
    )


def draft_manifest(artifact: Artifact, ctx: BuildContext, precision: str) -> Manifest:
    """The row's manifest before the gate: invalid until `write` records the result."""
    from bitdeploy.runtimes.preprocess import input_spec

    calib = ctx.calibration if precision == "int8" else None
    quantization = artifact.target.quantization
    method = quantization.method if quantization is not None else None
    return Manifest(
        valid=False,
        invalid_reason="not validated yet",
        model=ctx.model_info,
        target=artifact.target,
        model_file=artifact.model_file,
        input=input_spec(ctx.resolution),
        labels=list(ctx.labels),
        export=ExportInfo.from_dict(ctx.export),
        calibration=CalibrationInfo.from_dict(calib.manifest(method)) if calib is not None else None,
        notes=list(artifact.notes),
        provenance=provenance(),
    )


def write(
    path: Path, work: Path, artifact: Artifact, manifest: Manifest, logits: np.ndarray, ctx: BuildContext
) -> Manifest:
    """Write the bundle at `path` (atomically, replacing one there): the artifact's files from `work`, the golden
    self-test from the artifact's `logits`, and `manifest` (the gate's verdict recorded), sealed; returns it."""
    from bitdeploy.runtimes.bundle import bundle_writer, write_manifest

    evaluated_with = manifest.gate.evaluated_with if manifest.gate is not None else None
    manifest = replace(manifest, validated_on={**host_fingerprint(), "evaluated_with": evaluated_with})
    with guarded(path.parent, "pass --out DIR", f"{path.name} bundle"), bundle_writer(path) as tmp:
        copy_files(work, tmp, artifact.files)
        manifest = replace(manifest, self_test=_write_golden(tmp, ctx, logits, manifest))
        return write_manifest(tmp, manifest, [*artifact.files, selftest.GOLDEN_FILE])


def _write_golden(bundle_dir: Path, ctx: BuildContext, logits: np.ndarray, manifest: Manifest) -> SelfTestSpec:
    """The bundle's self-test: a seeded subset of the validation inputs, their FP32 logits and labels."""
    data, reference, labels = ctx.data, ctx.reference, ctx.label_ids
    idx = selftest.select(data.samples, ctx.resolution)
    picked, lo = [], 0
    for x, _ in data.batches():  # gather only the chosen rows: the validation set may not fit in memory
        picked.append(x[idx[(idx >= lo) & (idx < lo + len(x))] - lo])
        lo += len(x)
    inputs = np.concatenate(picked)
    spec: InputSpec = manifest.input
    return selftest.write(
        bundle_dir,
        inputs,
        reference[idx],
        labels[idx] if labels is not None else None,
        logits[idx],
        manifest.target.precision,
        spec,
    )
