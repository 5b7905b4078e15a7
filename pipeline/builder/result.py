"""A build row's result: its plan, its status, the bundle's sealed manifest and the build's quick timing. Every
figure the manifest holds (the gate's, the target's, serving memory, the --verify-on results) is read from it,
never copied into the row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bitdeploy.benchmarks.schema import PENDING, Status, Timing
from bitdeploy.builder.plan import RowPlan
from bitdeploy.runtimes.bundle.eligibility import Checks, Exclusion, float_precision
from bitdeploy.runtimes.bundle.manifest import GateResult, Manifest


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
    qat_line: str | None = None  # the quantization-aware fine-tune's one line, when the row escalated to it

    @property
    def target(self) -> str:
        return self.plan.target.name

    @property
    def precision(self) -> str:
        return self.plan.precision

    @property
    def qat(self) -> bool:
        """Whether the bundle was made by the quantization-aware fine-tune (`--int8-fallback qat|auto`)."""
        q = self.manifest.target.quantization if self.manifest is not None else None
        return bool(q is not None and q.details.get("qat"))

    @property
    def precision_label(self) -> str:
        """The table's precision: "int8 (qat)" for a bundle of the quantization-aware fine-tune."""
        return f"{self.precision} (qat)" if self.qat else self.precision

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
    def gate(self) -> GateResult | None:
        return self.manifest.gate if self.manifest is not None else None

    @property
    def accuracy(self) -> dict[str, Any] | None:
        gate = self.gate
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
    def top1_ci(self) -> tuple[float, float] | None:
        return self.gate.top1_ci if self.top1 is not None and self.gate is not None else None

    @property
    def delta_ci_pp(self) -> tuple[float, float] | None:
        """The interval of `delta_pp` (top-1 minus FP32's): the gate's drop interval, negated."""
        drop = self.gate.top1_drop_ci_pp if self.top1 is not None and self.gate is not None else None
        return (-drop[1], -drop[0]) if drop is not None else None

    @property
    def confidence(self) -> float | None:
        """The level of the gate's intervals."""
        return self.gate.confidence if self.gate is not None else None

    @property
    def noise(self) -> str | None:
        """ "within noise: ..." when the gate's threshold lies inside its figure's interval."""
        return self.gate.noise if self.gate is not None else None

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
    def checks(self) -> Checks:
        """Where it ran before selection (`runtimes.bundle.eligibility`): the build host, the --verify-on CPUs."""
        return Checks.of(self.manifest) if self.manifest is not None else Checks()

    @property
    def device_checked(self) -> bool:
        """Float layers pinned to bf16/fp16 compute what the CPU has: such a row is offered to --select only once
        a CPU that computes that precision ran it (the build host, or a --verify-on CPU); fp32 needs none."""
        return self.checks.float_checked

    @property
    def passes_devices(self) -> bool:
        """Its self-test passed on every --verify-on CPU (true when none was named)."""
        return not self.checks.failed_on()

    @property
    def exclusion(self) -> Exclusion | None:
        """Why a valid row may not be selected (`eligibility.Checks.exclusion`), or None."""
        return self.checks.exclusion() if self.valid else None

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
            "top1_ci": _listed(self.top1_ci),
            "reference_top1_ci": _listed(
                self.gate.reference_top1_ci if self.reference_top1 is not None and self.gate else None
            ),
            "delta_ci_pp": _listed(self.delta_ci_pp),
            "agreement": self.gate.agreement if self.gate is not None else None,
            "agreement_ci": _listed(self.gate.agreement_ci if self.gate is not None else None),
            "confidence": self.confidence,
            "gate_confidence": self.gate.gate_confidence if self.gate is not None else None,
            "within_noise": self.noise,
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
            "qat_line": self.qat_line,
            "qat": self.qat,
            "float_precision": self.float_precision,
            **self.timing.flat(),
            "name": self.name,
        }


def _listed(pair: tuple[float, float] | None) -> list[float] | None:
    return list(pair) if pair is not None else None
