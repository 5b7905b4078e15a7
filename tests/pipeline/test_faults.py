"""Faults injected at every stage that writes: a full disk (a real tmpfs, or ENOSPC/EIO raised where the stage writes),
memory (MemoryError, an allocator's error, a real address-space limit), SIGINT/SIGTERM, and kill -9 at seeded random
points. After each: one error line and the exit code, nothing half-written, the stage cache consistent, and a rerun
whose bundles are bit-identical to a clean build's."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.pipeline.faults import (
    BUILD,
    Run,
    build_args,
    cache_problems,
    cli,
    digests,
    fill,
    full_disk,
    half_written,
    subprocess_cmd,
)

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


def _no_space(path: object = None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([str(path)] if path is not None else []))


def _io_error() -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO))


def _error_line(run: Run) -> str:
    """The run's one error line: the last line, the only `error:` line, and no traceback anywhere."""
    errors = [line for line in run.lines if line.startswith("error:")]
    assert run.code == 1 and len(errors) == 1 and run.lines[-1] == errors[0], run.err
    assert "Traceback" not in run.err, run.err
    return errors[0]


def _consistent(out: Path, cache: Path) -> None:
    assert half_written(out.parent) == [] and half_written(cache) == []
    assert cache_problems(cache) == []


# (case, the patch that injects the fault, what the one line must say). In pipeline order: each build reuses the
# stages the previous one finished, runs the next, and fails there, so together they cost about one build.
Patch = Callable[[pytest.MonkeyPatch, Path, Path], None]


def _fail_torch_save(mp: pytest.MonkeyPatch, out: Path, cache: Path) -> None:
    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"half a checkpoint")
        raise _no_space()

    mp.setattr(torch, "save", save)


def _fail_onnx_export(mp: pytest.MonkeyPatch, out: Path, cache: Path) -> None:
    def export(model: Any, args: Any, f: Any, *more: Any, **kwargs: Any) -> None:
        Path(f).write_bytes(b"half a model")
        raise _no_space()

    mp.setattr(torch.onnx, "export", export)


def _fail_np_save(name: str, fault: Callable[[], BaseException]) -> Patch:
    real = np.save

    def install(mp: pytest.MonkeyPatch, out: Path, cache: Path) -> None:
        def save(file: Any, arr: Any, *args: Any, **kwargs: Any) -> None:
            if Path(file).name != name:
                return real(file, arr, *args, **kwargs)
            Path(file).write_bytes(b"\x93NUMPY half")
            raise fault()

        mp.setattr(np, "save", save)

    return install


def _raise_in(module: str, name: str, fault: Callable[[], BaseException]) -> Patch:
    def install(mp: pytest.MonkeyPatch, out: Path, cache: Path) -> None:
        def failing(*args: Any, **kwargs: Any) -> Any:
            raise fault()

        mp.setattr(f"{module}.{name}", failing)

    return install


def _fail_converter(precision: str) -> Patch:
    """The real converter runs, then its last write fails: what is half-written is the cache entry's temp dir."""

    def install(mp: pytest.MonkeyPatch, out: Path, cache: Path) -> None:
        from bitdeploy.converters.base import Converter

        real_convert = Converter.convert

        def convert(self: Converter, onnx: Path, work: Path, *args: Any, **kwargs: Any) -> Any:
            artifact = real_convert(self, onnx, work, *args, **kwargs)
            if self.precision == precision:
                raise _no_space(Path(work) / "model.onnx")
            return artifact

        mp.setattr(Converter, "convert", convert)

    return install


def _fail_bundle_copy(mp: pytest.MonkeyPatch, out: Path, cache: Path) -> None:
    from bitdeploy.builder import bundle
    from bitdeploy.core import fsutil

    def copy(src: Path, dst: Path, names: list[str]) -> None:
        fsutil.copy_files(src, dst, names[:1])
        raise _no_space()

    mp.setattr(bundle, "copy_files", copy)


def _fail_report(mp: pytest.MonkeyPatch, out: Path, cache: Path) -> None:
    from bitdeploy.benchmarks import report_render
    from bitdeploy.builder import timing

    real = report_render.atomic_write

    def write(path: Path, text: str) -> None:
        if path.name == "report.html":
            raise _no_space()
        real(path, text)

    mp.setattr(report_render, "atomic_write", write)
    mp.setattr(timing, "baseline_latency", lambda *args: None)  # the PyTorch baselines only time; not what is tested


def _oom_evaluating(mp: pytest.MonkeyPatch, out: Path, cache: Path) -> None:
    _raise_in("bitdeploy.converters.gate", "run_logits", lambda: RuntimeError("[ONNXRuntimeError] : bad allocation"))(
        mp, out, cache
    )


