"""Resource faults as one line: which fault, which directory, which option (`bitdeploy.core.resources`), and the build's
last line."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from bitdeploy.core.errors import BitdeployError, ConversionError, ResourceError
from bitdeploy.core.resources import guarded, resource_error, shrink_option


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as caught:
        return caught


def test_a_wrapped_full_disk_names_the_directory_not_the_wrapper_fix(tmp_path: Path) -> None:
    exc = _chained(
        ConversionError("torch.onnx.export failed at opset 17 ([Errno 28] No space left on device); try --opset 17"),
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    )
    error = resource_error(exc, tmp_path, "pass --cache-dir DIR", "ONNX export at 32 px", "export")
    assert error is not None and error.kind == "space"
    assert str(error).startswith(f"no space left on the disk of {tmp_path} (") and "--opset" not in str(error)
    assert str(error).endswith(
        "while writing the ONNX export at 32 px; free space there or pass --cache-dir DIR on a disk with room"
    )


def test_a_copy_names_its_destination_and_a_file_inside_the_chosen_directory_names_the_directory(
    tmp_path: Path,
) -> None:
    fault = OSError(
        errno.ENOSPC,
        "No space left on device",
        "/elsewhere/cache/model.onnx",
        None,
        str(tmp_path / "out" / ".x.tmp-1" / "m"),
    )
    error = resource_error(fault, tmp_path / "out", "pass --out DIR", "onnx-fp32 bundle")
    assert error is not None and f"disk of {tmp_path / 'out'} (" in str(error)
    outside = resource_error(OSError(errno.EROFS, "Read-only file system", "/ro/x"), tmp_path, "pass --out DIR", "pack")
    assert str(outside) == "/ro/x is on a read-only file system (pack); pass --out DIR on a writable disk"
    denied = resource_error(OSError(errno.EACCES, "Permission denied"), tmp_path, "pass --out DIR", "pack")
    assert (
        str(denied)
        == f"permission denied writing {tmp_path} (pack); pass --out DIR you can write to, or fix its permissions"
    )


@pytest.mark.parametrize(
    ("stage", "option"),
    [
        ("finetune", "--batch-size"),
        ("reference", "--eval-limit"),
        ("evaluate", "--eval-limit"),
        ("calibration", "--calib-size"),
        ("convert-onnx-int8", "--calib-size"),
        ("convert-trt-fp16", "--workspace"),
        ("export", "--resolution"),
    ],
)
def test_out_of_memory_names_the_option_that_shrinks_the_stage(stage: str, option: str) -> None:
    assert shrink_option(stage).startswith(option)
    for exc in (
        MemoryError(),
        RuntimeError("DefaultCPUAllocator: can't allocate memory"),
        RuntimeError("std::bad_alloc"),
    ):
        error = resource_error(exc, None, "", "step", stage)
        assert (
            error is not None
            and error.kind == "memory"
            and str(error) == f"out of memory in the step; lower {shrink_option(stage)}"
        )


def test_what_is_not_a_resource_fault_passes_through(tmp_path: Path) -> None:
    assert resource_error(ValueError("bad graph"), tmp_path, "", "x") is None
    assert resource_error(OSError(errno.ENOENT, "No such file"), tmp_path, "", "x") is None
    hinted = BitdeployError("out of memory on cpu with micro-batches of 64 images; raise --batch-split")
    assert resource_error(_chained(hinted, MemoryError()), tmp_path, "", "x", "finetune") is None  # already explained
    with pytest.raises(ResourceError, match="I/O error at"), guarded(tmp_path, "pass --out DIR", "report"):
        raise OSError(errno.EIO, "Input/output error")
    with pytest.raises(KeyError), guarded(tmp_path, "pass --out DIR", "report"):
        raise KeyError("not a fault")


def test_the_last_line_says_done_only_when_every_bundle_that_ran_is_valid() -> None:
    from bitdeploy.builder.finish import status_line
    from tests.rows import row

    rows = [row("onnx-fp32"), row("trt-int8", "skipped: no GPU")]
    assert status_line(rows, 3.14, ["export"]) == "done in 3.1 s (cache hits: export)"
    rows += [row("onnx-int8", "failed gate"), row("openvino-fp16", "failed: boom")]
    assert (
        status_line(rows, 3.14, [])
        == "finished in 3.1 s: 2 of 3 bundles failed: onnx-int8 (failed gate), openvino-fp16 (error)"
    )
