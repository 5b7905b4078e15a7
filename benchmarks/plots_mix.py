"""The report's INT8 sensitivity plot: for a bundle the INT8 search made (its manifest's `int8_mix`), one bar per
group of layers, most costly to quantize at the top, its length the share of uniform INT8's mean |logit error|
that keeping only that group in float removes; the groups the chosen mix keeps in float in their own colour.

The build puts `{"name": row, **Int8Mix.to_dict()}` per such row in its bench document's
`settings["int8_mix"]`; `mixes` reads them back (a malformed one is skipped, the report still renders).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bitdeploy.benchmarks.plots import _plt, to_base64_png
from bitdeploy.core.errors import BitdeployError
from bitdeploy.runtimes.bundle.manifest_mix import Int8Mix
from bitdeploy.runtimes.bundle.mix_text import measured, rank_label, ranked

XLABEL = {  # by the record's measure
    "mean_abs_logit_diff": "uniform INT8's mean |logit error| removed by keeping only this group in float, %",
    "kl": "KL divergence from FP32 removed by adding this group to its ranking's mix in float, %",
}
FLOAT_COLOUR = "#d62728"  # kept in float by the chosen mix
INT8_COLOUR = "#1f77b4"
UNMEASURED_FACE, UNMEASURED_HATCH = "#f4f4f4", "#c4c4c4"  # a pale hatched band across the row: no length to read
TITLE = "INT8 sensitivity"


def mixes(docs: Sequence[Mapping[str, Any]]) -> list[tuple[str, Int8Mix]]:
    """(row name, record) of every INT8 search the documents' builds stored, in order."""
    out = []
    for doc in docs:
        for item in (doc.get("settings") or {}).get("int8_mix") or []:
            if not isinstance(item, Mapping):
                continue
            try:
                out.append((str(item.get("name") or "?"), Int8Mix.from_dict(item)))
            except (BitdeployError, TypeError, ValueError):
                continue
    return out


def title(name: str, mix: Int8Mix) -> str:
    kept = len(mix.float_layers)
    return f"{name} ({mix.engine or '?'}): {kept} of {mix.quantizable_layers} layers kept in {mix.float_precision}"


def sensitivity_plot(name: str, mix: Int8Mix) -> Any:
    """The bar chart of one row's search (a matplotlib Figure), or None when it measured no group. Every group
    has a bar (patch gid = its name); an unmeasured group's is a pale hatched band across the row, labelled
    "not measured"."""
    costs = ranked(mix)
    if not costs:
        return None
    from matplotlib.patches import Patch

    plt = _plt()
    values = [c.error_reduction * 100 for c in costs if measured(c) and c.error_reduction is not None]
    lo, hi = min([0.0, *values]), max([0.0, *values])
    span = (hi - lo) or 1.0
    height = 0.32 * len(costs) + 2.3
    fig, ax = plt.subplots(figsize=(8, height))
    small = 7 if len(costs) > 30 else 8
    for i, c in enumerate(costs):
        if measured(c) and c.error_reduction is not None:
            value = c.error_reduction * 100
            colour = FLOAT_COLOUR if c.float_in_mix else INT8_COLOUR
            (bar,) = ax.barh(i, value, color=colour, height=0.7)
            gain = "" if c.agreement_gain_pp is None else f", {c.agreement_gain_pp:+.2f} pp"
            note, x = f"{value:.1f}%{gain}", max(value, 0.0) + 0.01 * span
        else:
            (bar,) = ax.barh(
                i, 1.32 * span, left=lo - 0.02 * span, height=0.7, color=UNMEASURED_FACE, hatch="//", linewidth=0
            )
            bar.set_edgecolor(UNMEASURED_HATCH)  # the hatch's colour; linewidth 0 leaves the band without an outline
            note, x = "not measured", lo + 0.01 * span
        bar.set_gid(c.name or "?")
        ax.text(x, i, note, va="center", fontsize=small, color="#333333", style="normal" if measured(c) else "italic")
    ax.set_yticks(
        range(len(costs)),
        [f"{rank_label(c)}. {c.name or '?'} ({c.layers or '?'})" for c in costs],
        fontsize=small,
    )
    ax.set_ylim(len(costs) - 0.5, -0.5)  # rank 1 on top
    ax.axvline(0, color="#444444", linewidth=0.8)
    ax.set_xlim(lo - 0.02 * span, hi + 0.3 * span)  # room for the labels right of the bars
    ax.set_xlabel(XLABEL.get(mix.measure, XLABEL["mean_abs_logit_diff"]))
    handles = [Patch(color=FLOAT_COLOUR, label="kept in float"), Patch(color=INT8_COLOUR, label="INT8")]
    if any(not measured(c) for c in costs):
        handles.append(Patch(facecolor=UNMEASURED_FACE, edgecolor=UNMEASURED_HATCH, hatch="//", label="not measured"))
    # under the figure: the longest bars (top) and the unmeasured bands (bottom) leave no free corner in the axis
    fig.legend(handles=handles, fontsize=8, loc="lower center", ncol=len(handles), frameon=False)
    subtitle = f"{mix.granularity} groups (layers in each), rank 1 the most costly to quantize"
    if mix.measure == "kl":
        finer = f", refined to {mix.granularity}s" if mix.granularity != "block" else ""
        subtitle = f"blocks{finer} (layers in each); rank 1 the most costly in its ranking"
    ax.set_title(f"{title(name, mix)}\n{subtitle}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1))
    return fig


def figures(found: list[tuple[str, Int8Mix]]) -> list[str | None]:
    """The base64 PNG of each (row, record)'s plot, in order (None: no group to draw); empty without matplotlib."""
    try:
        _plt()
    except ImportError:
        return []
    return [None if (fig := sensitivity_plot(name, mix)) is None else to_base64_png(fig) for name, mix in found]
