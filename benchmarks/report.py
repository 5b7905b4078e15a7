"""Reports from bench documents: `report.md` (one table) and a self-contained `report.html` (inline plots).

Documents from several machines merge into one table; the device column tells them apart, and speed-ups
and accuracy deltas are only computed between rows measured on the same machine.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bitdeploy.benchmarks.schema import MERGED, SCHEMA_VERSION, check_document, finite, load_documents, new_document
from bitdeploy.runtimes.fingerprint import cpu_class

COLUMNS = (
    "bundle",
    "target",
    "precision",
    "device",
    "status",
    "size MB",
    "top-1",
    "Δ top-1 (pp)",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "images/s",
    "speed-up vs fastest PyTorch",
    "peak RSS MB",
)


def as_documents(results: Any) -> list[dict[str, Any]]:
    """Accept a bench document, a list of documents, a list of entries, or paths of JSON files."""
    if isinstance(results, (str, os.PathLike)):
        return load_documents([Path(results)])
    if isinstance(results, dict):
        return [check_document(results)]
    items = list(results)
    if items and all(isinstance(r, (str, os.PathLike)) for r in items):
        return load_documents(items)
    if items and all(isinstance(r, dict) and "schema" not in r for r in items):
        return [check_document(new_document(items))]
    return [check_document(r) for r in items]


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _host(doc: dict[str, Any]) -> str:
    env = doc.get("environment") or {}
    return str(env.get("hostname") or "?")


def device_class(doc: dict[str, Any]) -> str:
    """The document's device class (CPU ISA class, plus GPU); derived from the CPU flags for older documents."""
    env = doc.get("environment") or {}
    if env.get("device_class"):
        return str(env["device_class"])
    flags = list((env.get("cpu") or {}).get("flags") or [])
    arch = str(env.get("machine") or "").lower() or (
        "x86_64" if any(f.startswith(("avx", "sse")) for f in flags) else "aarch64" if "asimd" in flags else ""
    )
    return cpu_class(arch, flags)


def _top1(entry: dict[str, Any]) -> tuple[float | None, str | None, float | None]:
    """(top-1, where it came from, the reference top-1 that came with it)."""
    acc = entry.get("accuracy") or {}
    if _num(acc.get("top1")) is not None:
        ref = (acc.get("reference") or {}).get("top1")
        return float(acc["top1"]), f"bench:{acc.get('dataset')}", _num(ref)
    build = entry.get("build_accuracy") or {}
    if _num(build.get("top1")) is not None:
        return float(build["top1"]), "build", _num(build.get("reference_top1"))
    return None, None, None


def _p(entry: dict[str, Any], key: str) -> float | None:
    return _num((entry.get("single_stream") or {}).get(key))


def _spread(entry: dict[str, Any], key: str = "p50_ms") -> tuple[float, float] | None:
    sp = ((entry.get("single_stream") or {}).get("spread") or {}).get(key)
    return (float(sp[0]), float(sp[1])) if sp else None


def _ips_spread(entry: dict[str, Any]) -> tuple[float, float] | None:
    sp = (entry.get("offline") or {}).get("best_images_per_s_spread")
    return (float(sp[0]), float(sp[1])) if sp else None


def disturbance(entry: dict[str, Any]) -> str | None:
    """Why a row's figures are not quotable (its flags, or its end-to-end window's), or None."""
    flags = list(entry.get("flags") or [])
    e2e = entry.get("end_to_end") or {}
    if e2e.get("disturbed"):
        flags += [f"end-to-end: {r}" for r in (e2e.get("interference") or {}).get("reasons") or []]
    if not flags and entry.get("disturbed"):
        flags = ["marked disturbed"]
    return "; ".join(flags) or None


def _agreement(entry: dict[str, Any]) -> float | None:
    ref = (entry.get("accuracy") or {}).get("reference") or {}
    return _num(ref.get("agreement")) if ref else _num((entry.get("build_accuracy") or {}).get("agreement"))


def _throughput(entry: dict[str, Any]) -> tuple[float | None, int | None]:
    off = entry.get("offline") or {}
    if _num(off.get("best_images_per_s")) is not None:
        return float(off["best_images_per_s"]), off.get("best_batch_size")
    return _num((entry.get("single_stream") or {}).get("images_per_s")), 1 if entry.get("single_stream") else None


def serving_rss(entry: dict[str, Any]) -> float | None:
    """Peak resident memory (MB) serving this bundle at batch 1 in a fresh process, when it was measured."""
    mem = entry.get("serving_memory")
    return _num(mem.get("peak_rss_mb")) if isinstance(mem, dict) else None


