"""One record per target: every record resolves, every CLI choice comes from the records, every registered backend
and converter has a conformance test, and a new target registered with one record is usable end to end without editing any other
module (the complete toy target, with a converter and build flags, is tests/pipeline/test_toy_target.py)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from bitdeploy.cli import cli
from bitdeploy.converters.base import Artifact, Converter
from bitdeploy.core import targets
from bitdeploy.runtimes.bundle import bundle_writer, write_manifest
from bitdeploy.runtimes.bundle.manifest import Manifest, ModelInfo, TargetInfo
from bitdeploy.runtimes.engines.base import Backend, backend_available, backend_class
from bitdeploy.runtimes.preprocess import input_spec
from tests.converters.converter_conformance import ConverterConformance
from tests.runtimes.backend_conformance import BackendConformance

TESTS = Path(__file__).resolve().parents[1]

RES = 16


class NumpyBackend(Backend):
    """A backend in a test file: logits = per-channel image means @ a weight matrix stored as model.npy."""

    name = "numpy-test"

    default_device = "cpu"

    def open(self) -> None:
        self.weights = np.load(self.model_path, allow_pickle=False)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return (batch.mean(axis=(2, 3)) @ self.weights).astype(np.float32)


def plugin_target(name: str, module: str, **fields: Any) -> targets.Target:
    """A test target's record: its build and runtime extras named after it, and one `module` that both need."""
    return targets.Target(name=name, extra=name, modules=(module,), runtime_extra=name, runtime_module=module, **fields)


@contextmanager
def registered_target(target: targets.Target) -> Iterator[targets.Target]:
    """`target` registered for the block, then the registry as it was (the same dict: modules hold it by name)."""
    before = dict(targets.TARGETS)
    try:
        yield targets.register(target)
    finally:
        targets.TARGETS.clear()
        targets.TARGETS.update(before)


DUMMY = plugin_target(
    "numpy-test",
    "numpy",
    title="NumPy (test)",
    backend="numpy-test",
    converter="tests.pipeline.test_registry:NoConverter",
    runtime="tests.pipeline.test_registry:NumpyBackend",
    formats=(".npy",),
)


@pytest.fixture
def registered() -> Iterator[targets.Target]:
    with registered_target(DUMMY) as target:  # the registration ends with the test
        yield target


def import_test_modules() -> None:
    """Import every test module under tests/ (what pytest collects), so each conformance subclass exists."""
    for path in sorted(TESTS.rglob("test_*.py")):
        try:
            importlib.import_module(".".join(path.relative_to(TESTS.parent).with_suffix("").parts))
        except (ImportError, pytest.skip.Exception):  # an SDK missing here: pytest skips that module too
            continue


