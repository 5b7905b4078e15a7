"""A target is one plugin: a complete toy target (tests/toy_target/: converter, runtime, options with one flag),
registered only here with one record, builds, gates, bundles, verifies, serves and exports with no other file
touched. Nothing imports tests/toy_target at module level, so deleting any of its files fails only this module."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from bitdeploy.cli import cli
from bitdeploy.core import targets
from tests.clirun import one_error_line
from tests.clirun import run_cli as run
from tests.pipeline.test_registry import backends_without_conformance, plugin_target, registered_target
from tests.runtimes.backend_conformance import BackendConformance, Case

TOY = plugin_target(
    "toy",
    "onnxruntime",
    title="Toy",
    backend="toy-engine",
    converter="tests.toy_target.converter:ToyConverter",
    runtime="tests.toy_target.runtime:ToyBackend",
    formats=(".toy",),
    precisions=("fp32",),
    devices="cpu",
    options="tests.toy_target.options:ToyOptions",
    engines=("onnxruntime",),
    triton=targets.TritonEngine("backend", "python", "model.toy"),
)
RES = 16


@pytest.fixture(scope="module")
def toy() -> Iterator[targets.Target]:
    with registered_target(TOY) as target:  # the registration ends with this module
        yield target


def _cli(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def bundle(toy: targets.Target, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    out = root / "bundle"
    result = _cli(
        "build",
        *("--model", "tiny", "--weights", "none", "--resolution", str(RES), "--target", "toy"),
        *("--toy-stamp", "v7", "--no-report", "--cache-dir", str(root / "cache"), "--out", str(out)),
    )
    assert result.exit_code == 0, result.output
    return out


def test_builds_gates_and_bundles_with_its_own_flag(bundle: Path) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["valid"] and m["validation"]["passed"] and m["accuracy"] is None  # no dataset: the logit gate
    assert m["target"] == {
        "backend": "toy-engine",
        "precision": "fp32",
        "precision_used": "fp32",
        "device": "cpu",
        "stamp": "v7",
    }
    assert set(m["files"]) == {"model.toy", "golden.npz"} and m["self_test"]["images"] >= 8


def test_verifies(bundle: Path) -> None:
    result = _cli("verify", str(bundle), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["passed"]


def test_serves(bundle: Path, toy: targets.Target) -> None:
    from bitdeploy.runtimes import load
    from tests.runtimes.serving import request, running

    image = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(image, format="PNG")
    with load(bundle) as model, running(model) as server:
        status, body = request(server, "GET", "/healthz")
        assert status == 200 and body["backend"] == "toy-engine"
        status, body = request(server, "POST", "/v1/predict?top_k=2", image.getvalue())
        assert status == 200 and len(body["predictions"]) == 2
        assert body["predictions"][0]["label"] == model.predict(image.getvalue(), top_k=1)[0][0][0]


def test_exports_a_model_repository(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = _cli("export-repo", str(bundle), "--format", "triton", "--out", str(tmp_path / "repo"))
    assert result.exit_code == 0, result.output
    config = (tmp_path / "repo" / "tiny" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "default_model_filename" not in config  # from the record alone
    assert (tmp_path / "repo" / "tiny" / "1" / "model.toy").is_file()
    code, _, err = run(["export-repo", bundle, "--format", "ovms", "--out", tmp_path / "ovms"], capsys)
    assert code == 1 and "OpenVINO Model Server cannot run a Toy model" in one_error_line(err)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--target", "toy", "--toy-stamp", "a b"), "--toy-stamp 'a b' must be one word"),  # its validate hook
        (("--target", "onnx", "--toy-stamp", "v1"), "--toy-stamp v1 applies to --target toy"),
        (("--target", "toy", "--precision", "int8"), "Toy has no int8 route"),
    ],
)
def test_its_flag_is_checked_before_any_work(
    toy: targets.Target, tmp_path: Path, args: Any, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["build", "--model", "tiny", "--weights", "none", "--out", tmp_path / "x", *args], capsys)
    assert code == 1 and message in one_error_line(err) and not (tmp_path / "x").exists()


def test_it_has_a_conformance_test(toy: targets.Target) -> None:
    assert backends_without_conformance() == []


class TestToyBackend(BackendConformance):
    covers = "toy-engine"

    @pytest.fixture(scope="class")
    def case(self, bundle: Path) -> Case:
        import onnxruntime as ort

        from bitdeploy.runtimes.bundle import read_manifest
        from tests.toy_target.runtime import ToyBackend

        manifest = read_manifest(bundle)
        x = np.random.default_rng(0).uniform(-1, 1, (4, 3, RES, RES)).astype(np.float32)
        session = ort.InferenceSession(str(bundle / "model.toy"), providers=["CPUExecutionProvider"])
        expected = session.run(None, {session.get_inputs()[0].name: x})[0]
        return Case(lambda: ToyBackend(bundle / "model.toy", manifest), x, expected, atol=1e-5)
