"""Timing: the one path that times bundles in a build (`time_bundles`: open each runtime, interleave their rounds,
close), used for the rows once all are built (`time_rows`) and for the INT8 search's candidates; and the PyTorch
baselines the report compares with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitdeploy.benchmarks.schema import Status, Timing
from bitdeploy.builder.options import BuildOptions
from bitdeploy.builder.result import RowResult
from bitdeploy.core.errors import BitdeployError, first_line
from bitdeploy.core.resources import guarded
from bitdeploy.runtimes.bundle.manifest import BuildLatency, Manifest

if TYPE_CHECKING:
    from bitdeploy.benchmarks.baseline import QuickBaseline

BUILD_BATCH_SIZES = (1, 4, 8, 16)  # throughput sweep of the build's quick timing (where memory allows)
BUILD_THROUGHPUT_IMAGES = 32  # images per batch size in that sweep
DECISION_ROUNDS = 5  # interleaved rounds a speed decision (the INT8 search's) is made from
DECISION_QUERIES = 50  # batch-1 queries per bundle over those rounds, at least
SWEEP_FIELDS = ("images_per_s", "images_per_s_spread", "throughput_batch", "throughput")  # a decision has no sweep
# The manifest's build_latency field -> the Timing field it holds.
LATENCY_FIELDS = {
    "batch1_p50_ms": "p50_ms",
    "batch1_p90_ms": "p90_ms",
    "queries": "n",
    "images_per_s": "images_per_s",
    "throughput_batch": "throughput_batch",
    "batch1_p50_spread_ms": "p50_spread",
}


@dataclass(frozen=True)
class Timed:
    """A bundle (or a search candidate) to time: its name, model file, manifest, and the device it runs on."""

    name: str
    model_path: Path
    manifest: Manifest
    device: str | None
    resolution: int


def quick_timing(iterations: int, sweep: bool = True) -> dict[str, Any]:
    """The build's quick timing (`benchmarks.quick.QuickTimer` arguments): batch-1 latency and, with `sweep`, a
    batch-size sweep."""
    return {
        "iterations": iterations,
        "throughput_batches": list(BUILD_BATCH_SIZES) if sweep else [],
        "throughput_images": BUILD_THROUGHPUT_IMAGES,
    }


def time_bundles(
    items: Sequence[Timed],
    threads: int | None,
    timing: dict[str, Any],
    log: Callable[[str], None],
    rounds: int | None = None,
) -> list[Timing | None]:
    """Every item timed together, in interleaved rounds of rotating order (`rounds`, else the quick timing's
    default), so slow drift of the machine hits each alike; None for an item whose runtime would not open."""
    from bitdeploy.benchmarks.quick import QuickTimer, quick_interleaved
    from bitdeploy.runtimes.engines.base import Backend, open_backend

    opened: list[tuple[int, Backend]] = []
    try:
        for i, item in enumerate(items):
            try:
                backend = open_backend(
                    item.manifest.target.backend, item.model_path, item.manifest, device=item.device, threads=threads
                )
            except Exception as exc:  # an SDK's own error type: the item goes without a timing
                log(f"warning: [{item.name}] not timed: {type(exc).__name__}: {first_line(exc)}")
                continue
            opened.append((i, backend))
        timing = {**timing, **({"rounds": rounds} if rounds is not None else {})}
        timers = [QuickTimer(b, (3, items[i].resolution, items[i].resolution), **timing) for i, b in opened]
        results = quick_interleaved(timers)
    finally:
        for _, backend in opened:
            backend.close()
    out: list[Timing | None] = [None] * len(items)
    for (i, _), result in zip(opened, results):
        out[i] = Timing.from_quick(result)
    return out


def time_rows(todo: Sequence[tuple[RowResult, Timed]], opts: BuildOptions, log: Callable[[str], None]) -> None:
    """Time every built bundle together; then each valid bundle's serving memory in a fresh process, one at a time.
    Each figure joins the sealed bundle's manifest (`build_latency`, files re-verified) and the row."""
    from bitdeploy.benchmarks.latency import DEFAULT_ROUNDS
    from bitdeploy.runtimes.bundle import amend_manifest

    if not todo:
        return
    if opts.timing.quiet_check == "wait":
        from bitdeploy.benchmarks.interference import QUIET_WAIT_S, wait_for_quiet

        wait_for_quiet(QUIET_WAIT_S)
    log(f"timing {len(todo)} bundles in {DEFAULT_ROUNDS} interleaved rounds: batch 1 and a batch-size sweep")
    timings = time_bundles([t for _, t in todo], opts.engine.threads, quick_timing(opts.timing.bench_iterations), log)
    for (row, _item), timing in zip(todo, timings):
        if timing is None:
            continue
        row.timing = timing
        path = Path(str(row.bundle))
        rss = _serving_memory(row, path, opts, log) if row.valid else None
        latency = build_latency(timing, rss, opts.engine.threads)
        with guarded(path.parent, "pass --out DIR", f"{row.name} bundle"):
            row.manifest = amend_manifest(path, build_latency=latency)
    hold_kept_mixes(todo, opts, log)


