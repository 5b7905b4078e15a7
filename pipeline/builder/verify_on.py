"""`bitdeploy build --verify-on CPU,...`: after the gate, each valid bundle's self-test on each emulated CPU.

A bundle that fails on one stays valid here and is marked in the table (`FAIL` in that CPU's column), in its
manifest (`verified_on`: the guests ran the sealed bundle, so their results join it through
`bundle.amend_manifest`, which re-verifies every file against the seal) and in the report; `--select fastest`
skips it. Torch-free: it runs guests and amends manifests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bitdeploy.builder.result import RowResult
from bitdeploy.core import devices, targets
from bitdeploy.core.errors import BitdeployError
from bitdeploy.emulation import guest as emulation


def verified_entry(report: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records of one emulated self-test."""
    cpu = (report.get("fingerprint") or {}).get("cpu") or {}
    test = report.get("self_test") or {}
    return {
        **report["emulated"],
        "passed": bool(report.get("passed")),
        "agreement": test.get("agreement"),
        "max_rel_error": test.get("max_rel_error"),
        "precision_used": report.get("precision_used"),
        "class": cpu.get("class"),
        "features": cpu.get("features"),
        "engines": (report.get("fingerprint") or {}).get("engines"),
        "error": report.get("error") or ("; ".join(test.get("failures") or []) or None),
        "checked": report.get("checked"),
    }


def _gpu_target(row: RowResult) -> targets.Target | None:
    """The row's target record when its bundles run on a GPU only (no CPU guest can run them), else None."""
    record = targets.find_backend(row.backend)
    return record if record is not None and record.needs_gpu else None


def run(rows: list[RowResult], verify_on: str, threads: int | None, log: Callable[[str], None]) -> None:
    """Verify every valid row's bundle on every CPU of `verify_on`; record the results in each manifest (and so in
    the row's `devices`)."""
    from bitdeploy.runtimes.bundle import amend_manifest

    cpus = devices.find(verify_on)
    gpu = {r.name: record.title for r in rows if r.valid and (record := _gpu_target(r)) is not None}
    if gpu:
        titles = " and ".join(dict.fromkeys(gpu.values()))
        log(f"[verify-on] not emulated: {', '.join(gpu)} ({titles} plans run on an NVIDIA GPU, not a CPU)")
    valid = [r for r in rows if r.valid and r.bundle and _gpu_target(r) is None]
    if not valid:
        return
    log(f"[verify-on] {len(valid)} bundles on {', '.join(c.name for c in cpus)}: {devices.NOTE}")
    entries: dict[str, list[dict[str, Any]]] = {r.name: [] for r in valid}
    for cpu in cpus:  # one guest per CPU for every bundle: its imports take seconds
        log(f"[verify-on] {cpu.name} ({cpu.board}): {len(valid)} self-tests emulated…")
        started = time.perf_counter()
        reports = emulation.verify_on(cpu, [Path(str(r.bundle)) for r in valid], threads=threads)
        passed = sum(1 for r in reports if r.get("passed"))
        log(f"[verify-on] {cpu.name}: {passed}/{len(reports)} pass ({time.perf_counter() - started:.0f} s emulated)")
        for row, report in zip(valid, reports):
            entries[row.name].append(verified_entry(report))
            if not report.get("passed"):
                log(f"[{row.name}] fails its self-test on {cpu.name} ({cpu.board}): {emulation.failure_line(report)}")
    for row in valid:
        row.manifest = amend_manifest(Path(str(row.bundle)), verified_on=entries[row.name])


def failure(rows: list[RowResult], selected: bool) -> str | None:
    """The build's one line when a valid bundle failed on a --verify-on CPU and no bundle passing everywhere was
    selected instead; None otherwise."""
    failed = [(r, cpu, why) for r in rows for cpu, why in r.devices.items() if why != "pass"]
    if not failed or selected:
        return None
    row, cpu, why = failed[0]
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return (
        f"{row.name} is valid here but fails its self-test on {cpu}: {why.removeprefix('FAIL: ')}{more}; "
        "its numerics do not hold there: try another --int8-scheme or precision, or drop that CPU from --verify-on"
    )


def raise_for_devices(rows: list[RowResult], selected: bool) -> None:
    line = failure(rows, selected)
    if line is not None:
        raise BitdeployError(line)
