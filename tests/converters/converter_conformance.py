"""The conformance test template every converter runs (as NNCF tests its backends), beside the runtime's
(tests/runtimes/backend_conformance.py).

`ConverterConformance` holds the tests; pytest collects them only through a subclass named `Test...` that names
the registered target it covers (see tests/converters/test_converter_contract.py):

    class TestMyConverter(ConverterConformance):
        covers = "mytarget"

The default `case` converts the untrained tiny BiT's FP32 export (`tiny_digits.tiny_export`, 32 px) with the
record's converter, and skips, with the record's own reason, where the target cannot be built here. What is
checked is the contract of `bitdeploy.converters.base.Converter`: the converter writes only inside its work dir
(nothing beside its input, in the working directory or left in the temporary directory); INT8 without calibration
is refused in one line before anything is written; the artifact names its record's backend and only files it
wrote; the FP32 output loads in the record's runtime and gives finite logits; and the stage cache key of a
conversion is stable (the same inputs give the same key, in this process and in another one) while the
precision and every option with choices change it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from bitdeploy.converters.base import Artifact, ConvertOptions, TargetOptions, bind, options_class
from bitdeploy.core import targets
from bitdeploy.core.errors import BitdeployError

if TYPE_CHECKING:
    from bitdeploy.converters.calibration import CalibrationData

REPO = Path(__file__).resolve().parents[2]
BATCH = 3
# What libraries the converters call keep in the temporary directory for every process of the user, not the
# converter's to clean up: PyTorch's compile cache (torch.export, under LiteRT's conversion).
SHARED_TOOL_CACHES = ("torchinductor_",)


@dataclass
class ConverterCase:
    """One converter under test: its record, the FP32 export it converts, and a batch its output is run on."""

    target: targets.Target
    onnx: Path
    x: np.ndarray
    options: ConvertOptions = field(default_factory=lambda: ConvertOptions(threads=1, cache=False))


@dataclass
class Converted:
    """What one watched conversion left: its work dir, the artifact, and every change outside the work dir."""

    work: Path
    artifact: Artifact
    outside: list[str]


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """{path under root: (size, mtime_ns)} of every file and directory, except what is under `skip`."""
    out = {}
    for path in root.rglob("*"):
        if path == skip or skip in path.parents:
            continue
        st = path.lstat()
        out[path.relative_to(root).as_posix()] = (-1 if path.is_dir() else st.st_size, st.st_mtime_ns)
    return out


def changes(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """What differs between two snapshots: '+path' (new), '-path' (gone), '~path' (rewritten)."""
    added = [f"+{p}" for p in after if p not in before]
    removed = [f"-{p}" for p in before if p not in after]
    changed = [f"~{p}" for p in after if p in before and after[p] != before[p] and after[p][0] != -1]
    return sorted(added + removed + changed)


def watched_convert(
    case: ConverterCase, sandbox: Path, precision: str, calibration: CalibrationData | None = None
) -> Converted:
    """Run the record's converter on a copy of the export in `sandbox`, with the working directory and the
    temporary directory inside it, and record every change outside the work dir under the sandbox's parent (the
    temporary root: a converter may not write beside the directory it is given either)."""
    inputs, work, cwd, tmp = (sandbox / name for name in ("input", "work", "cwd", "tmp"))
    for d in (inputs, work, cwd, tmp):
        d.mkdir(parents=True)
    onnx = inputs / case.onnx.name
    shutil.copyfile(case.onnx, onnx)
    converter = bind(case.target, precision, case.options)
    before = snapshot(sandbox.parent, work)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setenv("TMPDIR", str(tmp))
        mp.setattr(tempfile, "tempdir", str(tmp))
        artifact = converter.convert(onnx, work, calibration)
    outside = changes(before, snapshot(sandbox.parent, work))
    shared = tuple(f"+{(tmp / name).relative_to(sandbox.parent).as_posix()}" for name in SHARED_TOOL_CACHES)
    return Converted(work, artifact, [c for c in outside if not c.startswith(shared)])


def stage_key(target: targets.Target, onnx: Path, precision: str, extras: TargetOptions | None) -> str:
    """The key the build gives this conversion in the stage cache (bitdeploy.builder.convert.convert)."""
    from bitdeploy.builder.convert import cache_settings
    from bitdeploy.core.cache import file_sha256
    from bitdeploy.core.cache import stage_key as key

    options = ConvertOptions(extras=extras)
    inputs = {"onnx": file_sha256(onnx), "calibration": "none"}
    settings = {"converter": target.converter, **cache_settings(options), "float_layers": []}
    return key(f"convert-{target.name}-{precision}", inputs, settings)


_KEY_IN_ANOTHER_PROCESS = """
import json, sys
from pathlib import Path
from bitdeploy.converters.base import options_class
from bitdeploy.core import targets
from tests.converters.converter_conformance import stage_key
target = targets.get_target(sys.argv[1])
cls = options_class(target)
print(json.dumps(stage_key(target, Path(sys.argv[2]), "fp32", cls() if cls else None)))
"""


class ConverterConformance:
    """The tests; a subclass names the registered target it covers (every registered target needs one:
    tests/pipeline/test_registry.py checks) and may override `case`."""

    covers: str | None = None  # the registered target (its record's `name`) this subclass tests

    @pytest.fixture(scope="class")
    def case(self) -> ConverterCase:
        assert self.covers, "name the target: covers = '<record name>'"
        target = targets.get_target(self.covers)
        reason = targets.unavailable_reason(target, "fp32")
        if reason is not None:
            pytest.skip(reason)
        pytest.importorskip("torch", reason="the tiny export needs PyTorch")
        from tests.converters.tiny_digits import RESOLUTION, tiny_export

        x = np.random.default_rng(0).uniform(-1, 1, (BATCH, 3, RESOLUTION, RESOLUTION)).astype(np.float32)
        return ConverterCase(target, tiny_export(), x)

    @pytest.fixture(scope="class")
    def fp32(self, case: ConverterCase, tmp_path_factory: pytest.TempPathFactory) -> Converted:
        return watched_convert(case, tmp_path_factory.mktemp(f"{case.target.name}-fp32"), "fp32")

    # -- where it writes --------------------------------------------------------------------------------------
    def test_writes_only_inside_its_work_dir(self, fp32: Converted) -> None:
        assert fp32.outside == [], fp32.outside

    def test_the_artifact_lists_what_it_wrote(self, fp32: Converted, case: ConverterCase) -> None:
        a = fp32.artifact
        assert a.backend == case.target.backend and a.target.precision == "fp32"
        assert a.model_file in a.files and Path(a.model_file).suffix in case.target.formats
        assert all((fp32.work / f).is_file() for f in a.files)
        written = {p.relative_to(fp32.work).as_posix() for p in fp32.work.rglob("*") if p.is_file()}
        assert set(a.files) <= written

    # -- what it refuses --------------------------------------------------------------------------------------
    def test_int8_without_calibration_is_one_line_and_writes_nothing(self, case: ConverterCase, tmp_path: Path) -> None:
        if "int8" not in case.target.precisions:
            pytest.skip(f"{case.target.title} has no int8 route")
        work = tmp_path / "work"
        work.mkdir()
        with pytest.raises(BitdeployError) as err:
            bind(case.target, "int8", case.options).convert(case.onnx, work, None)
        msg = str(err.value)
        assert msg and "\n" not in msg, msg
        assert "calibration" in msg
        assert list(work.iterdir()) == []

    # -- what it made -----------------------------------------------------------------------------------------
    def test_fp32_output_runs_in_its_runtime_with_finite_logits(self, fp32: Converted, case: ConverterCase) -> None:
        from bitdeploy.runtimes.bundle.manifest import Manifest
        from bitdeploy.runtimes.engines.base import backend_available, open_backend

        if not backend_available(case.target.backend):
            pytest.skip(
                f'the {case.target.title} runtime is not installed: pip install "bitdeploy[{case.target.runtime_extra}]"'
            )
        manifest = Manifest(target=fp32.artifact.target)
        with open_backend(case.target.backend, fp32.work / fp32.artifact.model_file, manifest, threads=1) as backend:
            out = backend.infer(case.x)
        assert out.shape == (BATCH, 10) and out.dtype == np.float32
        assert np.isfinite(out).all()

    # -- its stage cache key ----------------------------------------------------------------------------------
    def test_the_cache_key_is_stable(self, case: ConverterCase) -> None:
        cls = options_class(case.target)
        first = stage_key(case.target, case.onnx, "fp32", cls() if cls else None)
        assert stage_key(case.target, case.onnx, "fp32", cls() if cls else None) == first
        env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a set or an address in the key would show here
        proc = subprocess.run(
            [sys.executable, "-c", _KEY_IN_ANOTHER_PROCESS, case.target.name, str(case.onnx)],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == first

    def test_the_precision_and_each_choice_change_the_key(self, case: ConverterCase) -> None:
        cls = options_class(case.target)
        default = cls() if cls else None
        first = stage_key(case.target, case.onnx, "fp32", default)
        keys = {first, *(stage_key(case.target, case.onnx, p, default) for p in case.target.precisions)}
        assert len(keys) == len(case.target.precisions)
        if cls is None:
            return
        for f in fields(cls):
            flag = f.metadata.get("flag")
            if flag is None or not flag.choices:
                continue
            other = next(c for c in flag.choices if c != getattr(default, f.name))
            assert stage_key(case.target, case.onnx, "fp32", replace(default, **{f.name: other})) != first, f.name
