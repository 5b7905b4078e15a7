"""`bitdeploy models`: the 12 released BiT models, their size and cost, and whether their weights are cached.

Torch-free: parameters and MACs are computed from the layer shapes (catalog), so it runs on a device.
"""

from __future__ import annotations

import json
from typing import Any

import click

from bitdeploy.core.catalog import PUBLIC_NAMES, UPSTREAM, get_variant

RESOLUTIONS = (128, 480)  # the two BiT-HyperRule evaluation sizes


def model_rows() -> list[dict[str, Any]]:
    from bitdeploy.core.catalog import count_macs, count_params
    from bitdeploy.training import download

    rows = []
    for name in PUBLIC_NAMES:
        v = get_variant(name)
        path = download.cached_path(v)
        row: dict[str, Any] = {
            "name": name,
            "upstream": UPSTREAM[v.upstream],
            "upstream_classes": v.num_classes,
            "depth": v.depth,
            "width_factor": int(v.width_factor),
            "params": count_params(v),
        }
        for r in RESOLUTIONS:
            row[f"gmacs_{r}"] = round(count_macs(v, r) / 1e9, 3)
        row.update(
            {
                "weights_file": v.npz_name,
                "url": download.weights_url(v),
                "cached": path.is_file(),
                "cache_path": str(path),
            }
        )
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["name", "upstream data", "params", *(f"GMACs@{r}" for r in RESOLUTIONS), "weights file", "cached"]
    body = [
        [
            r["name"],
            r["upstream"],
            f"{r['params'] / 1e6:.1f}M",
            *(f"{r[f'gmacs_{res}']:.2f}" for res in RESOLUTIONS),
            r["weights_file"],
            "yes" if r["cached"] else "no",
        ]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    numeric = {2, 3, 4}
    lines = []
    for cells in [header, *body]:
        lines.append(
            "  ".join(
                str(c).rjust(w) if i in numeric else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()
        )
    return "\n".join(lines)


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects instead of a table.")
def models(as_json: bool) -> None:
    """List the released BiT models (params with the upstream head; MACs per image).

    Weights for `--weights auto` are downloaded on first use into the cache directory
    ($BITDEPLOY_CACHE, else $XDG_CACHE_HOME/bitdeploy, else ~/.cache/bitdeploy).
    """
    rows = model_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from bitdeploy.training.download import cache_dir

    click.echo(format_table(rows))
    click.echo(f"\nparams include the upstream head (21843 classes for m-*, 1000 for s-*); cache: {cache_dir()}")
