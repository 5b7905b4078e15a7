"""`bitdeploy cache info|verify|prune`: the stage cache's size and age per stage, a full check, and cleanup."""

from __future__ import annotations

import time
from pathlib import Path

import click

from bitdeploy.cli import groups

CACHE_DIR = groups.option(groups.CACHE_DIR)


def _root(cache_dir: Path | None) -> Path:
    from bitdeploy.core.cache import default_root

    return cache_dir.expanduser() if cache_dir is not None else default_root()


@click.group("cache")
def cache() -> None:
    """The stage cache that `bitdeploy build` reuses: fine-tunes, exports, reference logits, calibration data,
    conversions. Every entry records its files' sha256; a build re-checks them on each hit and rebuilds a damaged
    entry. These commands show it, check all of it, and reclaim space."""


@cache.command("info")
@CACHE_DIR
def info(cache_dir: Path | None) -> None:
    """Size, entries and last use per stage, and what killed builds left behind."""
    from bitdeploy.core.cache_admin import human_age, scan, tree_bytes
    from bitdeploy.core.fsutil import human_bytes

    root = _root(cache_dir)
    entries, leftovers = scan(root)
    total = sum(e.bytes for e in entries)
    click.echo(f"stage cache {root}: {len(entries)} entries, {human_bytes(total)}")
    if not entries and not leftovers:
        return
    now = time.time()
    rows = [("stage", "entries", "size", "last used", "oldest use")]
    for stage in sorted({e.stage for e in entries}):
        mine = [e for e in entries if e.stage == stage]
        rows.append(
            (
                stage,
                str(len(mine)),
                human_bytes(sum(e.bytes for e in mine)),
                human_age(now - max(e.last_used for e in mine)),
                human_age(now - min(e.last_used for e in mine)),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    if leftovers:
        size = human_bytes(sum(tree_bytes(p) for p in leftovers))
        click.echo(f"left by interrupted builds: {len(leftovers)} ({size}); `bitdeploy cache prune` removes them")


@cache.command("verify")
@CACHE_DIR
def verify(cache_dir: Path | None) -> None:
    """Check every entry's files against the sha256 recorded when it was written; exit 1 if any is damaged."""
    from bitdeploy.core.cache import entry_problem
    from bitdeploy.core.cache_admin import scan
    from bitdeploy.core.errors import BitdeployError
    from bitdeploy.core.fsutil import human_bytes

    root = _root(cache_dir)
    entries, _ = scan(root)
    damaged = 0
    for entry in entries:
        problem = entry_problem(entry.path)
        if problem is not None:
            damaged += 1
            click.echo(f"damaged: {entry.name} ({problem})")
    click.echo(f"checked {len(entries)} entries ({human_bytes(sum(e.bytes for e in entries))}) in {root}")
    if damaged:
        raise BitdeployError(
            f"{damaged} damaged cache entr{'y' if damaged == 1 else 'ies'}; the next build that needs one rebuilds it, "
            "or `bitdeploy cache prune` removes them now"
        )


@cache.command("prune")
@CACHE_DIR
@click.option(
    "--older-than", "older_than", default=None, metavar="AGE", help="Remove entries unused for AGE (30d, 12h)."
)
@click.option(
    "--max-size",
    "max_size",
    default=None,
    metavar="SIZE",
    help="Then remove the least recently used until the cache holds at most SIZE (10G, 500M).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
def prune_cmd(cache_dir: Path | None, older_than: str | None, max_size: str | None, dry_run: bool) -> None:
    """Remove damaged entries and what killed builds left behind, then entries by age and total size.

    Entries a running build is using are kept. Without --older-than or --max-size only damaged entries and
    leftovers go.

    \b
    Examples:
      bitdeploy cache prune --older-than 30d
      bitdeploy cache prune --max-size 20G --dry-run
    """
    from bitdeploy.core.cache_admin import parse_age, parse_size, prune
    from bitdeploy.core.fsutil import human_bytes
    from bitdeploy.core.resources import guarded

    root = _root(cache_dir)
    age = parse_age(older_than) if older_than is not None else None
    size = parse_size(max_size) if max_size is not None else None
    with guarded(root, "pass --cache-dir DIR", "stage cache"):
        removed, leftovers, busy, freed = prune(root, age, size, dry_run)
    verb = "would remove" if dry_run else "removed"
    for entry in removed:
        click.echo(f"{verb}: {entry.name}")
    click.echo(
        f"{verb} {len(removed)} entries and {len(leftovers)} leftovers of interrupted builds, {human_bytes(freed)}"
        + (f"; kept {len(busy)} in use by a running build" if busy else "")
    )
