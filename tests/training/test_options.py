"""The training options are one record: both commands' groups parse into it, `TrainConfig` extends it and is made from
it by field name, and the fine-tune's stage-cache key is derived from it (torch-free)."""

from __future__ import annotations

import dataclasses
import inspect
import shlex

import click
import pytest

from bitdeploy.cli import groups_build, groups_run
from bitdeploy.cli.cmd_build import build
from bitdeploy.cli.cmd_train import train
from bitdeploy.core.options import TrainingArgs, TrainingOptions
from bitdeploy.training.planner import TrainConfig

# The keys of the fine-tune's stage cache before the records were one: a cached fine-tune stays valid only if they stay.
PRE_RECORD_KEYS = {"model", "shots", "steps", "batch_size", "lr", "resolution", "seed", "val_split", "hflip"}


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _own(cls: type) -> set[str]:
    """The fields a dataclass declares itself (not those it inherits)."""
    return set(inspect.get_annotations(cls))


def _parse(command: click.Command, args: str) -> dict[str, object]:
    """The command's parameters as its callback would get them (before the groups make their records)."""
    return command.make_context(command.name or "", shlex.split(args)).params


def test_each_training_option_is_declared_once() -> None:
    assert _own(TrainingArgs) == {"finetune"}  # the build's decision, not an option of the training
    # TrainConfig adds the run's own fields; it redeclares only the dataset, which it requires
    assert _own(TrainConfig) & _names(TrainingOptions) == {"dataset"}
    assert _names(TrainConfig) == _names(TrainingOptions) | {
        "model",
        "out",
        "weights",
        "resolution",
        "seed",
        "cache_mb",
        "log_every",
        "qat",  # `bitdeploy train --qat`; a build fine-tunes with quantization through --int8-fallback
        "qat_task_weight",
    }
    assert issubclass(TrainingArgs, TrainingOptions) and issubclass(TrainConfig, TrainingOptions)
    with pytest.raises(TypeError, match="dataset"):
        TrainConfig(model="tiny")  # type: ignore[call-arg]


def test_both_commands_groups_parse_into_the_record() -> None:
    build_params = _parse(build, "--model tiny --dataset digits --steps 3 --no-hflip --train-device cpu")
    built = groups_build.TRAINING.make(**{n: build_params[n] for n in groups_build.TRAINING.names})
    assert type(built) is TrainingArgs
    assert (built.dataset, built.steps, built.hflip, built.device) == ("digits", 3, False, "cpu")

    train_params = _parse(train, "--model tiny --dataset digits --steps 3 --no-hflip --device cpu --quiet --mixup 0.2")
    trained = groups_run.TRAINING.make(**{n: train_params[n] for n in groups_run.TRAINING.names})
    assert type(trained) is TrainingOptions
    assert (trained.steps, trained.hflip, trained.device, trained.mixup, trained.progress) == (
        3,
        False,
        "cpu",
        0.2,
        False,
    )
    trained.validate()  # the command's own --dataset is not in its group: no "needs --dataset" here

    # every group flag reaches a field of the record (renamed ones by record_of)
    assert set(groups_run.TRAINING.names) - {"quiet"} <= _names(TrainingOptions)
    assert set(groups_build.TRAINING.names) - {"train_device"} <= _names(TrainingArgs)
    params = inspect.signature(train.callback).parameters  # type: ignore[arg-type]
    assert params["training"].annotation in (TrainingOptions, "TrainingOptions")


def test_train_config_is_made_by_field_name() -> None:
    record = TrainingArgs(dataset="digits", shots=2, steps=5, batch_size=8, lr=0.01, hflip=False, device="cpu")
    config = TrainConfig.of(record, model="tiny", weights="none", resolution=32, seed=3)
    for f in dataclasses.fields(TrainingOptions):
        assert getattr(config, f.name) == getattr(record, f.name), f.name
    assert (config.model, config.weights, config.resolution, config.seed, config.out) == ("tiny", "none", 32, 3, None)
    assert not hasattr(config, "finetune")  # the build's own field stays behind
    assert TrainConfig.of(record, model="tiny", dataset="other").dataset == "other"  # the run's fields win
    assert config.workers >= 1 and TrainConfig.of(record, model="tiny", num_workers=2).workers == 2
    with pytest.raises(TypeError):
        TrainConfig.of(record, model="tiny", no_such_field=1)


def test_the_fine_tune_cache_key_keeps_its_keys_and_values() -> None:
    record = TrainingArgs(dataset="digits", val_split=0.3, shots=2, steps=5, batch_size=8, lr=0.01, hflip=False)
    config = TrainConfig.of(record, model="tiny", weights="none", resolution=32, seed=3, device="cpu", num_workers=1)
    assert config.cache_key() == {
        "model": "tiny",
        "shots": 2,
        "steps": 5,
        "batch_size": 8,
        "lr": 0.01,
        "resolution": 32,
        "seed": 3,
        "val_split": 0.3,
        "hflip": False,
    }
    defaults = TrainConfig(model="m-r50x1", dataset="digits")
    assert set(defaults.cache_key()) == PRE_RECORD_KEYS
    # How the run executes does not change the weights; the weights and the dataset are keyed by content.
    runs = dataclasses.replace(defaults, device="cpu", checkpoint_every=7, eval_every=3, progress=False, batch_split=2)
    assert runs.cache_key() == defaults.cache_key()
    # Options no build could set before are keyed once set (so a fine-tune with them is not a cache hit).
    mixed = dataclasses.replace(defaults, mixup=0.2, precision="bf16").cache_key()
    assert mixed == {**defaults.cache_key(), "mixup": 0.2, "precision": "bf16"}
