"""What the stage cache holds, whether it is intact, and removing entries (`bitdeploy cache`).

An entry's last use is its stage.json's mtime (a build touches it on every hit). Leftovers are what killed
builds leave: `.<key>.tmp-<pid>-*` (an entry being written), `.<key>.partial` (a fine-tune to resume),
`.<key>.damaged-<pid>` (an entry being discarded). Nothing is removed while a build holds the entry's lock.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bitdeploy.core.cache import STAGE_META, entry_problem
from bitdeploy.core.errors import BitdeployError

_KEY = re.compile(r"^[0-9a-f]{64}$")
_LEFTOVER = re.compile(r"^\.([0-9a-f]{64})\.(tmp-.*|partial|damaged-.*)$")


@dataclass
class Entry:
    stage: str
    key: str
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.key[:12]}"


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _last_used(path: Path) -> float:
    for probe in (path / STAGE_META, path):
        try:
            return probe.stat().st_mtime
        except OSError:
            continue
    return 0.0


def scan(root: Path) -> tuple[list[Entry], list[Path]]:
    """(entries, leftovers) under the cache root, entries oldest use first."""
    entries: list[Entry] = []
    leftovers: list[Path] = []
    if not root.is_dir():
        return entries, leftovers
    for stage_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for child in sorted(stage_dir.iterdir()):
            if child.is_dir() and _KEY.match(child.name):
                entries.append(Entry(stage_dir.name, child.name, child, tree_bytes(child), _last_used(child)))
            elif _LEFTOVER.match(child.name):
                leftovers.append(child)
    entries.sort(key=lambda e: e.last_used)
    return entries, leftovers


@contextmanager
def claimed(stage_dir: Path, key: str) -> Iterator[bool]:
    """Hold the entry's lock without waiting; yields False when a running build holds it."""
    import fcntl

    lock = stage_dir / f".{key}.lock"
    if not os.access(stage_dir, os.W_OK):  # a read-only cache: nobody can be writing it
        yield True
        return
    with open(lock, "a+b") as fd:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def remove(path: Path) -> None:
    """Rename out of the way (one step), then delete: a reader never sees half an entry."""
    doomed = path.parent / f".{path.name}.damaged-{os.getpid()}" if _KEY.match(path.name) else path
    if doomed != path:
        os.replace(path, doomed)
    if doomed.is_dir():
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        doomed.unlink(missing_ok=True)


def leftover_key(path: Path) -> str:
    m = _LEFTOVER.match(path.name)
    assert m is not None
    return m.group(1)


def prune(
    root: Path, older_than_s: float | None, max_bytes: int | None, dry_run: bool = False
) -> tuple[list[Entry], list[Path], list[str], int]:
    """Remove damaged entries, leftovers of killed builds, entries unused for `older_than_s`, then the least
    recently used until the cache holds at most `max_bytes`. Returns (entries removed, leftovers removed,
    entries skipped because a build is using them, bytes freed)."""
    entries, leftovers = scan(root)
    now = time.time()
    removed: list[Entry] = []
    busy: list[str] = []
    freed = 0
    doomed_leftovers: list[Path] = []
    for path in leftovers:
        with claimed(path.parent, leftover_key(path)) as free:
            if not free:
                continue
            size = tree_bytes(path)
            if not dry_run:
                remove(path)
            doomed_leftovers.append(path)
            freed += size
    total = sum(e.bytes for e in entries)
    for entry in entries:  # oldest use first
        reason = (
            entry_problem(entry.path, hashes=False) is not None
            or (older_than_s is not None and now - entry.last_used > older_than_s)
            or (max_bytes is not None and total > max_bytes)
        )
        if not reason:
            continue
        with claimed(entry.path.parent, entry.key) as free:
            if not free:
                busy.append(entry.name)
                continue
            if not dry_run:
                remove(entry.path)
                (entry.path.parent / f".{entry.key}.lock").unlink(missing_ok=True)
        removed.append(entry)
        total -= entry.bytes
        freed += entry.bytes
    return removed, doomed_leftovers, busy, freed


def parse_age(text: str) -> float:
    """'30d', '12h', '90m', '45s' or a bare number of days -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhms]?)\s*", text.lower())
    if not m:
        raise BitdeployError(f"--older-than {text!r} is not an age; write e.g. 30d, 12h or 90m")
    return float(m.group(1)) * {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 86400}[m.group(2)]


def parse_size(text: str) -> int:
    """'10G', '500MB', '1.5T', '2048' (bytes) -> bytes (powers of 1000, as `du --si` and disk vendors count)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*", text.lower())
    if not m:
        raise BitdeployError(f"--max-size {text!r} is not a size; write e.g. 10G, 500M or 2T")
    return int(float(m.group(1)) * 1000 ** " kmgt".index(m.group(2) or " "))


def human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"
