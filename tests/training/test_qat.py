"""Quantization-aware fine-tuning (`bitdeploy.training.qat`, `bitdeploy train --qat`): the fake quantization and its
calibration, the parameters the Q/DQ writer reads, the CLI run and its outputs, resume, and the one-line errors.

One tiny FP32 run (12 steps at 32 px, lr 0.02: ~0.18 val top-1, logits spanning ~3) is the teacher of every check.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.clirun import one_error_line, run_cli

torch = pytest.importorskip("torch")

from bitdeploy.cli import main  # noqa: E402
from bitdeploy.converters.qat_qdq import PARAMS_FILE, SCHEME, WEIGHT_QMAX, QatParams  # noqa: E402
from bitdeploy.training import qat  # noqa: E402
from bitdeploy.training.bit import StdConv2d  # noqa: E402
from bitdeploy.training.data import eval_batch  # noqa: E402
from bitdeploy.training.datasets import load_dataset  # noqa: E402
from bitdeploy.training.trainer import TrainConfig, train  # noqa: E402
from bitdeploy.training.weights import load_model  # noqa: E402

FP32 = dict(model="tiny", weights="none", dataset="digits", resolution=32, steps=12, batch_size=16, lr=0.02)
CONVS = 17  # tiny: the stem conv and 4 bottleneck units of conv1/conv2/conv3/downsample; the head is a plain Conv2d


pytestmark = pytest.mark.usefixtures("one_thread")


def qat_args(fp32: Path, out: Path, *extra: str) -> list[str]:
    head = ["train", "--model", "tiny", "--weights", str(fp32), "--dataset", "digits", "--qat", "--quiet"]
    return [*head, *extra, "--out", str(out)]


def cli(args: list[str]) -> int:
    """`bitdeploy ARGS` in process, for module fixtures (run_cli needs the function-scoped capsys)."""
    try:
        main(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fp32")
    train(TrainConfig(out=out, progress=False, **FP32))  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def qat_run(fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qat")
    assert cli(qat_args(fp32, out, "--steps", "3")) == 0
    return out


@pytest.fixture(scope="module")
def val_x() -> torch.Tensor:
    return torch.from_numpy(eval_batch(load_dataset("digits").val, 32, range(128))[0])


@pytest.fixture(scope="module")
def calibrated(fp32: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the FP32 teacher, a prepared and calibrated copy of it), both in eval mode."""
    teacher = load_model("tiny", fp32).model
    student = qat.prepare(copy.deepcopy(teacher))
    seen = qat.calibrate(student, qat.calibration_batches(load_dataset("digits").train, 32, 0, "cpu"))
    assert seen == qat.CALIBRATION_IMAGES
    return teacher, student.eval()


def rms(t: torch.Tensor) -> float:
    return float(t.float().pow(2).mean().sqrt())


# --- the fake quantization ----------------------------------------------------------------------------


def test_prepare_adds_quantizers_and_keeps_the_float_state(fp32: Path) -> None:
    model = load_model("tiny", fp32).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    std_convs = {n for n, m in model.named_modules() if isinstance(m, StdConv2d)}
    assert qat.prepare(model) is model
    convs = qat.quantized_convs(model)
    assert set(convs) == std_convs and len(convs) == CONVS and "root.conv" in convs
    assert "body.block1.unit01.conv1" in convs and not any(n.startswith("head") for n in convs)
    assert not hasattr(model.head.conv, "qat_input")
    quantizers = {id(q) for c in convs.values() for q in (c.qat_input, c.qat_output)}
    assert len(quantizers) == 2 * CONVS and all(isinstance(c.qat_input, qat.ActQuant) for c in convs.values())
    qat.prepare(model)  # idempotent: the same quantizers, not fresh ones
    assert {id(q) for c in convs.values() for q in (c.qat_input, c.qat_output)} == quantizers
    weights, quantizer_state = qat.split_state(model)
    assert weights.keys() == before.keys() and all(torch.equal(weights[k], before[k]) for k in before)
    assert len(quantizer_state) == 2 * CONVS * 3  # scale, zero_point, observed
    assert all(".qat_input." in k or ".qat_output." in k for k in quantizer_state)
    assert not set(quantizer_state) & set(weights)