CASES: list[tuple[str, Patch, list[str], list[str]]] = [
    # (case, patch, what the line says, extra build flags)
    (
        "fine-tune checkpoint, no space",
        _fail_torch_save,
        ["no space left on the disk of {cache}", "fine-tune of tiny on digits", "pass --cache-dir DIR"],
        [],
    ),
    (
        "export, no space",
        _fail_onnx_export,
        ["no space left on the disk of {cache}", "ONNX export at 32 px", "pass --cache-dir DIR"],
        [],
    ),
    (
        "reference logits, out of memory",
        _raise_in("bitdeploy.converters.gate", "torch_logits", MemoryError),
        ["out of memory in the FP32 PyTorch reference logits; lower --eval-limit"],
        [],
    ),
    (
        "reference logits, I/O error",
        _fail_np_save("logits.npy", _io_error),
        ["I/O error at {cache}", "FP32 PyTorch reference logits"],
        [],
    ),
    (
        "calibration, allocator error",
        _raise_in(
            "bitdeploy.converters.calibration",
            "from_image_set",
            lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 25165824 bytes"),
        ),
        ["out of memory in the calibration data (16 images); lower --calib-size"],
        [],
    ),
    (
        "calibration, no space",
        _fail_np_save("calibration.npy", _no_space),
        ["no space left on the disk of {cache}", "calibration data"],
        [],
    ),
    (
        "fp32 converter, no space",
        _fail_converter("fp32"),
        ["no space left on the disk of {cache}", "ONNX Runtime fp32 conversion", "pass --cache-dir DIR"],
        [],
    ),
    (
        "int8 converter, no space",
        _fail_converter("int8"),
        ["no space left on the disk of {cache}", "ONNX Runtime int8 conversion"],
        [],
    ),
    (
        "evaluation, out of memory",
        _oom_evaluating,
        ["onnx-fp32: out of memory in the onnx-fp32 evaluation; lower --eval-limit (1 more failed"],
        [],
    ),
    (
        "bundle, no space",
        _fail_bundle_copy,
        ["no space left on the disk of {out}", "onnx-fp32 bundle", "pass --out DIR"],
        [],
    ),
    ("report, no space", _fail_report, ["no space left on the disk of {out}", "build report", "pass --out DIR"], []),
]


