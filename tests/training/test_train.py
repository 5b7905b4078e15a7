"""`bitdeploy train`: plan, outputs, exact resume after SIGKILL, DDP == one process, batch-split, errors."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from bitdeploy.cli import cli
from tests.clirun import run_cli

torch = pytest.importorskip("torch")

from bitdeploy.training.data import eval_batch  # noqa: E402
from bitdeploy.training.datasets import load_dataset  # noqa: E402
from bitdeploy.training.feeder import Feeder  # noqa: E402
from bitdeploy.training.trainer import TrainConfig, train  # noqa: E402
from bitdeploy.training.weights import load_model  # noqa: E402

BIN = Path(sys.executable).parent
# A low peak lr: with 1x1 feature maps at 32px, max-pool/ReLU gradient routing can flip on float-rounding
# differences and make unrelated runs diverge chaotically; equality tests need a run that stays smooth.
RUN = dict(
    model="tiny",
    weights="none",
    dataset="digits",
    resolution=32,
    steps=12,
    batch_size=16,
    lr=0.001,
    checkpoint_every=4,
    progress=False,
)
RUN_ARGS = shlex.split(
    "--model tiny --weights none --dataset digits --resolution 32 --steps 12 --batch-size 16 --lr 0.001 "
    "--checkpoint-every 4 --quiet"
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def logits(out: Path, model: str = "tiny") -> np.ndarray:
    loaded = load_model(model, out)
    x, _ = eval_batch(load_dataset("digits").val, 32, range(48))
    with torch.no_grad():
        return loaded.model(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    train(TrainConfig(out=out, **RUN))  # type: ignore[arg-type]
    return out


# --- plan ---------------------------------------------------------------------------------------------


def test_plan_digits_acceptance() -> None:
    result = CliRunner().invoke(cli, ["train", "--model", "m-r50x1", "--dataset", "digits", "--plan"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert (plan["steps"], plan["warmup_steps"], plan["lr_decay_steps"]) == (500, 100, [200, 300, 400])
    rule = dict(base_lr=0.003, batch_size=512, resize=160, crop=128, mixup_alpha=0.0)
    assert {k: plan[k] for k in rule} == rule
    assert (plan["dataset_size"], plan["num_classes"]) == (1438, 10)


def linked_folder(root: Path, size: int, per_class: int) -> Path:
    """An ImageFolder of 2 x per_class images, made of hard links to one real image per class (fast)."""
    for c, name in enumerate(("a", "b")):
        d = root / name
        d.mkdir(parents=True)
        first = d / "0.png"
        Image.new("RGB", (size, size), (c * 200, 10, 10)).save(first)
        for i in range(1, per_class):
            os.link(first, d / f"{i}.png")
    return root


@pytest.mark.parametrize(("size", "resize", "crop"), [(40, 160, 128), (300, 512, 480)])
def test_plan_imagefolder_25k(tmp_path: Path, size: int, resize: int, crop: int) -> None:
    # 25,000 files, 20% held out by the seeded split -> 20,000 training images: the medium bucket.
    root = linked_folder(tmp_path / "ds", size, 15_625)
    result = CliRunner().invoke(
        cli, ["train", "--model", "m-r50x1", "--dataset", str(root), "--val-split", "0.2", "--plan"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["dataset_size"] == 25_000 and plan["val_size"] == 6_250
    assert (plan["steps"], plan["warmup_steps"], plan["mixup_alpha"]) == (10_000, 500, 0.1)
    assert (plan["resize"], plan["crop"]) == (resize, crop)


def test_plan_shows_overrides_beside_rule() -> None:
    result = CliRunner().invoke(
        cli,
        ["train", "--model", "m-r50x1", "--dataset", "digits", "--batch-size", "64", "--resolution", "32", "--plan"],
    )
    plan = json.loads(result.output)
    assert plan["base_lr"] == pytest.approx(0.000375) and plan["rule"]["base_lr"] == 0.003
    assert plan["overrides"]["crop"] == {"rule": 128, "value": 32}
    assert any("scaled linearly" in n for n in plan["notes"])


# --- a run and its outputs ----------------------------------------------------------------------------


def test_outputs_checkpoint_and_summary(reference: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = torch.load(reference / "checkpoint.pt", weights_only=True)
    assert ck["format"] == "bitdeploy-checkpoint" and ck["version"] == 1
    assert (ck["model_name"], ck["num_classes"], ck["resolution"], ck["step"]) == ("tiny", 10, 32, 12)
    assert ck["labels"] == [str(i) for i in range(10)] and "optimizer" in ck and "rng" in ck
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["steps"] == 12 and 0.0 <= summary["val_top1"] <= 1.0 and summary["images_per_second"] > 0
    assert summary["val_samples"] == 359 and summary["head"] == "zero-initialised"
    lines = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [10, 12]
    assert lines[-1]["val_top1"] == summary["val_top1"]
    loaded = load_model("tiny", reference)
    assert loaded.labels == ck["labels"] and loaded.resolution == 32
    # Rerunning the finished command does not train again.
    before = (reference / "checkpoint.pt").stat().st_mtime_ns
    code, out, _ = run_cli(["train", *RUN_ARGS, "--out", str(reference)], capsys)
    assert code == 0 and "already holds a finished run" in out
    assert (reference / "checkpoint.pt").stat().st_mtime_ns == before


def test_batch_split_gives_the_same_weights(reference: Path, tmp_path: Path) -> None:
    train(TrainConfig(out=tmp_path, batch_split=4, **RUN))  # type: ignore[arg-type]
    np.testing.assert_allclose(logits(tmp_path), logits(reference), atol=1e-5)


def test_resume_after_sigkill_is_exact(reference: Path, tmp_path: Path) -> None:
    cmd = [str(BIN / "bitdeploy"), "train", *RUN_ARGS, "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = tmp_path / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ck.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ck, weights_only=True)["step"]
    assert killed_at < 12, "the run finished before it could be killed"
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    np.testing.assert_allclose(logits(tmp_path), logits(reference), atol=1e-5)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_from_step"] == killed_at


@pytest.mark.skipif(
    shutil.which("torchrun", path=str(BIN)) is None and shutil.which("torchrun") is None,
    reason="torchrun is not installed",
)
def test_torchrun_two_processes_match_one(reference: Path, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(BIN)) or shutil.which("torchrun")
    cmd = [
        str(torchrun),
        "--nproc-per-node",
        "2",
        "--no-python",
        str(BIN / "bitdeploy"),
        "train",
        *RUN_ARGS,
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(
        cmd, env={**ENV, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    np.testing.assert_allclose(logits(tmp_path), logits(reference), atol=1e-4)


# --- batches ------------------------------------------------------------------------------------------


def test_batches_are_a_function_of_seed_and_step() -> None:
    train_set = load_dataset("digits").train
    mem = Feeder(train_set, 12, 10, seed=5, mixup_alpha=0.2, memory_budget=1 << 30)
    lazy = Feeder(train_set, 12, 10, seed=5, mixup_alpha=0.2, memory_budget=0)
    assert mem.in_memory and not lazy.in_memory
    whole = mem.build(3, 8, 0, 8)
    halves = [mem.build(3, 8, 0, 4), lazy.build(3, 8, 4, 8)]
    assert whole.partner_images is not None and 0.0 <= whole.lam < 1.0
    assert torch.equal(whole.images, torch.cat([h.images for h in halves]))
    assert torch.equal(whole.partner_images, torch.cat([h.partner_images for h in halves]))  # type: ignore[misc]
    assert torch.equal(whole.labels, torch.cat([h.labels for h in halves]))
    assert all(h.lam == whole.lam for h in halves)
    assert not torch.equal(mem.build(4, 8, 0, 8).images, whole.images)
    # --no-hflip: the same crops, never mirrored.
    plain = Feeder(train_set, 12, 10, seed=5, mixup_alpha=0.2, memory_budget=1 << 30, hflip=False).build(3, 8, 0, 8)
    same = [torch.equal(a, b) for a, b in zip(plain.images, whole.images)]
    assert not all(same) and all(s or torch.equal(a, b.flip(1)) for s, a, b in zip(same, plain.images, whole.images))
    # Every example is seen once per epoch, also across epoch boundaries.
    seen = np.concatenate([mem.global_indices(s, 100) for s in range(len(train_set) // 100)])
    assert len(np.unique(seen)) == len(seen)
    mem.close()
    lazy.close()


# --- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
        (["--device", "xla"], "torch_xla"),
        (["--device", "cuda"], "no CUDA device"),
        (["--batch-size", "10", "--batch-split", "3"], "does not split"),
    ],
)
def test_bad_settings_are_one_line_errors(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    if "xla" in extra and __import__("importlib").util.find_spec("torch_xla") is not None:
        pytest.skip("torch_xla is installed")
    args = [a for a in RUN_ARGS]
    if "--batch-size" in extra:
        args[args.index("--batch-size") + 1] = extra[1]
        extra = extra[2:]
    code, _, err = run_cli(["train", *args, *extra, "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_resume_refuses_another_model_or_config(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    shutil.copytree(reference, out)
    args = [a if a != "tiny" else "tiny-s" for a in RUN_ARGS]
    code, _, err = run_cli(["train", *args, "--out", str(out)], capsys)
    assert code == 1 and "checkpoint of model 'tiny', not 'tiny-s'" in err and len(err.strip().splitlines()) == 1
    args = list(RUN_ARGS)
    args[args.index("--steps") + 1] = "30"
    code, _, err = run_cli(["train", *args, "--out", str(out)], capsys)
    assert code == 1 and "different run (steps: 12 -> 30" in err


def test_out_of_memory_names_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bitdeploy.core.errors import BitdeployError
    from bitdeploy.training.step import Stepper

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Stepper, "loss", boom)
    with pytest.raises(BitdeployError, match=r"--batch-split .*--batch-size"):
        train(TrainConfig(out=tmp_path, **RUN))  # type: ignore[arg-type]


def test_imagefolder_run_skips_unreadable_or_stops_with_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "ds"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = [
        "train",
        "--model",
        "tiny",
        "--weights",
        "none",
        "--dataset",
        str(root),
        "--resolution",
        "16",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--quiet",
    ]
    code, _out, err = run_cli([*args, "--out", str(tmp_path / "o1")], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "o1" / "summary.json").read_text())
    assert summary["skipped_count"] == 1 and "broken.png" in summary["skipped_images"][0]
    assert summary["labels"] == ["a", "b"] and "skipped 1 unreadable" in err
    code, _, err = run_cli([*args, "--strict", "--out", str(tmp_path / "o2")], capsys)
    assert code == 1 and "broken.png" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o2" / "checkpoint.pt").exists()


def test_tiny_model_learns_digits(tmp_path: Path) -> None:
    # A broken label/augmentation pairing or schedule stays near chance (0.1); 40 steps of tiny reach ~0.45.
    run = {**RUN, "resolution": 16, "steps": 40, "batch_size": 32, "lr": 0.02, "checkpoint_every": 100}
    train(TrainConfig(out=tmp_path, **run))  # type: ignore[arg-type]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["val_top1"] > 0.3, summary["val_top1"]
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
    ]
    assert losses[-1] < losses[0]
