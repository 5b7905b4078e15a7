"""`bitdeploy verify`: run a bundle's self-test on this device (torch-free)."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

import click

from bitdeploy.cli import groups, groups_run
from bitdeploy.core.options import RuntimeArgs


@click.command("verify")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="BUNDLE...")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the result, the device fingerprint and the build host's as one JSON object (a list for several).",
)
@click.option(
    "--record",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="Append the result to the JSON log FILE (a list; created if missing). The bundle is never modified.",
)
@click.option(
    "--emulate",
    default=None,
    metavar="CPU[,CPU...]",
    help="Run the self-test on each emulated CPU model instead of this one (`bitdeploy devices` lists them; "
    "`bitdeploy devices setup` prepares them). Emulation checks numerics, not speed.",
)
@groups.option(groups.KIT_DIR)
@groups.option(groups.NO_VERIFY)
@groups.takes(groups_run.RUNTIME)
def verify(
    bundles: tuple[Path, ...],
    as_json: bool,
    record: Path | None,
    emulate: str | None,
    kit_dir: Path | None,
    no_verify: bool,
    runtime: RuntimeArgs,
) -> None:
    """Check that each BUNDLE computes on this device (or on emulated CPUs) what it computed when it was built.

    Runs the golden set the build stored in the bundle (validation inputs, their FP32 reference logits and
    labels) and applies the bundle's criteria: top-1 agreement with FP32 and max relative logit error. Prints
    the figures and this device's fingerprint beside the build host's. Exits 1, with one line saying what
    failed, when the device does not meet them. With --emulate the same runtime code runs the self-test under
    QEMU as each named CPU (an ARM board, a lower x86 class) and prints what that CPU computed.

    \b
    Examples:
      bitdeploy verify runs/digits/onnx-int8
      bitdeploy verify model.bitpack --json --record device-checks.json
      bitdeploy verify runs/digits/openvino-fp32 --emulate cortex-a76,neoverse-n1
    """
    from bitdeploy.core.errors import BitdeployError

    if emulate is not None:
        if runtime.backend or runtime.device or no_verify:
            raise BitdeployError("--emulate runs the bundle as built; drop --backend, --device and --no-verify")
        _verify_emulated(list(bundles), emulate, kit_dir, runtime.threads, as_json, record)
        return
    reports = []
    for bundle in bundles:
        try:
            report = _check(bundle, runtime, no_verify)
        except BitdeployError as exc:
            if len(bundles) == 1:
                raise
            report = {"bundle": str(bundle), "passed": False, "error": str(exc)}
        if record is not None:  # as each one finishes: a device that dies midway keeps the earlier ones
            _append_record(record, report)
        reports.append(report)
    if as_json:
        click.echo(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    else:
        for report in reports:
            _print_report(report, several=len(reports) > 1)
        if record is not None:
            click.echo(f"recorded in {record}")
    failed = [r for r in reports if not r["passed"]]
    if len(reports) == 1 and failed:
        from bitdeploy.runtimes.bundle.fingerprint import device_class

        here, built = failed[0]["fingerprint"], failed[0]["validated_on"]
        raise BitdeployError(
            f"self-test failed on {device_class(here)}: {'; '.join(failed[0]['self_test']['failures'])}; this "
            f"bundle's numerics do not hold here: rebuild it on this device class (built on {device_class(built)})"
        )
    if failed:
        why = failed[0].get("error") or "; ".join(failed[0]["self_test"]["failures"])
        raise BitdeployError(
            f"{len(failed)} of {len(reports)} bundles failed their self-test: {failed[0]['bundle']}: {why}"
        )


def _check(bundle: Path, runtime: RuntimeArgs, no_verify: bool) -> dict[str, Any]:
    """Run one bundle's self-test here: the report `verify --json` prints."""
    from bitdeploy.runtimes import load
    from bitdeploy.runtimes.bundle.fingerprint import device_class

    with load(
        bundle, backend=runtime.backend, device=runtime.device, threads=runtime.threads, verify=not no_verify
    ) as model:
        result = model.self_test()
        described = model.describe()
    here, built = described["device_fingerprint"], described.get("validated_on")
    return {
        "bundle": str(bundle),
        "checked": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "passed": result.passed,
        "self_test": result.as_dict(),
        "backend": described.get("backend") or model.backend_name,
        "device": described.get("device"),
        "precision": described.get("precision"),
        "precision_used": described.get("precision_used"),
        "device_class": device_class(here),
        "validated_on_class": device_class(built) if built else None,
        "fingerprint": here,
        "validated_on": built,
    }


