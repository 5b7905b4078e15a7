"""The content-verified stage cache: checksums recorded at write, checked on every hit, a damaged entry rebuilt with
one warning; `bitdeploy cache info|verify|prune`; a lock whose process was killed never blocks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bitdeploy.core.cache import STAGE_META, StageCache, entry_problem
from tests.pipeline.faults import Run, build_args, cache_problems, cli, digests

KEY = "a" * 64


def _step(calls: list[int]) -> Any:
    def step(d: Path) -> dict[str, Any]:
        calls.append(1)
        (d / "model.bin").write_bytes(b"weights" * 100)
        (d / "sub").mkdir()
        (d / "sub" / "extra.txt").write_text("x")
        return {"n": len(calls)}

    return step


@pytest.mark.parametrize("victim", ["model.bin", "sub/extra.txt", STAGE_META])
def test_a_damaged_file_is_reported_once_and_rebuilt(tmp_path: Path, victim: str) -> None:
    calls: list[int] = []
    logs: list[str] = []
    cache = StageCache(tmp_path / "c", log=logs.append)
    entry, _, _ = cache.run("export", KEY, _step(calls), what="ONNX export")
    record = json.loads((entry / STAGE_META).read_text())
    assert set(record["files"]) == {"model.bin", "sub/extra.txt"} and len(record["files"]["model.bin"]["sha256"]) == 64
    assert cache.run("export", KEY, _step(calls))[2] is True and len(calls) == 1

    path = entry / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a truncated file, as a disk fault leaves it
    logs.clear()
    _, meta, hit = cache.run("export", KEY, _step(calls), what="ONNX export")
    warnings = [line for line in logs if line.startswith("warning:")]
    assert not hit and len(calls) == 2 and meta == {"n": 2}
    assert len(warnings) == 1 and "ONNX export (export/aaaaaaaaaaaa) is damaged" in warnings[0]
    assert "rebuilding it" in warnings[0], warnings
    assert entry_problem(entry) is None and not [p for p in entry.parent.iterdir() if ".damaged-" in p.name]


def test_same_size_corruption_is_caught_by_the_checksum(tmp_path: Path) -> None:
    calls: list[int] = []
    cache = StageCache(tmp_path / "c")
    entry, _, _ = cache.run("reference", KEY, _step(calls))
    data = bytearray((entry / "model.bin").read_bytes())
    data[10] ^= 0xFF
    (entry / "model.bin").write_bytes(bytes(data))
    assert entry_problem(entry) == "model.bin does not match its sha256"
    assert entry_problem(entry, hashes=False) is None  # sizes alone cannot see it; hits always hash
    assert cache.run("reference", KEY, _step(calls))[2] is False and len(calls) == 2


def test_a_missing_file_or_an_old_record_is_rebuilt(tmp_path: Path) -> None:
    calls: list[int] = []
    cache = StageCache(tmp_path / "c")
    entry, _, _ = cache.run("calibration", KEY, _step(calls))
    (entry / "sub" / "extra.txt").unlink()
    assert entry_problem(entry) == "sub/extra.txt is missing"
    cache.run("calibration", KEY, _step(calls))
    record = json.loads((entry / STAGE_META).read_text())
    del record["files"]
    (entry / STAGE_META).write_text(json.dumps(record))
    assert "no file checksums" in (entry_problem(entry) or "")
    assert cache.run("calibration", KEY, _step(calls))[2] is False and len(calls) == 3


def test_a_lock_whose_process_was_killed_never_blocks(tmp_path: Path) -> None:
    """A build killed (-9) while it holds a step's lock: the OS drops the lock, the next build runs the step."""
    root = tmp_path / "c"
    (root / "export").mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a+b'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(60)",
            str(root / "export" / f".{KEY}.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    calls: list[int] = []
    started = time.monotonic()
    _, _, hit = StageCache(root).run("export", KEY, _step(calls))
    assert not hit and len(calls) == 1 and time.monotonic() - started < 5


def test_a_killed_writers_temporary_directory_is_removed_by_the_next_writer(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "c")
    stale = tmp_path / "c" / "export" / f".{KEY}.tmp-999999-x"
    stale.mkdir(parents=True)
    (stale / "model.bin").write_bytes(b"half")
    cache.run("export", KEY, _step([]))
    assert not stale.exists()


def _cache_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> Run:
    return cli(["cache", *args], capsys)


def test_cache_info_verify_and_prune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "c"
    cache = StageCache(root)
    keys = [c * 64 for c in "abcd"]
    for stage, key in zip(["export", "export", "reference", "convert-onnx-int8"], keys):
        cache.run(stage, key, _step([]))
    day = 86400
    old = root / "export" / keys[0]
    os.utime(old / STAGE_META, (time.time() - 40 * day, time.time() - 40 * day))
    leftover = root / "export" / f".{keys[1]}.tmp-999999-y"
    leftover.mkdir()
    (leftover / "half").write_bytes(b"?" * 10)

    info = _cache_cli(["info", "--cache-dir", str(root)], capsys)
    assert info.code == 0 and f"stage cache {root}: 4 entries" in info.out
    export_row = next(line for line in info.out.splitlines() if line.startswith("export "))
    assert export_row.split()[1] == "2" and "40 d ago" in export_row
    assert "left by interrupted builds: 1" in info.out

    assert _cache_cli(["verify", "--cache-dir", str(root)], capsys).code == 0
    victim = root / "reference" / keys[2] / "model.bin"
    victim.write_bytes(victim.read_bytes()[:5])
    bad = _cache_cli(["verify", "--cache-dir", str(root)], capsys)
    assert bad.code == 1 and f"damaged: reference/{keys[2][:12]} (model.bin has 5 bytes" in bad.out
    assert bad.lines == [
        "error: 1 damaged cache entry; the next build that needs one rebuilds it, or `bitdeploy cache prune` removes them now"
    ]

    dry = _cache_cli(["prune", "--cache-dir", str(root), "--older-than", "30d", "--dry-run"], capsys)
    assert dry.code == 0 and "would remove 2 entries and 1 leftovers" in dry.out and old.is_dir()
    pruned = _cache_cli(["prune", "--cache-dir", str(root), "--older-than", "30d"], capsys)
    assert pruned.code == 0 and "removed 2 entries and 1 leftovers" in pruned.out
    assert not old.exists() and not leftover.exists() and not victim.parent.exists()
    assert (root / "export" / keys[1]).is_dir() and (root / "convert-onnx-int8" / keys[3]).is_dir()
    os.utime(root / "export" / keys[1] / STAGE_META, (time.time() - 2 * day, time.time() - 2 * day))
    newest = root / "convert-onnx-int8" / keys[3]
    entry_bytes = sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
    by_size = _cache_cli(["prune", "--cache-dir", str(root), "--max-size", str(entry_bytes)], capsys)
    assert by_size.code == 0 and "removed 1 entries" in by_size.out
    assert (root / "convert-onnx-int8" / keys[3]).is_dir() and not (root / "export" / keys[1]).exists()
    assert cache_problems(root) == []
    wrong = _cache_cli(["prune", "--cache-dir", str(root), "--older-than", "soon"], capsys)
    assert wrong.code == 1 and wrong.lines == ["error: --older-than 'soon' is not an age; write e.g. 30d, 12h or 90m"]


def test_prune_keeps_an_entry_a_running_build_holds(tmp_path: Path) -> None:
    import fcntl

    from bitdeploy.core.cache_admin import prune

    root = tmp_path / "c"
    StageCache(root).run("export", KEY, _step([]))
    with open(root / "export" / f".{KEY}.lock", "a+b") as fd:
        fcntl.flock(fd, fcntl.LOCK_EX)
        removed, _, busy, _ = prune(root, older_than_s=0, max_bytes=None)
    assert removed == [] and busy == [f"export/{KEY[:12]}"] and (root / "export" / KEY).is_dir()


def test_truncating_a_file_of_every_stage_entry_rebuilds_identical_bundles(
    clean_build: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Acceptance: truncate a file of each entry (fine-tune, export, reference, calibration, both conversions; the
    largest file or the record, alternately), rebuild: one warning per entry, each stage rebuilt, bundles identical
    to the clean build's."""
    out, cache = clean_build
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    entries = sorted(p for p in copy.glob("*/*") if p.is_dir() and not p.name.startswith("."))
    assert {p.parent.name for p in entries} == {
        "finetune",
        "export",
        "reference",
        "calibration",
        "convert-onnx-fp32",
        "convert-onnx-int8",
    }
    for i, entry in enumerate(entries):
        files = sorted(p for p in entry.rglob("*") if p.is_file() and p.name != STAGE_META)
        victim = entry / STAGE_META if i % 2 else max(files, key=lambda p: p.stat().st_size)
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 3)
    run = cli(build_args(tmp_path / "out", copy), capsys)
    assert run.code == 0, run.err
    warnings = [line for line in run.lines if line.startswith("warning: cached ")]  # not the timing's warnings
    assert len(warnings) == len(entries) and all("is damaged" in w and "rebuilding it" in w for w in warnings)
    assert "cache hit" not in run.err and "error" not in run.err
    assert digests(tmp_path / "out") == digests(out)
    assert cache_problems(copy) == []
    again = cli(build_args(tmp_path / "out2", copy), capsys)
    assert again.code == 0 and "is damaged" not in again.err and again.err.count("cache hit") == len(entries)
