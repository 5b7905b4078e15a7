"""Rendering a report: `report.md` (one table, the baseline lines, the method) and a self-contained `report.html`
(inline plots), written atomically. The rows come from `bitdeploy.benchmarks.report.table_rows`."""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bitdeploy.benchmarks.report import (
    COLUMNS,
    _f,
    _host,
    _num,
    _with_spread,
    as_documents,
    cells,
    device_class,
    table_rows,
)
from bitdeploy.benchmarks.schema import MERGED, SCHEMA_VERSION, finite
from bitdeploy.core.fsutil import atomic_write

SPEEDUP_NOTE = (
    "Speed-up: the fastest PyTorch FP32 baseline's p50 over the row's p50, same machine, model and resolution. "
    "The baselines, measured in the same run: eager with Google's reference weight standardisation on every call, "
    "eager with the standardisation folded into the weights, and torch.compile of the folded model."
)


def baseline_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per PyTorch baseline row: its label, p50 or why it did not run, and whether it is the denominator."""
    out = []
    for r in rows:
        e = r["entry"]
        if e.get("kind") != "pytorch":
            continue
        label = (e.get("describe") or {}).get("label") or e["name"]
        compile_s = (e.get("describe") or {}).get("compile_s")
        took = f", compiled in {compile_s:.1f} s" if _num(compile_s) is not None else ""
        if r["p50"] is None:
            out.append(f"{r['label']}: {label}: {e.get('status')}")
        else:
            fastest = " (fastest PyTorch: the speed-up denominator)" if r["speedup_vs"] == r["label"] else ""
            out.append(f"{r['label']}: {label}: p50 {r['p50']:.2f} ms{took}{fastest}")
    return out


def _methodology(docs: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for doc in docs:
        s, env = doc.get("settings") or {}, doc.get("environment") or {}
        cpu = env.get("cpu") or {}
        ns = sorted({int(n) for e in doc["results"] if (n := (e.get("single_stream") or {}).get("n")) is not None})
        machine = [
            f"CPU {cpu.get('model')} [{' '.join(cpu.get('flags') or [])}]",
            f"{cpu['usable_cores']} usable cores" if cpu.get("usable_cores") else None,
            f"threads {s.get('threads') or 'backend default'}",
            "GPU " + (", ".join(g.get("name", "?") for g in env.get("gpus") or []) or "none"),
            env.get("os"),
            f"python {env['python']}" if env.get("python") else None,
            ", ".join(f"{k} {v}" for k, v in (env.get("libraries") or {}).items()) or None,
        ]
        method = [
            f"single-stream: batch 1, {', '.join(map(str, ns)) or '-'} queries after {s.get('warmup', '-')} warm-up, nearest-rank percentiles",
            f"offline batch sizes {s.get('batch_sizes', '-')}",
            f"{s['rounds']} interleaved rounds in rotating order, figures the median of the rounds [min-max]"
            if s.get("rounds")
            else "one round, no spread",
            "disturbed: "
            + ", ".join(
                f"{k} > {v:g}" for k, v in (s.get("interference_limits") or {}).items() if k != "min_judged_window_s"
            )
            if s.get("interference_limits")
            else None,
            f"end-to-end images: {s.get('end_to_end_images') or '-'}",
        ]
        lines.append(
            f"{_host(doc)}, {device_class(doc)} ({doc.get('created')}): "
            + "; ".join(x for x in machine if x)
            + ". "
            + "; ".join(x for x in method if x)
            + "."
        )
    return lines


def grouped(rows: list[dict[str, Any]]) -> list[tuple[str | None, list[dict[str, Any]]]]:
    """Rows per device class, in order; one unnamed group when every row comes from one class."""
    classes = list(dict.fromkeys(r["device_class"] for r in rows))
    if len(classes) < 2:
        return [(None, rows)]
    return [(c, [r for r in rows if r["device_class"] == c]) for c in classes]


def device_matrix(docs: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the device x bundle matrix a `build --verify-on` stored in its settings: one row per
    bundle, one column per emulated CPU, each cell pass / FAIL: why. Empty when no build verified on devices."""
    matrix: dict[str, dict[str, str]] = {}
    for doc in docs:
        for bundle, cells_ in ((doc.get("settings") or {}).get("verified_on") or {}).items():
            matrix.setdefault(str(bundle), {}).update({str(k): str(v) for k, v in cells_.items()})
    cpus = list(dict.fromkeys(cpu for cells_ in matrix.values() for cpu in cells_))
    if not cpus:
        return [], []
    header = ["bundle", *(f"{cpu} (emulated)" for cpu in cpus)]
    return header, [[bundle, *(cells_.get(cpu, "-") for cpu in cpus)] for bundle, cells_ in matrix.items()]