def build_latency(timing: Timing, serving_rss_mb: float | None, threads: int | None) -> BuildLatency:
    """The manifest's `build_latency` from the build's quick figures (`LATENCY_FIELDS`) and serving memory."""
    return BuildLatency(
        **{name: getattr(timing, field) for name, field in LATENCY_FIELDS.items()},
        serving_peak_rss_mb=serving_rss_mb,
        threads=threads,
        note="quick build-time figure; use `bitdeploy bench` for publishable numbers",
    )


def _serving_memory(row: RowResult, path: Path, opts: BuildOptions, log: Callable[[str], None]) -> float | None:
    """Peak RSS of a fresh runtime process loading the bundle and serving batch 1 (`benchmarks.memory`)."""
    from bitdeploy.benchmarks.memory import serving_memory

    try:
        return float(serving_memory(path, threads=opts.engine.threads)["peak_rss_mb"])
    except BitdeployError as exc:
        log(f"warning: [{row.name}] serving memory not measured: {first_line(exc)}")
        return None


def baseline_latency(
    model: Any, resolution: int, opts: BuildOptions, log: Callable[[str], None]
) -> list[QuickBaseline] | None:
    """The PyTorch FP32 baselines (`benchmarks.baseline.FORMS`: eager with Google's standardisation, eager folded,
    torch.compile of the folded model), timed briefly for the report's speed-up column of multi-bundle builds,
    before any row opens an engine session. Skipped when the report is off."""
    if not opts.timing.report or not opts.timing.baseline:
        return None
    import torch

    from bitdeploy.benchmarks.baseline import QuickBaseline, measure_forms

    # Fewer queries and images than a bundle gets: the eager forms are slow, and this is a denominator, not a row to rank.
    kwargs = quick_timing(max(5, opts.timing.bench_iterations // 10))
    timing = {"kind": "quick", "kwargs": {**kwargs, "warmup": 2, "throughput_images": BUILD_THROUGHPUT_IMAGES // 2}}
    threads = torch.get_num_threads()
    try:
        if opts.engine.threads:
            torch.set_num_threads(opts.engine.threads)
        results = measure_forms(model, (3, resolution, resolution), timing, log=log)
    finally:
        torch.set_num_threads(threads)
    out = [QuickBaseline.from_result(r, opts.model, resolution) for r in results]
    for b in out:
        took = f" (compiled in {b.compile_s:.1f} s)" if b.compile_s else ""
        p50 = b.timing.p50_ms
        log(f"PyTorch baseline {b.form}: " + (f"p50 {p50:.2f} ms{took}" if p50 is not None else b.status.text))
    return out


def faster(mix: Timing | None, fp32: Timing | None) -> bool:
    """The mix's slowest round beats FP32's fastest (p50s when there are no rounds to compare)."""
    if mix is None or fp32 is None or mix.p50_ms is None or fp32.p50_ms is None:
        return False
    if mix.p50_spread and fp32.p50_spread:
        return mix.p50_spread[1] < fp32.p50_spread[0]
    return mix.p50_ms < fp32.p50_ms


def decisive(items: Sequence[Timed], opts: BuildOptions, log: Callable[[str], None]) -> list[Timing | None]:
    """`items` timed for a decision: `DECISION_ROUNDS` interleaved rounds of batch 1 (at least `DECISION_QUERIES`
    queries each), measured again when the machine disturbed them (after waiting for quiet with --quiet-check
    wait); the figures of the last run, whose `disturbed` says whether it still was."""
    iterations = max(DECISION_QUERIES, opts.timing.bench_iterations)
    timing = quick_timing(iterations, sweep=False)
    out = time_bundles(items, opts.engine.threads, timing, log, rounds=DECISION_ROUNDS)
    disturbed = [t for t in out if t is not None and t.disturbed]
    if disturbed:  # honour the verdict: measure again, after waiting for quiet when the build asks to
        if opts.timing.quiet_check == "wait":
            from bitdeploy.benchmarks.interference import QUIET_WAIT_S, wait_for_quiet

            wait_for_quiet(QUIET_WAIT_S, log=log)
        log(f"timing disturbed ({disturbed[0].disturbed[0]}): measuring the mix and FP32 again")
        out = time_bundles(items, opts.engine.threads, timing, log, rounds=DECISION_ROUNDS)
    return out


def faster_or_untimed(mix: Timing, fp32: Timing) -> bool:
    """The table shows the mix faster than FP32 (by p50), or one of them without a figure to compare."""
    return mix.p50_ms is None or fp32.p50_ms is None or mix.p50_ms < fp32.p50_ms


def hold_kept_mixes(todo: Sequence[tuple[RowResult, Timed]], opts: BuildOptions, log: Callable[[str], None]) -> None:
    """After the table's timing: a kept mix that shows slower than its engine's FP32 is timed again with it
    (`DECISION_ROUNDS` interleaved rounds, both rows take those figures); still slower, it is marked invalid, so the
    table never shows a kept mix slower than that engine's FP32."""
    from bitdeploy.runtimes.bundle import amend_manifest

    rows = {(r.cell, r.target, r.precision): (r, t) for r, t in todo}
    for row, item in todo:
        mix = row.manifest.int8_mix if row.manifest is not None else None
        if not row.valid or mix is None or mix.chosen is None:
            continue
        pair = rows.get((row.cell, row.target, "fp32"))
        if pair is None or faster_or_untimed(row.timing, pair[0].timing):
            continue
        fp32_row, fp32_item = pair
        log(f"[{row.name}] the kept mix timed slower than FP32 in the table: timing the two again")
        again = decisive([item, fp32_item], opts, log)
        if again[0] is None or again[1] is None:
            continue
        for r, t in ((row, again[0]), (fp32_row, again[1])):
            sweep = {k: getattr(r.timing, k) for k in SWEEP_FIELDS}
            r.timing = replace(t, **sweep)
            latency = r.manifest.build_latency if r.manifest is not None else None
            rss = latency.serving_peak_rss_mb if latency is not None else None
            with guarded(Path(str(r.bundle)).parent, "pass --out DIR", f"{r.name} bundle"):
                r.manifest = amend_manifest(
                    Path(str(r.bundle)), build_latency=build_latency(r.timing, rss, opts.engine.threads)
                )
        if faster_or_untimed(row.timing, fp32_row.timing):
            continue
        why = f"kept by the INT8 search, but not faster than {row.plan.target.title} FP32 in this build's timing"
        with guarded(Path(str(row.bundle)).parent, "pass --out DIR", f"{row.name} bundle"):
            row.manifest = amend_manifest(Path(str(row.bundle)), valid=False, invalid_reason=why)
        row.status = Status.failed(why)
        log(f"[{row.name}] {why}: marked invalid")
