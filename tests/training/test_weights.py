"""Weights: Google's npz key scheme both ways, checkpoints, random init, and one-line errors for bad files."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bitdeploy.core.catalog import count_params, get_variant  # noqa: E402
from bitdeploy.core.errors import BitdeployError, WeightsError  # noqa: E402
from bitdeploy.training.weights import (  # noqa: E402
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    expected_shapes,
    load_model,
    npz_key,
    read_npz,
    save_npz,
)
from tests.reference import official_bit  # noqa: E402

TINY = get_variant("tiny")


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("npz") / "tiny.npz"
    official_bit.random_npz(str(path), TINY.block_units, TINY.width_factor, head_size=10, seed=1)
    return path


def _x(n: int = 3, res: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, (n, 3, res, res)).astype(np.float32))


def _one_line_error(path: Path, match: str, model: str = "tiny") -> str:
    with pytest.raises(WeightsError, match=match) as err:
        load_model(model, str(path))
    assert "\n" not in str(err.value)
    return str(err.value)


def _rewrite(src: Path, dst: Path, **changes: np.ndarray | None) -> Path:
    arrays = dict(read_npz(src))
    for key, value in changes.items():
        key = key.replace("__", "/")
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    np.savez(dst, **arrays)
    return dst


def test_key_scheme_matches_google_for_every_official_model() -> None:
    for name in ("m-r50x1", "s-r101x3", "m-r152x4"):
        v = get_variant(name)
        shapes = expected_shapes(v, v.num_classes)
        keys = {npz_key(k) for k in shapes}
        assert len(keys) == len(shapes)
        assert sum(int(np.prod(s)) for s in shapes.values()) == count_params(v)
        # Google's naming: 1-based blocks, 2-digit units, a/b/c, proj only on unit01
        units = v.block_units
        assert f"resnet/block3/unit{units[2]:02d}/c/standardized_conv2d/kernel" in keys
        assert "resnet/block4/unit01/a/proj/standardized_conv2d/kernel" in keys
        assert "resnet/block4/unit02/a/proj/standardized_conv2d/kernel" not in keys
        assert {"resnet/group_norm/gamma", "resnet/head/conv2d/kernel", "resnet/head/conv2d/bias"} <= keys


def test_official_npz_loads_like_googles_code(tiny_npz: Path) -> None:
    oracle = official_bit.from_npz(str(tiny_npz), TINY.block_units, TINY.width_factor)
    loaded = load_model("tiny", str(tiny_npz))
    assert loaded.num_classes == 10 and loaded.labels is None and loaded.resolution is None
    assert loaded.weights_info["kind"] == "npz" and len(loaded.weights_info["sha256"]) == 64
    assert not loaded.model.training
    x = _x()
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), oracle(x), atol=1e-5, rtol=0)


def test_save_npz_writes_googles_layout(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = load_model("tiny", "none", num_classes=4).model
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    out = save_npz(model, tmp_path / "saved.npz")
    arrays = read_npz(out)
    assert arrays["resnet/root_block/standardized_conv2d/kernel"].shape == (7, 7, 3, 32)  # HWIO
    assert arrays["resnet/head/conv2d/kernel"].shape == (1, 1, 1024, 4)
    oracle = official_bit.from_npz(str(out), TINY.block_units, TINY.width_factor)  # Google's loader reads it
    x = _x(2)
    with torch.no_grad():
        assert torch.allclose(model(x), oracle(x), atol=1e-5, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["saved.npz"]


def test_other_head_size_keeps_body_and_zeroes_head(tiny_npz: Path) -> None:
    loaded = load_model("tiny", str(tiny_npz), num_classes=3)
    assert loaded.num_classes == 3 and "zero-initialised" in loaded.weights_info["head"]
    assert loaded.model.head.conv.weight.shape == (3, 1024, 1, 1)
    assert not loaded.model.head.conv.weight.any() and not loaded.model.head.conv.bias.any()
    ref = load_model("tiny", str(tiny_npz)).model
    assert torch.equal(loaded.model.body.block2.unit01.conv2.weight, ref.body.block2.unit01.conv2.weight)
    assert all(p.requires_grad for p in loaded.model.parameters())


def test_missing_key_is_named(tiny_npz: Path, tmp_path: Path) -> None:
    bad = _rewrite(tiny_npz, tmp_path / "missing.npz", **{"resnet__block2__unit01__b__group_norm__gamma": None})
    _one_line_error(bad, r"missing key 'resnet/block2/unit01/b/group_norm/gamma'")


def test_unexpected_key_is_named(tiny_npz: Path, tmp_path: Path) -> None:
    bad = _rewrite(
        tiny_npz, tmp_path / "extra.npz", **{"resnet__block4__unit02__a__group_norm__gamma": np.ones(1024, np.float32)}
    )
    _one_line_error(bad, r"unexpected key 'resnet/block4/unit02/a/group_norm/gamma'")


def test_misshaped_key_is_named(tiny_npz: Path, tmp_path: Path) -> None:
    bad = _rewrite(
        tiny_npz,
        tmp_path / "shape.npz",
        **{"resnet__block1__unit01__b__standardized_conv2d__kernel": np.ones((1, 1, 32, 32), np.float32)},
    )
    _one_line_error(
        bad,
        r"key 'resnet/block1/unit01/b/standardized_conv2d/kernel' has shape \(1, 1, 32, 32\), but tiny needs \(3, 3, 32, 32\)",
    )


def test_file_of_another_model(tiny_npz: Path) -> None:
    _one_line_error(tiny_npz, r"m-r50x1 needs|for m-r50x1", model="m-r50x1")


def test_non_finite_and_integer_values(tiny_npz: Path, tmp_path: Path) -> None:
    nan = np.ones(1024, np.float32)
    nan[5] = np.nan
    _one_line_error(
        _rewrite(tiny_npz, tmp_path / "nan.npz", **{"resnet__group_norm__beta": nan}),
        r"'resnet/group_norm/beta' contains NaN",
    )
    ints = np.ones(1024, np.int64)
    _one_line_error(
        _rewrite(tiny_npz, tmp_path / "int.npz", **{"resnet__group_norm__beta": ints}),
        r"'resnet/group_norm/beta' holds int64",
    )


@pytest.mark.parametrize("cut", [0.5, 0.98])
def test_truncated_npz(tiny_npz: Path, tmp_path: Path, cut: float) -> None:
    data = tiny_npz.read_bytes()
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(data[: int(len(data) * cut)])
    _one_line_error(bad, "truncated or corrupt")


def test_corrupt_member_crc(tiny_npz: Path, tmp_path: Path) -> None:
    data = bytearray(tiny_npz.read_bytes())
    data[len(data) // 3] ^= 0xFF  # flip a byte inside a stored array
    bad = tmp_path / "flipped.npz"
    bad.write_bytes(bytes(data))
    _one_line_error(bad, "not a readable .npz")


def test_pickled_content_is_never_loaded(tiny_npz: Path, tmp_path: Path) -> None:
    bad = _rewrite(tiny_npz, tmp_path / "objects.npz", **{"resnet__group_norm__beta": np.array([object()] * 1024)})
    _one_line_error(bad, "allow_pickle=False")
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    _one_line_error(npy, "single .npy array")


def test_unrecognised_and_missing_paths(tmp_path: Path) -> None:
    text = tmp_path / "weights.bin"
    text.write_text("not weights")
    _one_line_error(text, "unrecognised weights file")
    _one_line_error(tmp_path / "nope.npz", "no such file or directory")


def test_npz_without_suffix_is_recognised(tiny_npz: Path, tmp_path: Path) -> None:
    plain = tmp_path / "weights"
    plain.write_bytes(tiny_npz.read_bytes())
    assert load_model("tiny", str(plain)).weights_info["kind"] == "npz"


def test_none_is_random_with_upstream_or_given_head() -> None:
    assert load_model("tiny-s", "none").num_classes == 1000
    loaded = load_model("tiny", "none", num_classes=5)
    assert loaded.weights_info == {"kind": "none", "source": None, "sha256": None}
    assert loaded.model(_x(1)).shape == (1, 5)
    with pytest.raises(BitdeployError, match="at least 1"):
        load_model("tiny", "none", num_classes=0)
    with pytest.raises(BitdeployError, match="unknown model"):
        load_model("r50", "none")


# --- checkpoints ---------------------------------------------------------------------------------------


def _write_checkpoint(out: Path, net: torch.nn.Module, **overrides: object) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "model_name": "tiny",
        "num_classes": 4,
        "labels": ["a", "b", "c", "d"],
        "resolution": 32,
        "step": 7,
        "model": net.state_dict(),
        "optimizer": {"state": {}},
        "rng": {"torch": torch.get_rng_state()},
    }
    payload.update(overrides)
    torch.save(payload, out / CHECKPOINT_NAME)
    return out


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    torch.manual_seed(5)
    return load_model("tiny", "none", num_classes=4).model


def test_checkpoint_dir_and_file(trained: torch.nn.Module, tmp_path: Path) -> None:
    run = _write_checkpoint(tmp_path / "run", trained)
    for spec in (run, run / CHECKPOINT_NAME):
        loaded = load_model("tiny", str(spec))
        assert loaded.num_classes == 4 and loaded.labels == ["a", "b", "c", "d"] and loaded.resolution == 32
        assert loaded.weights_info["kind"] == "checkpoint" and loaded.weights_info["step"] == 7
        x = _x(2)
        with torch.no_grad():
            assert torch.equal(loaded.model(x), trained.eval()(x))


def test_checkpoint_with_ddp_prefixes(trained: torch.nn.Module, tmp_path: Path) -> None:
    wrapped = {f"module.{k}": v for k, v in trained.state_dict().items()}
    run = _write_checkpoint(tmp_path / "ddp", trained, model=wrapped)
    assert load_model("tiny", str(run)).num_classes == 4


def test_checkpoint_of_another_model(trained: torch.nn.Module, tmp_path: Path) -> None:
    run = _write_checkpoint(tmp_path / "other", trained, model_name="tiny-s")
    _one_line_error(run, r"checkpoint is for model 'tiny-s', not 'tiny'; pass --model tiny-s")


def test_checkpoint_missing_weights(trained: torch.nn.Module, tmp_path: Path) -> None:
    state = dict(trained.state_dict())
    del state["body.block3.unit01.gn2.bias"]
    _one_line_error(
        _write_checkpoint(tmp_path / "partial", trained, model=state), "missing weights 'body.block3.unit01.gn2.bias'"
    )


class Payload:  # not a tensor or plain data: weights_only loading must refuse it
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this must never run",))


def test_checkpoint_with_arbitrary_objects_is_refused(
    trained: torch.nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _write_checkpoint(tmp_path / "evil", trained, extra=Payload())
    _one_line_error(run, "refused")
    assert "must never run" not in capsys.readouterr().out


def test_truncated_checkpoint_and_empty_dir(trained: torch.nn.Module, tmp_path: Path) -> None:
    run = _write_checkpoint(tmp_path / "cut", trained)
    data = (run / CHECKPOINT_NAME).read_bytes()
    (run / CHECKPOINT_NAME).write_bytes(data[: len(data) // 2])
    _one_line_error(run, "not a readable checkpoint")
    (tmp_path / "empty").mkdir()
    _one_line_error(tmp_path / "empty", "no checkpoint.pt")


def test_foreign_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, path)
    _one_line_error(path, "not a bitdeploy checkpoint")
    assert zipfile.is_zipfile(path)


def test_debug_shows_the_original_error_and_plain_runs_stay_one_line(tiny_npz: Path, tmp_path: Path) -> None:
    """`--debug` prints the chained traceback down to the npz reader's own exception."""
    import subprocess
    import sys

    bad = tmp_path / "truncated.npz"
    bad.write_bytes(tiny_npz.read_bytes()[: len(tiny_npz.read_bytes()) // 2])
    args = ["export", "--model", "tiny", "--weights", str(bad), "--out", str(tmp_path / "x.onnx")]
    plain = subprocess.run([sys.executable, "-m", "bitdeploy", *args], capture_output=True, text=True, timeout=300)
    lines = [line for line in plain.stderr.splitlines() if line.strip()]
    assert (
        plain.returncode == 1
        and len(lines) == 1
        and "truncated or corrupt" in lines[0]
        and "Traceback" not in plain.stderr
    )
    debug = subprocess.run(
        [sys.executable, "-m", "bitdeploy", "--debug", *args], capture_output=True, text=True, timeout=300
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "The above exception was the direct cause of the following exception" in debug.stderr
    assert "zipfile.BadZipFile" in debug.stderr or "EOFError" in debug.stderr  # the reader's own error, not only ours
    assert debug.stderr.rstrip().splitlines()[-1].startswith("error: ") and not (tmp_path / "x.onnx").exists()
