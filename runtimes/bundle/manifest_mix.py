"""The manifest's `int8_mix`: what the INT8 search measured and chose when uniform INT8 failed the gate.

`sets` names the search's images and the report's (disjoint parts of the validation split: every figure of the
bundle's `accuracy` is on the report's, every figure here on the search's unless named `report_*`). `sensitivity`
lists each group of layers (a block, a bottleneck unit or a convolution) a ranking measured, with what leaving it in
float on top of the mix it was ranked on bought (`measure`: the mean KL divergence from FP32 since the search ranks
by it; bundles from before it ranked by the mean |logit error|), most costly first within each ranking, and whether
the chosen mix keeps it in float. `candidates` are the mixes the search evaluated, in order, with their figures,
and an `error` for one that failed to convert; `speed` the keep-or-refuse timing. The runtime reads none of it;
`bitdeploy inspect` and the build's report show it. Stdlib only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bitdeploy.runtimes.bundle.manifest_parse import FlatRecord, bad, number, numbers, obj, text

WORDS = {"measure": "mean_abs_logit_diff", "made_by": "convert", "stop": ""}  # Int8Mix's text fields and defaults


@dataclass(frozen=True)
class LayerCost(FlatRecord):
    """One group of layers and what quantizing it costs: the figures with only this group left in float."""

    SECTION: ClassVar[str] = "int8_mix.sensitivity"
    name: str | None = None
    layers: int | None = None
    agreement: float | None = None  # top-1 agreement with FP32, 0..1, with this group in float too
    mean_abs_logit_diff: float | None = None
    agreement_gain_pp: float | None = None  # against the mix it was ranked on (uniform INT8 for the first ranking)
    error_reduction: float | None = None  # 1 - error / that mix's error, by `Int8Mix.measure`
    rank: int | None = None  # 1: the most costly to quantize, within its ranking
    float_in_mix: int | None = None  # 1: the chosen mix keeps this group in float
    kl: float | None = None  # mean KL divergence from FP32, nats
    level: str | None = None  # block | unit | layer
    ranking: int | None = None  # which ranking measured it: 1 on uniform INT8, then each refinement or re-ranking


@dataclass(frozen=True)
class Candidate(FlatRecord):
    """One mix the search evaluated: the `float_groups` most sensitive groups in float."""

    SECTION: ClassVar[str] = "int8_mix.candidates"
    name: str | None = None  # what it adds to the mix before it ("+ body.block2.unit01"), or "ceiling: ..."
    float_groups: int | None = None
    float_layers: int | None = None
    top1: float | None = None
    agreement: float | None = None
    mean_abs_logit_diff: float | None = None
    passed: int | None = None  # 1: met the gate (on the search's images)
    p50_ms: float | None = None  # batch-1 p50, timed with FP32 and uniform INT8 in one interleaved run
    p50_spread: tuple[float, ...] | None = None  # [min, max] of the rounds' p50
    chosen: int | None = None  # 1: the bundle holds this mix
    kl: float | None = None  # mean KL divergence from FP32, nats
    error: str | None = None  # why it could not be converted or evaluated (skipped)
    report_top1: float | None = None  # the search's answer judged on the report's images
    report_agreement: float | None = None
    report_passed: int | None = None


@dataclass(frozen=True)
class ImageSets(FlatRecord):
    """The validation split's two disjoint parts: the search ranks and chooses on one, the gate reports on the other."""

    SECTION: ClassVar[str] = "int8_mix.sets"
    source: str | None = None  # the validation data, e.g. "digits:val"
    how: str | None = None  # "validation split stratified by label, seed 0"
    validation: int | None = None  # images in the validation split
    search: int | None = None
    report: int | None = None


@dataclass(frozen=True)
class SpeedDecision(FlatRecord):
    """The keep-or-refuse timing of the search's answer against its engine's FP32."""

    SECTION: ClassVar[str] = "int8_mix.speed"
    rule: str | None = None
    rounds: int | None = None  # interleaved rounds
    kept: int | None = None  # 1: faster than FP32 by more than the spread of both
    cached: int | None = None  # 1: the stage cache's decision for these bundles on this host
    disturbed: str | None = None  # the machine was busy while timing, after measuring again


