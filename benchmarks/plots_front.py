"""The accuracy-latency plot: one panel per device class, the Pareto front marked, the selection circled; a marker
per target, a fill per precision, a colour per (model, resolution) cell."""

from __future__ import annotations

from typing import Any

from bitdeploy.benchmarks.plots import PALETTE, _plain_log_axis, _plt, _span_limits, pareto_front
from bitdeploy.core.targets import backend_names

TARGET_MARKERS = {**dict(zip(backend_names(), ("o", "s", "D", "^"))), "pytorch": "*"}  # the records' backends
SPARE_MARKERS = ("v", "P", "h", "<", ">", "p", "X")  # targets registered later, in order of appearance
FILLS = {"fp32": ("full", "filled"), "fp16": ("left", "half-filled"), "int8": ("none", "hollow")}
BASELINE_GREY = "#bdbdbd"
INK = "#444444"  # the neutral colour of the marker legend's keys
MAX_PANEL_COLUMNS = 3  # more device classes wrap onto further rows; the PNG stays under 2000 px wide


def _candidate(r: dict[str, Any]) -> bool:
    """A row the front is drawn over: a bundle that passed its gate (not a PyTorch baseline, not a failed build)."""
    return r["entry"].get("kind") != "pytorch" and str(r["entry"].get("status")) == "valid"


def front_panels(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]], list[int]]]:
    """Per device class, in row order: (class, its rows with a top-1 and a p50, the indices of its Pareto front
    among them, fastest first). The front is taken over the valid bundles; baselines and failed rows are off it."""
    pts = [r for r in rows if r["top1"] is not None and r["p50"]]
    out = []
    for cls in dict.fromkeys(str(r.get("device_class") or "") for r in pts):
        panel = [r for r in pts if str(r.get("device_class") or "") == cls]
        cand = [i for i, r in enumerate(panel) if _candidate(r)]
        front = [cand[j] for j in pareto_front([(panel[i]["p50"], panel[i]["top1"]) for i in cand])]
        out.append((cls, panel, front))
    return out


def _cell(r: dict[str, Any]) -> str | None:
    e = r["entry"]
    return f"{e['model']} @ {e['resolution']} px" if e.get("model") and e.get("resolution") else None


def _colour_keys(pts: list[dict[str, Any]]) -> tuple[dict[int, str], dict[str, str], bool]:
    """(row id -> colour key, colour key -> colour, whether any key is a cell). Colour keys are "model @ px" cells,
    the same in every panel; a row without model and resolution is its own key (its label), and so is every row
    when the figure has a single cell (one colour would say nothing)."""
    by_cell = len({_cell(r) for r in pts} - {None}) > 1
    models = list(dict.fromkeys(str(r["entry"]["model"]) for r in pts if _cell(r)))

    def key(r: dict[str, Any]) -> str:
        cell = _cell(r) if by_cell else None
        return cell or r["label"] + (" (DISTURBED)" if r.get("disturbed") else "")

    def order(r: dict[str, Any]) -> tuple[int, int]:  # cells by model (first seen), then resolution; rows after
        if by_cell and _cell(r):
            return models.index(str(r["entry"]["model"])), int(r["entry"]["resolution"])
        return len(models), 0

    keys = {id(r): key(r) for r in pts}
    names = list(dict.fromkeys(keys[id(r)] for r in sorted(pts, key=order)))
    return keys, {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(names)}, by_cell


def _target(r: dict[str, Any]) -> str:
    e = r["entry"]
    return "pytorch" if e.get("kind") == "pytorch" else str(e.get("target") or "?").lower()


def _precision(r: dict[str, Any]) -> str:
    return str(r["entry"].get("precision") or "?").lower()


def _marker_style(marker: str, fill: str, colour: str, baseline: bool) -> dict[str, Any]:
    """Line2D keyword arguments of one point: the target's shape, the precision's fill, the colour's edge."""
    size = {"*": 14.0, "D": 8.0, "s": 8.0}.get(marker, 9.0)
    face = BASELINE_GREY if baseline else colour
    style: dict[str, Any] = {"marker": marker, "markersize": size, "markeredgecolor": colour, "markeredgewidth": 1.6}
    if fill == "none":  # hollow: a white face, so the error bar does not show through
        style.update(markerfacecolor="white")
    elif fill == "full":
        style.update(markerfacecolor=face)
    else:
        style.update(fillstyle=fill, markerfacecolor=face, markerfacecoloralt="white")
    return style


def _front_limits(panel: list[dict[str, Any]]) -> tuple[float, float, bool]:
    lows = [(r.get("p50_spread") or (r["p50"], r["p50"]))[0] for r in panel]
    highs = [(r.get("p50_spread") or (r["p50"], r["p50"]))[1] for r in panel]
    return _span_limits(min(lows + [r["p50"] for r in panel]), max(highs + [r["p50"] for r in panel]), 8.0)


