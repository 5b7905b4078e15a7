"""Keep stdout for bitdeploy's results: what a third-party library prints while it works goes to stderr."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def stdout_to_stderr(*loggers: str) -> Iterator[None]:
    """While the block runs, send writes to sys.stdout (e.g. NNCF's rich progress bars) to stderr, and retarget
    the stdout handlers of the named loggers (e.g. "nncf", whose handler holds stdout from import time)."""
    sys.stdout.flush()
    outs = {id(sys.stdout), id(sys.__stdout__)}
    moved = [
        h
        for name in loggers
        for h in logging.getLogger(name).handlers
        if isinstance(h, logging.StreamHandler) and id(h.stream) in outs
    ]
    old = [h.setStream(sys.stderr) for h in moved]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for h, stream in zip(moved, old):
            h.setStream(stream)
