"""The manifest's `int8_mix`: what the INT8 search measured and chose when uniform INT8 failed the gate.

`sensitivity` lists each group of layers (a convolution, a bottleneck unit or a block) with what leaving only it in
float bought against uniform INT8 (agreement with FP32, mean |logit error|), most costly to quantize first, and
whether the chosen mix keeps it in float. `candidates` are the mixes the bisection evaluated (the k most sensitive
groups in float) with their gate figures and, for those that passed, their p50. The runtime reads none of it;
`bitdeploy inspect` and the build's report show it. Stdlib only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bitdeploy.runtimes.bundle.manifest_parse import FlatRecord, bad, number, numbers, obj


@dataclass(frozen=True)
class LayerCost(FlatRecord):
    """One group of layers and what quantizing it costs: the figures with only this group left in float."""

    SECTION: ClassVar[str] = "int8_mix.sensitivity"
    name: str | None = None
    layers: int | None = None
    agreement: float | None = None  # top-1 agreement with FP32, 0..1, with only this group in float
    mean_abs_logit_diff: float | None = None
    agreement_gain_pp: float | None = None  # against uniform INT8
    error_reduction: float | None = None  # 1 - error / uniform INT8's error
    rank: int | None = None  # 1: the most costly to quantize
    float_in_mix: int | None = None  # 1: the chosen mix keeps this group in float


@dataclass(frozen=True)
class Candidate(FlatRecord):
    """One mix the search evaluated: the `float_groups` most sensitive groups in float."""

    SECTION: ClassVar[str] = "int8_mix.candidates"
    name: str | None = None  # "3 most sensitive groups", or one group's name
    float_groups: int | None = None
    float_layers: int | None = None
    top1: float | None = None
    agreement: float | None = None
    mean_abs_logit_diff: float | None = None
    passed: int | None = None  # 1: met the gate
    p50_ms: float | None = None  # batch-1 p50, timed with FP32 and uniform INT8 in one interleaved run
    p50_spread: tuple[float, ...] | None = None  # [min, max] of the rounds' p50
    chosen: int | None = None  # 1: the bundle holds this mix


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

        uniform = obj(data, "uniform", where)
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
        }

    @property
    def chosen(self) -> Candidate | None:
        """The mix the bundle holds: the passing candidate with the float layers it lists."""
        return next((c for c in self.candidates if c.chosen), None)