def _panel_title(cls: str, panel: list[dict[str, Any]]) -> str:
    hosts = list(dict.fromkeys(str(r.get("host") or "?") for r in panel))
    shown = ", ".join(hosts[:3]) + (f" +{len(hosts) - 3}" if len(hosts) > 3 else "")
    return f"{cls or 'device class unknown'}\n({shown})"


def _draw_panel(
    ax: Any,
    panel: list[dict[str, Any]],
    front: list[int],
    keys: dict[int, str],
    colours: dict[str, str],
    markers: dict[str, str],
) -> None:
    xy = [(r["p50"], r["top1"] * 100) for r in panel]

    def ring(points: list[tuple[float, float]], colour: str, size: float, width: float, zorder: int, gid: str) -> None:
        ax.plot(
            [x for x, _ in points],
            [y for _, y in points],
            linestyle="none",
            zorder=zorder,
            gid=gid,
            **_ring(colour, size, width),
        )

    for i, r in enumerate(panel):
        x, y = xy[i]
        colour = colours[keys[id(r)]]
        lo, hi = r.get("p50_spread") or (x, x)
        faded = 1.0 if r["entry"].get("kind") == "pytorch" or _candidate(r) else 0.35
        # One error bar per point (the rounds' min-max of p50), even a zero-width one.
        ax.errorbar(x, y, xerr=[[x - lo], [hi - x]], fmt="none", ecolor=colour, alpha=0.8 * faded, capsize=3, zorder=2)
        target = _target(r)
        fill = FILLS.get(_precision(r), ("bottom", ""))[0]
        style = _marker_style(markers[target], fill, colour, target == "pytorch")
        ax.plot([x], [y], linestyle="none", alpha=faded, zorder=3, gid="point", **style)
        if r.get("disturbed"):
            ax.plot([x], [y], linestyle="none", marker="x", markersize=11, color="black", zorder=4, gid="disturbed")
    if front:
        # The front as a dashed staircase, carried to the slowest point so a single-point front is still drawn.
        fx = [xy[i][0] for i in front] + [max(x for x, _ in xy)]
        fy = [xy[i][1] for i in front] + [xy[front[-1]][1]]
        ax.step(fx, fy, where="post", color="black", linestyle="--", linewidth=1, alpha=0.6, zorder=1)
        ring([xy[i] for i in front], "black", 19, 1.2, 4, "pareto-front")
    chosen = [xy[i] for i, r in enumerate(panel) if r.get("selected")]
    if chosen:
        ring(chosen, "red", 27, 2.2, 5, "selected")
    lo, hi, log = _front_limits(panel)
    if log:
        _plain_log_axis(ax.xaxis, ax.set_xscale)
    ax.set_xlim(lo, hi)
    ax.margins(y=0.12)
    ax.grid(alpha=0.3, which="major")


def _marker_legend_handles(
    pts: list[dict[str, Any]], markers: dict[str, str], by_cell: bool
) -> tuple[list[Any], list[str]]:
    """The second legend: one key per target present (shape), per precision present (fill), and the overlays."""
    from matplotlib.lines import Line2D

    handles: list[Any] = []
    labels: list[str] = []

    def key(label: str, **style: Any) -> None:
        handles.append(Line2D([], [], linestyle=style.pop("linestyle", "none"), **style))
        labels.append(label)

    for target, marker in markers.items():
        baseline = target == "pytorch"
        key("pytorch (FP32 baseline)" if baseline else target, **_marker_style(marker, "full", INK, baseline))
    order = list(FILLS)
    for prec in sorted(dict.fromkeys(_precision(r) for r in pts), key=lambda p: order.index(p) if p in order else 3):
        fill, word = FILLS.get(prec, ("bottom", "bottom-filled"))
        key(f"{prec}: {word}", **_marker_style("o", fill, INK, False))
    key("Pareto front (ringed)", color="black", linestyle="--", linewidth=1, **_ring("black", 13, 1.2))
    if any(r.get("selected") for r in pts):
        key("selected", **_ring("red", 15, 2.2))
    noisy = [r["label"] for r in pts if r.get("disturbed")]
    if noisy:
        names = ", ".join(noisy[:2]) + (f" +{len(noisy) - 2}" if len(noisy) > 2 else "")
        key("timing disturbed (DISTURBED)" + ("" if not by_cell else f": {names}"), marker="x", color="black")
    if any(r["entry"].get("kind") != "pytorch" and not _candidate(r) for r in pts):
        key("not valid (faded, off the front)", **_marker_style("o", "full", INK, False), alpha=0.35)
    return handles, labels


