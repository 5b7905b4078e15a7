"""Which bundle is fastest, when a second run could reverse a small difference.

Both `bitdeploy report --select fastest` and `build --select fastest` rank through `fastest` here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bitdeploy.runtimes.bundle.eligibility import Exclusion, exclusion_notes

TIE_RULE = "tie broken by higher top-1, then higher agreement with FP32, then smaller size"


@dataclass(frozen=True)
class Candidate:
    name: str
    p50_ms: float
    spread: tuple[float, float] | None  # min-max of the rounds' p50; None: one round, no spread known
    agreement: float | None = None
    size_mb: float | None = None
    item: Any = None
    top1: float | None = None  # fraction; known only where a dataset scored the bundle

    @property
    def low(self) -> float:
        return self.spread[0] if self.spread else self.p50_ms

    @property
    def high(self) -> float:
        return self.spread[1] if self.spread else self.p50_ms


def _span(c: Candidate) -> str:
    return f"{c.p50_ms:.2f} ms [{c.low:.2f}-{c.high:.2f}]" if c.spread else f"{c.p50_ms:.2f} ms (no spread)"


def _not_beaten(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other beats on both higher top-1 and median p50 at least as low; equal top-1 is left to
    the tie rule, and a candidate without a top-1 is never dropped."""
    scored = [c for c in candidates if c.top1 is not None]
    return [
        c
        for c in candidates
        if c.top1 is None or not any((q.top1 or 0.0) > c.top1 and q.p50_ms <= c.p50_ms for q in scored)
    ]


def fastest(candidates: Sequence[Candidate]) -> tuple[Candidate, list[Candidate], str] | None:
    """(winner, the candidates tied with the fastest, a sentence saying why).

    The fastest by median p50 is only a winner when no other spread overlaps its own: a bundle whose slowest
    round is faster than the fastest's slowest round could win a second run. Tied bundles are ranked by higher
    top-1 (across models and resolutions the only comparable accuracy), then higher agreement with FP32, then
    smaller size, then median p50. A bundle another beats outright (higher top-1 and no slower median) is dropped
    first, so a noisy spread cannot hand the win to a slower, less accurate model."""
    if not candidates:
        return None
    ranked = sorted(_not_beaten(candidates), key=lambda c: c.p50_ms)
    lead = ranked[0]
    tied = [c for c in ranked if c.low <= lead.high]
    if len(tied) == 1:
        nxt = f"; next {ranked[1].name} at {_span(ranked[1])}, spreads apart" if len(ranked) > 1 else ""
        return lead, tied, f"fastest: p50 {_span(lead)}{nxt}"
    winner = min(
        tied,
        key=lambda c: (
            -(c.top1 if c.top1 is not None else -1.0),
            -(c.agreement if c.agreement is not None else -1.0),
            c.size_mb if c.size_mb is not None else float("inf"),
            c.p50_ms,
        ),
    )
    others = ", ".join(f"{c.name} {_span(c)}" for c in tied if c is not winner)
    top1 = f", top-1 {winner.top1 * 100:.2f}%" if winner.top1 is not None else ""
    agree = f", agreement {winner.agreement * 100:.1f}%" if winner.agreement is not None else ""
    size = f", {winner.size_mb:.1f} MB" if winner.size_mb is not None else ""
    return (
        winner,
        tied,
        f"tied on speed (round spreads overlap): {winner.name} p50 {_span(winner)}{top1}{agree}{size} vs {others}; {TIE_RULE}",
    )


OBJECTIVES = ("fastest", "most-accurate")


class SelectionError(Exception):
    """No bundle meets the constraints: one line naming the nearest miss (the CLI turns it into exit 1)."""


@dataclass(frozen=True)
class Option:
    """One bundle as selection sees it: its gate verdict, accuracy from the build, speed and memory from where it ran."""

    name: str
    valid: bool  # passed the accuracy gate
    top1: float | None  # fraction
    p50_ms: float | None
    spread: tuple[float, float] | None = None
    rss_mb: float | None = None  # peak resident memory serving batch 1, in a fresh process
    agreement: float | None = None
    size_mb: float | None = None
    item: Any = None
    excluded: Exclusion | None = None  # valid, but not to be picked (`runtimes.bundle.eligibility`)

    @property
    def eligible(self) -> bool:
        return self.valid and self.excluded is None

    def candidate(self) -> Candidate:
        return Candidate(self.name, self.p50_ms or 0.0, self.spread, self.agreement, self.size_mb, self, self.top1)