def test_a_fault_at_each_stage_that_writes(
    clean_build: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    for case, patch, needles, flags in CASES:
        args = build_args(out, cache, *flags)
        if case.startswith("report"):
            args.remove("--no-report")
        with monkeypatch.context() as mp:
            patch(mp, out, cache)
            run = cli(args, capsys)
        line = _error_line(run)
        for needle in needles:
            assert needle.format(cache=cache, out=out) in line, (case, line)
        assert "--opset" not in line, line  # the old wrong fix for a full disk during export
        _consistent(out, cache)
        if case.startswith("bundle"):  # the bundle an earlier build wrote is still whole
            assert (out / "onnx-fp32" / "manifest.json").is_file()
        if case.startswith("evaluation"):
            assert "finished in" in run.out and "2 of 2 bundles failed" in run.out and "done in" not in run.out
        if case.startswith("report"):
            assert not (out / "report").exists() and digests(out) == digests(clean_build[0])
    final = cli(build_args(out, cache), capsys)
    assert final.code == 0, final.err
    assert digests(out) == digests(clean_build[0])
    _consistent(out, cache)


@pytest.fixture
def clean_copy(clean_build: tuple[Path, Path], tmp_path: Path) -> Path:
    """A copy of the clean build's stage cache (every step a hit)."""
    shutil.copytree(clean_build[1], tmp_path / "cache")
    return tmp_path / "cache"


def test_a_full_disk_under_out(
    clean_build: tuple[Path, Path], clean_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Acceptance: --out on a full file system: exit 1, one line naming the directory and the fix, nothing written."""
    with full_disk(tmp_path, 1024) as disk:
        run = cli(build_args(disk / "out", clean_copy), capsys)
        line = _error_line(run)
        assert f"no space left on the disk of {disk / 'out'} (" in line and "pass --out DIR on a disk with room" in line
        assert [p for p in disk.rglob("*") if p.is_file()] == [] and half_written(disk) == []
    assert cache_problems(clean_copy) == []
    again = cli(build_args(tmp_path / "elsewhere", clean_copy), capsys)
    assert again.code == 0 and digests(tmp_path / "elsewhere") == digests(clean_build[0])


def test_a_full_disk_under_the_cache(
    clean_build: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Acceptance: --cache-dir on a full file system: the same, and the next build on a roomy disk succeeds."""
    with full_disk(tmp_path, 2048) as disk:
        run = cli(build_args(tmp_path / "out", disk / "cache"), capsys)
        line = _error_line(run)
        assert f"no space left on the disk of {disk / 'cache'} (" in line and "pass --cache-dir DIR" in line
        assert half_written(disk) == [] and cache_problems(disk / "cache") == []
        assert not (tmp_path / "out").exists()


def test_a_full_disk_under_export_pack_repository_and_verify_record(
    clean_build: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = clean_build[0] / "onnx-int8"
    with full_disk(tmp_path, 512) as disk:
        fill(disk)
        commands = {
            "ONNX export": (
                ["export", "--model", "tiny", "--weights", "none", "--resolution", "32", "--out", str(disk / "m.onnx")],
                "pass --out FILE",
            ),
            "pack": (["pack", str(bundle), str(disk / "m.bitpack")], "write OUT"),
            "model repository": (
                ["export-repo", str(bundle), "--format", "triton", "--out", str(disk / "repo")],
                "pass --out DIR",
            ),
            "verify record": (["verify", str(bundle), "--record", str(disk / "log.json")], "pass --record FILE"),
        }
        for what, (args, fix) in commands.items():
            line = _error_line(cli(args, capsys))
            assert line.startswith(f"error: no space left on the disk of {disk} ("), (what, line)
            assert f"while writing the {what}; free space there or {fix} on a disk with room" in line, line
            assert sorted(p.name for p in disk.iterdir()) == ["filler"], what


def test_read_only_output_names_the_path(clean_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with full_disk(tmp_path, 1024) as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        line = _error_line(cli(build_args(disk / "out", clean_copy), capsys))
    assert line.startswith(f"error: {disk} is on a read-only file system") or "read-only" in line, line
    assert "pass --out DIR on a writable disk" in line, line


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    ("sig", "after", "code", "last"),
    [
        (signal.SIGINT, "cached: fine-tune", 130, "Aborted."),
        (signal.SIGTERM, "[onnx-int8] converting", 143, "Terminated."),
    ],
)
def test_sigint_and_sigterm_clean_up(
    clean_build: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    sig: int,
    after: str,
    code: int,
    last: str,
) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    # A shell's background job starts with SIGINT ignored, and the child would inherit that: Ctrl-C's disposition
    # is reset here so the test does not depend on how the suite was started.
    proc = subprocess.Popen(
        subprocess_cmd(build_args(out, cache)), stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint
    )
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line.rstrip())
        if line.startswith(after):
            proc.send_signal(sig)
            break
    rest = proc.stderr.read().splitlines()
    assert proc.wait(60) == code, seen + rest
    assert [line for line in rest if line.strip()][-1] == last and not any("Traceback" in line for line in rest)
    _consistent(out, cache)
    rerun = cli(build_args(out, cache), capsys)
    assert rerun.code == 0 and digests(out) == digests(clean_build[0])


def test_kill_9_at_seeded_random_points_then_rerun(
    clean_build: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The chaos test: six builds killed with SIGKILL at seeded random points (a progress line, then up to a second),
    then a rerun: exit 0, bundles bit-identical to a never-interrupted build, the cache consistent."""
    rng = random.Random(22)
    points = [  # progress lines in build order; a cached step skips its line, so a kill waits for this one or a later one
        "fine-tuning tiny",
        "cached: fine-tune",
        "ONNX export:",
        "[onnx-fp32] converting",
        "[onnx-fp32] evaluating",
        "[onnx-int8] converting",
        "[onnx-int8] evaluating",
    ]
    out, cache = tmp_path / "out", tmp_path / "cache"
    killed = 0
    for _ in range(6):
        after, delay = rng.randrange(len(points)), rng.uniform(0.0, 0.5)
        proc = subprocess.Popen(
            subprocess_cmd(build_args(out, cache)), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        assert proc.stderr is not None
        for line in proc.stderr:
            if any(line.startswith(point) for point in points[after:]):
                break
        time.sleep(delay)
        proc.kill()
        killed += proc.wait(60) == -signal.SIGKILL
        proc.stderr.close()
    assert killed >= 3, "the builds finished before they could be killed"
    run = cli(build_args(out, cache), capsys)
    assert run.code == 0, run.err
    assert digests(out) == digests(clean_build[0])
    assert cache_problems(cache) == [] and half_written(out) == []
    assert cli(["cache", "prune", "--cache-dir", str(cache)], capsys).code == 0
    assert half_written(cache) == [] and not list(cache.glob("*/.*.partial"))


AS_LIMIT = """
import resource, sys
from bitdeploy.cli import main
out, args = sys.argv[1], sys.argv[2:]
try:
    main([*args, "--out", out + "-warm"])  # every library imported and every code path run, unlimited
except SystemExit as exc:
    assert not exc.code, "the warm build failed"
with open("/proc/self/status") as f:
    size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
limit = size + (256 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
main([*args, "--out", out, "--resolution", "1024"])
"""


def test_an_address_space_limit_names_the_batch_and_its_options(tmp_path: Path) -> None:
    """A real allocation failure: the build runs once unlimited (imports, lazy code paths), then under RLIMIT_AS of its
    size + 256 MB at 1024 px, where the fine-tune's first batch (200 MB as float) cannot be allocated. The one
    allocation that fails is large, so the slack left lets every thread raise its MemoryError normally (with a
    margin of a few MB, CPython can abort while normalizing one: "Cannot recover from MemoryErrors")."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [*BUILD[: BUILD.index("fp32,int8")], "fp32", *BUILD[BUILD.index("fp32,int8") + 1 :]]
    done = subprocess.run(
        [sys.executable, "-c", AS_LIMIT, str(out), *args, "--cache-dir", str(cache), "--no-report"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr[-2000:]
    assert lines[-1] == (
        "error: out of memory on cpu with micro-batches of 16 images at 1024px; raise --batch-split "
        "(e.g. --batch-split 2, same results) or lower --batch-size"
    ), lines[-3:]
    assert half_written(tmp_path) == [] and cache_problems(cache) == []
