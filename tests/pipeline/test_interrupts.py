"""A Ctrl-C is never lost: not when a finalizer swallows it, not between build steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from bitdeploy.core import interrupts


class _SignalsInFinalizer:
    """Engines' sessions free themselves in finalizers; a SIGINT that lands there is printed and dropped."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def ctrl_c_enabled() -> Iterator[None]:
    """SIGINT as an interactive shell gives it: a suite started in the background inherits it ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the drop is the point
def test_a_ctrl_c_a_finalizer_swallowed_is_raised_at_the_next_check(ctrl_c_enabled: None) -> None:
    with interrupts.handled():
        _SignalsInFinalizer()  # Python prints "Exception ignored in ... KeyboardInterrupt" and goes on
        assert interrupts.pending() is KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
        interrupts.clear()
        interrupts.check()  # handled: nothing left to raise


def test_the_handlers_are_put_back_after_the_command() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with interrupts.handled():
        assert signal.getsignal(signal.SIGTERM) is not before[1]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


_SWALLOWING_COMMAND = textwrap.dedent(
    """
    import os, signal, sys, click
    from bitdeploy import cli

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)

    @click.command()
    def swallow():
        Finalized()
        print("ran to the end")

    sys.modules["swallowing"] = sys.modules[__name__]
    cli.COMMANDS["swallow"] = "swallowing:swallow"
    cli.main(["swallow"])
    """
)


def _run_child(code: str, sigint: signal.Handlers) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
    )


def test_the_entry_point_exits_130_when_the_command_ran_on_past_a_swallowed_ctrl_c() -> None:
    proc = _run_child(_SWALLOWING_COMMAND, signal.SIG_DFL)
    assert proc.returncode == 130, (proc.stdout, proc.stderr)
    assert proc.stderr.strip().splitlines()[-1] == "Aborted.", proc.stderr


def test_a_ctrl_c_ignored_at_start_stays_ignored() -> None:
    """A background job of a non-interactive shell starts with SIGINT ignored, as the shell meant."""
    proc = _run_child(_SWALLOWING_COMMAND, signal.SIG_IGN)
    assert proc.returncode == 0 and "ran to the end" in proc.stdout, (proc.stdout, proc.stderr)


@pytest.fixture
def interrupt_after_temp_mkdir(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C landing right after the mkdir of a write's temporary directory, before its name reaches a `try`."""
    real = os.mkdir

    def mkdir(path: os.PathLike[str] | str, *args: object, **kwargs: object) -> None:
        real(path, *args, **kwargs)  # type: ignore[arg-type]
        if ".tmp-" in os.path.basename(path):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "mkdir", mkdir)


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if ".tmp" in p.name)


def test_an_interrupt_right_after_a_cache_entrys_mkdir_leaves_nothing(
    tmp_path: Path, interrupt_after_temp_mkdir: None
) -> None:
    from bitdeploy.core.cache import StageCache

    cache = StageCache(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cache.run("convert-x", "ab" * 32, lambda work: {})
    assert _leftovers(tmp_path) == [] and not (tmp_path / "convert-x" / ("ab" * 32)).exists()


def test_an_interrupt_right_after_a_bundles_mkdir_leaves_nothing(
    tmp_path: Path, interrupt_after_temp_mkdir: None
) -> None:
    from bitdeploy.runtimes.bundle import bundle_writer

    with pytest.raises(KeyboardInterrupt), bundle_writer(tmp_path / "bundle"):
        pass
    assert _leftovers(tmp_path) == []


def test_an_interrupt_right_after_an_atomic_files_creation_leaves_nothing(tmp_path: Path) -> None:
    from bitdeploy.core.fsutil import atomic_write

    class Interrupting(str):
        def encode(self, *args: object, **kwargs: object) -> bytes:  # runs once the temporary file exists
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "report.html", Interrupting("<html>"))
    assert list(tmp_path.iterdir()) == []


def test_a_ctrl_c_inside_a_deferred_block_is_raised_when_it_ends(ctrl_c_enabled: None) -> None:
    with interrupts.handled():
        with pytest.raises(KeyboardInterrupt), interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler has run by now, and only remembered it
                pass
            finished = True
        assert finished
        with interrupts.deferred():  # the interrupt is still pending, but it landed before this block
            pass
        interrupts.clear()