@dataclass(frozen=True)
class Criteria:
    """What the user asked for: constraints, and what to optimise among the bundles that meet them.

    Without --select the objective is the axis left free: a latency or memory budget asks for the most accurate
    bundle, an accuracy floor alone for the fastest."""

    objective: str = "fastest"
    latency_budget_ms: float | None = None
    min_top1: float | None = None  # fraction
    memory_budget_mb: float | None = None

    @classmethod
    def from_flags(
        cls,
        select: str | None = None,
        latency_budget_ms: float | None = None,
        min_top1_pct: float | None = None,
        memory_budget_mb: float | None = None,
    ) -> Criteria | None:
        """None when nothing was asked; `min_top1_pct` is in percent, as the tables show top-1."""
        if select is None and latency_budget_ms is None and min_top1_pct is None and memory_budget_mb is None:
            return None
        if select is not None and select not in OBJECTIVES:
            raise ValueError(f"--select must be one of {', '.join(OBJECTIVES)} (got {select!r})")
        if min_top1_pct is not None and not 1.0 <= min_top1_pct <= 100.0:
            raise ValueError(f"--min-top1 is a top-1 in percent, 1 to 100, e.g. 95 (got {min_top1_pct:g})")
        objective = select or (
            "fastest"
            if min_top1_pct is not None and latency_budget_ms is None and memory_budget_mb is None
            else "most-accurate"
            if latency_budget_ms is not None or memory_budget_mb is not None
            else "fastest"
        )
        return cls(
            objective,
            latency_budget_ms,
            None if min_top1_pct is None else min_top1_pct / 100.0,
            memory_budget_mb,
        )

    @property
    def needs_accuracy(self) -> bool:
        return self.objective == "most-accurate" or self.min_top1 is not None

    def constraints(self) -> list[str]:
        out = []
        if self.latency_budget_ms is not None:
            out.append(f"p50 <= {self.latency_budget_ms:g} ms")
        if self.min_top1 is not None:
            out.append(f"top-1 >= {self.min_top1 * 100:g}%")
        if self.memory_budget_mb is not None:
            out.append(f"peak RSS <= {self.memory_budget_mb:g} MB")
        return out

    def describe(self) -> str:
        what = "most accurate" if self.objective == "most-accurate" else "fastest"
        limits = self.constraints()
        return f"{what} with {' and '.join(limits)}" if limits else what

    def violation(self, o: Option) -> str | None:
        """Why `o` misses a constraint (None: it meets them all)."""
        if self.latency_budget_ms is not None and (o.p50_ms is None or o.p50_ms > self.latency_budget_ms):
            return "no latency measured" if o.p50_ms is None else f"over the latency budget at p50 {o.p50_ms:.2f} ms"
        if self.min_top1 is not None and (o.top1 is None or o.top1 < self.min_top1 - 1e-12):
            return "no top-1 measured" if o.top1 is None else f"below the top-1 floor at {o.top1 * 100:.2f}%"
        if self.memory_budget_mb is not None and (o.rss_mb is None or o.rss_mb > self.memory_budget_mb):
            return "no peak RSS measured" if o.rss_mb is None else f"over the memory budget at {o.rss_mb:.0f} MB"
        return None


@dataclass(frozen=True)
class Choice:
    winner: Option
    runner_up: Option | None
    line: str  # the one-line explanation, naming the runner-up and why it lost
    front: list[Option]  # the accuracy-latency Pareto front of the valid options, fastest first
    fitting: int  # how many eligible options met the constraints


def pareto(options: Sequence[Option]) -> list[Option]:
    """Options no other beats on both lower p50 and higher top-1, fastest first (ties on p50: the more accurate)."""
    pts = sorted(
        (o for o in options if o.p50_ms is not None and o.top1 is not None), key=lambda o: (o.p50_ms, -(o.top1 or 0))
    )
    front: list[Option] = []
    for o in pts:
        if not front or (o.top1 or 0.0) > (front[-1].top1 or 0.0):
            front.append(o)
    return front


def _acc(o: Option) -> str:
    return "-" if o.top1 is None else f"{o.top1 * 100:.2f}%"


def _speed(o: Option) -> str:
    return "no latency" if o.p50_ms is None else _span(o.candidate())


def _ranked(options: Sequence[Option], objective: str) -> list[Option]:
    """Best first by the objective; the fastest among equal top-1, the most accurate among equal p50."""
    inf = float("inf")
    if objective == "most-accurate":
        return sorted(
            options, key=lambda o: (-(o.top1 if o.top1 is not None else -1.0), o.p50_ms or inf, o.size_mb or inf)
        )
    return sorted(options, key=lambda o: (o.p50_ms if o.p50_ms is not None else inf, -(o.top1 or 0.0)))