def _ring(colour: str, size: float, width: float) -> dict[str, Any]:
    return {
        "marker": "o",
        "markersize": size,
        "markerfacecolor": "none",
        "markeredgecolor": colour,
        "markeredgewidth": width,
    }


def accuracy_vs_latency(rows: list[dict[str, Any]]) -> Any:
    """Top-1 against batch-1 p50, one panel per device class (shared top-1 axis, each its own latency axis).

    Colour: the (model, resolution) cell; marker shape: the target; fill: the precision (fp32 filled, fp16
    half-filled, int8 hollow); PyTorch baselines grey stars. No text beside the points: two legends outside
    the axes key them. Error bars: the rounds' p50 spread; x: disturbed timing. The Pareto front of each
    panel's valid bundles is the dashed staircase, its points ringed in black; the selected row is ringed in red.
    """
    from matplotlib.lines import Line2D

    panels = front_panels(rows)
    plt = _plt()
    if not panels:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.set_title("Top-1 against batch-1 p50 latency")
        ax.text(
            0.5,
            0.5,
            "no accuracy figures: run bench with --dataset,\nor report bundles built with an accuracy gate",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_xticks([])
        ax.set_yticks([])
        fig.tight_layout()
        return fig
    pts = [r for _, panel, _ in panels for r in panel]
    keys, colours, by_cell = _colour_keys(pts)
    markers: dict[str, str] = {}
    spare = iter(SPARE_MARKERS * 4)
    known = list(TARGET_MARKERS)  # the legend lists known targets in a fixed order, baselines last
    for target in sorted(
        dict.fromkeys(_target(r) for r in pts),
        key=lambda t: (t == "pytorch", known.index(t) if t in known else len(known)),
    ):
        markers[target] = TARGET_MARKERS.get(target) or next(spare)

    ncols = min(MAX_PANEL_COLUMNS, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, sharey=True, squeeze=False, figsize=(6 * ncols, 4.5 * nrows))
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            fig.delaxes(ax)
            continue
        cls, panel, front = panels[k]
        _draw_panel(ax, panel, front, keys, colours, markers)
        ax.set_title(_panel_title(cls, panel), fontsize=10)
        ax.set_xlabel("p50 latency, ms (lower is better)" + (", log" if ax.get_xscale() == "log" else ""))
        if k % ncols == 0:
            ax.set_ylabel("top-1, % (higher is better)")
    anchor = axes[0, ncols - 1]  # both legends to the right of the top-right panel
    handles, labels = _marker_legend_handles(pts, markers, by_cell)
    kinds = anchor.legend(
        handles,
        labels,
        title="marker: target; fill: precision",
        loc="upper left",
        borderaxespad=0,
        fontsize=8,
        title_fontsize=8,
    )
    anchor.add_artist(kinds)
    swatches = [
        Line2D([], [], linestyle="none", marker="s", markersize=9, markerfacecolor=c, markeredgecolor=c)
        for c in colours.values()
    ]
    keyed = anchor.legend(
        swatches,
        list(colours),
        title="colour: model @ input size" if by_cell else "colour: row",
        loc="upper left",
        borderaxespad=0,
        fontsize=8,
        title_fontsize=8,
    )
    _layout_front(fig, anchor, nrows, ncols, keyed, kinds)
    return fig


def _layout_front(fig: Any, anchor: Any, nrows: int, ncols: int, first: Any, second: Any) -> None:
    """Size the figure from its panels and its two legends (measured), panels left, legends stacked right."""
    renderer = fig.canvas.get_renderer()
    inch = fig.dpi
    sizes = [
        (leg.get_window_extent(renderer).width / inch, leg.get_window_extent(renderer).height / inch)
        for leg in (first, second)
    ]
    left, top, bottom, wgap, hgap, pad, gap = 0.85, 0.95, 0.65, 0.3, 1.25, 0.2, 0.15
    right = pad + max(w for w, _ in sizes) + 0.15
    pw = 5.2 if ncols < MAX_PANEL_COLUMNS else 4.6
    ph = max(4.2, (sizes[0][1] + gap + sizes[1][1] - (nrows - 1) * hgap) / nrows)
    width = left + ncols * pw + (ncols - 1) * wgap + right
    height = top + nrows * ph + (nrows - 1) * hgap + bottom
    fig.set_size_inches(width, height)
    fig.subplots_adjust(
        left=left / width,
        right=(width - right) / width,
        bottom=bottom / height,
        top=(height - top) / height,
        wspace=wgap / pw,
        hspace=hgap / ph,
    )
    x = 1 + pad / pw
    first.set_bbox_to_anchor((x, 1.0), transform=anchor.transAxes)
    second.set_bbox_to_anchor((x, 1.0 - (sizes[0][1] + gap) / ph), transform=anchor.transAxes)
    fig.suptitle("Top-1 against batch-1 p50 latency, per device class", y=1 - 0.15 / height)
