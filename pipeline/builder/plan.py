"""The build's plan: every option checked before anything heavy, then one frozen `RowPlan` per (target, precision)
that everything downstream takes. A row's target record, precision, the target's own options and what its
converter is told are decided here, once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from bitdeploy.builder.options import BuildOptions
from bitdeploy.converters.base import Converter, ConvertOptions, RowInputs, TargetOptions, bind
from bitdeploy.core.devices import find as find_cpus
from bitdeploy.core.errors import BitdeployError
from bitdeploy.core.options import DEFAULT_MAX_DROP_PP
from bitdeploy.core.targets import (
    Asked,
    Target,
    check_available,
    deferred_reason,
    get_target,
    plan_rows,
    unavailable_reason,
)

if TYPE_CHECKING:
    from bitdeploy.converters.calibration import ValidationData


@dataclass(frozen=True)
class RowPlan:
    """One (target, precision) of a build, as planned: what to build, with which options, or why not."""

    target: Target
    precision: str
    own: TargetOptions | None  # the target's own options (its defaults when none were given)
    convert: ConvertOptions  # what the converter is told: the shared options and `own` bound to this row
    skip: str | None = None  # why it is not built here (None: build it)
    deferred: str | None = None  # why its last step (a TensorRT engine) is left to the device: a ready bundle
    cell: str | None = None  # a grid's (model, resolution) cell
    model: str = ""
    resolution: int | None = None  # as asked (None: the checkpoint's or the default)

    @property
    def bundle_name(self) -> str:
        return f"{self.target.name}-{self.precision}"

    @property
    def name(self) -> str:
        return f"{self.cell}/{self.bundle_name}" if self.cell else self.bundle_name

    def converter(self) -> Converter:
        return bind(self.target, self.precision, self.convert)


def plan_build(opts: BuildOptions) -> list[RowPlan]:
    """Fast checks before anything heavy (one line and exit 1 on a bad combination); then the rows, in table
    order, each with its skip reason."""
    rows = plan_rows(opts.engine.target, opts.engine.precisions)
    opts.validate()
    from bitdeploy.core.catalog import get_variant

    get_variant(opts.model)
    single = opts.engine.target != "all"
    if single:
        _check_single(opts, rows)
    if opts.gate.min_agreement is not None and opts.dataset is None:
        raise BitdeployError(
            "--min-agreement gates on the labelled validation split; pass --dataset (without one, bundles are compared on random inputs)"
        )
    own = {
        name: opts.options_for(get_target(name))
        for name in dict.fromkeys([*(t.name for t, _ in rows), *opts.target_options])
    }
    _check_target_options(own, rows, single, opts.dataset)
    if opts.selection.select and single and len(rows) < 2 and not opts.cell:
        raise BitdeployError(
            f"--select {opts.selection.select} picks among several bundles; use --target all, several targets or several --precision values"
        )
    if opts.gate.verify_on:  # no QEMU or kit: one line now, not after the build
        from bitdeploy.emulation.guest import check_ready

        check_ready(find_cpus(opts.gate.verify_on))
    if len(rows) > 1 and (Path(opts.out) / "manifest.json").is_file():
        raise BitdeployError(f"{opts.out} is a bundle; a build of several bundles needs a new or empty --out directory")
    plans = []
    for t, p in rows:
        deferred = deferred_reason(t, p)
        reason = None if deferred else unavailable_reason(t, p, short=True)
        if reason is None and p == "int8" and opts.dataset is None:
            reason = "int8 needs --dataset for calibration"
        plan = RowPlan(
            t,
            p,
            own[t.name],
            ConvertOptions(),
            skip=reason,
            deferred=deferred,
            cell=opts.cell,
            model=opts.model,
            resolution=opts.resolution,
        )
        plans.append(_bind(plan, opts, None))
    return plans


def with_validation(plans: Sequence[RowPlan], opts: BuildOptions, validation: ValidationData | None) -> list[RowPlan]:
    """The plans with the labelled validation split handed to the targets that asked for it."""
    return [_bind(p, opts, validation) if validation is not None else p for p in plans]


def sibling(plan: RowPlan, precision: str, opts: BuildOptions) -> RowPlan:
    """The same target's row at another precision (the INT8 search times the engine's FP32 beside its mixes)."""
    return _bind(
        replace(plan, precision=precision, skip=None, deferred=deferred_reason(plan.target, precision)), opts, None
    )


def wants_validation(plans: Sequence[RowPlan]) -> bool:
    """Some target's options ask for the labelled validation split (OpenVINO's accuracy control)."""
    built = [p for p in plans if p.skip is None]
    for name in dict.fromkeys(p.target.name for p in built):
        mine = [p for p in built if p.target.name == name]
        if mine[0].own is not None and mine[0].own.needs_validation([p.precision for p in mine]):
            return True
    return False


def _bind(plan: RowPlan, opts: BuildOptions, validation: ValidationData | None) -> RowPlan:
    """What the converter of the row is told: the shared options, and the target's own bound to the row."""
    arches = tuple(dict.fromkeys(c.arch for c in find_cpus(opts.gate.verify_on))) if opts.gate.verify_on else ()
    allowance = opts.gate.spec().drop_allowance  # None: agreement alone gates; accuracy control needs a drop
    drop = allowance if allowance is not None else DEFAULT_MAX_DROP_PP
    inputs = RowInputs(drop, validation, opts.dataset, arches)
    extras = plan.own.for_row(plan.precision, inputs) if plan.own is not None else None
    method = opts.calibration.calib_method if opts.calibration.calib_method in plan.target.calib_methods else None
    convert = ConvertOptions(
        device=opts.engine.device,
        threads=opts.engine.threads,
        calib_method=method,
        cache=opts.cache.enabled,
        cache_dir=opts.cache.dir,
        extras=extras,
        ready_only=plan.deferred is not None,
    )
    return replace(plan, convert=convert)


def _check_single(opts: BuildOptions, rows: list[Asked]) -> None:
    """A build of named targets: each row must be buildable here, INT8 needs data, the method must exist."""
    for t, p in rows:
        if deferred_reason(t, p) is None:  # a ready bundle's engine is built on the device (TensorRT without a GPU)
            check_available(t, p)  # e.g. LiteRT's converter not installed: exit 1 here, before any export
    if any(p == "int8" for _, p in rows) and opts.dataset is None:
        raise BitdeployError(
            "--precision int8 needs --dataset to calibrate on (INT8 is never calibrated on random data); pass --dataset digits, an ImageFolder or a CIFAR folder"
        )
    t = rows[0][0]
    if opts.calibration.calib_method and opts.calibration.calib_method not in t.calib_methods:
        raise BitdeployError(
            f"--calib-method {opts.calibration.calib_method!r} is not available for {t.title}; choose one of: {', '.join(t.calib_methods)}"
        )


def _check_target_options(
    own: dict[str, TargetOptions | None], rows: list[Asked], single: bool, dataset: str | None
) -> None:
    """Each target's own options: a flag given for rows this build does not make is refused (for one target),
    then the target's validate hook sees its rows' precisions."""
    for name, options in own.items():
        if options is None:
            continue
        precisions = [p for t, p in rows if t.name == name]
        if single:
            for _, flag, value in options.given():
                if not set(precisions) & set(flag.precisions):
                    given = flag.flag if isinstance(value, bool) else f"{flag.flag} {value}"
                    raise BitdeployError(
                        f"{given} applies to --target {name} --precision {' or '.join(flag.precisions)}"
                    )
        if precisions:
            options.validate(precisions, dataset)
