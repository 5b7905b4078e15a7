"""`bitdeploy select`: join a folder of bundles (a grid build) with the latency and memory a device measured
(`bitdeploy bench DIR --all --json device.json`), pick by the user's constraint, write `DIR/selected`.

Accuracy is the build's: each manifest's gate result, measured against FP32 PyTorch on the validation split. Speed
and memory come from the device's results, matched to bundles by their files' checksums (so a renamed or moved copy
still matches); without results they come from the build host's quick timing, and the output says so. A valid
bundle may still be excluded, as `build --select` excludes it (`runtimes.bundle.eligibility`): its self-test failed
on a --verify-on CPU of the device's class, or no CPU computing its bf16/fp16 float layers checked it. Torch-free.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitdeploy.benchmarks.ranking import Choice, Criteria, Option, SelectionError, choose
from bitdeploy.core.errors import BitdeployError
from bitdeploy.core.fsutil import atomic_write, remove_stale_temps, replace_dir
from bitdeploy.runtimes.bundle.eligibility import excluded
from bitdeploy.runtimes.bundle.fingerprint import device_class
from bitdeploy.runtimes.bundle.manifest import BuildLatency, Manifest

SELECTED = "selected"  # DIR/selected: the chosen bundle's copy (DIR/selected.bitpack with --pack)
SELECTION_FILE = "selection.json"


@dataclass(frozen=True)
class Found:
    """A bundle under the folder: where it is, its name there, its manifest."""

    path: Path
    name: str
    manifest: Manifest

    @property
    def key(self) -> frozenset[tuple[str, str]]:
        return frozenset(self.manifest.files.items())


def find(root: Path) -> list[Found]:
    """Every bundle under `root` (as `bitdeploy bench --all` finds them), with its manifest."""
    from bitdeploy.benchmarks.discovery import find_bundles
    from bitdeploy.runtimes.bundle.pack import open_bundle

    out = []
    for path in find_bundles(root):
        opened = open_bundle(path, verify=False, require_valid=False)
        opened.cleanup()
        out.append(Found(path, path.relative_to(root).as_posix(), opened.manifest))
    if not out:
        raise BitdeployError(f"no bundle under {root}; pass the --out folder of a build, e.g. runs/grid")
    return out


def _gate_top1(m: Manifest) -> float | None:
    return m.gate.top1 if m.gate is not None else None


def host_options(found: Sequence[Found], wanted_class: str | None = None) -> list[Option]:
    """Options with the build host's figures (each manifest's `build_latency`), each excluded as it is for
    `wanted_class` (None: for any device)."""
    out = []
    for f in found:
        lat = f.manifest.build_latency or BuildLatency()
        spread = lat.batch1_p50_spread_ms
        out.append(
            Option(
                f.name,
                f.manifest.valid,
                _gate_top1(f.manifest),
                lat.batch1_p50_ms,
                (float(spread[0]), float(spread[1])) if spread else None,
                lat.serving_peak_rss_mb,
                f.manifest.gate.agreement if f.manifest.gate is not None else None,
                None,
                f,
                excluded(f.manifest, wanted_class),
            )
        )
    return out


def device_docs(results: Sequence[str], wanted: str | None) -> tuple[list[dict[str, Any]], str]:
    """The bench documents of one device class (`wanted`, or the only one present) and that class."""
    from bitdeploy.benchmarks.report import as_documents
    from bitdeploy.benchmarks.report import device_class as doc_class

    docs = as_documents(list(results))
    classes = list(dict.fromkeys(doc_class(d) for d in docs))
    if wanted is None and len(classes) > 1:
        raise BitdeployError(
            f"the results come from {len(classes)} device classes ({', '.join(classes)}); pick one with --device-class"
        )
    chosen = wanted or classes[0]
    if chosen not in classes:
        raise BitdeployError(f"no results from device class {chosen!r}; the results have: {', '.join(classes)}")
    return [d for d in docs if doc_class(d) == chosen], chosen


def device_options(
    found: Sequence[Found], docs: Sequence[dict[str, Any]], cls: str | None = None
) -> tuple[list[Option], list[str]]:
    """Options with the device's figures (each excluded as it is for the device class `cls`), and the names of
    bundles the device did not measure."""
    measured: dict[frozenset[tuple[str, str]], dict[str, Any]] = {}
    for doc in docs:
        for e in doc["results"]:
            if e.get("kind") == "bundle" and e.get("files_sha256"):
                measured[frozenset(dict(e["files_sha256"]).items())] = e
    out, missing = [], []
    for f in found:
        e = measured.get(f.key)
        if e is None:
            if f.manifest.valid:
                missing.append(f.name)
            continue
        ss = e.get("single_stream") or {}
        spread = (ss.get("spread") or {}).get("p50_ms")
        ran = str(e.get("status")) == "valid"
        out.append(
            Option(
                f.name,
                f.manifest.valid and ran,
                _gate_top1(f.manifest),
                ss.get("p50_ms") if ran else None,
                (float(spread[0]), float(spread[1])) if spread else None,
                (e.get("serving_memory") or {}).get("peak_rss_mb"),
                f.manifest.gate.agreement if f.manifest.gate is not None else None,
                e.get("size_mb"),
                f,
                excluded(f.manifest, cls),
            )
        )
    return out, missing


def front_table(options: Sequence[Option], choice: Choice | None) -> str:
    """The accuracy-latency front as aligned text, the selection marked (and listed, fastest first, where a tie
    on speed picked a bundle off the front)."""
    header = ["bundle", "model", "px", "target", "precision", "top-1 %", "p50 ms", "peak RSS MB", ""]
    lines = [header]
    shown = list(choice.front) if choice is not None else []
    if choice is not None and all(o is not choice.winner for o in shown):
        shown = sorted([*shown, choice.winner], key=lambda o: o.p50_ms if o.p50_ms is not None else float("inf"))
    for o in shown:
        m: Manifest = o.item.manifest
        lines.append(
            [
                o.name,
                str(m.model.name or "-"),
                str(m.model.resolution or "-"),
                str(m.target.backend or "-"),
                str(m.target.precision or "-"),
                "-" if o.top1 is None else f"{o.top1 * 100:.2f}",
                "-" if o.p50_ms is None else f"{o.p50_ms:.2f}",
                "-" if o.rss_mb is None else f"{o.rss_mb:.0f}",
                "<- selected" if choice is not None and o is choice.winner else "",
            ]
        )
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    text = [
        "  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in lines
    ]
    return "\n".join([text[0], "  ".join("-" * w for w in widths[:-1]), *text[1:]])


def write_selected(root: Path, found: Found, pack: bool) -> Path:
    """Copy (or pack) the chosen bundle to root/selected, atomically: a failure leaves the previous one."""
    from bitdeploy.runtimes.bundle.pack import pack as pack_bundle

    if pack:
        out = root / f"{SELECTED}.bitpack"
        if found.path.is_file():
            tmp = root / f".{out.name}.tmp-{os.getpid()}"
            shutil.copyfile(found.path, tmp)
            os.replace(tmp, out)
            return out
        return pack_bundle(found.path, out)
    out = root / SELECTED
    if found.path.is_file():
        raise BitdeployError(f"{found.name} is a pack; write it with --pack")
    remove_stale_temps(root, f".{SELECTED}.tmp-")
    tmp = root / f".{SELECTED}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(found.path, tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def record(
    root: Path, choice: Choice, criteria: Criteria, source: str, written: Path, options: Sequence[Option] = ()
) -> Path:
    def row(o: Option) -> dict[str, Any]:
        return {"name": o.name, "top1": o.top1, "p50_ms": o.p50_ms, "p50_spread": o.spread, "peak_rss_mb": o.rss_mb}

    doc = {
        "selected": row(choice.winner),
        "reason": choice.line,
        "criteria": criteria.describe(),
        "runner_up": row(choice.runner_up) if choice.runner_up else None,
        "front": [row(o) for o in choice.front],
        "figures_from": source,
        "written": written.name,
        "excluded": {o.name: f"{o.excluded.group}: {o.excluded.detail}" for o in options if o.valid and o.excluded},
    }
    path = root / SELECTION_FILE
    atomic_write(path, json.dumps(doc, indent=1) + "\n")
    return path


def select(
    root: Path,
    criteria: Criteria,
    results: Sequence[str] = (),
    wanted_class: str | None = None,
) -> tuple[Choice, list[Option], str, list[str]]:
    """(the choice, every option, where speed and memory come from, bundles the device did not measure).

    Raises SelectionError when no bundle meets the constraints."""
    from bitdeploy.runtimes.bundle.fingerprint import host_fingerprint

    found = find(root)
    if results:
        docs, cls = device_docs(results, wanted_class)
        options, missing = device_options(found, docs, cls)
        hosts = sorted({str((d.get("environment") or {}).get("hostname") or "?") for d in docs})
        source = f"latency and memory measured on {cls} ({', '.join(hosts)}), accuracy from the build's gate"
    else:
        built_on = {device_class(f.manifest.validated_on) for f in found if f.manifest.validated_on}
        here = device_class(host_fingerprint())
        where = ", ".join(sorted(built_on)) or "the build host"
        source = (
            f"build host figures ({where}), not the device's: run `bitdeploy bench {root} --all --json device.json` "
            "on the device and pass --results device.json"
        )
        if built_on and here not in built_on:
            source += f" (this machine is {here})"
        options, missing = host_options(found, wanted_class), []
    if not any(o.valid for o in options):
        raise SelectionError(f"no valid bundle under {root} was measured; nothing to select")
    return choose(options, criteria), options, source, missing
