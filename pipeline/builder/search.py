"""`--int8-fallback auto`: when uniform INT8 fails the gate, the fastest INT8/float mix of one engine that passes.

1. Sensitivity: for each group of quantized layers (`bitdeploy.converters.layers`: a convolution, a bottleneck unit
   or a block, the finest the budget allows), convert with only that group in float, through the engine's own
   mechanism, and measure what it buys against uniform INT8: agreement with FP32 and mean |logit error| on the
   gate's split. Groups are ranked by the agreement they gain (the error they remove breaks ties).
2. Bisection: the k most sensitive groups in float, for the smallest k in 1..n-1 that passes the gate (at least
   one group stays INT8). Accuracy need not rise as layers go float: when even n-1 groups in float fail, the budget
   left tries each group as the only one in INT8. Every candidate is a stage-cache entry keyed by its float layers.
3. Speed: the passing candidates with the fewest float layers are timed with the engine's FP32 and uniform INT8
   bundles in one interleaved run; the fastest is kept only when its p50 is below FP32's fastest round. A mix
   that cannot be timed here (its runtime does not run on this machine) is not kept.

Each conversion plus evaluation counts against `--int8-search-budget`; progress and an ETA go to the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from bitdeploy.builder import plan as build_plan
from bitdeploy.builder.bundle import draft_manifest
from bitdeploy.builder.convert import convert
from bitdeploy.builder.gate import Evaluated, candidate
from bitdeploy.builder.options import BuildOptions
from bitdeploy.builder.plan import RowPlan
from bitdeploy.builder.prepare import BuildContext
from bitdeploy.builder.result import float_precision
from bitdeploy.builder.timing import Timed, quick_timing, time_bundles
from bitdeploy.converters import layers
from bitdeploy.core.cache import StageCache
from bitdeploy.runtimes.bundle.manifest_mix import Candidate, Int8Mix, LayerCost

TIMED_CANDIDATES = 3  # passing mixes timed against FP32 (the fewest float layers first)


@dataclass
class SearchOutcome:
    record: Int8Mix
    line: str  # the one line the build prints for this engine
    chosen: Evaluated | None  # None: no mix passes the gate faster than FP32


class Search:
    """One engine's search; `run()` returns its outcome. `log` gets the progress lines."""

    def __init__(
        self,
        plan: RowPlan,
        ctx: BuildContext,
        opts: BuildOptions,
        cache: StageCache,
        uniform: Evaluated,
        log: Callable[[str], None],
    ) -> None:
        self.plan, self.ctx, self.opts, self.cache = plan, ctx, opts, cache
        self.row_name, self.target = plan.name, plan.target
        self.uniform, self.log = uniform, log
        self.budget = opts.gate.int8_search_budget
        self.evaluations = 0
        self.planned = self.budget  # the evaluations the search expects, for the ETA (set by `run`)
        self.seconds: list[float] = []
        self.started = time.perf_counter()
        self.seen: dict[tuple[str, ...], Evaluated] = {(): uniform}

    # -- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, float_layers: tuple[str, ...], what: str) -> Evaluated:
        key = tuple(sorted(float_layers))
        if key in self.seen:
            return self.seen[key]
        began = time.perf_counter()
        found = candidate(self.plan, self.ctx, self.opts, self.cache, tuple(float_layers))
        self.seconds.append(time.perf_counter() - began)
        self.evaluations += 1
        self.seen[key] = found
        left = max(0, self.planned - self.evaluations)
        eta = left * sum(self.seconds) / len(self.seconds)
        r = found.result
        self.log(
            f"[{self.row_name}] search {self.evaluations}/{self.planned}: {what}: agreement {(r.agreement or 0) * 100:.1f}%, "
            f"top-1 {(r.top1 or 0) * 100:.2f}%{' (passes)' if r.passed else ''}; ETA {eta:.0f} s"
        )
        return found

    def run(self) -> SearchOutcome:
        quantized = self.quantized_layers()
        granularity = layers.finest(quantized, self.budget)
        groups = layers.groups(quantized, granularity)
        self.planned = min(self.budget, layers.search_cost(len(groups)))
        record = Int8Mix(
            engine=self.target.backend,
            gate=self.opts.gate.spec().describe(),
            granularity=granularity,
            quantizable_layers=len(quantized),
            float_precision=float_precision(self.uniform.artifact.target),
            budget=self.budget,
            uniform=_candidate(Mix("uniform INT8", 0, self.uniform), {}),
        )
        if len(groups) < 2:
            return self.fail(record, [], "fewer than two groups of quantized layers to choose from")
        self.log(
            f"[{self.row_name}] uniform INT8 fails the gate ({record.gate}): searching {len(groups)} "
            f"{granularity} groups of {len(quantized)} quantized layers (budget {self.budget} evaluations)"
        )
        singles = self.sensitivity(groups)
        ranked = sorted(groups, key=lambda g: _cost(singles.get(g.name), self.uniform), reverse=True)
        record = replace(record, sensitivity=self.costs(ranked, singles))
        mixes = self.bisect(ranked)
        mixes += [Mix(g.name, 1, singles[g.name]) for g in groups if g.name in singles]
        passing = sorted((m for m in mixes if m.found.result.passed), key=lambda m: len(m.found.float_layers))
        passing = list({m.found.float_layers: m for m in passing}.values())  # a mix reached both ways, once
        if not passing:
            best = max(mixes, key=lambda m: (m.found.result.agreement or 0, m.found.result.top1 or 0))
            return self.fail(
                record, mixes, f"no mix passes the gate ({record.gate}); best found: {self.describe(best)}"
            )
        timed = self.time(passing[:TIMED_CANDIDATES])
        return self.choose(record, mixes, passing[:TIMED_CANDIDATES], timed)

    def quantized_layers(self) -> list[str]:
        q = self.uniform.artifact.target.quantization
        kept = set((q.details.get("float_layers") or []) if q is not None else [])
        return [name for name in layers.conv_layers(self.ctx.onnx) if name not in kept]

    def sensitivity(self, groups: list[layers.Group]) -> dict[str, Evaluated]:
        """Each group with only it in float (while the budget leaves two evaluations for the bisection)."""
        out: dict[str, Evaluated] = {}
        for g in groups:
            if self.evaluations >= self.budget - 2:
                break
            out[g.name] = self.evaluate(g.layers, f"{g.name} in float")
        return out

    def bisect(self, ranked: list[layers.Group]) -> list[Mix]:
        """The smallest k whose k most sensitive groups in float pass (1 <= k < groups); every mix tried."""
        tried: list[Mix] = []

        def passes(k: int) -> bool:
            float_layers = tuple(name for g in ranked[:k] for name in g.layers)
            found = self.evaluate(float_layers, f"{k} most sensitive groups in float")
            tried.append(Mix(f"{k} most sensitive group{'s' if k > 1 else ''}", k, found))
            return found.result.passed

        lo, hi = 0, len(ranked) - 1
        if not passes(hi):
            return tried + self.one_int8_group(ranked)
        while hi - lo > 1 and self.evaluations < self.budget:
            mid = (lo + hi) // 2
            if passes(mid):
                hi = mid
            else:
                lo = mid
        return tried

    def one_int8_group(self, ranked: list[layers.Group]) -> list[Mix]:
        """When even the least sensitive group alone in INT8 fails (accuracy need not rise as layers go float),
        the budget left tries each other group as the one in INT8, least sensitive first, until one passes."""
        tried: list[Mix] = []
        for g in reversed(ranked[:-1]):
            if self.evaluations >= self.budget:
                break
            float_layers = tuple(name for other in ranked if other is not g for name in other.layers)
            found = self.evaluate(float_layers, f"all but {g.name} in float")
            tried.append(Mix(f"all but {g.name}", len(ranked) - 1, found))
            if found.result.passed:
                break
        return tried

    # -- speed --------------------------------------------------------------------------------------------------
    def time(self, passing: list[Mix]) -> dict[str, tuple[float | None, tuple[float, ...] | None]]:
        """Batch-1 p50 (with spread) of the passing mixes, uniform INT8 and the engine's FP32, interleaved, by
        name; empty when the engine's runtime cannot run here."""
        if not self.uniform.runs_here or any(not m.found.runs_here for m in passing):
            return {}  # its runtime cannot run here (TensorRT without a GPU): `choose` keeps no mix
        fp32_work, fp32 = convert(build_plan.sibling(self.plan, "fp32", self.opts), self.ctx, self.cache)
        device, size = self.uniform.device, self.ctx.resolution
        items = [Timed(FP32, fp32_work / fp32.model_file, draft_manifest(fp32, self.ctx, "fp32"), device, size)]
        for m in [Mix(UNIFORM, 0, self.uniform), *passing]:
            items.append(Timed(m.name, m.found.model_path, m.found.manifest, device, size))
        self.log(f"[{self.row_name}] timing {len(passing)} passing mixes with FP32 and uniform INT8 (interleaved)")
        iterations = max(20, self.opts.timing.bench_iterations // 2)
        timings = time_bundles(items, self.opts.engine.threads, quick_timing(iterations, sweep=False), self.log)
        return {item.name: (t.p50_ms, t.p50_spread) for item, t in zip(items, timings) if t is not None}

    def choose(self, record: Int8Mix, mixes: list[Mix], passing: list[Mix], timed: dict[str, Any]) -> SearchOutcome:
        """The fastest passing mix (by p50), if it is faster than FP32 in every round: its p50 below the fastest
        of FP32's rounds. A mix that cannot be timed here cannot be shown faster, so none is kept then."""
        if not timed:
            return self.fail(
                record,
                mixes,
                f"{len(passing)} mixes pass the gate ({self.describe(passing[0])}) but {self.target.title} cannot "
                "run here to show one is faster than FP32; rebuild where it runs",
            )
        fp32_p50, fp32_spread = timed.get(FP32, (None, None))
        record = replace(record, fp32_p50_ms=fp32_p50, fp32_p50_spread=fp32_spread)
        if timed and record.uniform is not None:
            record = replace(
                record, uniform=replace(record.uniform, p50_ms=timed[UNIFORM][0], p50_spread=timed[UNIFORM][1])
            )
        best = min(passing, key=lambda m: timed[m.name][0] or float("inf"))
        p50 = timed[best.name][0]
        floor = min(fp32_spread) if fp32_spread else fp32_p50  # FP32's fastest round
        if p50 is None or floor is None or p50 >= floor:
            return self.fail(
                record,
                mixes,
                f"the fastest mix that passes ({self.describe(best)}) takes {p50 or 0:.2f} ms at p50, not faster "
                f"than {self.target.title} FP32 ({fp32_p50 or 0:.2f} ms, fastest round {floor or 0:.2f} ms); use the FP32 bundle",
                timed,
            )
        chosen = best.found
        in_float = set(chosen.float_layers)
        record = replace(
            record,
            float_layers=list(chosen.float_layers),
            evaluations=self.evaluations,
            search_s=round(time.perf_counter() - self.started, 1),
            candidates=[_candidate(m, timed, m is best) for m in mixes],
            sensitivity=[
                replace(c, float_in_mix=int(c.name in {layers.group_of(n, record.granularity) for n in in_float}))
                for c in record.sensitivity
            ],
        )
        r = chosen.result
        speed = f"p50 {p50:.2f} ms vs uniform INT8 {timed[UNIFORM][0]:.2f} ms and FP32 {fp32_p50:.2f} ms"
        line = (
            f"{self.row_name}: {len(chosen.float_layers)} of {record.quantizable_layers} layers kept in float "
            f"({best.name}); top-1 {(r.top1 or 0) * 100:.2f}% ({-(r.top1_drop_pp or 0):+.2f} pp), agreement "
            f"{(r.agreement or 0) * 100:.2f}%; {speed}; {self.evaluations} evaluations in {record.search_s:.0f} s"
        )
        return SearchOutcome(record, line, chosen)

    # -- records ------------------------------------------------------------------------------------------------
    def describe(self, m: Mix) -> str:
        r = m.found.result
        return (
            f"{len(m.found.float_layers)} layers in float ({m.name}), top-1 {(r.top1 or 0) * 100:.2f}%, "
            f"agreement {(r.agreement or 0) * 100:.2f}%"
        )

    def fail(self, record: Int8Mix, mixes: list[Mix], why: str, timed: dict[str, Any] | None = None) -> SearchOutcome:
        record = replace(
            record,
            evaluations=self.evaluations,
            search_s=round(time.perf_counter() - self.started, 1),
            candidates=[_candidate(m, timed or {}) for m in mixes],
        )
        return SearchOutcome(record, f"{self.row_name}: {why}", None)

    def costs(self, ranked: list[layers.Group], singles: dict[str, Evaluated]) -> list[LayerCost]:
        base = self.uniform.result
        out = []
        for rank, g in enumerate(ranked, 1):
            e = singles.get(g.name)
            r = e.result if e is not None else None
            out.append(
                LayerCost(
                    name=g.name,
                    layers=len(g.layers),
                    agreement=r.agreement if r else None,
                    mean_abs_logit_diff=r.mean_abs_logit_diff if r else None,
                    agreement_gain_pp=round(((r.agreement or 0) - (base.agreement or 0)) * 100, 4) if r else None,
                    error_reduction=round(_cost(e, self.uniform)[1], 4) if e is not None else None,
                    rank=rank,
                    float_in_mix=0,
                )
            )
        return out


@dataclass(frozen=True)
class Mix:
    """A candidate the search evaluated: its name ("3 most sensitive groups", a group's), how many groups it keeps
    in float, and its conversion and gate figures."""

    name: str
    groups: int
    found: Evaluated


FP32, UNIFORM = "fp32", "uniform INT8"


def _cost(e: Evaluated | None, uniform: Evaluated) -> tuple[float, float]:
    """What keeping only a group in float buys: (agreement with FP32 gained, the share of uniform INT8's mean
    |logit error| removed): agreement is what both gates count, the error breaks its ties; unmeasured ranks last."""
    if e is None:
        return (float("-inf"), float("-inf"))
    base = uniform.result.mean_abs_logit_diff or 0.0
    error = e.result.mean_abs_logit_diff or 0.0
    removed = 1.0 - error / base if base > 0 else 0.0
    return ((e.result.agreement or 0) - (uniform.result.agreement or 0), removed)


def _candidate(m: Mix, timed: dict[str, Any], chosen: bool = False) -> Candidate:
    r = m.found.result
    p50, spread = timed.get(m.name, (None, None))
    return Candidate(
        name=m.name,
        float_groups=m.groups,
        float_layers=len(m.found.float_layers),
        top1=r.top1,
        agreement=r.agreement,
        mean_abs_logit_diff=r.mean_abs_logit_diff,
        passed=int(r.passed),
        p50_ms=p50,
        p50_spread=spread,
        chosen=int(chosen),
    )
