"""Content-addressed stage cache: a build step's outputs, keyed by what went into it.

key = sha256 of (stage name, the sha256 of every input file or content hash, the step's options as
canonical JSON, the bitdeploy version). The same inputs give the same key, so a second identical build
reuses the export, the fine-tune and the calibration; any changed input gives a new key (invalidation is
never needed, only deletion to reclaim space).

Layout: `<root>/<stage>/<key>/` holds the step's files and `stage.json`, which records every file's size and
sha256 (as a bundle's manifest does). The entry is written in a temporary directory and renamed into place, and
every hit re-checks the files against the record: a damaged or incomplete entry (a truncated file, a disk fault,
an interrupted copy) is reported in one warning line and rebuilt, never trusted. A step runs under an exclusive lock on
`<root>/<stage>/.<key>.lock`, so two builds that need the same step (two terminals, a CI matrix on one cache)
run it once: the second waits, then takes the first one's result. The lock is the OS's (flock), released when its
process dies, so a killed build never blocks the next. The root is `$BITDEPLOY_CACHE/stages`, else
`$XDG_CACHE_HOME/bitdeploy/stages`, else `~/.cache/bitdeploy/stages` (the weights cache rule); `--cache-dir`
overrides it. With the cache disabled, steps run in a scratch directory removed at the end of the build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any, Protocol

from bitdeploy import __version__
from bitdeploy.core import interrupts
from bitdeploy.core.errors import BitdeployError
from bitdeploy.core.fsutil import sha256_file, temp_dir
from bitdeploy.core.resources import guarded

CACHE_ENV = "BITDEPLOY_CACHE"
STAGE_META = "stage.json"
TMP_MARK = ".tmp-"  # `.<key>.tmp-<pid>-<random>`: a write in progress, or one whose process was killed
PARTIAL_MARK = ".partial"  # `.<key>.partial`: a resumable step's output so far


class Recordable(Protocol):
    """A step's result that records itself as JSON (a converter's `Artifact`)."""

    def to_dict(self) -> dict[str, Any]: ...


Step = Callable[[Path], dict[str, Any] | Recordable]  # writes its files into the dir, returns its metadata


def default_root() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        base = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "bitdeploy"
    return base / "stages"


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """`fsutil.sha256_file`, memoised per (path, size, mtime) so large inputs are hashed once per process."""
    p = Path(path).resolve()
    st = p.stat()
    memo = (str(p), st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        _HASHES[memo] = sha256_file(p)
    return _HASHES[memo]


def record_files(directory: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every file under `directory` except stage.json."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != STAGE_META):
        files[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return files


def read_record(directory: Path) -> dict[str, Any]:
    """An entry's stage.json; raises ValueError saying what is wrong with it."""
    try:
        record = json.loads((directory / STAGE_META).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ValueError(f"{STAGE_META} is missing") from exc
    except (OSError, ValueError) as exc:
        raise ValueError(f"{STAGE_META} is unreadable ({type(exc).__name__})") from exc
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict) or "meta" not in record:
        raise ValueError(f"{STAGE_META} has no file checksums (written by an older bitdeploy)")
    return record


def entry_problem(directory: Path, hashes: bool = True) -> str | None:
    """What is wrong with a cache entry (a missing, resized or changed file), or None when it is intact.
    Without `hashes` only the record, presence and sizes are checked (fast)."""
    try:
        record = read_record(directory)
    except ValueError as exc:
        return str(exc)
    for name, want in sorted(record["files"].items()):
        path = directory / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != want.get("bytes"):
            return f"{name} has {size} bytes, {want.get('bytes')} were written"
        if hashes and file_sha256(path) != want.get("sha256"):
            return f"{name} does not match its sha256"
    return None


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stage_key(stage: str, inputs: Mapping[str, str | os.PathLike[str]], options: Mapping[str, Any]) -> str:
    """Key of one step. `inputs` values are files (hashed) or strings that already identify content."""
    digests = {name: file_sha256(v) if isinstance(v, os.PathLike) else str(v) for name, v in sorted(inputs.items())}
    payload = canonical({"stage": stage, "inputs": digests, "options": dict(options), "bitdeploy": __version__})
    return hashlib.sha256(payload.encode()).hexdigest()


