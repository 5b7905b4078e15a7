"""`--int8-fallback auto`: when uniform INT8 fails the gate, the fastest INT8/float mix of one engine that passes.

The search ranks and chooses on its own images; the bundle's verdict and figures come from images it never saw
(`search_data`: a seeded split of the validation set, stratified by label, made only when a search runs).

1. Candidates: each is the uniform INT8 model with some convolutions back in float. Where the converter can revert
   (ONNX Runtime: its Q/DQ dropped and float weights restored; OpenVINO: its FakeQuantize removed and float weights
   restored, as NNCF's accuracy control does; LiteRT: converted again with the uniform conversion's calibrated
   ranges) every candidate comes from the one calibration; TensorRT converts each with the layers excluded.
   Either way a candidate is a stage-cache entry keyed by its float layers.
2. Measure: the mean KL divergence of a candidate's softmax from FP32's on the search's images: continuous, so no
   single image decides a ranking (`search_data.kl`).
3. Ranking, coarse to fine: the blocks (stem, each block of units, head) are ranked by the KL their reverting
   removes; a group about to be added is first refined into its units, a unit into its layers, each ranked on top of
   the current mix, while the budget allows, so the answer reaches single layers.
4. Early stop: the top-ranked blocks that keep at least half the layers INT8 are tried together; when even that mix
   fails the gate, INT8 cannot pass with most layers INT8 (the error is spread over the network): the search stops
   and says so in one line, with the alternatives.
5. Greedy, NNCF's scheme: add the top-ranked group to the mix; a mix that passes the gate is the answer; an addition
   that does not lower the KL is taken back and the next groups are ranked again on the current mix.
6. The answer is judged on the report's images; then it must be faster than the engine's FP32 by more than the
   spread of both (`search_speed`), a decision kept in the stage cache.

Each evaluation counts against `--int8-search-budget`; progress and an ETA go to the log. A candidate that fails to
convert or run is recorded with its error and skipped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from bitdeploy.builder import plan as build_plan
from bitdeploy.builder import search_data
from bitdeploy.builder.bundle import draft_manifest
from bitdeploy.builder.convert import conversion_key, convert, revert, revert_key
from bitdeploy.builder.gate import Evaluated, evaluate
from bitdeploy.builder.options import BuildOptions
from bitdeploy.builder.plan import RowPlan
from bitdeploy.builder.prepare import BuildContext
from bitdeploy.builder.result import float_precision
from bitdeploy.builder.search_record import Tried, candidate, count, layer_cost, speed_record
from bitdeploy.builder.search_speed import FP32, MIX, RULE, UNIFORM, SpeedVerdict, decide
from bitdeploy.builder.timing import Timed
from bitdeploy.converters import layers
from bitdeploy.converters.base import Artifact
from bitdeploy.core.cache import StageCache
from bitdeploy.core.errors import ResourceError, first_line
from bitdeploy.runtimes.bundle.manifest import GateResult
from bitdeploy.runtimes.bundle.manifest_mix import ImageSets, Int8Mix, LayerCost

MAX_FLOAT_SHARE = 0.5  # a mix keeps at least half the quantized layers INT8: a mostly float bundle is not "INT8"
RERANK = 3  # groups ranked again on the current mix when an addition does not help (NNCF re-ranks them all)
LEVELS = ("block", "unit", "layer")
T = TypeVar("T")
ALTERNATIVES = "use FP32, fp16 or bf16, or quantization-aware fine-tuning"


@dataclass
class SearchOutcome:
    record: Int8Mix
    line: str  # the one line the build prints for this engine
    chosen: Evaluated | None  # the mix, judged on the report's images; None: the row keeps uniform INT8
    ctx: BuildContext | None = None  # the report's images, which the chosen bundle's self-test is drawn from


def level(group: layers.Group) -> str:
    if len(group.layers) == 1 and group.name == group.layers[0]:
        return "layer"
    return "unit" if group.name.count(".") >= 2 else "block"


def children(group: layers.Group) -> list[layers.Group]:
    """The group's parts at the next finer level that has more than one (none for a single layer)."""
    for finer in LEVELS[LEVELS.index(level(group)) + 1 :]:
        parts = layers.groups(group.layers, finer)
        if len(parts) > 1:
            return parts
    return []


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
        self.row_name, self.uniform, self.log = plan.name, uniform, log
        self.spec, self.budget = opts.gate.spec(), opts.gate.int8_search_budget
        self.reverting = plan.converter().reverts
        self.evaluations, self.rankings = 0, 0
        self.seconds: list[float] = []
        self.started = time.perf_counter()
        self.tried: list[Tried] = []
        self.seen: dict[tuple[str, ...], Tried] = {}
        self.costs: list[LayerCost] = []
        self.reported: tuple[Tried, GateResult] | None = None  # the answer and its figures on the report's images
        self.timed: SpeedVerdict | None = None
        self.quantized = self.quantized_layers()
        self.max_float = math.floor(MAX_FLOAT_SHARE * len(self.quantized))

    # -- the search ---------------------------------------------------------------------------------------------
    def run(self) -> SearchOutcome:
        record = Int8Mix(
            engine=self.plan.target.backend,
            gate=self.spec.describe(),
            granularity=LEVELS[0],
            quantizable_layers=len(self.quantized),
            float_precision=float_precision(self.uniform.artifact.target),
            budget=self.budget,
            measure="kl",
            made_by="revert" if self.reverting else "convert",
        )
        q = self.uniform.artifact.target.quantization
        if q is not None and q.details.get("accuracy_control"):
            return self.end(record, "accuracy control", ACCURACY_CONTROL)
        parts = search_data.split(self.ctx, self.spec, self.opts.seed)
        if isinstance(parts, str):
            return self.end(record, "too few images", parts)
        self.parts = parts
        on_search = search_data.judge(self.uniform, parts.search, self.spec)
        on_report = search_data.judge(self.uniform, parts.report, self.spec).result
        self.base = Tried(UNIFORM, (), 0, on_search, search_data.kl(on_search.logits, parts.search.ctx.reference))
        self.base.key = conversion_key(self.plan, self.ctx)[1]
        uniform = replace(candidate(self.base), report_top1=on_report.top1, report_agreement=on_report.agreement)
        sets = ImageSets(self.ctx.data.source, parts.describe(), parts.total, parts.search.size, parts.report.size)
        record = replace(record, uniform=replace(uniform, report_passed=int(on_report.passed)), sets=sets)
        if len(self.quantized) < 2:
            return self.end(record, "nothing to choose", "fewer than two quantized layers to choose from")
        self.log(
            f"[{self.row_name}] uniform INT8 fails the gate ({record.gate}): searching {len(self.quantized)} quantized "
            f"layers on {parts.search.size} of {parts.total} validation images (the other {parts.report.size} report; "
            f"budget {self.budget} evaluations, candidates by {record.made_by}); there it has {self.base.figures()}"
        )
        answer, stop, why = self.search()
        if answer is None:
            return self.end(record, stop, why)
        return self.settle(record, answer)

    def search(self) -> tuple[Tried | None, str, str]:
        """(the answer on the search's images or None, why the search stopped, the line when there is none)."""
        ranked = self.rank(layers.groups(self.quantized, LEVELS[0]), self.base)
        ceiling = None if any(t.passed for t in self.tried) else self.ceiling(ranked)
        if ceiling is not None and ceiling.found is not None and not self.passes_point(ceiling):
            return None, "spread", self.spread_line(ceiling)
        answer = self.greedy(ranked)
        if answer is None and ceiling is not None and ceiling.passed:
            answer = ceiling
        if answer is not None:
            return answer, "passed", ""
        best = self.best()
        found = f"; best found: {best.describe()}" if best is not None else ""
        return (
            None,
            "budget",
            f"no mix keeping most layers INT8 passes the gate ({self.spec.describe()}) within {self.budget} "
            f"evaluations{found}; {ALTERNATIVES}",
        )

    def rank(self, groups: list[layers.Group], base: Tried) -> list[layers.Group]:
        """`groups` measured on top of `base` (while the budget lasts), best first: a mix that passes, then by KL;
        unmeasured and failed groups after them."""
        self.rankings += 1
        measured: list[tuple[layers.Group, Tried]] = []
        for g in groups:
            float_layers = _merge(base.float_layers, g.layers)
            if len(float_layers) > self.max_float or float_layers == base.float_layers:
                continue
            t = self.evaluate(float_layers, f"+ {g.name}", base.groups + 1)
            if t is None:
                break
            if t.found is not None:
                measured.append((g, t))
            if t.passed:
                break  # it ranks first whatever the others measure: the greedy takes (or refines) it next
        measured.sort(key=lambda m: (not m[1].passed, m[1].kl))
        for rank, (g, t) in enumerate(measured, 1):
            self.costs.append(layer_cost(g, level(g), t, base, rank, self.rankings))
        done = {g.name for g, _ in measured}
        rest = [g for g in groups if g.name not in done]  # the budget, a pass or an error left them unmeasured
        self.costs += [LayerCost(g.name, len(g.layers), level=level(g), ranking=self.rankings) for g in rest]
        return [g for g, _ in measured] + rest

    def ceiling(self, ranked: list[layers.Group]) -> Tried | None:
        """The most a mix may revert, in float together: the top-ranked groups up to half the quantized layers (a
        group that does not fit whole adds its first layers). None when the budget is spent."""
        chosen: tuple[str, ...] = ()
        for g in ranked:
            room = self.max_float - len(chosen)
            if room <= 0:
                break
            chosen = _merge(chosen, tuple(n for n in g.layers if n not in chosen)[:room])
        if not chosen:
            return None
        return self.evaluate(chosen, f"ceiling: {count(len(chosen))} of the most costly groups", len(ranked))

    def greedy(self, ranked: list[layers.Group]) -> Tried | None:
        """NNCF's scheme: add the top group (refined first where the budget allows); stop at a mix that passes;
        take back an addition that does not lower the KL and rank the next groups again on the current mix."""
        current, queue, stepped_back = self.base, list(ranked), True
        while queue and self.evaluations < self.budget:
            group = queue[0]
            parts = children(group)
            if parts and self.evaluations + len(parts) <= self.budget:
                queue = self.rank(parts, current) + queue[1:]
                continue
            queue.pop(0)
            float_layers = _merge(current.float_layers, group.layers)
            if len(float_layers) > self.max_float or float_layers == current.float_layers:
                continue
            t = self.evaluate(float_layers, f"+ {group.name}", current.groups + 1)
            if t is None:
                break
            if t.found is None:
                continue
            if t.passed:
                return t
            if t.kl <= current.kl or stepped_back:
                current, stepped_back = t, False
                continue
            stepped_back = True
            queue = self.rank(queue[:RERANK], current) + queue[RERANK:] + [group]
        return None

    # -- one candidate ------------------------------------------------------------------------------------------
    def evaluate(self, float_layers: tuple[str, ...], name: str, groups: int) -> Tried | None:
        """The mix with `float_layers` in float, converted (or reverted) and measured on the search's images;
        None when the budget is spent. A mix that fails to convert or run is recorded and returned with its error."""
        key = tuple(sorted(float_layers))
        if key in self.seen:
            return self.seen[key]
        if self.evaluations >= self.budget:
            return None
        began = time.perf_counter()
        part = self.parts.search

        def measure() -> Tried:
            work, artifact, cache_key = self.make(key)
            found = search_data.verdict(evaluate(self.plan, part.ctx, self.opts, work, artifact, key), part, self.spec)
            return Tried(name, key, groups, found, search_data.kl(found.logits, part.ctx.reference), cache_key)

        done = self.guarded(measure)  # a candidate that fails is recorded and skipped: the search goes on
        t = done if isinstance(done, Tried) else Tried(name, key, groups, None, math.inf, error=done)
        self.seconds.append(time.perf_counter() - began)
        self.evaluations += 1
        self.seen[key] = t
        self.tried.append(t)
        eta = max(0, self.budget - self.evaluations) * sum(self.seconds) / len(self.seconds)
        self.log(f"[{self.row_name}] search {self.evaluations}/{self.budget}: {name}: {t.figures()}; ETA {eta:.0f} s")
        return t

    def make(self, float_layers: tuple[str, ...]) -> tuple[Path, Artifact, str]:
        if self.reverting:
            uniform = (self.uniform.work, self.uniform.artifact)
            work, artifact = revert(self.plan, self.ctx, self.cache, uniform, float_layers)
            return work, artifact, revert_key(self.plan, self.ctx, float_layers)[1]
        work, artifact = convert(self.plan, self.ctx, self.cache, float_layers)
        return work, artifact, conversion_key(self.plan, self.ctx, float_layers)[1]

    def quantized_layers(self) -> list[str]:
        """The convolutions uniform INT8 quantized: read from its model file where the converter can, else what
        its quantization record keeps in float taken from the export's convolutions."""
        q = self.uniform.artifact.target.quantization
        kept = set((q.details.get("float_layers") or []) if q is not None else [])
        with suppress(NotImplementedError):  # LiteRT, TensorRT: what the conversion recorded
            kept = set(self.plan.converter().float_layers(self.uniform.model_path))
        return [name for name in layers.conv_layers(self.ctx.onnx) if name not in kept]

    # -- the answer ---------------------------------------------------------------------------------------------
    def settle(self, record: Int8Mix, answer: Tried) -> SearchOutcome:
        """The answer judged on the report's images, then timed against FP32: chosen, or the line why not."""
        report = self.parts.report
        judged = self.guarded(lambda: self.on_report(answer))
        if isinstance(judged, str):
            return self.end(
                record,
                "report",
                f"the mix that passes ({answer.describe()}) could not run on the report's images ({judged})",
            )
        r = judged.result
        self.reported = (answer, r)
        if not r.passed:
            miss = self.spec.shortfall(r.top1_drop_pp, r.agreement, r.top1_drop_ci_pp, r.agreement_ci)
            return self.end(
                record,
                "report",
                f"the mix that passes on the search's {self.parts.search.size} images ({answer.describe()}) "
                f"fails on the report's {report.size}: {miss}; {ALTERNATIVES}",
            )
        if not self.uniform.runs_here or not judged.runs_here:
            return self.end(
                record,
                "not timed",
                f"a mix passes the gate ({answer.describe()}) but {self.plan.target.title} cannot run here to show "
                "it is faster than FP32; rebuild where it runs",
            )
        verdict = self.guarded(lambda: self.speed(answer, judged))
        if isinstance(verdict, str):
            return self.end(record, "not timed", f"the mix that passes could not be timed against FP32 ({verdict})")
        record = replace(record, fp32_p50_ms=verdict.p50.get(FP32), fp32_p50_spread=verdict.spread.get(FP32))
        record = replace(record, speed=speed_record(verdict))
        self.timed = verdict
        if not verdict.kept:
            return self.end(
                record,
                "speed",
                f"the mix that passes ({answer.describe()}) is not faster than {self.plan.target.title} FP32 by "
                f"more than the spread of both: {verdict.describe()}; use the FP32 bundle",
            )
        record = self.finish(record, answer, "passed")
        line = (
            f"{self.row_name}: {len(answer.float_layers)} of {record.quantizable_layers} layers kept in float "
            f"({_names(answer.float_layers)}); on the {report.size} report images top-1 {(r.top1 or 0) * 100:.2f}% "
            f"({-(r.top1_drop_pp or 0):+.2f} pp), agreement {(r.agreement or 0) * 100:.2f}%; {verdict.describe()}; "
            f"{self.evaluations} evaluations in {record.search_s:.0f} s"
        )
        return SearchOutcome(record, line, judged, report.ctx)

    def on_report(self, answer: Tried) -> Evaluated:
        work, artifact, _ = self.make(answer.float_layers)
        judged = evaluate(self.plan, self.parts.report.ctx, self.opts, work, artifact, answer.float_layers)
        return search_data.verdict(judged, self.parts.report, self.spec)

    def guarded(self, step: Callable[[], T]) -> T | str:
        """`step`'s result, or its error in a line: a failing SDK call ends the search, never the row (a full or
        failing disk still stops the build)."""
        try:
            return step()
        except ResourceError as exc:
            if exc.kind != "memory":
                raise
            return first_line(exc)
        except Exception as exc:  # an SDK's own error type
            return f"{type(exc).__name__}: {first_line(exc)}"

    def speed(self, answer: Tried, judged: Evaluated) -> SpeedVerdict:
        """The answer, uniform INT8 and the engine's FP32 timed together (or the stage cache's decision)."""
        fp32_plan = build_plan.sibling(self.plan, "fp32", self.opts)
        fp32_work, fp32 = convert(fp32_plan, self.ctx, self.cache)
        device, size = self.uniform.device, self.ctx.resolution
        fp32_manifest = draft_manifest(fp32, self.ctx, "fp32")
        items = {
            FP32: (
                Timed(FP32, fp32_work / fp32.model_file, fp32_manifest, device, size),
                conversion_key(fp32_plan, self.ctx)[1],
            ),
            UNIFORM: (Timed(UNIFORM, self.uniform.model_path, self.uniform.manifest, device, size), self.base.key),
            MIX: (Timed(MIX, judged.model_path, judged.manifest, device, size), answer.key),
        }
        self.log(f"[{self.row_name}] timing the mix with FP32 and uniform INT8 ({RULE})")
        return decide(items, self.opts, self.cache, self.log)

    # -- records ------------------------------------------------------------------------------------------------
    def end(self, record: Int8Mix, stop: str, why: str) -> SearchOutcome:
        return SearchOutcome(self.finish(record, None, stop), f"{self.row_name}: {why}", None)

    def finish(self, record: Int8Mix, answer: Tried | None, stop: str) -> Int8Mix:
        in_float = set(answer.float_layers) if answer is not None else set()
        timed, candidates = self.timed, []
        for t in self.tried:
            c = candidate(t, chosen=answer is not None and t is answer)
            if self.reported is not None and t is self.reported[0]:
                r = self.reported[1]
                c = replace(c, report_top1=r.top1, report_agreement=r.agreement, report_passed=int(r.passed))
                if timed is not None:
                    c = replace(c, p50_ms=timed.p50.get(MIX), p50_spread=timed.spread.get(MIX))
            candidates.append(c)
        uniform = record.uniform
        if timed is not None and uniform is not None:
            uniform = replace(uniform, p50_ms=timed.p50.get(UNIFORM), p50_spread=timed.spread.get(UNIFORM))
        finest = max((LEVELS.index(c.level or LEVELS[0]) for c in self.costs), default=0)
        return replace(
            record,
            uniform=uniform,
            granularity=LEVELS[finest],
            float_layers=sorted(in_float),
            evaluations=self.evaluations,
            search_s=round(time.perf_counter() - self.started, 1),
            candidates=candidates,
            sensitivity=[replace(c, float_in_mix=int(bool(c.name) and self._in(c, in_float))) for c in self.costs],
            stop=stop,
        )

    def _in(self, cost: LayerCost, in_float: set[str]) -> bool:
        members = [n for n in self.quantized if n == cost.name or n.startswith(f"{cost.name}.")]
        return bool(members) and set(members) <= in_float

    def passes_point(self, t: Tried) -> bool:
        """The gate met by the point figures on the search's images (no margin): what the early stop asks of the
        ceiling, since a mix that fails even so cannot pass."""
        r = t.found.result if t.found is not None else None
        return r is not None and self.spec.passes(r.top1_drop_pp or 0.0, r.agreement)

    def best(self) -> Tried | None:
        done = [t for t in self.tried if t.found is not None]
        return min(done, key=lambda t: (not t.passed, t.kl), default=None)

    def spread_line(self, ceiling: Tried) -> str:
        assert ceiling.found is not None
        r, share = ceiling.found.result, 1.0 - ceiling.kl / self.base.kl if self.base.kl > 0 else 0.0
        return (
            f"INT8 cannot meet the gate ({self.spec.describe()}) with most layers INT8: the error is spread over the "
            f"network (with the most costly groups in float, {len(ceiling.float_layers)} of {len(self.quantized)} "
            f"layers, top-1 {(r.top1 or 0) * 100:.2f}% and agreement {(r.agreement or 0) * 100:.2f}% on the search's "
            f"{self.parts.search.size} images, {share:.0%} of uniform INT8's KL removed; {self.evaluations} "
            f"evaluations); {ALTERNATIVES}"
        )


ACCURACY_CONTROL = (
    "not searched: NNCF's accuracy control already chose this model's float layers on the whole validation split, "
    "which the search would split into its own images and the report's; rebuild without --accuracy-control to "
    "search, or with --int8-fallback none for NNCF's result alone"
)


def _merge(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(set(a) | set(b)))


def _names(float_layers: tuple[str, ...]) -> str:
    return ", ".join(float_layers) if len(float_layers) <= 3 else f"{', '.join(float_layers[:3])}, ..."
