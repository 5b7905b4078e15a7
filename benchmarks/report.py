"""Reports from bench documents: `report.md` (one table) and a self-contained `report.html` (inline plots).

Documents from several machines merge into one table; the device column tells them apart, and speed-ups
and accuracy deltas are only computed between rows measured on the same machine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bitdeploy.benchmarks.schema import check_document, load_documents, new_document
from bitdeploy.runtimes.bundle.eligibility import Checks, Exclusion, exclusion_notes
from bitdeploy.runtimes.bundle.fingerprint import cpu_class

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


def _pair(x: Any) -> tuple[float, float] | None:
    return (float(x[0]), float(x[1])) if isinstance(x, (list, tuple)) and len(x) == 2 else None


def _intervals(entry: dict[str, Any], source: str | None) -> tuple[tuple[float, float] | None, ...]:
    """(top-1's interval, Δ top-1's in pp) where the figures came with them: the build gate's (Wilson; Newcombe's
    paired interval, negated from the drop's), or a Wilson interval of bench's own top-1 (no Δ interval: bench
    keeps no discordant pairs)."""
    if source == "build":
        build = entry.get("build_accuracy") or {}
        drop = _pair(build.get("top1_drop_ci_pp"))
        return _pair(build.get("top1_ci")), (-drop[1], -drop[0]) if drop else None
    acc = entry.get("accuracy") or {}
    samples, top1 = acc.get("samples"), _num(acc.get("top1"))
    if source and isinstance(samples, int) and samples > 0 and top1 is not None:
        from bitdeploy.converters.intervals import wilson

        return wilson(round(top1 * samples), samples), None
    return None, None


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
            top1_ci, delta_ci = _intervals(e, source)
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
                    "top1_ci": top1_ci,
                    "delta_ci": delta_ci,  # only against the reference that came with the top-1
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


def exclusion(row: dict[str, Any]) -> Exclusion | None:
    """Why a valid bundle's row may not be picked on its device class (`runtimes.bundle.eligibility`): from the
    entry's `build_checks`, None when it may (or the document predates them)."""
    checks = row["entry"].get("build_checks")
    return Checks.from_dict(checks).exclusion(row["device_class"]) if isinstance(checks, dict) else None


def select_fastest(results: Any, max_accuracy_drop: float = 1.0) -> dict[str, str] | None:
    """The valid bundle with the lowest single-stream p50 whose top-1 drop (pp) is within `max_accuracy_drop`,
    among those its device class may pick (`exclusion`: not failed --verify-on on that class, float precision
    checked where it computes); the reason names the ones excluded.

    Rows without an accuracy figure are eligible only if nothing measured is (their gate is the build's).
    Returns {"name", "reason"} or None when no bundle qualifies.
    """
    measured = [
        r
        for r in table_rows(as_documents(results))
        if r["entry"].get("kind") == "bundle" and _valid(r["entry"].get("status")) and r["p50"]
    ]
    verdicts = [(r, exclusion(r)) for r in measured]
    barred = [(r["label"], bar) for r, bar in verdicts if bar is not None]
    rows = [r for r, bar in verdicts if bar is None]
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
    reason = f"within the accuracy gate, {why}; {acc}{excluded}{exclusion_notes(barred)}{caveat}"
    picked_row = {"name": best["entry"]["name"], "reason": reason}
    if len({r["device_class"] for r in rows}) > 1:  # the same name on another device is not the one picked
        picked_row["device_class"] = best["device_class"]
    return picked_row


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def interval(pair: tuple[float, float] | None, scale: float = 1.0, signed: bool = False) -> str:
    """ " [94.3-98.1]" (" [-1.4, +0.9]" signed: a minus would read as the dash) after a figure; "" without one."""
    if pair is None:
        return ""
    lo, hi = pair[0] * scale, pair[1] * scale
    return f" [{lo:+.1f}, {hi:+.1f}]" if signed else f" [{lo:.1f}-{hi:.1f}]"


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
        "-" if r["top1"] is None else f"{r['top1'] * 100:.2f}%" + interval(r["top1_ci"], 100),
        _f(r["delta_pp"], "+.2f") + (interval(r["delta_ci"], signed=True) if r["delta_pp"] is not None else ""),
        _with_spread(r["p50"], r["p50_spread"], ".2f"),
        _with_spread(r["p90"], r["p90_spread"], ".2f"),
        _f(r["p99"], ".2f"),
        ips,
        "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
        _f(r["rss"], ".0f"),
    ]
