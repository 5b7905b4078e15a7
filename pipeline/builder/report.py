"""The build's report: its rows and PyTorch baselines as `bitdeploy bench` entries, rendered by the bench report
(markdown, HTML, results.json), plus build.json with this build's rows. Torch-free.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitdeploy.benchmarks.schema import BenchEntry
from bitdeploy.builder.result import RowResult
from bitdeploy.core.fsutil import remove_stale_temps, replace_dir

if TYPE_CHECKING:
    from bitdeploy.benchmarks.baseline import QuickBaseline


def bench_entries(
    rows: list[RowResult], model: dict[str, Any], baseline: list[QuickBaseline] | None, env: dict[str, Any]
) -> list[BenchEntry]:
    """Rows and PyTorch baselines as `bitdeploy bench` result entries, so the bench report renders them (same schema)."""
    from bitdeploy.benchmarks.env import device_label

    name, resolution, classes = model["name"], model["resolution"], model["num_classes"]
    entries = [b.entry(classes, device_label(env, "cpu")) for b in baseline or []]
    for r in rows:
        rss = r.serving_rss_mb
        entries.append(
            BenchEntry(
                name=r.name,
                kind="bundle",
                bundle=r.bundle,
                model=r.model or name,  # a grid row's own cell, else the build's one model
                resolution=r.resolution or resolution,
                num_classes=classes,
                target=r.backend,
                precision=r.precision,
                precision_used=r.precision_used,
                backend_device=r.device,
                device=device_label(env, r.device),
                status=r.status,
                size_mb=r.size_mb,
                build_accuracy=r.accuracy,
                build_checks=r.checks.to_dict() if r.manifest is not None else None,
                error=r.error,
                serving_memory={"peak_rss_mb": rss} if rss is not None else None,
                **r.timing.entry_fields(),
            )
        )
    return entries


def write_report(
    rows: list[RowResult],
    model: dict[str, Any],
    baseline: list[QuickBaseline] | None,
    rdir: Path,
    selected: dict[str, str] | None,
    settings: dict[str, Any],
) -> Path:
    """report.md / report.html / results.json through the bench report, plus build.json (this build's rows), written
    beside `rdir` and renamed into place: a failure leaves the old report or none. Returns the HTML report's path."""
    from bitdeploy.benchmarks.env import collect
    from bitdeploy.benchmarks.report_render import write_report as bench_report
    from bitdeploy.benchmarks.schema import new_document

    env = collect(settings.get("threads"))
    mixes: list[dict[str, Any]] = []  # {"name": row, **int8_mix} per INT8 search: the report's sensitivity plot
    for r in rows:
        mix = r.manifest.int8_mix if r.manifest is not None else None
        if mix is not None:
            mixes.append({"name": r.name, **mix.to_dict()})
    doc = new_document(
        bench_entries(rows, model, baseline, env),
        env,
        {"source": "bitdeploy build", **settings, **({"int8_mix": mixes} if mixes else {})},
        selected,
    )
    summary = {
        "model": model,
        "rows": [r.as_dict() for r in rows],
        "selected": selected,
        "settings": settings,
        "baseline": [b.as_dict() for b in baseline] if baseline is not None else None,
    }
    remove_stale_temps(rdir.parent, f".{rdir.name}.tmp-")
    tmp = rdir.parent / f".{rdir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        paths = bench_report(doc, tmp, selected)
        (tmp / "build.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
        replace_dir(tmp, rdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rdir / paths["html"].name
