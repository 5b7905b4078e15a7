"""The manifest's `int8_mix` as text: the one summary line and the sensitivity table that `bitdeploy inspect` and
the build's report show. Stdlib only; reads the typed record (`manifest_mix.Int8Mix`), writes nothing. "error
removed" is the share of the error the record's `measure` counts (KL divergence from FP32 for the current search).
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
    split = mix.sets is not None  # figures on the report's images where the record has them
    base = (uniform.report_agreement if split else uniform.agreement) if uniform is not None else None
    kept = f"{len(mix.float_layers)} of {mix.quantizable_layers} layers kept in {mix.float_precision}"
    if chosen is not None:
        top1, agreement = (chosen.report_top1, chosen.report_agreement) if split else (chosen.top1, chosen.agreement)
        kept += f" ({chosen.name}): top-1 {_pct(top1)}, agreement {_pct(agreement)}"
        kept += f" vs uniform INT8's {_pct(base)}" if base is not None else ""
        kept += " on the report's images" if split else ""
    elif not mix.float_layers:
        kept = f"no mix chosen, all {mix.quantizable_layers} layers INT8 (the bundle is uniform INT8"
        if split:  # as a build without a search judges it
            kept += ", judged on the whole validation split)"
        else:
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
    return f"{mix.engine or '?'}{gate}: {kept}; {search}; {speed}{_more(mix)}"


def _more(mix: Int8Mix) -> str:
    """What bundles from the split search add: which images did what, why it stopped, what failed to convert."""
    parts = []
    if mix.sets is not None:
        sets = mix.sets
        parts.append(
            f"searched on {sets.search} of {sets.validation} validation images, reported on the other {sets.report}"
        )
    if mix.stop and mix.chosen is None:
        parts.append(f"stopped: {mix.stop}")
    failed = sum(1 for c in mix.candidates if c.error)
    if failed:
        parts.append(f"{failed} candidate{'s' if failed > 1 else ''} failed to convert (skipped)")
    return "".join(f"; {p}" for p in parts)


def sensitivity_rows(mix: Int8Mix) -> list[list[str]]:
    """One row of COLUMNS per group of layers, most costly to quantize first (unmeasured groups last, as such)."""
    return [_row(c) for c in ranked(mix)]


def ranked(mix: Int8Mix) -> list[LayerCost]:
    """The sensitivity in rank order, ranking by ranking (the first on uniform INT8, then each refinement or
    re-ranking on the mix of its time); a group without a rank after the ranked ones of its ranking."""
    big = len(mix.sensitivity) + 1
    return sorted(mix.sensitivity, key=lambda c: (c.ranking or 1, c.rank if c.rank is not None else big))


def rank_label(cost: LayerCost) -> str:
    """ "3", or "2.3" for the third of the second ranking (a refinement)."""
    rank = "-" if cost.rank is None else str(cost.rank)
    return rank if (cost.ranking or 1) == 1 else f"{cost.ranking}.{rank}"


def measured(cost: LayerCost) -> bool:
    return cost.error_reduction is not None


def _row(c: LayerCost) -> list[str]:
    gain = "-" if c.agreement_gain_pp is None else f"{c.agreement_gain_pp:+.2f} pp"
    return [
        rank_label(c),
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
