"""ONNX export: parity with Google's code through the CLI, graph structure, atomic writes, one-line errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxslim")

from click.testing import CliRunner  # noqa: E402

from bitdeploy.cli import cli  # noqa: E402
from bitdeploy.converters.onnx_export import check_graph, export_onnx, torch_export  # noqa: E402
from bitdeploy.core.catalog import get_variant  # noqa: E402
from bitdeploy.core.errors import ConversionError  # noqa: E402
from bitdeploy.training.weights import load_model, read_npz  # noqa: E402
from tests.reference import official_bit  # noqa: E402

TINY = get_variant("tiny")
REPO = Path(__file__).resolve().parents[2]


def _inputs(n: int, res: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, res, res)).astype(np.float32)


def _cli_export(tmp: Path, model: str, npz: Path, res: int) -> Path:
    out = tmp / f"{model}-{res}.onnx"
    result = CliRunner().invoke(
        cli, ["export", "--model", model, "--weights", str(npz), "--resolution", str(res), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "max |onnxruntime - torch|" in result.output
    return out


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["logits"], {"input": x})[0])


def _assert_parity(onnx_path: Path, npz: Path, units: tuple[int, ...], wf: float, res: int, n: int) -> float:
    oracle = official_bit.from_npz(str(npz), units, wf)
    x = _inputs(n, res)
    with torch.no_grad():
        expected = oracle(torch.from_numpy(x)).numpy()
    got = _ort(onnx_path, x)
    diff = float(np.abs(got - expected).max())
    assert diff < 1e-3, diff
    assert (got.argmax(1) == expected.argmax(1)).all()
    return diff


@pytest.fixture(scope="module")
def tiny10(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("tiny10")
    npz = tmp / "tiny10.npz"
    official_bit.random_npz(str(npz), TINY.block_units, TINY.width_factor, head_size=10, seed=11)
    return npz, _cli_export(tmp, "tiny", npz, 32)


def test_cli_export_matches_official_code(tiny10: tuple[Path, Path]) -> None:
    npz, onnx_path = tiny10
    _assert_parity(onnx_path, npz, TINY.block_units, TINY.width_factor, 32, n=8)


def test_cli_export_21843_head_matches_official_code(tmp_path: Path) -> None:
    npz = tmp_path / "tiny21k.npz"
    official_bit.random_npz(str(npz), TINY.block_units, TINY.width_factor, head_size=21843, seed=12)
    _assert_parity(_cli_export(tmp_path, "tiny", npz, 48), npz, TINY.block_units, TINY.width_factor, 48, n=4)


@pytest.mark.slow
def test_real_r50x1_export_matches_official_code(tmp_path: Path) -> None:
    v = get_variant("m-r50x1")
    npz = tmp_path / "r50x1.npz"
    official_bit.random_npz(str(npz), v.block_units, v.width_factor, head_size=10, seed=13)
    onnx_path = _cli_export(tmp_path, "m-r50x1", npz, 128)
    _assert_parity(onnx_path, npz, v.block_units, v.width_factor, 128, n=4)
    check_graph(onnx.load(str(onnx_path)), 128, 10, 17)  # every Conv weight an initializer, root Pad kept


def test_graph_structure(tiny10: tuple[Path, Path]) -> None:
    _, onnx_path = tiny10
    model = onnx.load(str(onnx_path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    ops = [n.op_type for n in model.graph.node]
    assert "GroupNormalization" not in ops and ops.count("InstanceNormalization") == 13  # 4 units x 3 + head
    assert not {"ReduceMean", "Sqrt", "Div", "Sub", "Pow"} & set(ops)  # no weight statistics left
    inits = {i.name for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 18 and all(n.input[1] in inits for n in convs)
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    pad = next(n for n in model.graph.node if pool.input[0] in n.output)
    assert pad.op_type == "Pad"
    pads = next(a for a in pool.attribute if a.name == "pads").ints
    assert list(pads) == [0, 0, 0, 0]
    check_graph(model, 32, 10, 17)


def test_dynamic_batch(tiny10: tuple[Path, Path]) -> None:
    _, onnx_path = tiny10
    x = _inputs(5, 32)
    full = _ort(onnx_path, x)
    assert full.shape == (5, 10)
    assert np.abs(_ort(onnx_path, x[2:3]) - full[2:3]).max() < 1e-5


@pytest.mark.filterwarnings("ignore")
def test_check_graph_catches_unfolded_weights(tmp_path: Path) -> None:
    """A generic export computes the standardised weights in the graph: check_graph must see that."""
    model = load_model("tiny", "none", num_classes=3).model
    path = tmp_path / "naive.onnx"
    torch_export(model, 32, path)
    with pytest.raises(ConversionError, match="not folded"):
        check_graph(onnx.load(str(path)), 32, 3, 17)


def test_fused_root_pool_is_refused_and_nothing_written(tmp_path: Path) -> None:
    """MaxPool(padding=1) pads with -inf instead of zeros: the export must refuse it."""
    model = load_model("tiny", "none", num_classes=3).model
    model.root.pad = torch.nn.Identity()
    model.root.pool = torch.nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    out = tmp_path / "fused.onnx"
    with pytest.raises(ConversionError, match="must zero-pad, then max-pool"):
        export_onnx(model, 32, out)
    assert list(tmp_path.iterdir()) == []


def test_mismatch_fails_and_leaves_nothing(
    tiny10: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bitdeploy.converters import onnx_export

    monkeypatch.setattr(onnx_export, "_reference", lambda model, x: np.zeros((x.shape[0], 10), np.float32) + 50.0)
    out = tmp_path / "bad.onnx"
    with pytest.raises(ConversionError, match="differs from PyTorch"):
        export_onnx(load_model("tiny", str(tiny10[0])).model, 32, out)
    assert list(tmp_path.iterdir()) == []


def test_external_data_and_info(tiny10: tuple[Path, Path], tmp_path: Path) -> None:
    model = load_model("tiny", str(tiny10[0])).model
    out = tmp_path / "big.onnx"
    info = export_onnx(model, 32, out, external_data_threshold=0)
    assert info["external_data"] == "big.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert out.stat().st_size < 100_000  # the weights live in the sidecar
    assert info["opset"] == 17 and info["nodes"] < info["nodes_before_simplify"]
    assert info["max_abs_diff"] < 1e-3 and info["simplifier"].startswith("onnxslim")
    x = _inputs(2, 32)
    with torch.no_grad():
        assert np.abs(_ort(out, x) - model(torch.from_numpy(x)).numpy()).max() < 1e-3
    export_onnx(model, 32, out)  # re-exported small: the stale sidecar goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx"]


def test_other_opset_is_written_as_asked(tiny10: tuple[Path, Path], tmp_path: Path) -> None:
    info = export_onnx(load_model("tiny", str(tiny10[0])).model, 32, tmp_path / "o13.onnx", opset=13)
    model = onnx.load(str(tmp_path / "o13.onnx"))
    assert info["opset"] == 13 and [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [13]
    with pytest.raises(ConversionError, match="not supported"):
        export_onnx(load_model("tiny", "none", num_classes=2).model, 32, tmp_path / "o21.onnx", opset=21)


# --- the CLI on bad input: exit 1, one line, no traceback ----------------------------------------------


def _run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bitdeploy", *args], capture_output=True, text=True, env=full_env, cwd=REPO, timeout=300
    )


def _assert_one_line_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_truncated_npz(tiny10: tuple[Path, Path], tmp_path: Path) -> None:
    bad = tmp_path / "cut.npz"
    bad.write_bytes(tiny10[0].read_bytes()[:100_000])
    out = tmp_path / "m.onnx"
    _assert_one_line_failure(
        _run_cli(["export", "--model", "tiny", "--weights", str(bad), "--resolution", "32", "--out", str(out)]),
        "truncated",
    )
    assert not out.exists()


def test_cli_npz_with_key_removed(tiny10: tuple[Path, Path], tmp_path: Path) -> None:
    arrays = dict(read_npz(tiny10[0]))
    del arrays["resnet/block3/unit01/a/proj/standardized_conv2d/kernel"]
    bad = tmp_path / "missing.npz"
    np.savez(bad, **arrays)
    proc = _run_cli(
        ["export", "--model", "tiny", "--weights", str(bad), "--resolution", "32", "--out", str(tmp_path / "m.onnx")]
    )
    _assert_one_line_failure(proc, "resnet/block3/unit01/a/proj/standardized_conv2d/kernel")


def test_cli_auto_offline_with_empty_cache(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"BITDEPLOY_CACHE": str(tmp_path / "cache"), "BITDEPLOY_WEIGHTS_URL": f"http://127.0.0.1:{port}/bit_models"}
    proc = _run_cli(["export", "--model", "m-r50x1", "--out", str(tmp_path / "m.onnx")], env)
    _assert_one_line_failure(proc, f"http://127.0.0.1:{port}/bit_models/BiT-M-R50x1.npz", "--weights PATH")
    assert not (tmp_path / "m.onnx").exists()
