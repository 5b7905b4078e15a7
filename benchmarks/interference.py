"""Was a timing window the bundle's own cost? Measure what else the machine did while it ran.

A window is bracketed by two snapshots. Between them we know the wall time, this process's CPU time and
involuntary context switches (`resource.getrusage`, every platform with `resource`) and, where `/proc/stat`
exists, every CPU's busy and steal time. Other processes' CPU use is the machine's busy time minus ours.
Without `/proc/stat` the 1-minute load average stands in (coarser: it lags and counts our own threads).

No third-party package: this runs on a device with only numpy and the engine.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# Other processes' average CPU use, in cores, above which a window is disturbed. A quiet host's daemons use
# well under 0.1 core; one competing CPU-bound process uses ~1. At 0.3 core, a 2-thread engine on a 2-core
# machine has lost ~15% of its CPU to others, which is beyond the 5% spread we promise for quiet figures.
OTHERS_CORES_LIMIT = 0.3
# Share of wall time a virtual CPU spent waiting for the hypervisor. Steal is invisible to the guest's
# process table, so a noisy neighbour shows up only here; 5% steal is 5% of the figure.
STEAL_LIMIT = 0.05
# Involuntary context switches per second of this process: the scheduler took a core from our threads for
# someone else. Quiet runs of ONNX Runtime/OpenVINO stay far below this; a competing busy loop drives it up.
NIVCSW_PER_S_LIMIT = 500.0
# Windows shorter than this are judged only together with the row's other windows: /proc/stat counts in
# clock ticks (10 ms), too coarse for a 50 ms window on its own.
MIN_JUDGED_S = 0.5
# With only the load average: load beyond our own threads above which a window is disturbed.
LOAD_EXCESS_LIMIT = 0.5
# `--quiet-check wait`: how long to wait for a quiet machine before timing.
QUIET_WAIT_S = 60.0


@dataclass(frozen=True)
class Snapshot:
    wall_s: float
    own_cpu_s: float
    nivcsw: int
    busy_s: float | None  # all CPUs, non-idle time (excluding steal)
    steal_s: float | None
    total_s: float | None
    load1: float | None


def _proc_stat() -> tuple[float, float, float] | None:
    """(busy, steal, total) CPU seconds over all CPUs since boot, or None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            first = f.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    ticks = [int(v) for v in first[1:]]
    hz = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
    user, nice, system, idle, iowait, irq, softirq = (ticks + [0] * 7)[:7]
    steal = ticks[7] if len(ticks) > 7 else 0  # guest time is already counted in user
    busy = user + nice + system + irq + softirq
    return busy / hz, steal / hz, (busy + idle + iowait + steal) / hz


def _load1() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def snapshot() -> Snapshot:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    stat = _proc_stat()
    return Snapshot(
        wall_s=time.perf_counter(),
        own_cpu_s=ru.ru_utime + ru.ru_stime,
        nivcsw=ru.ru_nivcsw,
        busy_s=stat[0] if stat else None,
        steal_s=stat[1] if stat else None,
        total_s=stat[2] if stat else None,
        load1=_load1(),
    )


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def record(start: Snapshot, end: Snapshot) -> dict[str, Any]:
    """What the window between two snapshots shows (raw deltas, so records can be summed: see `merge`)."""
    out: dict[str, Any] = {
        "wall_s": end.wall_s - start.wall_s,
        "own_cpu_s": end.own_cpu_s - start.own_cpu_s,
        "involuntary_switches": end.nivcsw - start.nivcsw,
        "cores": usable_cores(),
    }
    if start.busy_s is not None and end.busy_s is not None:
        out["source"] = "/proc/stat"
        out["machine_busy_s"] = end.busy_s - start.busy_s
        out["steal_s"] = (end.steal_s or 0.0) - (start.steal_s or 0.0)
        out["machine_total_s"] = (end.total_s or 0.0) - (start.total_s or 0.0)
    else:
        out["source"] = "loadavg"
        out["load1"] = end.load1
    return derive(out)