def table_rows(docs: Sequence[dict[str, Any]], selected: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per entry with the derived columns (Δ top-1, speed-up), in document order.

    `selected` ({"name", "reason"}, optionally "device_class") marks the rows of that name; with a device class,
    only the row measured on that class (the same bundle name recurs once per device in a merged report)."""
    multi = len({_host(d) for d in docs}) > 1
    classes = list(dict.fromkeys(device_class(d) for d in docs))
    rows = []
    for doc in sorted(docs, key=lambda d: classes.index(device_class(d))):  # grouped by device class, stable
        host = _host(doc)
        for e in doc["results"]:
            top1, source, ref = _top1(e)
            ips, bs = _throughput(e)
            rows.append(
                {
                    "entry": e,
                    "host": host,
                    "device_class": device_class(doc),
                    "label": f"{e['name']} @ {host}" if multi else e["name"],
                    "top1": top1,
                    "top1_source": source,
                    "ref_top1": ref,
                    "p50": _p(e, "p50_ms"),
                    "p90": _p(e, "p90_ms"),
                    "p99": _p(e, "p99_ms"),
                    "ips": ips,
                    "ips_bs": bs,
                    "p50_spread": _spread(e),
                    "p90_spread": _spread(e, "p90_ms"),
                    "ips_spread": _ips_spread(e),
                    "disturbed": disturbance(e),
                    "rss": serving_rss(e),
                }
            )
    sel, sel_class = (selected or {}).get("name"), (selected or {}).get("device_class")
    for r in rows:
        e = r["entry"]
        same = [
            o
            for o in rows
            if o["host"] == r["host"]
            and o["entry"].get("model") == e.get("model")
            and o["entry"].get("resolution") == e.get("resolution")
        ]
        torch_rows = sorted(
            (o for o in same if o["entry"].get("kind") == "pytorch" and o["p50"]), key=lambda o: o["p50"]
        )
        r["speedup"] = torch_rows[0]["p50"] / r["p50"] if torch_rows and r["p50"] else None
        r["speedup_vs"] = torch_rows[0]["label"] if torch_rows else None
        if r["ref_top1"] is None and r["top1"] is not None:
            # No explicit reference: the FP32 row on the same data (PyTorch first, then any FP32 bundle).
            fp32 = [
                o
                for o in same
                if o["entry"].get("precision") == "fp32"
                and o["top1"] is not None
                and o["top1_source"] == r["top1_source"]
            ]
            fp32.sort(key=lambda o: o["entry"].get("kind") != "pytorch")
            if fp32 and fp32[0] is not r:
                r["ref_top1"] = fp32[0]["top1"]
            elif fp32:
                r["ref_top1"] = r["top1"]
        r["delta_pp"] = (
            (r["top1"] - r["ref_top1"]) * 100.0 if r["top1"] is not None and r["ref_top1"] is not None else None
        )
        r["selected"] = sel is not None and e["name"] == sel and sel_class in (None, r["device_class"])
    return rows


def _valid(status: Any) -> bool:
    return str(status) == "valid"


def select_fastest(results: Any, max_accuracy_drop: float = 1.0) -> dict[str, str] | None:
    """The valid bundle with the lowest single-stream p50 whose top-1 drop (pp) is within `max_accuracy_drop`.

    Rows without an accuracy figure are eligible only if nothing measured is (their gate is the build's).
    Returns {"name", "reason"} or None when no bundle qualifies.
    """
    rows = [
        r
        for r in table_rows(as_documents(results))
        if r["entry"].get("kind") == "bundle" and _valid(r["entry"].get("status")) and r["p50"]
    ]
    if not rows:
        return None
    gated = [r for r in rows if r["delta_pp"] is not None]
    ok = [r for r in gated if r["delta_pp"] >= -max_accuracy_drop - 1e-9] if gated else rows
    if not ok:
        return None
    from bitdeploy.benchmarks.ranking import Candidate, fastest

    picked = fastest(
        [
            Candidate(
                r["label"],
                r["p50"],
                r["p50_spread"],
                _agreement(r["entry"]),
                _num(r["entry"].get("size_mb")),
                r,
                r.get("top1"),
            )
            for r in ok
        ]
    )
    assert picked is not None
    best, _, why = picked[0].item, picked[1], picked[2]
    acc = (
        f"top-1 {best['top1'] * 100:.2f}% ({best['delta_pp']:+.2f} pp, gate -{max_accuracy_drop:g} pp)"
        if best["delta_pp"] is not None
        else "no accuracy measured here (passed its build gate)"
    )
    faster = [r for r in rows if r["p50"] < best["p50"] and r not in ok]
    excluded = "".join(
        f"; {r['label']} is faster ({r['p50']:.2f} ms) but fails the gate ({r['delta_pp']:+.2f} pp)" for r in faster
    )
    noisy = [c.name for c in picked[1] if c.item["disturbed"]]
    caveat = f"; disturbed timing, not a firm ranking: {', '.join(noisy)}" if noisy else ""
    reason = f"within the accuracy gate, {why}; {acc}{excluded}{caveat}"
    picked_row = {"name": best["entry"]["name"], "reason": reason}
    if len({r["device_class"] for r in rows}) > 1:  # the same name on another device is not the one picked
        picked_row["device_class"] = best["device_class"]
    return picked_row


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _with_spread(x: float | None, spread: tuple[float, float] | None, fmt: str) -> str:
    """`1.23 [1.20-1.31]`: the median of the rounds and their min-max."""
    if x is None:
        return "-"
    return format(x, fmt) + (f" [{format(spread[0], fmt)}-{format(spread[1], fmt)}]" if spread else "")


def cells(r: dict[str, Any]) -> list[str]:
    e = r["entry"]
    prec = str(e.get("precision") or "-")
    used = e.get("precision_used")
    if used and str(used).lower() not in (prec.lower(), prec.lower().replace("fp", "f")):
        prec = f"{prec} ({used})"
    ips = "-" if r["ips"] is None else _with_spread(r["ips"], r["ips_spread"], ".1f")
    ips += f" (bs {r['ips_bs']})" if r["ips"] is not None and r["ips_bs"] else ""
    return [
        r["label"] + (" (selected)" if r["selected"] else ""),
        str(e.get("target") or "-"),
        prec,
        str(e.get("device") or "-"),
        str(e.get("status") or "-") + (" DISTURBED" if r["disturbed"] else ""),
        _f(_num(e.get("size_mb")), ".1f"),
        "-" if r["top1"] is None else f"{r['top1'] * 100:.2f}%",
        _f(r["delta_pp"], "+.2f"),
        _with_spread(r["p50"], r["p50_spread"], ".2f"),
        _with_spread(r["p90"], r["p90_spread"], ".2f"),
        _f(r["p99"], ".2f"),
        ips,
        "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
        _f(r["rss"], ".0f"),
    ]


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


FRONT_COLUMNS = ("bundle", "top-1", "p50 ms", "peak RSS MB")
FRONT_NOTE = (
    "Per device class, the valid bundles no other valid bundle beats on both p50 and top-1, fastest first "
    "(PyTorch baselines and failed bundles are not candidates); the plot draws the whole grid around it."
)


def front_sections(rows: list[dict[str, Any]]) -> list[tuple[str, list[tuple[list[str], bool]]]]:
    """Per device class with accuracy figures: (heading "class (hosts)", for each Pareto-front row in front
    order, fastest first: its FRONT_COLUMNS cells and whether it is the selected row)."""
    from bitdeploy.benchmarks.plots import front_panels

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


def markdown(docs: Sequence[dict[str, Any]], rows: list[dict[str, Any]], selected: dict[str, str] | None) -> str:
    out = ["# bitdeploy benchmark report", ""]
    warn = banner(rows)
    if warn:
        out += [f"> **{warn[0]}**", ">", *(f"> - {line}" for line in warn[1:]), ""]
    for cls, group in grouped(rows):
        if cls is not None:
            out += [f"## {cls}", ""]
        out += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        out += ["| " + " | ".join(c.replace("|", "/") for c in cells(r)) + " |" for r in group]
        out.append("")
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
        "on the same data. " + SPEEDUP_NOTE,
        "",
        *[f"- {line}" for line in baseline_lines(rows)],
        "",
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
) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = ""
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
        + html.escape(SPEEDUP_NOTE)
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
    parts.append(
        "<h2>Environment and method</h2><ul>"
        + "".join(f'<li class="note">{_defang(x)}</li>' for x in _methodology(docs))
        + "</ul></body></html>"
    )
    return "\n".join(parts) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(
    results: Any, out_dir: str | os.PathLike[str], selected: dict[str, str] | str | None = None
) -> dict[str, Path]:
    """Write report.md, report.html and results.json (the merged documents) into out_dir; return their paths.

    `results`: a bench document, a list of documents or of entries, or JSON paths. `selected`: {"name", "reason"}
    (or just a name) to mark a row; by default a `selected` stored in a document is used.
    """
    from bitdeploy.benchmarks.plots import render_all

    docs = as_documents(results)
    if isinstance(selected, str):
        selected = {"name": selected, "reason": ""}
    if selected is None:
        selected = next((d["selected"] for d in docs if d.get("selected")), None)
    rows = table_rows(docs, selected)
    figures, note = render_all(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "report.md", "html": out / "report.html", "json": out / "results.json"}
    _atomic_write(paths["markdown"], markdown(docs, rows, selected))
    _atomic_write(paths["html"], render_html(docs, rows, selected, figures, note))
    merged = {"schema": MERGED, "schema_version": SCHEMA_VERSION, "selected": selected, "documents": list(docs)}
    _atomic_write(paths["json"], json.dumps(finite(merged), indent=1, default=str) + "\n")
    return paths