INTERVAL_NOTE = (
    "[a-b] after top-1: its 95 % Wilson interval; [a, b] after Δ top-1: the build gate's paired interval (Newcombe, "
    "the same images scored by both); a build's --gate-confidence sets another level."
)
FRONT_COLUMNS = ("bundle", "top-1", "p50 ms", "peak RSS MB")
FRONT_NOTE = (
    "Per device class, the valid bundles no other valid bundle beats on both p50 and top-1, fastest first "
    "(PyTorch baselines and failed bundles are not candidates); the plot draws the whole grid around it."
)


def front_sections(rows: list[dict[str, Any]]) -> list[tuple[str, list[tuple[list[str], bool]]]]:
    """Per device class with accuracy figures: (heading "class (hosts)", for each Pareto-front row in front
    order, fastest first: its FRONT_COLUMNS cells and whether it is the selected row)."""
    from bitdeploy.benchmarks.plots_front import front_panels

    out = []
    for cls, panel, front in front_panels(rows):
        hosts = ", ".join(dict.fromkeys(str(r["host"]) for r in panel))
        table = [
            (
                [
                    r["label"] + (" (selected)" if r["selected"] else ""),
                    f"{r['top1'] * 100:.2f}%",
                    _with_spread(r["p50"], r["p50_spread"], ".2f"),
                    _f(r["rss"], ".0f"),
                ],
                bool(r["selected"]),
            )
            for r in (panel[i] for i in front)
        ]
        out.append((f"{cls} ({hosts})", table))
    return out


def _selected_line(selected: dict[str, str]) -> tuple[str, str]:
    """(what was selected, why), the selection's device class named when it has one."""
    where = f" on {selected['device_class']}" if selected.get("device_class") else ""
    return f"Selected: {selected['name']}{where}", str(selected.get("reason", ""))


def banner(rows: list[dict[str, Any]]) -> list[str]:
    """The report's warning lines when any row's timing was disturbed (empty otherwise)."""
    noisy = [r for r in rows if r["disturbed"]]
    if not noisy:
        return []
    return [
        f"WARNING: {len(noisy)} of {len(rows)} rows were timed while the machine was busy or gave inconsistent "
        "figures (DISTURBED below): do not quote them; see docs/measuring.md.",
        *(f"{r['label']}: {r['disturbed']}" for r in noisy),
    ]


def is_ready(row: dict[str, Any]) -> bool:
    """A bundle gated here whose engine is built on the device (`bitdeploy engine`): shown apart, never timed."""
    return str(row["entry"].get("status") or "").startswith("ready")


READY_TITLE = "Ready for the device (engine built there by `bitdeploy engine`; gated here, not timed)"
READY_COLUMNS = ["bundle", "top-1", "Δ top-1 pp", "status"]


def ready_cells(r: dict[str, Any]) -> list[str]:
    e = r["entry"]
    top1 = "-" if r["top1"] is None else f"{r['top1'] * 100:.2f}"
    delta = "-" if r["top1"] is None or r["ref_top1"] is None else f"{(r['top1'] - r['ref_top1']) * 100:+.2f}"
    return [r["label"], top1, delta, str(e.get("status"))]


