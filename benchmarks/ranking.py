"""Which bundle is fastest, when a second run could reverse a small difference.

Both `bitdeploy report --select fastest` and `build --select fastest` rank through `fastest` here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TIE_RULE = "tie broken by higher agreement with FP32, then smaller size"


@dataclass(frozen=True)
class Candidate:
    name: str
    p50_ms: float
    spread: tuple[float, float] | None  # min-max of the rounds' p50; None: one round, no spread known
    agreement: float | None = None
    size_mb: float | None = None
    item: Any = None

    @property
    def low(self) -> float:
        return self.spread[0] if self.spread else self.p50_ms

    @property
    def high(self) -> float:
        return self.spread[1] if self.spread else self.p50_ms


def _span(c: Candidate) -> str:
    return f"{c.p50_ms:.2f} ms [{c.low:.2f}-{c.high:.2f}]" if c.spread else f"{c.p50_ms:.2f} ms (no spread)"


def fastest(candidates: Sequence[Candidate]) -> tuple[Candidate, list[Candidate], str] | None:
    """(winner, the candidates tied with the fastest, a sentence saying why).

    The fastest by median p50 is only a winner when no other spread overlaps its own: a bundle whose slowest
    round is faster than the fastest's slowest round could win a second run. Tied bundles are ranked by higher
    agreement with FP32, then smaller size, then median p50."""
    if not candidates:
        return None
    ranked = sorted(candidates, key=lambda c: c.p50_ms)
    lead = ranked[0]
    tied = [c for c in ranked if c.low <= lead.high]
    if len(tied) == 1:
        nxt = f"; next {ranked[1].name} at {_span(ranked[1])}, spreads apart" if len(ranked) > 1 else ""
        return lead, tied, f"fastest: p50 {_span(lead)}{nxt}"
    winner = min(
        tied,
        key=lambda c: (
            -(c.agreement if c.agreement is not None else -1.0),
            c.size_mb if c.size_mb is not None else float("inf"),
            c.p50_ms,
        ),
    )
    others = ", ".join(f"{c.name} {_span(c)}" for c in tied if c is not winner)
    agree = f", agreement {winner.agreement * 100:.1f}%" if winner.agreement is not None else ""
    size = f", {winner.size_mb:.1f} MB" if winner.size_mb is not None else ""
    return (
        winner,
        tied,
        f"tied on speed (round spreads overlap): {winner.name} p50 {_span(winner)}{agree}{size} vs {others}; {TIE_RULE}",
    )
