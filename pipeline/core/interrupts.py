"""Ctrl-C and SIGTERM that are never lost.

Python raises KeyboardInterrupt wherever the main thread happens to be when the signal lands. Raised inside a
finalizer (a `__del__`, a weakref callback the garbage collector runs, as engines' sessions have), it is printed
as "Exception ignored" and dropped, and the command would run on to the end and exit 0. The handlers here also
remember the signal: `check()` at each build step raises it again, and the entry point exits 130/143 even if
the command returned normally.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every `finally` removes its temporary files before the exit."""


_pending: type[KeyboardInterrupt] | None = None
_deferring = 0
_received = 0  # signals seen: `deferred()` raises only one that landed inside its block


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _pending, _received
    _pending = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    _received += 1
    if not _deferring:
        raise _pending()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block (and `handled()`) a SIGINT or SIGTERM is remembered and raised when the block ends: for the
    renames that must not be split, such as moving an old bundle aside and the new one into its place."""
    global _deferring
    before = _received
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _received != before and _pending is not None:
        raise _pending()  # not an older one: the cleanup of an interrupted build may still replace a directory


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise (and are remembered). A SIGINT this process was started ignoring
    (a background job of a non-interactive shell) stays ignored, as the shell meant."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [signal.SIGTERM] + ([] if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else [signal.SIGINT])
    previous = {sig: signal.signal(sig, _on_signal) for sig in wanted}
    _pending = None
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def pending() -> type[KeyboardInterrupt] | None:
    """The interrupt received since `handled()` began and not yet handled by the entry point, if any."""
    return _pending


def clear() -> None:
    global _pending
    _pending = None


def check() -> None:
    """Raise the interrupt again if one was received: a step that starts after a Ctrl-C was swallowed stops here."""
    if _pending is not None:
        raise _pending()