def _nearest_miss(valid: Sequence[Option], criteria: Criteria) -> str:
    """The one line when nothing fits: for each constraint, the best bundle on its axis."""
    parts = []
    timed = [o for o in valid if o.p50_ms is not None]
    if criteria.latency_budget_ms is not None and timed:
        best = min(timed, key=lambda o: o.p50_ms or 0.0)
        parts.append(f"the fastest is {best.name} at p50 {best.p50_ms:.2f} ms (top-1 {_acc(best)})")
    scored = [o for o in valid if o.top1 is not None]
    if criteria.min_top1 is not None and scored:
        best = max(scored, key=lambda o: o.top1 or 0.0)
        parts.append(f"the most accurate is {best.name} at top-1 {_acc(best)}")
    measured = [o for o in valid if o.rss_mb is not None]
    if criteria.memory_budget_mb is not None and measured:
        best = min(measured, key=lambda o: o.rss_mb or 0.0)
        parts.append(f"the leanest is {best.name} at {best.rss_mb:.0f} MB peak RSS")
    if criteria.memory_budget_mb is not None and not measured:
        parts.append("no bundle has a peak RSS measured (bench with --memory)")
    return f"no valid bundle meets {' and '.join(criteria.constraints())}: " + ("; ".join(parts) or "nothing measured")


def choose(options: Sequence[Option], criteria: Criteria) -> Choice:
    """The selection among the eligible options (valid, not `excluded`): constraints first, then the objective,
    ties on speed as in `fastest`; the line names what was excluded and why.

    Raises SelectionError (one line) when no eligible option meets the constraints, naming the nearest miss."""
    if not any(o.valid for o in options):
        raise SelectionError("no bundle passed the accuracy gate, nothing to select; see the table above")
    notes = exclusion_notes((o.name, o.excluded) for o in options if o.valid and o.excluded is not None)
    valid = [o for o in options if o.eligible]
    if not valid:
        raise SelectionError(f"no valid bundle may be selected{notes}")
    if criteria.needs_accuracy and all(o.top1 is None for o in valid):
        raise SelectionError(
            f"--select {criteria.objective} / --min-top1 need a top-1 per bundle: build with --dataset "
            "(without it the gate compares logits on random inputs)"
        )
    fitting = [o for o in valid if criteria.violation(o) is None]
    if criteria.objective == "fastest" or criteria.latency_budget_ms is not None:
        fitting = [o for o in fitting if o.p50_ms is not None]
    if not fitting:
        raise SelectionError(_nearest_miss(valid, criteria) + notes)
    if criteria.objective == "fastest":
        picked = fastest([o.candidate() for o in fitting])
        assert picked is not None
        winner: Option = picked[0].item
        why = picked[2].removeprefix("fastest: ")  # the objective is named once, before the parenthesis
    else:
        winner = _ranked(fitting, criteria.objective)[0]
        why = f"top-1 {_acc(winner)}, p50 {_speed(winner)}"
    others = [o for o in _ranked(valid, criteria.objective) if o is not winner]
    runner = others[0] if others else None
    line = f"{winner.name}: {criteria.describe()} ({why})"
    if runner is not None and not (f"next {runner.name} at " in why and criteria.violation(runner) is None):
        line += f"; runner-up {runner.name} {_lost(runner, winner, criteria)}"  # unless `why` compared them already
    line += f"; {len(fitting)} of {len(valid)} valid bundles met the constraints" if criteria.constraints() else ""
    return Choice(winner, runner, line + notes, pareto(valid), len(fitting))


def _lost(runner: Option, winner: Option, criteria: Criteria) -> str:
    """Why the runner-up lost, in a clause."""
    missed = criteria.violation(runner)
    if missed:
        return f"({_acc(runner)}, {_speed(runner)}) is {missed}"
    if criteria.objective == "most-accurate":
        if runner.top1 is not None and winner.top1 is not None and runner.top1 < winner.top1:
            return f"is less accurate: top-1 {_acc(runner)} ({(runner.top1 - winner.top1) * 100:+.2f} pp), p50 {_speed(runner)}"
        return f"has the same top-1 {_acc(runner)} but is slower: p50 {_speed(runner)}"
    if runner.candidate().low <= winner.candidate().high:
        return f"is tied on speed at p50 {_speed(runner)} and lost the tie ({TIE_RULE})"
    return f"is slower: p50 {_speed(runner)}, top-1 {_acc(runner)}"
