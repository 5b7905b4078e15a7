"""One error family. The CLI prints a BitdeployError as one line and exits 1 (no traceback unless --debug)."""

from __future__ import annotations

from typing import Any


class BitdeployError(Exception):
    """A user-facing error: the message names the problem and the fix."""


class UsageError(BitdeployError):
    """Flags that cannot go together (the CLI exits 2, as for any usage error)."""


class MissingDependencyError(BitdeployError):
    """An optional package is not installed; the message says which extra brings it."""

    def __init__(self, what: str, extra: str, reason: str = "") -> None:
        hint = f'pip install "bitdeploy[{extra}]"'
        msg = f"{what} is not installed{': ' + reason if reason else ''}; install it with: {hint}"
        super().__init__(msg)
        self.extra = extra


class WeightsError(BitdeployError):
    """Weights are missing, unreadable, or do not match the model."""


class DatasetError(BitdeployError):
    """A dataset spec or its contents are unusable."""


class BundleError(BitdeployError):
    """A bundle or pack is missing, corrupt, tampered with, or of an unknown format."""


class ImageError(BitdeployError):
    """An input image cannot be decoded."""


class ConversionError(BitdeployError):
    """A conversion step failed or its result does not match the reference."""


class AccuracyGateError(BitdeployError):
    """A built artifact lost more accuracy than --max-accuracy-drop allows."""


class ResourceError(BitdeployError):
    """The machine ran out of something the command needs (disk space, write permission, memory); the message
    names the directory or stage and the option that fixes it (`bitdeploy.core.resources`)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind  # space | read-only | denied | io | memory


def require(module: str, extra: str, what: str | None = None) -> Any:
    """Import an optional module or raise MissingDependencyError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(what or module, extra, str(exc).splitlines()[0] if str(exc) else "") from exc


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first message line (at most `limit` characters), or its type name when it has no message:
    what a one-line error quotes of a library's multi-line error."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
