"""Resource faults as one line that names the fix: a full disk, a read-only or forbidden path, an I/O error, memory.

A library rarely says which of bitdeploy's options caused its failure: torch.onnx.export reports a full disk as an
export failure, ONNX Runtime reports memory as `bad allocation`. `guarded(...)` wraps a step that writes into one
directory chosen by one option; when the failure's chain (`__cause__`/`__context__`) holds a resource fault, it
raises a ResourceError naming the directory, its free space and the option that moves or shrinks the work.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bitdeploy.core.errors import BitdeployError, ResourceError
from bitdeploy.core.fsutil import human_bytes

_KINDS = {
    errno.ENOSPC: "space",
    errno.EDQUOT: "space",
    errno.EROFS: "read-only",
    errno.EACCES: "denied",
    errno.EPERM: "denied",
    errno.EIO: "io",
    errno.ENOMEM: "memory",
}
# How native libraries word an allocation failure (torch's CPU allocator, C++ std::bad_alloc, CUDA, ONNX Runtime).
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "bad_alloc", "bad allocation")

# The option that shrinks each stage's memory (stage names of `bitdeploy.core.cache`; "evaluate" is a row's gate run).
_SHRINK = {
    "finetune": "--batch-size (or --batch-split, same results)",
    "export": "--resolution",
    "reference": "--eval-limit",
    "calibration": "--calib-size",
    "evaluate": "--eval-limit",
}


def shrink_option(stage: str) -> str:
    if stage.startswith("convert-trt-"):
        return "--workspace"
    if stage.startswith("convert-") and stage.endswith("-int8"):
        return "--calib-size"
    return _SHRINK.get(stage, "--resolution, or run on a machine with more memory")


def kind_of(exc: BaseException) -> str | None:
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, OSError) and exc.errno in _KINDS:
        return _KINDS[exc.errno]
    if not isinstance(exc, (BitdeployError, OSError)) and any(t in str(exc).lower() for t in _OOM_TEXT):
        return "memory"
    return None


def find_fault(exc: BaseException) -> tuple[str, BaseException] | None:
    """(kind, the exception) of the first resource fault in `exc`'s chain, or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        kind = kind_of(current)
        if kind is not None:
            return kind, current
        current = current.__cause__ or current.__context__
    return None


def free_space(path: Path) -> str:
    """Free space on the file system holding `path` (its nearest existing ancestor), e.g. '12.0 MB'."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return human_bytes(shutil.disk_usage(probe).free)
    except OSError:
        return "unknown"


def resource_error(
    exc: BaseException, where: Path | None, move: str, what: str, stage: str = ""
) -> ResourceError | None:
    """The ResourceError for `exc`, or None when it is not a resource fault.

    `where`: the directory the step writes; `move`: the fix that puts it elsewhere (e.g. 'pass --out DIR');
    `what`: the work, for the message; `stage`: picks the option that shrinks memory."""
    if isinstance(exc, ResourceError):
        return exc
    found = find_fault(exc)
    if found is None:
        return None
    kind, fault = found
    if kind == "memory":
        if isinstance(exc, BitdeployError) and "out of memory" in str(exc):
            return None  # already explained where it happened (e.g. the trainer's --batch-split hint)
        if not stage:
            return ResourceError("out of memory; lower --batch-size, --calib-size or --eval-limit", kind)
        return ResourceError(f"out of memory in the {what}; lower {shrink_option(stage)}", kind)
    # A copy or rename names (source, destination): the destination is where the write failed.
    named = getattr(fault, "filename2", None) or getattr(fault, "filename", None)
    path = Path(os.fsdecode(named)) if named else where
    if where is not None and path is not None and path.absolute().is_relative_to(where.absolute()):
        path = where  # the directory the user chose, not a temporary file inside it
    if path is None:  # a fault no command anticipated, without a file name: say what it was
        reason = getattr(fault, "strerror", None) or type(fault).__name__
        return ResourceError(f"{reason} while writing the {what}; {move}", kind)
    if kind == "space":
        directory = path if path == where or path.is_dir() else path.parent
        message = f"no space left on the disk of {directory} ({free_space(directory)} free) while writing the {what}; free space there or {move} on a disk with room"
    elif kind == "read-only":
        message = f"{path} is on a read-only file system ({what}); {move} on a writable disk"
    elif kind == "denied":
        message = f"permission denied writing {path} ({what}); {move} you can write to, or fix its permissions"
    else:
        message = f"I/O error at {path} while writing the {what} (the disk or file system failed); check the disk, or {move} elsewhere"
    return ResourceError(message, kind)


@contextmanager
def guarded(where: Path | None, move: str, what: str, stage: str = "") -> Iterator[None]:
    """Turn a resource fault raised inside into a one-line ResourceError (see `resource_error`)."""
    try:
        yield
    except Exception as exc:
        error = resource_error(exc, where, move, what, stage)
        if error is None or error is exc:
            raise
        raise error from exc