def markdown(docs: Sequence[dict[str, Any]], rows: list[dict[str, Any]], selected: dict[str, str] | None) -> str:
    out = ["# bitdeploy benchmark report", ""]
    warn = banner(rows)
    if warn:
        out += [f"> **{warn[0]}**", ">", *(f"> - {line}" for line in warn[1:]), ""]
    ready = [r for r in rows if is_ready(r)]
    rows = [r for r in rows if not is_ready(r)]
    for cls, group in grouped(rows):
        if cls is not None:
            out += [f"## {cls}", ""]
        out += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        out += ["| " + " | ".join(c.replace("|", "/") for c in cells(r)) + " |" for r in group]
        out.append("")
    if ready:
        out += [f"## {READY_TITLE}", "", "| " + " | ".join(READY_COLUMNS) + " |", "|" + "---|" * len(READY_COLUMNS)]
        out += ["| " + " | ".join(c.replace("|", "/") for c in ready_cells(r)) + " |" for r in ready] + [""]
    out += _front_markdown(rows)
    if selected:
        what, why = _selected_line(selected)
        out += [f"**{what}** - {why}", ""]
    header, matrix = device_matrix(docs)
    if matrix:
        out += ["## Self-test on emulated devices (numerics, not speed)", "", "| " + " | ".join(header) + " |"]
        out += ["|" + "---|" * len(header), *("| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in matrix)]
        out.append("")
    out += [
        "p50/p90/p99: single-stream latency (batch 1, next query when the previous returns), pure inference, ms; "
        "p50 and images/s are medians of interleaved rounds, [min-max] over the rounds. "
        "images/s: offline throughput at the best batch size. Δ top-1: percentage points against the FP32 reference "
        "on the same data. " + INTERVAL_NOTE + " " + SPEEDUP_NOTE,
        "",
        *[f"- {line}" for line in baseline_lines(rows)],
        "",
        *_mix_markdown(docs),
        "## Environment and method",
        "",
    ]
    out += [f"- {line}" for line in _methodology(docs)]
    return "\n".join(out) + "\n"


def _front_markdown(rows: list[dict[str, Any]]) -> list[str]:
    sections = front_sections(rows)
    if not sections:
        return []
    out = ["## Accuracy–latency front", "", FRONT_NOTE, ""]
    for heading, table in sections:
        out += [f"**{heading}**", "", "| " + " | ".join(FRONT_COLUMNS) + " |", "|" + "---|" * len(FRONT_COLUMNS)]
        out += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r, _ in table]
        out.append("")
    return out


def _front_html(rows: list[dict[str, Any]]) -> str:
    sections = front_sections(rows)
    if not sections:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in FRONT_COLUMNS)
    parts = [f'<h2 id="front">Accuracy–latency front</h2><p class="note">{html.escape(FRONT_NOTE)}</p>']
    for heading, table in sections:
        body = "".join(
            f'<tr class="{"selected" if on else ""}">' + "".join(f"<td>{_defang(c)}</td>" for c in r) + "</tr>"
            for r, on in table
        )
        parts.append(
            f'<h3>{_defang(heading)}</h3><table class="front"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        )
    return "".join(parts)


MIX_NOTE = (
    "Per bundle the INT8 search made: each group of layers with the share of uniform INT8's mean |logit error| "
    "that keeping only that group in float removes, and the top-1 agreement with FP32 it gains; rank 1 is the most "
    "costly to quantize. The chosen mix keeps the groups marked float in float, the others run INT8."
)


def _mix_markdown(docs: Sequence[dict[str, Any]]) -> list[str]:
    from bitdeploy.benchmarks.plots_mix import TITLE, mixes
    from bitdeploy.runtimes.bundle.mix_text import COLUMNS, sensitivity_rows, summary

    found = mixes(docs)
    out = [f"## {TITLE}", "", MIX_NOTE + " The plots are in report.html.", ""] if found else []
    for name, mix in found:
        out += [f"**{name}**: {summary(mix)}", ""]
        if rows := sensitivity_rows(mix):
            out += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
            out += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows] + [""]
    return out


