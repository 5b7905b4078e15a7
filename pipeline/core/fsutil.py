"""File helpers shared by every area (stdlib only, so the torch-free runtime can use them)."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bitdeploy.core import interrupts


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write to a temporary name beside `path`, then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temp_name(path: str | os.PathLike[str]) -> Path:
    """`.<name>.<random>.tmp` beside `path`, to open with "xb" inside the `try` that removes it: the name is known
    before the file exists, so an interrupt landing right after its creation still finds it to remove."""
    path = Path(path)
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"


@contextmanager
def temp_dir(parent: str | os.PathLike[str], prefix: str) -> Iterator[Path]:
    """A new directory `<parent>/<prefix><random>`, removed when the block ends unless the block moved it away.
    Its name is chosen before it is created, so a Ctrl-C or SIGTERM landing right after the mkdir (where
    `tempfile.mkdtemp` has not yet returned the name) still finds it to remove."""
    while True:
        path = Path(parent) / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o700)
            break
        except FileExistsError:
            continue
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def replace_dir(tmp: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Move the finished directory `tmp` to `out`, replacing what is there with two renames (no half state)."""
    tmp, out = Path(tmp), Path(out)
    old = None
    with interrupts.deferred():  # a Ctrl-C between the renames would leave no `out` at all
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temps(directory: Path, prefix: str) -> None:
    """Remove `<prefix><pid>-...` entries of `directory` whose process is gone: what a write killed with -9 leaves."""
    for path in directory.glob(f"{prefix}*"):
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def copy_files(src_dir: Path, dst_dir: Path, names: list[str]) -> None:
    """Copy the files `names` (relative paths) from src_dir into dst_dir, creating subdirectories."""
    for name in names:
        dst = dst_dir / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_dir / name, dst)


def human_bytes(n: float) -> str:
    """'512 B', '12.3 MB', '1.5 GB' (powers of 1000, as `df -H` and disk vendors count)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