def test_calibration_sets_ranges_and_the_fake_quantized_model_tracks_the_float_one(
    calibrated: tuple[torch.nn.Module, torch.nn.Module], val_x: torch.Tensor
) -> None:
    """Bounds: the fake-quantized model departs from the float one by the rounding of 34 UINT8 activation quantizers
    (noise ~range / (255 sqrt 12) each, ~0.1 % of a tensor's range) and 17 7-bit weight quantizers (standardised
    weights, max |w| ~ 3-4 sigma: noise ~1.5 % of the weights' rms per layer), plus clipping beyond the mean per-batch
    range; adding ~17 layers' worth in quadrature gives an error of at most ~10 % of the logits' rms (measured here:
    0.028, top-1 agreement 0.98). 0.15 leaves room for the amplification through the network while a wrong zero point
    or scale, which shifts or saturates whole tensors, moves the logits by about their own size. The lower bound says
    the quantization is really applied (float rounding alone differs by ~1e-6)."""
    teacher, student = calibrated
    convs = qat.quantized_convs(student)
    for name, conv in convs.items():
        q_in, q_out = conv.qat_input.quantizer(), conv.qat_output.quantizer()
        assert 0 < q_in.scale < 1 and 0 < q_out.scale < 10, name
        if name == "root.conv":  # the image in [-1, 1]: a fixed grid that keeps every 8-bit pixel off a tie
            assert q_in.zero_point == 127 and q_in.scale == pytest.approx(1 / 127, rel=1e-6)
            pixels = (np.arange(256) / 127.5 - 1.0) / q_in.scale + q_in.zero_point
            assert np.abs(pixels - np.floor(pixels) - 0.5).min() > 1e-3
        else:  # every body conv reads relu(gn(x)) >= 0: the range starts at 0
            assert q_in.zero_point == 0, name
        assert 0 < q_out.zero_point < 255, name  # a conv's output is signed
    with torch.no_grad():
        want = teacher(val_x)
        quantizers = [m for m in student.modules() if isinstance(m, qat.ActQuant)]
        for q in quantizers:  # calibrating: every quantizer (and the weight one) passes through
            q.calibrating = True
        try:
            passthrough = student(val_x)
        finally:
            for q in quantizers:
                q.calibrating = False
        got = student(val_x)
    torch.testing.assert_close(passthrough, want, atol=1e-5, rtol=1e-5)  # prepare alone changes nothing
    relative = rms(got - want) / rms(want)
    assert 1e-3 < relative < 0.15, relative
    assert qat.agreement(student, teacher, val_x) >= 0.8


