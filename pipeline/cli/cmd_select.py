"""`bitdeploy select`: pick the bundle of a grid that meets the device's budget (torch-free)."""

from __future__ import annotations

from pathlib import Path

import click

from bitdeploy.cli import groups, groups_build
from bitdeploy.core.errors import BitdeployError
from bitdeploy.core.options import SelectionArgs


@click.command("select")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="DIR")
@click.option(
    "--results",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    metavar="JSON",
    help="Device results from `bitdeploy bench DIR --all --json JSON` run on the device (repeatable) [default: "
    "the build host's figures, and it says so].",
)
@click.option("--device-class", default=None, help="Which device's results to use when they come from several.")
@click.option("--pack", is_flag=True, help="Write DIR/selected.bitpack (one file) instead of the DIR/selected copy.")
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write a report of the results with the front plotted and the selection circled (needs --results).",
)
@groups.takes(groups_build.SELECTION)
def select(
    folder: Path,
    results: tuple[str, ...],
    device_class: str | None,
    pack: bool,
    report_dir: Path | None,
    selection: SelectionArgs,
) -> None:
    """Choose the bundle under DIR (a grid build's --out) for a device, print the accuracy-latency front, and write
    DIR/selected (a copy of the chosen bundle) and DIR/selection.json (the reason).

    Accuracy is each bundle's build gate; latency and memory come from --results measured on the device. A bundle
    that failed --verify-on on the device's class, or whose bf16/fp16 float layers no CPU computing them checked,
    is excluded, and the line says so. No bundle meets the budget: exit 1 with one line naming the nearest miss.

    \b
    Example (on the device: bitdeploy bench runs/grid --all --json pi5.json):
      bitdeploy select runs/grid --results pi5.json --latency-budget 20
    """
    from bitdeploy.benchmarks.ranking import Criteria, SelectionError
    from bitdeploy.builder import select_folder

    criteria = (
        Criteria.from_flags(selection.select, selection.latency_budget, selection.min_top1, selection.memory_budget)
        or Criteria()
    )
    if report_dir is not None and not results:
        raise BitdeployError(
            "--report draws the device's results; pass --results JSON from `bitdeploy bench DIR --all`"
        )
    try:
        choice, options, source, missing = select_folder.select(folder, criteria, results, device_class)
    except SelectionError as exc:
        raise BitdeployError(str(exc)) from None
    click.echo(select_folder.front_table(options, choice))
    click.echo(f"figures: {source}")
    if missing:
        click.echo(f"warning: not in the results, left out: {', '.join(missing)}", err=True)
    click.echo(f"selected: {choice.line}")
    written = select_folder.write_selected(folder, choice.winner.item, pack)
    click.echo(f"wrote {written} and {select_folder.record(folder, choice, criteria, source, written, options)}")
    if report_dir is not None:
        from bitdeploy.benchmarks.report import as_documents
        from bitdeploy.benchmarks.report_render import write_report

        selected = {"name": choice.winner.name, "reason": choice.line}
        paths = write_report(as_documents(list(results)), report_dir, selected)
        click.echo(f"report: {paths['html']}")
