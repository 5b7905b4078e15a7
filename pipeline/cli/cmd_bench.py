"""`bitdeploy bench` and `bitdeploy report`."""

from __future__ import annotations

import json
from typing import Any

import click

from bitdeploy.benchmarks.baseline import COMPILE_TIMEOUT_S
from bitdeploy.cli import choices
from bitdeploy.core.errors import BitdeployError

SCENARIOS = ("single-stream", "offline", "both")


def quiet_check_option(fn: Any) -> Any:
    """--quiet-check, shared by bench and build."""
    return click.option(
        "--quiet-check",
        type=click.Choice(["warn", "wait", "fail"]),
        default="warn",
        show_default=True,
        help="A busy machine during timing: warn (mark the rows disturbed), wait (for a quiet machine first, up to a limit), fail (exit 1, write nothing).",
    )(fn)


def _batch_sizes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 1,8,32") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: batch sizes must be integers >= 1, e.g. 1,8,32")
    return tuple(dict.fromkeys(sizes))


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
    "--batch-sizes",
    default="1,8,32",
    show_default=True,
    callback=_batch_sizes,
    help="Offline batch sizes, comma-separated.",
)
@click.option(
    "--scenario",
    type=click.Choice(SCENARIOS),
    default="both",
    show_default=True,
    help="single-stream: batch-1 latency (MLPerf); offline: images/s per batch size.",
)
@click.option(
    "--iterations",
    type=click.IntRange(min=1),
    help="Single-stream queries (and images per offline batch size). Default 1000.",
)
@click.option(
    "--duration", type=click.FloatRange(min=0, min_open=True), help="Seconds per measurement instead of --iterations."
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Untimed queries before each single-stream run.",
)
@click.option("--threads", type=click.IntRange(min=1), help="Engine threads (default: the engine's own choice).")
@click.option("--device", help="Runtime device override, e.g. cpu, cuda:0, CPU, GPU (default: the bundle's).")
@click.option("--backend", type=choices.backends(), help="Run the bundle on another backend than it names.")
@click.option(
    "--dataset", help="Measure top-1/top-5 on this dataset's validation split (digits, ImageFolder dir, CIFAR)."
)
@click.option("--samples", type=click.IntRange(min=1), help="Evaluate at most this many validation images.")
@click.option(
    "--reference", type=click.Path(), help="A bundle whose predictions the others are compared with (needs --dataset)."
)
@click.option(
    "--pytorch-baseline",
    is_flag=True,
    help="Also time PyTorch FP32 three ways: eager with Google's weight standardisation every call, eager with it folded, torch.compile of the folded model; the speed-up column divides by the fastest. Needs the train extra.",
)
@click.option(
    "--baseline-weights",
    default="auto",
    show_default=True,
    metavar="auto|none|PATH",
    help="Weights of the PyTorch baseline; auto: the bundle's own checkpoint/.npz if it is a local file, else random (latency only).",
)
@click.option(
    "--compile-timeout",
    type=click.FloatRange(min=0),
    default=COMPILE_TIMEOUT_S,
    show_default=True,
    help="Seconds allowed for torch.compile of the baseline (0: skip that form); past it the row says so.",
)
@click.option("--no-e2e", is_flag=True, help="Skip the end-to-end (decode + preprocess + infer) measurement.")
@click.option(
    "--memory/--no-memory",
    default=True,
    show_default=True,
    help="After the timing, each bundle's serving memory: peak RSS of a fresh process loading it and serving batch 1.",
)
@click.option("--no-raw", is_flag=True, help="Do not store every query's latency in the JSON.")
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
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs and the dataset split.")
@click.option(
    "--rounds",
    type=click.IntRange(min=3),
    default=3,
    show_default=True,
    help="Interleaved rounds per bundle (queries are split between them); each figure is their median, with the min-max spread.",
)
@quiet_check_option
@click.option(
    "--quiet-wait",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds --quiet-check wait waits for a quiet machine before each round.",
)
def bench(
    bundles: tuple[str, ...],
    all_bundles: bool,
    batch_sizes: tuple[int, ...],
    scenario: str,
    iterations: int | None,
    duration: float | None,
    warmup: int,
    threads: int | None,
    device: str | None,
    backend: str | None,
    dataset: str | None,
    samples: int | None,
    reference: str | None,
    pytorch_baseline: bool,
    baseline_weights: str,
    compile_timeout: float,
    no_e2e: bool,
    memory: bool,
    no_raw: bool,
    json_out: str | None,
    report_dir: str | None,
    no_progress: bool,
    seed: int,
    rounds: int,
    quiet_check: str,
    quiet_wait: float,
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
    from bitdeploy.benchmarks.report import disturbance, table_rows, write_report
    from bitdeploy.benchmarks.schema import write_json

    if iterations is not None and duration is not None:
        raise click.UsageError("use either --iterations or --duration, not both")
    planned = bundles_to_bench(bundles, all_bundles, lambda message: click.echo(f"bench: {message}", err=True))
    opts = BenchOptions(
        batch_sizes=batch_sizes,
        scenario=scenario,
        iterations=iterations,
        duration=duration,
        warmup=warmup,
        threads=threads,
        device=device,
        backend=backend,
        dataset=dataset,
        samples=samples,
        reference=reference,
        pytorch_baseline=baseline_weights if pytorch_baseline else None,
        compile_timeout=compile_timeout,
        end_to_end=not no_e2e,
        keep_raw=not no_raw,
        progress=not no_progress,
        seed=seed,
        rounds=rounds,
        quiet_check=quiet_check,
        quiet_wait=quiet_wait,
        memory=memory,
    )
    doc = run([p for p, _ in planned], opts, [n for _, n in planned], skip_invalid=all_bundles)
    noisy = disturbed(doc)
    if noisy and quiet_check == "fail":
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
    "--select", type=click.Choice(["fastest"]), help="Mark the fastest valid bundle within --max-accuracy-drop."
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
    from bitdeploy.benchmarks.report import as_documents, select_fastest, table_rows, write_report

    docs = as_documents(list(results))
    selected = None
    if select == "fastest":
        selected = select_fastest(docs, max_accuracy_drop)
        if selected is None:
            click.echo(f"no valid bundle meets the {max_accuracy_drop:g} pp accuracy gate; nothing selected", err=True)
    paths = write_report(docs, out_dir, selected)
    click.echo(
        format_table(table_rows(docs, selected or next((d["selected"] for d in docs if d.get("selected")), None)))
    )
    if selected:
        click.echo(f"selected: {selected['name']}: {selected['reason']}")
    for key in ("markdown", "html", "json"):
        click.echo(f"{key}: {paths[key]}")
