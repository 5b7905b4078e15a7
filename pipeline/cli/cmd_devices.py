"""`bitdeploy devices`: the CPU models a bundle can be checked on without owning them, and their setup."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from bitdeploy.cli import groups

KIT_OPTION = groups.option(groups.KIT_DIR)


@click.group("devices", invoke_without_command=True)
@KIT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@click.pass_context
def devices(ctx: click.Context, kit_dir: Path | None, as_json: bool) -> None:
    """List the CPU models bundles can be verified on by emulation, the boards they stand for, and whether
    emulation is ready here.

    \b
    Examples:
      bitdeploy devices
      bitdeploy devices setup arm64
      bitdeploy verify runs/digits/onnx-int8 --emulate cortex-a72,neoverse-n1,sandybridge
    """
    if ctx.invoked_subcommand is not None:
        return
    from bitdeploy.core.devices import CPUS, NOTE
    from bitdeploy.emulation.kit import ARCHES, kit_root, readiness

    root = kit_root(kit_dir)
    ready = {arch: readiness(arch, root) for arch in ARCHES}
    rows: list[dict[str, Any]] = [
        {
            "cpu": c.name,
            "arch": c.arch,
            "board": c.board,
            "features": list(c.features),
            "qemu_cpu": c.qemu_cpu,
            "ready": ready[c.arch][1] is None,
        }
        for c in CPUS
    ]
    if as_json:
        missing = {arch: why for arch, (_, why) in ready.items() if why}
        click.echo(json.dumps({"kit": str(root), "cpus": rows, "missing": missing, "note": NOTE}, indent=2))
        return
    widths = [max(len(str(r[k])) for r in rows) for k in ("cpu", "arch", "board")]
    click.echo(f"{'cpu':<{widths[0]}}  {'arch':<{widths[1]}}  {'stands for':<{widths[2]}}  ready  ISA features")
    for r in rows:
        click.echo(
            f"{r['cpu']:<{widths[0]}}  {r['arch']:<{widths[1]}}  {r['board']:<{widths[2]}}  "
            f"{'yes' if r['ready'] else 'no':<5}  {' '.join(r['features'])}"
        )
    click.echo(f"kit: {root}")
    for arch, (qemu, why) in ready.items():
        click.echo(f"{arch}: {qemu.label() + ' ' + qemu.path if qemu else 'no QEMU'}; {why or 'ready'}")
    click.echo(f"note: {NOTE}")


@devices.command("setup")
@click.argument("arch", type=click.Choice(["arm64", "x86_64"]))
@click.option(
    "--engines",
    default=None,
    metavar="NAME[,NAME...]",
    help="arm64: the engines' aarch64 wheels to install (default: onnxruntime,openvino,ai-edge-litert).",
)
@KIT_OPTION
def setup(arch: str, engines: str | None, kit_dir: Path | None) -> None:
    """Prepare emulation of ARCH once: find QEMU (>= 8.1 for arm64), extract an arm64 Debian sysroot with
    Python (mmdebstrap) and install the aarch64 wheels of the runtime and each engine into the kit.
    Afterwards verifying on emulated CPUs needs no network."""
    from bitdeploy.emulation.kit import kit_root
    from bitdeploy.emulation.kit import setup as prepare

    root = kit_root(kit_dir)
    picked = [e.strip() for e in engines.split(",") if e.strip()] if engines else None
    kit = prepare(arch, root, picked)
    click.echo(f"{arch} emulation ready in {root / arch}: QEMU {'.'.join(map(str, kit['qemu_version']))} {kit['qemu']}")
    if kit.get("wheels"):
        click.echo(f"aarch64 wheels (Python {kit['python']}): {' '.join(kit['wheels'])}")