class StageCache:
    """Runs build steps at most once per key. `log` receives one line per hit or miss."""

    def __init__(
        self, root: str | os.PathLike[str] | None = None, enabled: bool = True, log: Callable[[str], None] | None = None
    ) -> None:
        self.enabled = enabled
        self.log = log or (lambda _msg: None)
        self._scratch: Path | None = None
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.hits: list[str] = []
        self.misses: list[str] = []

    def _base(self) -> Path:
        if self.enabled:
            return self.root
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="bitdeploy-stages-"))
        return self._scratch

    def path(self, stage: str, key: str) -> Path:
        return self._base() / stage / key

    def lookup(self, stage: str, key: str) -> tuple[Path, dict[str, Any]] | None:
        """(directory, record) of an intact entry; None when there is none or it is damaged (see `check`)."""
        if not self.enabled:
            return None
        d = self.path(stage, key)
        if not d.exists() or entry_problem(d) is not None:
            return None
        return d, read_record(d)

    def _discard_damaged(self, stage: str, key: str, label: str) -> None:
        """Under the step's lock: report a damaged entry in one line and move it out of the way."""
        d = self.path(stage, key)
        if not d.exists():
            return
        problem = entry_problem(d)
        if problem is None:
            return
        self.log(f"warning: cached {label} ({stage}/{key[:12]}) is damaged ({problem}); rebuilding it")
        doomed = d.parent / f".{key}.damaged-{os.getpid()}"
        os.replace(d, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def _parent(self, stage: str, key: str) -> Path:
        parent = self.path(stage, key).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BitdeployError(
                f"cannot write the stage cache at {parent} ({exc.strerror}); pass --cache-dir DIR or --no-cache"
            ) from exc
        return parent

    @contextmanager
    def _locked(self, stage: str, key: str, label: str) -> Iterator[None]:
        """Hold the step's lock (POSIX advisory, released by the OS if the process dies); say so when waiting."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
            yield
            return
        with open(self._parent(stage, key) / f".{key}.lock", "a+b") as fd:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fd.seek(0)
                holder = fd.read().decode(errors="replace").strip() or "?"
                self.log(f"waiting: another build is running the {label} ({stage}/{key[:12]}, pid {holder})")
                started = time.monotonic()
                fcntl.flock(fd, fcntl.LOCK_EX)
                self.log(f"waited {time.monotonic() - started:.0f} s for the other build's {label}")
            fd.truncate(0)  # who holds it, for the message above; the OS, not this pid, decides who may hold it
            fd.write(str(os.getpid()).encode())
            fd.flush()
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    @contextmanager
    def _writing(self, stage: str, key: str, resumable: bool = False) -> Iterator[Path]:
        final = self.path(stage, key)
        self._parent(stage, key)
        if self.enabled:  # under the step's lock: a temporary directory of this key is a killed build's
            for stale in final.parent.glob(f".{key}{TMP_MARK}*"):
                shutil.rmtree(stale, ignore_errors=True)
        if resumable:  # a long step (fine-tuning) that picks up its own partial output after an interruption
            partial = final.parent / f".{key}{PARTIAL_MARK}"
            partial.mkdir(exist_ok=True)
            writing: AbstractContextManager[Path] = nullcontext(partial)
        else:  # removed on any exception, an interrupt included; moved into place on success
            writing = temp_dir(final.parent, f".{key}{TMP_MARK}{os.getpid()}-")
        with writing as tmp:
            yield tmp
            if final.exists():  # a build without the lock (--no-cache scratch) or one that finished first
                if entry_problem(final, hashes=False) is None:
                    shutil.rmtree(tmp, ignore_errors=True)
                    return
                shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)

    def run(
        self,
        stage: str,
        key: str,
        step: Step,
        what: str | None = None,
        resumable: bool = False,
    ) -> tuple[Path, dict[str, Any], bool]:
        """Return (directory, metadata, hit). On a miss `step(dir)` writes its files into dir and returns
        JSON-able metadata (or a record with `to_dict()`), which is stored with them. `resumable` steps run in a fixed directory that an
        interrupted run leaves behind, so the next run continues where it stopped."""
        interrupts.check()  # a Ctrl-C that a finalizer swallowed stops the build at its next step
        label = what or stage
        move = "pass --cache-dir DIR" if self.enabled else "set TMPDIR to a directory"
        with guarded(self._base(), move, label, stage):
            found = self.lookup(stage, key)
            if found is None and self.enabled:
                with self._locked(stage, key, label):
                    found = self.lookup(stage, key)  # another build may have finished it while this one waited
                    if found is None:
                        self._discard_damaged(stage, key, label)
                        return self._miss(stage, key, step, label, resumable)
            elif found is None:
                return self._miss(stage, key, step, label, resumable)
        self.hits.append(stage)
        self.log(f"cache hit: {label} ({stage}/{key[:12]})")
        # The record's mtime is the entry's last use (`bitdeploy cache prune --older-than`); a read-only cache still serves.
        with suppress(OSError):
            os.utime(found[0] / STAGE_META)
        return found[0], found[1]["meta"], True

    def _miss(self, stage: str, key: str, step: Step, label: str, resumable: bool) -> tuple[Path, dict[str, Any], bool]:
        self.misses.append(stage)
        with self._writing(stage, key, resumable) as tmp:
            result = step(tmp)
            meta = result if isinstance(result, dict) else result.to_dict()
            record = {
                "stage": stage,
                "key": key,
                "bitdeploy": __version__,
                "created": time.time(),
                "files": record_files(tmp),
                "meta": meta,
            }
            (tmp / STAGE_META).write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
        if self.enabled:
            self.log(f"cached: {label} ({stage}/{key[:12]})")
        return self.path(stage, key), meta, False

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
