"""A build's fast checks, before anything heavy: the options across groups (each group checked its own), the
target records, the rows it will build and why any is skipped."""

from __future__ import annotations

from pathlib import Path

from bitdeploy.builder import verify_on as build_verify_on
from bitdeploy.builder.context import BuildOptions
from bitdeploy.core.errors import BitdeployError
from bitdeploy.core.targets import Target, check_available, get_target, plan_rows, unavailable_reason


def check_options(opts: BuildOptions) -> list[tuple[Target, str, str | None]]:
    """Fast checks before anything heavy: returns the rows with a skip reason (None = build it)."""
    rows = plan_rows(opts.engine.target, opts.engine.precisions)
    opts.validate()
    from bitdeploy.core.catalog import get_variant

    get_variant(opts.model)
    single = opts.engine.target != "all"
    if single:
        for t, p in rows:
            check_available(t, p)  # e.g. TensorRT without a GPU: exit 1 here, before any export
        if any(p == "int8" for _, p in rows) and opts.dataset is None:
            raise BitdeployError(
                "--precision int8 needs --dataset to calibrate on (INT8 is never calibrated on random data); pass --dataset digits, an ImageFolder or a CIFAR folder"
            )
        t = rows[0][0]
        if opts.calibration.calib_method and opts.calibration.calib_method not in t.calib_methods:
            raise BitdeployError(
                f"--calib-method {opts.calibration.calib_method!r} is not available for {t.title}; choose one of: {', '.join(t.calib_methods)}"
            )
    if opts.gate.min_agreement is not None and opts.dataset is None:
        raise BitdeployError(
            "--min-agreement gates on the labelled validation split; pass --dataset (without one, bundles are compared on random inputs)"
        )
    _check_target_options(opts, rows, single)
    if opts.selection.select and single and len(rows) < 2 and not opts.cell:
        raise BitdeployError(
            f"--select {opts.selection.select} picks among several bundles; use --target all, several targets or several --precision values"
        )
    build_verify_on.check(opts.gate.verify_on)  # no QEMU or kit: one line now, not after the build
    if len(rows) > 1 and (Path(opts.out) / "manifest.json").is_file():
        raise BitdeployError(f"{opts.out} is a bundle; a build of several bundles needs a new or empty --out directory")
    out = []
    for t, p in rows:
        reason = unavailable_reason(t, p, short=True)
        if reason is None and p == "int8" and opts.dataset is None:
            reason = "int8 needs --dataset for calibration"
        out.append((t, p, reason))
    return out


def _check_target_options(opts: BuildOptions, rows: list[tuple[Target, str]], single: bool) -> None:
    """Each target's own options: a flag given for rows this build does not make is refused (for one target),
    then the target's validate hook sees its rows' precisions."""
    for name in dict.fromkeys([*(t.name for t, _ in rows), *opts.target_options]):
        target = get_target(name)
        own = opts.options_for(target)
        if own is None:
            continue
        precisions = [p for t, p in rows if t.name == name]
        if single:
            for _, flag, value in own.given():
                if not set(precisions) & set(flag.precisions):
                    given = flag.flag if isinstance(value, bool) else f"{flag.flag} {value}"
                    raise BitdeployError(
                        f"{given} applies to --target {name} --precision {' or '.join(flag.precisions)}"
                    )
        if precisions:
            own.validate(precisions, opts.dataset)
