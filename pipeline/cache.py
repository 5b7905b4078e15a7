"""Content-addressed stage cache: a build step's outputs, keyed by what went into it.

key = sha256 of (stage name, the sha256 of every input file or content hash, the step's options as
canonical JSON, the bitdeploy version). The same inputs give the same key, so a second identical build
reuses the export, the fine-tune and the calibration; any changed input gives a new key (invalidation is
never needed, only deletion to reclaim space).

Layout: `<root>/<stage>/<key>/` holds the step's files and `stage.json` (written last, so a directory
without it is an interrupted write and is ignored). A step runs under an exclusive lock on
`<root>/<stage>/.<key>.lock`, so two builds that need the same step (two terminals, a CI matrix on one cache)
run it once: the second waits, then takes the first one's result. The root is `$BITDEPLOY_CACHE/stages`, else
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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bitdeploy import __version__
from bitdeploy.errors import BitdeployError

CACHE_ENV = "BITDEPLOY_CACHE"
STAGE_META = "stage.json"


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
    """sha256 of a file, memoised per (path, size, mtime) so large inputs are hashed once per process."""
    p = Path(path).resolve()
    st = p.stat()
    memo = (str(p), st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        _HASHES[memo] = h.hexdigest()
    return _HASHES[memo]


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
        if not self.enabled:
            return None
        d = self.path(stage, key)
        try:
            meta = json.loads((d / STAGE_META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return d, meta

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
                self.log(f"waiting: another build is running the {label} ({stage}/{key[:12]})")
                started = time.monotonic()
                fcntl.flock(fd, fcntl.LOCK_EX)
                self.log(f"waited {time.monotonic() - started:.0f} s for the other build's {label}")
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    @contextmanager
    def _writing(self, stage: str, key: str, resumable: bool = False) -> Iterator[Path]:
        final = self.path(stage, key)
        self._parent(stage, key)
        if resumable:  # a long step (fine-tuning) that picks up its own partial output after an interruption
            tmp = final.parent / f".{key}.partial"
            tmp.mkdir(exist_ok=True)
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.tmp-", dir=final.parent))
        try:
            yield tmp
            if final.exists():  # an interrupted write (no stage.json) or a concurrent build that finished first
                if (final / STAGE_META).is_file():
                    shutil.rmtree(tmp, ignore_errors=True)
                    return
                shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            if not resumable:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def run(
        self,
        stage: str,
        key: str,
        step: Callable[[Path], dict[str, Any]],
        what: str | None = None,
        resumable: bool = False,
    ) -> tuple[Path, dict[str, Any], bool]:
        """Return (directory, metadata, hit). On a miss `step(dir)` writes its files into dir and returns
        JSON-able metadata, which is stored with them. `resumable` steps run in a fixed directory that an
        interrupted run leaves behind, so the next run continues where it stopped."""
        label = what or stage
        found = self.lookup(stage, key)
        if found is None and self.enabled:
            with self._locked(stage, key, label):
                found = self.lookup(stage, key)  # another build may have finished it while this one waited
                if found is None:
                    return self._miss(stage, key, step, label, resumable)
        elif found is None:
            return self._miss(stage, key, step, label, resumable)
        self.hits.append(stage)
        self.log(f"cache hit: {label} ({stage}/{key[:12]})")
        return found[0], found[1]["meta"], True

    def _miss(
        self, stage: str, key: str, step: Callable[[Path], dict[str, Any]], label: str, resumable: bool
    ) -> tuple[Path, dict[str, Any], bool]:
        self.misses.append(stage)
        with self._writing(stage, key, resumable) as tmp:
            meta = step(tmp)
            record = {"stage": stage, "key": key, "bitdeploy": __version__, "meta": meta}
            (tmp / STAGE_META).write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
        if self.enabled:
            self.log(f"cached: {label} ({stage}/{key[:12]})")
        return self.path(stage, key), meta, False

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