def _print_report(report: dict[str, Any], several: bool) -> None:
    from bitdeploy.runtimes.bundle.fingerprint import summary

    if several:
        click.echo(f"bundle      {report['bundle']}")
    if report.get("error"):
        click.echo(f"self-test   FAIL: {report['error']}")
        return
    click.echo(f"self-test   {_line(report)}")
    click.echo(
        f"engine      {report['backend']} on {report['device']}, {report['precision']}"
        + (f" (runs {report['precision_used']})" if report["precision_used"] else "")
    )
    click.echo(f"this device {summary(report['fingerprint'])}")
    click.echo(f"built on    {summary(report['validated_on'])}")


def _line(report: dict[str, Any]) -> str:
    from bitdeploy.runtimes.bundle.selftest import SelfTestResult

    return SelfTestResult(**report["self_test"]).line()


def _verify_emulated(
    bundles: list[Path], names: str, kit: Path | None, threads: int | None, as_json: bool, record: Path | None
) -> None:
    import time

    from bitdeploy.core import devices
    from bitdeploy.core.errors import BundleError
    from bitdeploy.emulation import guest as emulation

    cpus = devices.find(names)
    missing = [b for b in bundles if not b.exists()]
    if missing:
        raise BundleError(f"{missing[0]}: no such bundle; pass a bundle directory or a .bitpack file")
    emulation.check_ready(cpus, kit)
    matrix: dict[str, list[dict[str, Any]]] = {}
    for cpu in cpus:  # one guest per CPU for every bundle: its imports take seconds
        click.echo(f"emulating {cpu.name} ({cpu.board}): {len(bundles)} self-test(s)…", err=True)
        started = time.perf_counter()
        matrix[cpu.name] = emulation.verify_on(cpu, bundles, kit, threads)
        click.echo(f"emulating {cpu.name}: done in {time.perf_counter() - started:.0f} s", err=True)
        if record is not None:
            for report in matrix[cpu.name]:
                _append_record(record, report)
        if not as_json:
            _print_emulated(cpu, matrix[cpu.name])
    if as_json:
        checks = [r for reports in matrix.values() for r in reports]
        click.echo(json.dumps({"note": devices.NOTE, "checks": checks}, indent=2))
    else:
        click.echo(f"note: {devices.NOTE}")
        if record is not None:
            click.echo(f"recorded in {record}")
    emulation.raise_if_failed(matrix)


def _print_emulated(cpu: Any, reports: list[dict[str, Any]]) -> None:
    from bitdeploy.runtimes.bundle.fingerprint import summary

    click.echo(f"{cpu.name}: {cpu.board}, emulated by QEMU -cpu {cpu.qemu_cpu}")
    dropped = reports[0]["emulated"].get("dropped_env") if reports else None
    if dropped:
        click.echo(f"  guest started without {', '.join(dropped)} (host settings that pin CPU kernels)")
    for r in reports:
        click.echo(f"  {r['bundle']}")
        if r.get("error"):
            click.echo(f"    FAIL: {r['error']}")
            continue
        click.echo(f"    {_line(r)}")
        used = f", computes {r['precision_used']}" if r.get("precision_used") else ""
        click.echo(f"    {r['backend']} on {r['device']}, {r['precision']}{used}")
        click.echo(f"    saw {summary(r['fingerprint'])}")


def _append_record(path: Path, report: dict[str, Any]) -> None:
    from bitdeploy.core.errors import BitdeployError
    from bitdeploy.core.fsutil import atomic_write
    from bitdeploy.core.resources import guarded

    entries: list[Any] = []
    if path.exists():
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BitdeployError(f"{path}: not a readable JSON log ({exc}); pass a new file to --record") from exc
        if not isinstance(entries, list):
            raise BitdeployError(f"{path}: not a bitdeploy verify log (a JSON list); pass a new file to --record")
    with guarded(path.absolute().parent, "pass --record FILE", "verify record"):
        atomic_write(path, json.dumps([*entries, report], indent=2) + "\n")
