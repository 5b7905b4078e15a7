"""Argument groups: each shared flag is declared here once, and each group's flags parse into one frozen record.

A command lists the groups it takes with `@takes(GROUP, ...)`; its callback then receives one record per group,
named by the group, after the record's `validate()`, instead of the group's flags. Polygraphy's argument groups
are the model. The groups themselves are in `groups_build` (build, select) and `groups_run` (train, bench, serve,
predict, verify); their records live in `bitdeploy.core.options` (and `bitdeploy.runtimes.serving.serve_options`), so the
build and the runtime read them without importing the CLI. A target's own build flags stay with its record
(`bitdeploy.cli.cmd_build.target_params`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from bitdeploy.core.errors import UsageError

Flag = tuple[tuple[str, ...], dict[str, Any]]


def flag(*decls: str, **attrs: Any) -> Flag:
    """A click option's declarations and attributes, to be added by a group or `option`."""
    return decls, attrs


def varied(base: Flag, **attrs: Any) -> Flag:
    """The same flag with some attributes changed for one command (its help, `required`)."""
    return base[0], {**base[1], **attrs}


def option(base: Flag) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A shared flag that a command takes on its own, outside any group."""
    return click.option(*base[0], **base[1])


def record_of(cls: Callable[..., Any], **renamed: str) -> Callable[..., Any]:
    """A group's `make`: the record `cls` from flags named as its fields, except those in `renamed` (flag name ->
    field; a field written "not:NAME" takes the flag's negation, for --no-X flags)."""

    def make(**values: Any) -> Any:
        for name, target in renamed.items():
            value = values.pop(name)
            field, negate = (target[4:], True) if target.startswith("not:") else (target, False)
            values[field] = not value if negate else value
        return cls(**values)

    return make


@dataclass(frozen=True)
class Group:
    """`param`: the callback's parameter the record fills; `flags`: in help order; `make`: the record, from the
    parsed flags by their click parameter names."""

    param: str
    flags: tuple[Flag, ...]
    make: Callable[..., Any]

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(click.Option(list(decls), **attrs).name or "" for decls, attrs in self.flags)


def takes(*groups: Group) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add each group's flags to the command, and hand the callback one validated record per group."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def callback(*args: Any, **kwargs: Any) -> Any:
            for group in groups:
                record = group.make(**{name: kwargs.pop(name) for name in group.names})
                try:
                    record.validate()
                except UsageError as exc:
                    raise click.UsageError(str(exc)) from None
                kwargs[group.param] = record
            return fn(*args, **kwargs)

        out: Callable[..., Any] = callback
        for group in reversed(groups):
            for decls, attrs in reversed(group.flags):
                out = click.option(*decls, **attrs)(out)
        return out

    return decorate


# -- flags that several commands or groups take ------------------------------------------------------------------
MODEL = flag("--model", "model_name", required=True, help="Model name (see `bitdeploy models`), e.g. m-r50x1.")
OPSET = flag("--opset", type=click.IntRange(13, 20), default=17, show_default=True, help="ONNX opset of the export.")
CACHE_DIR = flag(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Stage cache [default: $BITDEPLOY_CACHE/stages or ~/.cache/bitdeploy/stages].",
)
KIT_DIR = flag(
    "--kit-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The emulation kit (default: $BITDEPLOY_KIT, else ~/.cache/bitdeploy/emulation).",
)
MAX_BATCH = flag(
    "--max-batch",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Most images per engine call; requests that arrive together are batched.",
)
MAX_DELAY_MS = flag(
    "--max-delay-ms",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Longest a request waits for others to join its batch (only while other requests are in flight).",
)
WEIGHTS = flag(
    "--weights",
    default="auto",
    show_default=True,
    help="auto (official, cached) | none (random init) | PATH (.npz, checkpoint.pt or training dir).",
)
SEED = flag(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of every random draw: data order, splits, few-shot and calibration draws, evaluation subsets, "
    "augmentation, random inputs and init.",
)
DATASET = flag(
    "--dataset",
    default=None,
    help="digits | ImageFolder DIR (DIR/<class>/*, or DIR/train + DIR/val) | CIFAR-10/100 binary tarball or folder.",
)
VAL_SPLIT = flag(
    "--val-split",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Validation fraction for datasets without their own split [0.2].",
)
THREADS = flag(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Inference threads per engine call [default: the engine's own choice].",
)
QUIET_CHECK = flag(
    "--quiet-check",
    type=click.Choice(["warn", "wait", "fail"]),
    default="warn",
    show_default=True,
    help="A busy machine during timing: warn (mark the rows disturbed), wait (for a quiet machine first, up to a "
    "limit), fail (exit 1, write nothing).",
)
NO_VERIFY = flag(
    "--no-verify",
    is_flag=True,
    help="Skip the sha256 check of the bundle's files at load (debugging only: a modified model then loads).",
)
SHOTS = flag(
    "--shots", type=click.IntRange(min=1), default=None, help="Few-shot: K seeded training examples per class."
)
STEPS = flag(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Fine-tuning steps [rule: 500 / 10k / 20k by dataset size]; warmup and decays keep their fractions.",
)
BATCH_SIZE = flag(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Fine-tuning global batch, split across processes [rule: 512].",
)
LR = flag("--lr", type=float, default=None, help="Peak learning rate, used as is [rule: 0.003 x batch/512].")
HFLIP = flag(
    "--hflip/--no-hflip",
    default=True,
    show_default=True,
    help="Random horizontal flips while fine-tuning [rule: on]; turn off for digits, text and other chiral images.",
)