@dataclass(frozen=True)
class Int8Mix:
    engine: str = ""
    gate: str = ""  # the gate it met, e.g. "agreement >= 99.5 %"
    granularity: str = "layer"  # layer | unit | block
    quantizable_layers: int = 0  # layers uniform INT8 quantized
    float_layers: list[str] = field(default_factory=list)  # the layers the chosen mix keeps in float (searched)
    float_precision: str = "fp32"  # what those layers compute in
    evaluations: int = 0
    budget: int = 0
    search_s: float | None = None
    uniform: Candidate | None = None  # uniform INT8's figures (0 groups in float)
    fp32_p50_ms: float | None = None
    fp32_p50_spread: tuple[float, ...] | None = None
    sensitivity: list[LayerCost] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    measure: str = "mean_abs_logit_diff"  # what ranks the groups: "kl" (mean KL divergence from FP32)
    made_by: str = "convert"  # "revert": from the uniform INT8 conversion, no recalibration; "convert": each converted
    stop: str = ""  # why the search ended
    sets: ImageSets | None = None
    speed: SpeedDecision | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Int8Mix:
        where = "int8_mix"
        names = data.get("float_layers") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise bad(f"{where}.float_layers", "a list of strings", names)

        def records(key: str, kind: type[FlatRecord]) -> list[Any]:
            items = data.get(key) or []
            if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
                raise bad(f"{where}.{key}", "a list of objects", items)
            return [kind.from_dict(i) for i in items]

        def count(key: str) -> int:
            value = data.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(f"{where}.{key}", "an integer", value)
            return value

        uniform, sets, speed = obj(data, "uniform", where), obj(data, "sets", where), obj(data, "speed", where)
        words = {k: text(data, k, where, default) or default for k, default in WORDS.items()}
        figures = {k: number(data, k, where) for k in ("search_s", "fp32_p50_ms")}
        return cls(
            engine=str(data.get("engine") or ""),
            gate=str(data.get("gate") or ""),
            granularity=str(data.get("granularity") or "layer"),
            quantizable_layers=count("quantizable_layers"),
            float_layers=list(names),
            float_precision=str(data.get("float_precision") or "fp32"),
            evaluations=count("evaluations"),
            budget=count("budget"),
            uniform=Candidate.from_dict(uniform) if uniform is not None else None,
            sensitivity=records("sensitivity", LayerCost),
            candidates=records("candidates", Candidate),
            fp32_p50_spread=numbers(data, "fp32_p50_spread", where),
            sets=ImageSets.from_dict(sets) if sets is not None else None,
            speed=SpeedDecision.from_dict(speed) if speed is not None else None,
            measure=words["measure"],
            made_by=words["made_by"],
            stop=words["stop"],
            **figures,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "gate": self.gate,
            "granularity": self.granularity,
            "quantizable_layers": self.quantizable_layers,
            "float_layers": list(self.float_layers),
            "float_precision": self.float_precision,
            "evaluations": self.evaluations,
            "budget": self.budget,
            "search_s": self.search_s,
            "uniform": None if self.uniform is None else self.uniform.to_dict(),
            "fp32_p50_ms": self.fp32_p50_ms,
            "fp32_p50_spread": None if self.fp32_p50_spread is None else list(self.fp32_p50_spread),
            "sensitivity": [c.to_dict() for c in self.sensitivity],
            "candidates": [c.to_dict() for c in self.candidates],
            **{k: getattr(self, k) for k in WORDS},
            "sets": None if self.sets is None else self.sets.to_dict(),
            "speed": None if self.speed is None else self.speed.to_dict(),
        }

    @property
    def chosen(self) -> Candidate | None:
        """The mix the bundle holds: the passing candidate with the float layers it lists."""
        return next((c for c in self.candidates if c.chosen), None)
