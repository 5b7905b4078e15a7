"""`bitdeploy bench` and `bitdeploy report`."""

from __future__ import annotations

import json
from typing import Any

import click

from bitdeploy.cli import groups, groups_run
from bitdeploy.core.errors import BitdeployError
from bitdeploy.core.options import AccuracyArgs, BenchTimingArgs, PyTorchBaselineArgs, RuntimeArgs, values


def format_table(rows: list[dict[str, Any]]) -> str:
    """The report's table as aligned plain text, for the terminal."""
    from bitdeploy.benchmarks.report import COLUMNS, cells

    body = [cells(r) for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(COLUMNS)]
    line = lambda cs: "  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(cs, widths)))  # noqa: E731
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *(line(b) for b in body)])


@click.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path())
@click.option(
    "--all",
    "all_bundles",
    is_flag=True,
    help="Bench every bundle under each DIR (folders with a manifest.json, .bitpack files; not DIR/selected), each "
    "named by its path under DIR; a bundle the build marked invalid is listed as skipped.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Write the results (schema bitdeploy-bench v1) here; - for stdout.",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False),
    help="Also write report.md and report.html into this directory.",
)
@groups.option(groups.SEED)
@groups.takes(groups_run.BENCH_TIMING, groups_run.RUNTIME, groups_run.ACCURACY, groups_run.PYTORCH_BASELINE)
def bench(  # noqa: PLR0913 - a command: its records are the argument groups
    bundles: tuple[str, ...],
    all_bundles: bool,
    json_out: str | None,
    report_dir: str | None,
    seed: int,
    timing: BenchTimingArgs,
    runtime: RuntimeArgs,
    accuracy: AccuracyArgs,
    baseline: PyTorchBaselineArgs,
) -> None:
    """Measure latency, throughput and accuracy of BUNDLE... on this machine.

    \b
    Single-stream (MLPerf): batch 1, next query when the previous returns; p50/p90/p99 over 1000 queries by default.
    Offline: images/s per batch size. End-to-end: decode + preprocess + infer on encoded images.
    Serving memory: peak RSS of a fresh process loading one bundle and serving batch 1.
    Example: bitdeploy bench runs/onnx runs/ov --threads 2 --dataset digits --pytorch-baseline --json bench.json
    A grid build's folder: bitdeploy bench runs/grid --all --json device.json
    """
    from bitdeploy.benchmarks.bench import disturbed, failed, run
    from bitdeploy.benchmarks.discovery import bundles_to_bench
    from bitdeploy.benchmarks.measure import BenchOptions
    from bitdeploy.benchmarks.report import disturbance, table_rows
    from bitdeploy.benchmarks.report_render import write_report
    from bitdeploy.benchmarks.schema import write_json

    planned = bundles_to_bench(bundles, all_bundles, lambda message: click.echo(f"bench: {message}", err=True))
    opts = BenchOptions(
        **values(timing, runtime, accuracy, compile_timeout=baseline.compile_timeout, seed=seed),
        pytorch_baseline=baseline.weights,
    )
    doc = run([p for p, _ in planned], opts, [n for _, n in planned], skip_invalid=all_bundles)
    noisy = disturbed(doc)
    if noisy and timing.quiet_check == "fail":
        raise BitdeployError(
            f"{len(noisy)} of {len(doc['results'])} rows disturbed ({noisy[0]['name']}: "
            f"{(disturbance(noisy[0]) or '').split('; ')[0]}), "
            "nothing written; run again on a quiet machine, or use --quiet-check wait"
        )
    table = format_table(table_rows([doc]))
    if json_out == "-":
        click.echo(table, err=True)
        click.echo(json.dumps(doc, indent=1, default=str))
    else:
        click.echo(table)
        if json_out:
            click.echo(f"results: {write_json(doc, json_out)}", err=True)
    if report_dir:
        paths = write_report(doc, report_dir)
        click.echo(f"report: {paths['markdown']} {paths['html']}", err=True)
    for e in noisy:
        click.echo(f"warning: {e['name']}: disturbed: {disturbance(e)}", err=True)
    if noisy:
        click.echo(
            f"warning: {len(noisy)} of {len(doc['results'])} rows disturbed: not quotable (docs/measuring.md)", err=True
        )
    bad = failed(doc)
    if bad:
        raise BitdeployError(
            f"{len(bad)} of {len(doc['results'])} benchmarks failed; first: {bad[0]['name']}: {bad[0]['error']}"
        )


@click.command()
@click.argument("results", nargs=-1, required=True, type=click.Path())
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for report.md, report.html and results.json.",
)
@click.option(
    "--select",
    type=click.Choice(["fastest"]),
    help="Mark the fastest valid bundle within --max-accuracy-drop, as `bitdeploy select` would pick it: not one "
    "that failed --verify-on on its device class, nor a bf16/fp16 one no CPU computing that precision checked.",
)
@click.option(
    "--max-accuracy-drop",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Accuracy gate for --select, in top-1 percentage points.",
)
def report(results: tuple[str, ...], out_dir: str, select: str | None, max_accuracy_drop: float) -> None:
    """Merge bench RESULTS... (JSON files, from one or several machines) into report.md and report.html."""
    from bitdeploy.benchmarks.report import as_documents, select_fastest, table_rows
    from bitdeploy.benchmarks.report_render import write_report

    docs = as_documents(list(results))
    selected = None
    if select == "fastest":
        selected = select_fastest(docs, max_accuracy_drop)
        if selected is None:
            click.echo(
                f"no valid bundle meets the {max_accuracy_drop:g} pp accuracy gate and may be picked on its device "
                "class (docs/choosing.md); nothing selected",
                err=True,
            )
    paths = write_report(docs, out_dir, selected)
    click.echo(
        format_table(table_rows(docs, selected or next((d["selected"] for d in docs if d.get("selected")), None)))
    )
    if selected:
        click.echo(f"selected: {selected['name']}: {selected['reason']}")
    for key in ("markdown", "html", "json"):
        click.echo(f"{key}: {paths[key]}")