def test_weights_are_fake_quantized_on_the_7_bit_grid(
    calibrated: tuple[torch.nn.Module, torch.nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, student = calibrated
    used: list[torch.Tensor] = []
    conv2d = torch.nn.functional.conv2d

    def spy(x: torch.Tensor, w: torch.Tensor, *args: Any) -> torch.Tensor:
        used.append(w.detach().clone())
        return conv2d(x, w, *args)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    for name, conv in qat.quantized_convs(student).items():
        used.clear()
        with torch.no_grad():
            conv(torch.zeros(1, conv.in_channels, 8, 8))
        assert len(used) == 1, name
        w = conv.standardized_weight().detach()
        scale = (w.abs().amax(dim=(1, 2, 3)) / WEIGHT_QMAX).view(-1, 1, 1, 1)
        q = used[0] / scale
        levels = q.round()
        assert (q - levels).abs().max() < 1e-3, name  # on the grid (up to the fused standardisation's rounding)
        assert levels.abs().max() <= WEIGHT_QMAX and torch.all(levels.abs().amax(dim=(1, 2, 3)) == WEIGHT_QMAX)
        assert max(len(torch.unique(c)) for c in levels) <= 2 * WEIGHT_QMAX + 1, name
        assert torch.all((used[0] - w).abs() <= scale / 2 + 1e-6), name  # rounding, no clipping


def test_params_name_every_quantized_conv_and_round_trip(
    calibrated: tuple[torch.nn.Module, torch.nn.Module], tmp_path: Path
) -> None:
    _, student = calibrated
    params = qat.params(student, {"steps": 0, "split": "train"})
    convs = qat.quantized_convs(student)
    assert list(params.convs) == list(convs) and "body.block1.unit01.conv1" in params.convs
    assert (params.weight_qmax, params.scheme, dict(params.record)) == (
        WEIGHT_QMAX,
        SCHEME,
        {"steps": 0, "split": "train"},
    )
    for name, conv in convs.items():
        q = params.convs[name]
        assert len(q.weight_scales) == conv.out_channels
        want = conv.standardized_weight().detach().abs().amax(dim=(1, 2, 3)) / WEIGHT_QMAX
        np.testing.assert_allclose(q.weight_scales, want.numpy(), rtol=1e-6)
        assert (q.input, q.output) == (conv.qat_input.quantizer(), conv.qat_output.quantizer())
    assert QatParams.load(params.save(tmp_path / PARAMS_FILE)) == params


def test_run_defaults_come_from_the_fp32_run(fp32: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = TrainConfig(model="tiny", dataset="digits", weights=str(fp32), qat=True)
    got = qat.run_defaults(config)
    assert (got.steps, got.resolution, got.batch_size) == (qat.MIN_STEPS, 32, 16)  # a tenth of 12 is below 20
    assert got.lr == pytest.approx(qat.LR_SHARE * FP32["lr"])  # type: ignore[operator]
    assert (
        qat.run_defaults(TrainConfig(model="tiny", dataset="digits", weights=str(fp32), qat=True, steps=3)).steps == 3
    )
    from bitdeploy.training import weights

    monkeypatch.setattr(weights, "read_checkpoint", lambda path: (path, {"plan": {"steps": 1000, "base_lr": 0.003}}))
    assert qat.run_defaults(config).steps == 100


# --- bitdeploy train --qat ----------------------------------------------------------------------------


def test_qat_run_writes_a_float_checkpoint_its_params_and_record(
    fp32: Path, qat_run: Path, val_x: torch.Tensor
) -> None:
    assert {"checkpoint.pt", "summary.json", "metrics.jsonl", PARAMS_FILE} <= {p.name for p in qat_run.iterdir()}
    summary = json.loads((qat_run / "summary.json").read_text())
    fp32_plan = json.loads((fp32 / "summary.json").read_text())["plan"]
    record = summary["qat"]
    assert summary["steps"] == record["steps"] == 3 and summary["qat_params"] == PARAMS_FILE
    assert (record["split"], record["calibrated_images"], record["train_size"]) == ("train", 256, 1438)
    assert record["teacher"] == str(fp32) and record["scheme"] == SCHEME and "KL divergence" in record["loss"]
    assert record["base_lr"] == pytest.approx(qat.LR_SHARE * fp32_plan["base_lr"])
    assert (summary["resolution"], record["batch_size"]) == (32, 16)  # as the FP32 run trained
    ck = torch.load(qat_run / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 3 and ck["qat_record"] == record
    assert not [k for k in ck["model"] if "qat_" in k]
    assert len(ck["qat"]) == 2 * CONVS * 3 and all(".qat_" in k for k in ck["qat"])
    loaded = load_model("tiny", qat_run)  # an ordinary float fine-tune
    assert loaded.labels == [str(i) for i in range(10)] and loaded.resolution == 32
    assert torch.isfinite(loaded.model(val_x)).all()
    params = QatParams.load(qat_run / PARAMS_FILE)
    assert len(params.convs) == CONVS and params.record["steps"] == 3
    assert params.record["val_top1_simulated"] == summary["val_top1"]
    losses = [r["loss"] for r in map(json.loads, (qat_run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses and all(math.isfinite(v) and v >= 0 for v in losses)
    # The student it saved, against its teacher: a finite distillation loss, and mostly the same top-1.
    teacher = load_model("tiny", fp32).model
    student = qat.prepare(load_model("tiny", qat_run).model)
    student.load_state_dict({**ck["model"], **ck["qat"]})
    student.eval()
    with torch.no_grad():
        loss = float(qat.distillation_loss(student(val_x), teacher(val_x)))
    assert math.isfinite(loss) and 0 <= loss < 0.05, loss  # measured: 2e-4
    assert qat.agreement(student, teacher, val_x) >= 0.8


def test_qat_run_resumes_where_it_stopped_and_then_says_it_is_finished(
    fp32: Path, qat_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = qat_args(fp32, tmp_path, "--steps", "3", "--checkpoint-every", "1")
    real_loss, calls = qat.DistillStepper.loss, []

    def ctrl_c_at_step_3(self: Any, *a: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(self, *a)

    monkeypatch.setattr(qat.DistillStepper, "loss", ctrl_c_at_step_3)
    code, _, err = run_cli(args, capsys)
    assert code == 130 and err.rstrip().endswith("Aborted."), err  # click's answer to Ctrl-C
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / PARAMS_FILE).exists() and not (tmp_path / "summary.json").exists()
    monkeypatch.undo()
    code, _, err = run_cli(args, capsys)
    assert code == 0 and "resuming" in err, err
    assert json.loads((tmp_path / "summary.json").read_text())["resumed_from_step"] == 2
    # The quantizers came back from the checkpoint (not recalibrated): the same run as the uninterrupted one.
    resumed = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    straight = torch.load(qat_run / "checkpoint.pt", weights_only=True)
    for key in ("model", "qat"):
        for name, value in straight[key].items():
            torch.testing.assert_close(resumed[key][name], value, atol=1e-6, rtol=1e-5, msg=name)
    assert QatParams.load(tmp_path / PARAMS_FILE).convs == QatParams.load(qat_run / PARAMS_FILE).convs
    before = (tmp_path / "checkpoint.pt").stat().st_mtime_ns
    code, out, _ = run_cli(args, capsys)
    assert code == 0 and "already holds a finished run" in out
    assert (tmp_path / "checkpoint.pt").stat().st_mtime_ns == before


def test_qat_run_into_the_out_of_an_fp32_run_is_refused(
    fp32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    shutil.copytree(fp32, out)
    code, _, err = run_cli(qat_args(fp32, out, "--steps", "3"), capsys)
    assert "holds a different run" in one_error_line(err) and code == 1
    assert not (out / PARAMS_FILE).exists()


def test_qat_run_into_an_fp32_run_differing_only_by_qat_is_refused(
    fp32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    same = ["--steps", "1", "--lr", "0.002", "--batch-size", "16", "--resolution", "32"]
    out = tmp_path / "o"
    plain = ["train", "--model", "tiny", "--weights", str(fp32), "--dataset", "digits", "--quiet", *same]
    assert run_cli([*plain, "--out", str(out)], capsys)[0] == 0
    code, _, err = run_cli(qat_args(fp32, out, *same), capsys)
    assert code == 1 and "holds a different run" in err


# --- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["none", "auto"])
def test_qat_without_a_trained_checkpoint_is_a_one_line_error(
    weights: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = qat_args(Path(weights), tmp_path / "o", "--steps", "3")
    code, _, err = run_cli(args, capsys)
    assert code == 1 and "--weights CHECKPOINT" in one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_qat_on_a_dataset_with_other_classes_is_a_one_line_error(
    fp32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "ds"
    for c, name in enumerate(("a", "b", "c")):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (12, 12), (80 * c, 20 * i, 10)).save(root / name / f"{i}.png")
    args = qat_args(fp32, tmp_path / "o", "--steps", "1")
    args[args.index("digits")] = str(root)
    code, _, err = run_cli(args, capsys)
    line = one_error_line(err)
    assert code == 1 and "trained on other classes" in line and "pass the dataset that model was fine-tuned on" in line
    assert not (tmp_path / "o" / "checkpoint.pt").exists()