def covered(template: type) -> set[str]:
    """What the collected (`Test...`) subclasses of a conformance template cover, at any depth."""
    import_test_modules()
    found, todo = set(), list(template.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__name__.startswith("Test") and cls.covers:
            found.add(cls.covers)
    return found


def backends_without_conformance() -> list[str]:
    """Registered backends that no `Test...` subclass of BackendConformance anywhere under tests/ covers."""
    found = covered(BackendConformance)
    return [b for b in targets.backend_names() if b not in found]


def targets_without_converter_conformance() -> list[str]:
    """Registered targets that no `Test...` subclass of ConverterConformance anywhere under tests/ covers."""
    found = covered(ConverterConformance)
    return [t for t in targets.target_names() if t not in found]


def test_every_registered_backend_has_a_conformance_test() -> None:
    assert backends_without_conformance() == []


def test_every_registered_target_has_a_converter_conformance_test() -> None:
    assert targets_without_converter_conformance() == []


def test_the_meta_test_finds_subclasses_by_import(registered: targets.Target) -> None:
    """A subclass anywhere is found through the class itself (no file text is read); a target without one is named."""
    assert targets_without_converter_conformance() == ["numpy-test"]
    assert backends_without_conformance() == ["numpy-test"]

    class TestNumpyTestConverter(ConverterConformance):  # defined here, so pytest never collects it
        covers = "numpy-test"

    class TestNumpyTestBackend(BackendConformance):
        covers = "numpy-test"

    assert targets_without_converter_conformance() == [] and backends_without_conformance() == []


def test_a_record_without_calibration_methods_and_every_cli_module_import_in_a_fresh_interpreter() -> None:
    """The default `calib_methods=()` once made importing `bitdeploy build` fail with IndexError."""
    code = """
import importlib
from click.testing import CliRunner
from bitdeploy.core import targets
from bitdeploy.cli import COMMANDS, cli
targets.register(targets.Target(name="bare", title="Bare", backend="bare", converter="bare:BareConverter",
    runtime="bare:Backend", formats=(".bare",), extra="bare", modules=("bare",), runtime_extra="bare",
    runtime_module="bare"))
for ref in COMMANDS.values():
    importlib.import_module(ref.partition(":")[0])
for command in COMMANDS:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, (command, result.output)
assert "bare (Bare)" in CliRunner().invoke(cli, ["build", "--help"]).output
print("ok")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=TESTS.parent, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def _choices(command: str, option: str) -> list[str]:
    from bitdeploy.cli import COMMANDS

    module, attr = COMMANDS[command].split(":")
    cmd = getattr(importlib.import_module(module), attr)
    (param,) = [p for p in cmd.params if p.name == option]
    return list(param.type.choices)


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_every_record_resolves(name: str) -> None:
    t = targets.TARGETS[name]
    assert t.formats and all(f.startswith(".") for f in t.formats)
    assert targets.for_backend(t.backend) is t
    module, _, attr = t.converter.partition(":")
    assert importlib.util.find_spec(module) is not None and attr
    runtime_module, _, runtime_cls = t.runtime.partition(":")
    assert importlib.util.find_spec(runtime_module) is not None and runtime_cls
    if backend_available(t.backend):  # the SDK is installed: the class imports and is a Backend
        assert issubclass(backend_class(t.backend), Backend)
    if not any(importlib.util.find_spec(m) is None for m in t.modules):
        assert issubclass(targets.load_converter(t), Converter)


def test_cli_choices_come_from_the_records() -> None:
    backends = [t.backend for t in targets.TARGETS.values()]
    assert _choices("predict", "backend") == backends
    assert _choices("bench", "backend") == backends
    assert _choices("serve", "backend") == backends
    assert _choices("build", "target") == [*targets.TARGETS, "all"]


def test_one_backend_per_record() -> None:
    with pytest.raises(ValueError, match="already belongs to target"):
        targets.register(targets.Target(**{**DUMMY.__dict__, "name": "other", "backend": "onnxruntime"}))


def test_registered_target_appears_in_every_choice(registered: targets.Target) -> None:
    assert "numpy-test" in _choices("predict", "backend") and "numpy-test" in _choices("build", "target")
    help_text = CliRunner().invoke(cli, ["predict", "--help"]).output
    assert "numpy-test" in help_text
    artifact = Artifact(files=["model.npy"], model_file="model.npy", target=TargetInfo(backend="numpy-test"))
    assert artifact.backend == "numpy-test"


def test_registered_backend_runs_a_bundle(registered: targets.Target, tmp_path: Path) -> None:
    """A bundle for the new backend: loaded, checked and run by predict through its record alone."""
    rng = np.random.default_rng(0)
    with bundle_writer(tmp_path / "b") as tmp:
        np.save(tmp / "model.npy", rng.standard_normal((3, 4)).astype(np.float32))
        manifest = Manifest(
            valid=True,
            model=ModelInfo(name="dummy", num_classes=4),
            target=TargetInfo(backend="numpy-test", device="cpu"),
            model_file="model.npy",
            input=input_spec(RES),
            labels=["a", "b", "c", "d"],
        )
        write_manifest(tmp, manifest, ["model.npy"])
    image = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(image)
    result = CliRunner().invoke(cli, ["predict", str(tmp_path / "b"), str(image), "--json", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert next(p["label"] for p in out[0]["predictions"]) in "abcd" and len(out[0]["predictions"]) == 2
    from bitdeploy.runtimes import load

    with load(tmp_path / "b") as pred, pytest.raises(Exception, match="expects a float32"):
        pred.backend.infer(np.zeros((1, 3, RES, RES), np.float64))  # the base's input contract holds for it too


def test_unregistered_backend_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["predict", str(tmp_path), "x.png", "--backend", "numpy-test"])
    assert result.exit_code == 2 and "not one of" in result.output
