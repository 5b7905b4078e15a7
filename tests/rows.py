"""Build rows for tests of the table, the selection and the report: a `RowResult` with the manifest its figures
are read from, as a build would leave it."""

from __future__ import annotations

from typing import Any

from bitdeploy.benchmarks.schema import Status, Timing
from bitdeploy.builder.plan import RowPlan
from bitdeploy.builder.result import RowResult
from bitdeploy.converters.base import ConvertOptions
from bitdeploy.core.targets import get_target
from bitdeploy.runtimes.bundle.manifest import GateResult, Manifest, TargetInfo

HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def row(
    name: str,
    status: str = "valid",
    *,
    top1: float | None = None,
    agreement: float | None = None,
    timing: Timing | None = None,
    size_mb: float | None = None,
    bundle: str | None = None,
    devices: dict[str, str] | None = None,
    float_precision: str | None = None,
    cell: str | None = None,
    manifest: Manifest | None = None,
    gate: dict[str, Any] | None = None,
    host: dict[str, Any] | None = None,
) -> RowResult:
    """`name` is "<target>-<precision>"; a figure left out is absent from the manifest, as after a failed row.
    `gate`: more GateResult fields (intervals, thresholds); `host`: the build host's fingerprint (`validated_on`)."""
    target, precision = name.split("-")
    record = get_target(target)
    plan = RowPlan(record, precision, None, ConvertOptions(), cell=cell, model="m-r50x1" if cell else "")
    figures = (top1, agreement, devices, float_precision, host)
    if manifest is None and any(f is not None for f in figures):
        manifest = _manifest(record.backend, precision, top1, agreement, devices, float_precision, gate or {}, host)
    return RowResult(plan, Status.parse(status), bundle, manifest, size_mb, timing or Timing())


def _manifest(
    backend: str,
    precision: str,
    top1: float | None,
    agreement: float | None,
    devices: dict[str, str] | None,
    float_precision: str | None,
    more: dict[str, Any],
    host: dict[str, Any] | None,
) -> Manifest:
    details: dict[str, Any] = {"inference_precision": HINTS[float_precision]} if float_precision else {}
    gate = None
    if top1 is not None or agreement is not None:
        figures = {"top1": top1, "reference_top1": top1, **more}
        gate = GateResult("accuracy", True, 100, agreement, 0.0, 0.0, **figures)
    verified = [
        {"cpu": cpu, "passed": why == "pass", "error": None if why == "pass" else why.removeprefix("FAIL: ")}
        for cpu, why in (devices or {}).items()
    ]
    return Manifest(
        valid=True,
        target=TargetInfo(backend, precision, details=details),
        gate=gate,
        verified_on=verified or None,
        validated_on=host,
    )
