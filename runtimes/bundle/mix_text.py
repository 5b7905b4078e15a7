"""The manifest's `int8_mix` as text: the one summary line and the sensitivity table that `bitdeploy inspect` and
the build's report show. Stdlib only; reads the typed record (`manifest_mix.Int8Mix`), writes nothing.
"""

from __future__ import annotations

from bitdeploy.runtimes.bundle.manifest_mix import Int8Mix, LayerCost

COLUMNS = ("rank", "group", "layers", "error removed", "agreement gain", "in mix")
UNMEASURED = "not measured"


def _pct(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else f"{x * 100:{spec}}%"


def _ms(x: float | None) -> str | None:
    return None if x is None else f"{x:.2f} ms"


def summary(mix: Int8Mix) -> str:
    """One line: engine and gate, how many layers stayed in float (and the chosen mix's figures), the search's
    granularity, evaluations against the budget and seconds, and the p50 of the mix, uniform INT8 and FP32 where
    they were timed."""
    chosen, uniform = mix.chosen, mix.uniform
    base = uniform.agreement if uniform is not None else None
    kept = f"{len(mix.float_layers)} of {mix.quantizable_layers} layers kept in {mix.float_precision}"
    if chosen is not None:
        kept += f" ({chosen.name}): top-1 {_pct(chosen.top1)}, agreement {_pct(chosen.agreement)}"
        kept += f" vs uniform INT8's {_pct(base)}" if base is not None else ""
    elif not mix.float_layers:
        kept = f"no mix chosen, all {mix.quantizable_layers} layers INT8 (the bundle is uniform INT8"
        kept += f", agreement {_pct(base)})" if base is not None else ")"
    took = f" in {mix.search_s:.0f} s" if mix.search_s is not None else ""
    search = f"granularity {mix.granularity}, {mix.evaluations}/{mix.budget} evaluations{took}"
    timed = [
        (what, t)
        for what, t in (
            ("mix", _ms(chosen.p50_ms if chosen else None)),
            ("uniform INT8", _ms(uniform.p50_ms if uniform else None)),
            ("FP32", _ms(mix.fp32_p50_ms)),
        )
        if t is not None
    ]
    speed = "p50 " + " vs ".join(f"{what} {t}" for what, t in timed) if timed else "not timed"
    gate = f", gate {mix.gate}" if mix.gate else ""
    return f"{mix.engine or '?'}{gate}: {kept}; {search}; {speed}"


def sensitivity_rows(mix: Int8Mix) -> list[list[str]]:
    """One row of COLUMNS per group of layers, most costly to quantize first (unmeasured groups last, as such)."""
    return [_row(c) for c in ranked(mix)]


def ranked(mix: Int8Mix) -> list[LayerCost]:
    """The sensitivity in rank order (a group without a rank after the ranked ones, in record order)."""
    big = len(mix.sensitivity) + 1
    return sorted(mix.sensitivity, key=lambda c: c.rank if c.rank is not None else big)


def measured(cost: LayerCost) -> bool:
    return cost.error_reduction is not None


def _row(c: LayerCost) -> list[str]:
    gain = "-" if c.agreement_gain_pp is None else f"{c.agreement_gain_pp:+.2f} pp"
    return [
        "-" if c.rank is None else str(c.rank),
        c.name or "?",
        "-" if c.layers is None else str(c.layers),
        _pct(c.error_reduction, ".1f") if measured(c) else UNMEASURED,
        gain,
        "float" if c.float_in_mix else "INT8",
    ]


def table(mix: Int8Mix) -> list[str]:
    """The sensitivity as aligned text lines, a header first (group left-aligned, figures right); empty when the
    search measured no group."""
    rows = sensitivity_rows(mix)
    if not rows:
        return []
    lines = [list(COLUMNS), *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return [
        "  ".join(
            cell.ljust(w) if i in (0, 1, 5) else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))
        ).rstrip()
        for line in lines
    ]


def inspect_rows(mix: Int8Mix) -> list[tuple[str, str]]:
    """`bitdeploy inspect`'s (field, text) rows: the summary, then the table under it (no field name)."""
    return [("int8 mix", summary(mix)), *(("", line) for line in table(mix))]
