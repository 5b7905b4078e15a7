"""The `bitdeploy` command line. Commands live in small modules imported only when they run."""

from __future__ import annotations

import importlib
import sys
import traceback
from typing import Any

import click

from bitdeploy import __version__
from bitdeploy.core import interrupts
from bitdeploy.core.devices import exit_if_below_floor
from bitdeploy.core.errors import BitdeployError
from bitdeploy.core.interrupts import Terminated
from bitdeploy.core.resources import resource_error

# command name -> "module:attribute"; each module imports its heavy dependencies inside the command body.
COMMANDS: dict[str, str] = {
    "models": "bitdeploy.cli.cmd_models:models",
    "export": "bitdeploy.cli.cmd_export:export",
    "train": "bitdeploy.cli.cmd_train:train",
    "build": "bitdeploy.cli.cmd_build:build",
    "predict": "bitdeploy.cli.cmd_runtime:predict",
    "inspect": "bitdeploy.cli.cmd_runtime:inspect",
    "verify": "bitdeploy.cli.cmd_verify:verify",
    "pack": "bitdeploy.cli.cmd_runtime:pack",
    "serve": "bitdeploy.cli.cmd_runtime:serve",
    "engine": "bitdeploy.cli.cmd_engine:engine",
    "export-repo": "bitdeploy.cli.cmd_export_repo:export_repo",
    "bench": "bitdeploy.cli.cmd_bench:bench",
    "report": "bitdeploy.cli.cmd_bench:report",
    "select": "bitdeploy.cli.cmd_select:select",
    "cache": "bitdeploy.cli.cmd_cache:cache",
    "devices": "bitdeploy.cli.cmd_devices:devices",
}


class LazyGroup(click.Group):
    """click's documented lazy-loading group: a subcommand's module is imported only when it is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        command: click.Command = getattr(importlib.import_module(module), attr)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="bitdeploy")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Fine-tune BiT image classifiers and deploy them to TensorRT, OpenVINO, ONNX Runtime and LiteRT.

    \b
    Quickstart (offline, on the built-in digits dataset):
      bitdeploy build --model m-r50x1 --weights none --dataset digits --resolution 32
          --steps 1000 --batch-size 64 --lr 0.01 --no-hflip --target all --select fastest --out runs/digits
      bitdeploy predict runs/digits/onnx-int8 image.png
    """
    ctx.obj = {"debug": debug}


def main(argv: list[str] | None = None) -> Any:
    exit_if_below_floor()  # before anything imports numpy: one line, not an Illegal instruction
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    with interrupts.handled():
        return _run(argv, debug)


def _run(argv: list[str] | None, debug: bool) -> Any:
    try:
        rv = cli.main(args=argv, prog_name="bitdeploy", standalone_mode=False)
        # Without standalone mode click returns ctx.exit(n)'s code instead of exiting with it.
        if isinstance(rv, int) and rv:
            sys.exit(rv)
        swallowed = interrupts.pending()  # a Ctrl-C raised inside a finalizer is dropped by Python: never by us
        if swallowed is not None:
            raise click.exceptions.Abort() from swallowed()
        return rv
    except click.exceptions.Abort as exc:  # click turns Ctrl-C (and SIGTERM, above) into Abort
        interrupts.clear()
        terminated = isinstance(exc.__cause__, Terminated)
        click.echo("Terminated." if terminated else "Aborted.", err=True)
        sys.exit(143 if terminated else 130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors: exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except BitdeployError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except Terminated:
        interrupts.clear()
        click.echo("Terminated.", err=True)
        sys.exit(143)
    except KeyboardInterrupt:
        interrupts.clear()
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug, not a user error: still one line unless --debug
        if debug:
            traceback.print_exc()
        fault = resource_error(exc, None, "free space, or write to another disk", "output")
        if fault is not None:  # a fault no command anticipated: still the directory and a fix
            click.echo(f"error: {fault}", err=True)
            sys.exit(1)
        first = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(
            f"error: unexpected {type(exc).__name__}: {first} (rerun with --debug for the traceback and report it)",
            err=True,
        )
        sys.exit(1)
