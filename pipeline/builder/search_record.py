"""The INT8 search's records: a mix it tried (`Tried`) and how it reads in the log and in the manifest's `int8_mix`
(`manifest_mix.Candidate`, `LayerCost`, `SpeedDecision`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bitdeploy.builder.gate import Evaluated
from bitdeploy.builder.search_speed import RULE, SpeedVerdict
from bitdeploy.converters import layers
from bitdeploy.runtimes.bundle.manifest_mix import Candidate, LayerCost, SpeedDecision


@dataclass
class Tried:
    """A mix the search evaluated on its images: the float layers it adds to uniform INT8 and its figures."""

    name: str
    float_layers: tuple[str, ...]
    groups: int
    found: Evaluated | None  # None: it failed to convert or run (`error`)
    kl: float
    key: str = ""  # its stage-cache key
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.found is not None and self.found.result.passed

    def describe(self) -> str:
        """ "3 layers in float (+ body.block2.unit01), top-1 .., agreement .. on the search's images"."""
        r = self.found.result if self.found is not None else None
        if r is None:
            return f"{count(len(self.float_layers))} in float ({self.name}): {self.error}"
        bound = f" (lower bound {r.agreement_ci[0] * 100:.2f}%)" if r.agreement_ci and not self.passed else ""
        return (
            f"{count(len(self.float_layers))} in float ({self.name}), top-1 {(r.top1 or 0) * 100:.2f}%, "
            f"agreement {(r.agreement or 0) * 100:.2f}%{bound} on the search's images"
        )

    def figures(self) -> str:
        """The progress line's figures."""
        if self.found is None:
            return f"failed, skipped ({self.error})"
        r = self.found.result
        return (
            f"KL {self.kl:.4g}, agreement {(r.agreement or 0) * 100:.1f}%, top-1 {(r.top1 or 0) * 100:.2f}%"
            f"{' (passes)' if self.passed else ''}"
        )


def layer_cost(group: layers.Group, level: str, t: Tried, base: Tried, rank: int, ranking: int) -> LayerCost:
    """A group's sensitivity: the mix `t` (`base` with the group in float too) against `base`."""
    assert t.found is not None and base.found is not None
    r, b = t.found.result, base.found.result
    return LayerCost(
        name=group.name,
        layers=len(group.layers),
        agreement=r.agreement,
        mean_abs_logit_diff=r.mean_abs_logit_diff,
        agreement_gain_pp=round(((r.agreement or 0) - (b.agreement or 0)) * 100, 4),
        error_reduction=round(1.0 - t.kl / base.kl, 4) if base.kl > 0 else 0.0,
        rank=rank,
        float_in_mix=0,
        kl=round(t.kl, 6),
        level=level,
        ranking=ranking,
    )


def count(n: int) -> str:
    return f"{n} layer{'s' if n != 1 else ''}"


def speed_record(verdict: SpeedVerdict) -> SpeedDecision:
    return SpeedDecision(
        RULE, verdict.rounds, int(verdict.kept), int(verdict.cached), "; ".join(verdict.disturbed) or None
    )


def candidate(t: Tried, chosen: bool = False) -> Candidate:
    r = t.found.result if t.found is not None else None
    return Candidate(
        name=t.name,
        float_groups=t.groups,
        float_layers=len(t.float_layers),
        top1=r.top1 if r else None,
        agreement=r.agreement if r else None,
        mean_abs_logit_diff=r.mean_abs_logit_diff if r else None,
        passed=int(t.passed),
        chosen=int(chosen),
        kl=round(t.kl, 6) if math.isfinite(t.kl) else None,
        error=t.error,
    )