def _mix_html(docs: Sequence[dict[str, Any]], pictures: Sequence[str | None]) -> str:
    from bitdeploy.benchmarks.plots_mix import TITLE, mixes, title
    from bitdeploy.runtimes.bundle.mix_text import COLUMNS, sensitivity_rows, summary

    found = mixes(docs)
    parts = [f'<h2 id="int8-sensitivity">{TITLE}</h2><p class="note">{html.escape(MIX_NOTE)}</p>'] if found else []
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    for (name, mix), png in zip(found, [*pictures, *[None] * len(found)]):
        parts.append(f"<h3>{_defang(name)}</h3><p>{_defang(summary(mix))}</p>")
        if png:
            parts.append(
                f'<figure><img alt="{html.escape(title(name, mix))}" src="data:image/png;base64,{png}"></figure>'
            )
        body = "".join("<tr>" + "".join(f"<td>{_defang(c)}</td>" for c in r) + "</tr>" for r in sensitivity_rows(mix))
        parts.append(f'<table class="mix"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>' if body else "")
    return "".join(parts)


def _defang(text: str) -> str:
    """The report must hold no URL at all (it opens offline); text that quotes one (an error) is broken up."""
    return html.escape(text).replace("://", ":/&#8203;/")


CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f0f0f0}td:nth-child(-n+5),th:nth-child(-n+5){text-align:left}
tr.selected{background:#fff4c2;font-weight:bold}tr.device-class th{text-align:left;background:#e4ecf7}figure{display:inline-block;margin:1em}img{max-width:100%}
.note{color:#555;font-size:0.9em;max-width:70em}table.front td:nth-child(n+2),table.front th:nth-child(n+2){text-align:right}
tr.disturbed td{color:#a33}.banner{border:2px solid #c33;background:#fdecea;padding:0.5em 1em;margin:1em 0;max-width:70em}"""


def render_html(
    docs: Sequence[dict[str, Any]],
    rows: list[dict[str, Any]],
    selected: dict[str, str] | None,
    figures: list[tuple[str, str]],
    plot_note: str | None,
    mix_figures: Sequence[str | None] = (),
) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = ""
    ready = [r for r in rows if is_ready(r)]
    rows = [r for r in rows if not is_ready(r)]
    for cls, group in grouped(rows):
        if cls is not None:
            body += f'<tr class="device-class"><th colspan="{len(COLUMNS)}">{_defang(cls)}</th></tr>'
        body += "".join(
            f'<tr class="{" ".join(c for c, on in (("selected", r["selected"]), ("disturbed", r["disturbed"])) if on)}">'
            + "".join(f"<td>{_defang(c)}</td>" for c in cells(r))
            + "</tr>"
            for r in group
        )
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>bitdeploy benchmark report</title>',
        f"<style>{CSS}</style></head><body><h1>bitdeploy benchmark report</h1>",
        *(
            [
                f'<div id="disturbed" class="banner"><b>{_defang(warn[0])}</b><ul>'
                + "".join(f"<li>{_defang(x)}</li>" for x in warn[1:])
                + "</ul></div>"
            ]
            if (warn := banner(rows))
            else []
        ),
        f'<table id="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>',
    ]
    if ready:
        parts.append(
            f'<h2>{_defang(READY_TITLE)}</h2><table id="ready"><thead><tr>'
            + "".join(f"<th>{html.escape(c)}</th>" for c in READY_COLUMNS)
            + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{_defang(c)}</td>" for c in ready_cells(r)) + "</tr>" for r in ready)
            + "</tbody></table>"
        )
    front = _front_html(rows)
    if front:
        parts.append(front)
    if selected:
        what, why = _selected_line(selected)
        parts.append(f'<p id="selected"><b>{_defang(what)}</b>: {_defang(why)}</p>')
    header, matrix = device_matrix(docs)
    if matrix:
        parts.append(
            '<h2>Self-test on emulated devices (numerics, not speed)</h2><table id="devices"><thead><tr>'
            + "".join(f"<th>{html.escape(c)}</th>" for c in header)
            + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{_defang(c)}</td>" for c in r) + "</tr>" for r in matrix)
            + "</tbody></table>"
        )
    parts.append(
        '<p class="note">p50/p90/p99: single-stream latency, batch 1, pure inference (ms); p50 and images/s are medians of interleaved rounds, [min-max] over the rounds. images/s: offline throughput at the best batch size. Δ top-1 in percentage points against the FP32 reference on the same data. '
        + html.escape(INTERVAL_NOTE + " " + SPEEDUP_NOTE)
        + "</p>"
    )
    lines = baseline_lines(rows)
    if lines:
        parts.append("<ul>" + "".join(f'<li class="note">{_defang(x)}</li>' for x in lines) + "</ul>")
    if plot_note:
        parts.append(f'<p class="note">{_defang(plot_note)}</p>')
    for title, b64 in figures:
        parts.append(
            f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{b64}"><figcaption>{html.escape(title)}</figcaption></figure>'
        )
    sensitivity = _mix_html(docs, mix_figures)
    if sensitivity:
        parts.append(sensitivity)
    parts.append(
        "<h2>Environment and method</h2><ul>"
        + "".join(f'<li class="note">{_defang(x)}</li>' for x in _methodology(docs))
        + "</ul></body></html>"
    )
    return "\n".join(parts) + "\n"


def write_report(
    results: Any, out_dir: str | os.PathLike[str], selected: dict[str, str] | str | None = None
) -> dict[str, Path]:
    """Write report.md, report.html and results.json (the merged documents) into out_dir; return their paths.

    `results`: a bench document, a list of documents or of entries, or JSON paths. `selected`: {"name", "reason"}
    (or just a name) to mark a row; by default a `selected` stored in a document is used.
    """

    docs = as_documents(results)
    if isinstance(selected, str):
        selected = {"name": selected, "reason": ""}
    if selected is None:
        selected = next((d["selected"] for d in docs if d.get("selected")), None)
    rows = table_rows(docs, selected)
    figures, note = _figures(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "report.md", "html": out / "report.html", "json": out / "results.json"}
    atomic_write(paths["markdown"], markdown(docs, rows, selected))
    from bitdeploy.benchmarks import plots_mix

    pictures = plots_mix.figures(plots_mix.mixes(docs))
    atomic_write(paths["html"], render_html(docs, rows, selected, figures, note, pictures))
    merged = {"schema": MERGED, "schema_version": SCHEMA_VERSION, "selected": selected, "documents": list(docs)}
    atomic_write(paths["json"], json.dumps(finite(merged), indent=1, default=str) + "\n")
    return paths


def _figures(rows: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], str | None]:
    """[(title, base64 PNG)] for every plot with data, and a note when plots are missing."""
    from bitdeploy.benchmarks.plots import (
        _plt,
        end_to_end_split,
        latency_distribution,
        throughput_vs_batch,
        to_base64_png,
    )
    from bitdeploy.benchmarks.plots_front import accuracy_vs_latency

    try:
        _plt()
    except ImportError:
        return (
            [],
            'matplotlib is not installed, so this report has no plots; install it with: pip install "bitdeploy[all]"',
        )
    figures = []
    for title, fn in (
        ("Latency distribution per bundle", latency_distribution),
        ("Throughput against batch size", throughput_vs_batch),
        ("Accuracy against latency, Pareto front marked", accuracy_vs_latency),
        ("End-to-end latency split", end_to_end_split),
    ):
        fig = fn(rows)
        if fig is not None:
            figures.append((title, to_base64_png(fig)))
    return figures, None
