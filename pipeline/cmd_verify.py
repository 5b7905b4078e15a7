"""`bitdeploy verify`: run a bundle's self-test on this device (torch-free)."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

import click

from bitdeploy.cmd_runtime import BUNDLE_ARG, _engine_options


@click.command("verify")
@BUNDLE_ARG
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the result, the device fingerprint and the build host's as one JSON object.",
)
@click.option(
    "--record",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="Append the result to the JSON log FILE (a list; created if missing). The bundle is never modified.",
)
@_engine_options
def verify(
    bundle: Path,
    as_json: bool,
    record: Path | None,
    backend: str | None,
    device: str | None,
    threads: int | None,
    no_verify: bool,
) -> None:
    """Check that BUNDLE computes on this device what it computed when it was built.

    Runs the golden set the build stored in the bundle (validation inputs, their FP32 reference logits and
    labels) and applies the bundle's criteria: top-1 agreement with FP32 and max relative logit error. Prints
    the figures and this device's fingerprint beside the build host's. Exits 1, with one line saying what
    failed, when the device does not meet them.

    \b
    Examples:
      bitdeploy verify runs/digits/onnx-int8
      bitdeploy verify model.bitpack --json --record device-checks.json
    """
    from bitdeploy.errors import BitdeployError
    from bitdeploy.runtimes import load
    from bitdeploy.runtimes.fingerprint import device_class, summary

    with load(bundle, backend=backend, device=device, threads=threads, verify=not no_verify) as model:
        result = model.self_test()
        described = model.describe()
    here, built = described["device_fingerprint"], described.get("validated_on")
    report: dict[str, Any] = {
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
    if record is not None:
        _append_record(record, report)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"self-test   {result.line()}")
        click.echo(
            f"engine      {report['backend']} on {report['device']}, {report['precision']}"
            + (f" (runs {report['precision_used']})" if report["precision_used"] else "")
        )
        click.echo(f"this device {summary(here)}")
        click.echo(f"built on    {summary(built)}")
        if record is not None:
            click.echo(f"recorded in {record}")
    if not result.passed:
        raise BitdeployError(
            f"self-test failed on {device_class(here)}: {'; '.join(result.failures)}; this bundle's numerics do not hold here: "
            f"rebuild it on this device class (built on {device_class(built)})"
        )


def _append_record(path: Path, report: dict[str, Any]) -> None:
    from bitdeploy.errors import BitdeployError
    from bitdeploy.fsutil import atomic_write

    entries: list[Any] = []
    if path.exists():
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BitdeployError(f"{path}: not a readable JSON log ({exc}); pass a new file to --record") from exc
        if not isinstance(entries, list):
            raise BitdeployError(f"{path}: not a bitdeploy verify log (a JSON list); pass a new file to --record")
    atomic_write(path, json.dumps([*entries, report], indent=2) + "\n")
