"""A build row's result: its plan, its status, the bundle's sealed manifest and the build's quick timing. Every
figure the manifest holds (the gate's, the target's, serving memory, the --verify-on results) is read from it,
never copied into the row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bitdeploy.benchmarks.schema import PENDING, Status, Timing
from bitdeploy.builder.plan import RowPlan
from bitdeploy.runtimes.bundle.manifest import Manifest, TargetInfo

FLOAT_PRECISIONS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}  # OpenVINO's hint -> what float layers compute in


@dataclass
class RowResult:
    """One (target, precision) of a build, as the table and report show it."""

    plan: RowPlan
    status: Status = PENDING  # valid | failed gate | failed: <reason> | skipped: <reason>
    bundle: str | None = None
    manifest: Manifest | None = None  # the bundle's, sealed (and amended by timing and --verify-on)
    size_mb: float | None = None
    timing: Timing = field(default_factory=Timing)  # the build's quick figures; `disturbed` says why not quotable
    selected: bool = False
    search_line: str | None = None  # the INT8 search's one line, when it ran

    @property
    def target(self) -> str:
        return self.plan.target.name

    @property
    def precision(self) -> str:
        return self.plan.precision

    @property
    def backend(self) -> str:
        return self.plan.target.backend

    @property
    def cell(self) -> str | None:
        return self.plan.cell

    @property
    def model(self) -> str | None:
        return self.plan.model or None

    @property
    def resolution(self) -> int | None:
        return self.manifest.model.resolution if self.manifest is not None else self.plan.resolution

    @property
    def bundle_name(self) -> str:
        return self.plan.bundle_name

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def valid(self) -> bool:
        return self.status.is_valid

    @property
    def error(self) -> str | None:
        return self.status.reason if self.status.is_failed else None

    @property
    def accuracy(self) -> dict[str, Any] | None:
        gate = self.manifest.gate if self.manifest is not None else None
        return gate.to_dict() if gate is not None else None

    @property
    def top1(self) -> float | None:
        gate = self.manifest.gate if self.manifest is not None else None
        return gate.top1 if gate is not None and gate.reference_top1 is not None else None

    @property
    def reference_top1(self) -> float | None:
        gate = self.manifest.gate if self.manifest is not None else None
        return gate.reference_top1 if gate is not None and gate.top1 is not None else None

    @property
    def delta_pp(self) -> float | None:
        top1, ref = self.top1, self.reference_top1
        return (top1 - ref) * 100.0 if top1 is not None and ref is not None else None

    @property
    def precision_used(self) -> str | None:
        return self.manifest.target.precision_used if self.manifest is not None else None

    @property
    def device(self) -> str | None:
        return (self.manifest.target.device or "") if self.manifest is not None else None

    @property
    def notes(self) -> list[str]:
        return list(self.manifest.notes) if self.manifest is not None else []

    @property
    def float_precision(self) -> str:
        return float_precision(self.manifest.target) if self.manifest is not None else "fp32"

    @property
    def serving_rss_mb(self) -> float | None:
        latency = self.manifest.build_latency if self.manifest is not None else None
        return latency.serving_peak_rss_mb if latency is not None else None

    @property
    def devices(self) -> dict[str, str]:
        """--verify-on CPU -> "pass" | "FAIL: why", from the manifest's `verified_on`."""
        out = {}
        for entry in (self.manifest.verified_on if self.manifest is not None else None) or []:
            why = entry.get("error") or "failed"
            out[str(entry.get("cpu"))] = "pass" if entry.get("passed") else f"FAIL: {why}"
        return out

    @property
    def device_checked(self) -> bool:
        """Float layers pinned to bf16/fp16 compute what this host's CPU has: such a row is offered to --select
        only after its self-test passed on --verify-on CPUs (a row in fp32 needs none)."""
        return self.float_precision == "fp32" or (bool(self.devices) and self.passes_devices)

    @property
    def passes_devices(self) -> bool:
        """Its self-test passed on every --verify-on CPU (true when none was named)."""
        return all(v == "pass" for v in self.devices.values())

    def as_dict(self) -> dict[str, Any]:
        """The row as build.json lists it."""
        return {
            "target": self.target,
            "precision": self.precision,
            "status": self.status.text,
            "backend": self.backend,
            "bundle": self.bundle,
            "size_mb": self.size_mb,
            "top1": self.top1,
            "reference_top1": self.reference_top1,
            "delta_pp": self.delta_pp,
            "precision_used": self.precision_used,
            "device": self.device,
            "notes": self.notes,
            "error": self.error,
            "accuracy": self.accuracy,
            "selected": self.selected,
            "devices": self.devices,
            "serving_rss_mb": self.serving_rss_mb,
            "cell": self.cell,
            "model": self.model,
            "resolution": self.resolution,
            "search_line": self.search_line,
            "float_precision": self.float_precision,
            **self.timing.flat(),
            "name": self.name,
        }


def float_precision(target: TargetInfo) -> str:
    """What a bundle's float layers compute in: fp32, or bf16/fp16 where the engine was pinned to it."""
    hint = str((target.details or {}).get("inference_precision") or "f32")
    return FLOAT_PRECISIONS.get(hint, hint)