def derive(rec: dict[str, Any]) -> dict[str, Any]:
    """Add the rates the classifier judges: cores used by this process and by others, steal share, switches/s."""
    wall = max(float(rec["wall_s"]), 1e-9)
    own = float(rec["own_cpu_s"]) / wall
    rec["own_cores"] = own
    rec["involuntary_switches_per_s"] = rec["involuntary_switches"] / wall
    if rec.get("source") == "/proc/stat":
        # /proc/stat is machine-wide but counts only CPUs it sees; with `cores` < machine CPUs others may use the rest
        rec["others_cores"] = max(0.0, float(rec["machine_busy_s"]) / wall - own)
        total = float(rec["machine_total_s"])
        rec["steal_share"] = float(rec["steal_s"]) / total if total > 0 else 0.0
    elif rec.get("load1") is not None:
        rec["others_cores"] = max(0.0, float(rec["load1"]) - own)
    return rec


def merge(records: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """One record for several windows (summed deltas): how a row's rounds are judged together."""
    recs = list(records)
    if not recs:
        return None
    out: dict[str, Any] = {"wall_s": 0.0, "own_cpu_s": 0.0, "involuntary_switches": 0, "cores": recs[0]["cores"]}
    proc = all(r.get("source") == "/proc/stat" for r in recs)
    if proc:
        out.update(source="/proc/stat", machine_busy_s=0.0, steal_s=0.0, machine_total_s=0.0)
    else:
        loads = [r["load1"] for r in recs if r.get("load1") is not None]
        out.update(source="loadavg", load1=max(loads) if loads else None)
    for r in recs:
        for key in ("wall_s", "own_cpu_s", "involuntary_switches") + (
            ("machine_busy_s", "steal_s", "machine_total_s") if proc else ()
        ):
            out[key] += r[key]
    return derive(out)


def reasons(rec: dict[str, Any]) -> list[str]:
    """Why this window's figure is not the bundle's own cost; empty when it looks quiet."""
    out = []
    others = rec.get("others_cores")
    limit = OTHERS_CORES_LIMIT if rec.get("source") == "/proc/stat" else LOAD_EXCESS_LIMIT
    if others is not None and others > limit:
        what = "other processes used" if rec.get("source") == "/proc/stat" else "load average exceeded ours by"
        out.append(f"{what} {others:.2f} cores (limit {limit:g})")
    if (rec.get("steal_share") or 0.0) > STEAL_LIMIT:
        out.append(f"CPU steal {rec['steal_share'] * 100:.0f}% of the time (limit {STEAL_LIMIT * 100:.0f}%)")
    if rec["involuntary_switches_per_s"] > NIVCSW_PER_S_LIMIT:
        out.append(
            f"{rec['involuntary_switches_per_s']:.0f} involuntary context switches/s (limit {NIVCSW_PER_S_LIMIT:g})"
        )
    return out


def judge(windows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A row's verdict from its windows: disturbed when all of them together, or any one long enough to judge
    alone, crossed a limit. Returns {"disturbed", "reasons", "overall", "windows"}."""
    overall = merge(windows)
    found = reasons(overall) if overall else []
    for i, w in enumerate(windows):
        if w["wall_s"] >= MIN_JUDGED_S and len(windows) > 1:
            found += [f"round {i + 1}: {r}" for r in reasons(w)]
    return {"disturbed": bool(found), "reasons": found, "overall": overall, "windows": list(windows)}


class Window:
    """`with Window() as w:` ... then `w.record` describes what the machine did meanwhile."""

    def __init__(self) -> None:
        self.record: dict[str, Any] = {}
        self._start: Snapshot | None = None

    def __enter__(self) -> Window:
        self._start = snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._start is not None
        self.record = record(self._start, snapshot())


def wait_for_quiet(limit_s: float, probe_s: float = 1.0, log: Any = None) -> tuple[bool, float, dict[str, Any]]:
    """Sleep in `probe_s` windows until one shows a quiet machine, for at most `limit_s` seconds.

    Returns (quiet, seconds waited, the last probe's record)."""
    t0 = time.perf_counter()
    while True:
        with Window() as w:
            time.sleep(probe_s)
        found = reasons(w.record)
        waited = time.perf_counter() - t0
        if not found or waited >= limit_s:
            return not found, waited, w.record
        if log is not None:
            log(f"waiting for a quiet machine ({'; '.join(found)}), {waited:.0f}/{limit_s:g} s")


def limits() -> dict[str, float]:
    """The thresholds, for the bench document's settings (a reader can tell what "disturbed" meant)."""
    return {
        "others_cores": OTHERS_CORES_LIMIT,
        "steal_share": STEAL_LIMIT,
        "involuntary_switches_per_s": NIVCSW_PER_S_LIMIT,
        "load_excess": LOAD_EXCESS_LIMIT,
        "min_judged_window_s": MIN_JUDGED_S,
    }
