"""The ``iotauth`` command: mounts every package's sub-commands (docs/ARCHITECTURE.md, "CLI names").

Packages own their commands; this module only composes them and is the last line of defence
against a traceback reaching a user.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer
from typer.core import TyperGroup

from broker.cli import broker_app
from device_agent.cli import agent_app, fleet_app, set_fleet_backend
from hardware.cli import hw_app
from iotauth import __version__
from iotauth.mqtt_cli import mqtt_app
from provisioning.cli import ca_app, device_app, ledger_app, service_app
from provisioning.station_cli import hw_reset_command, provision_command

if TYPE_CHECKING:
    from device_agent.fleet import FleetBackend

__all__ = ["app", "main", "root_command"]

app = typer.Typer(
    name="iotauth",
    help="Trusted identities for IoT devices: fleet PKI, provisioning, broker, agent.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(ca_app, name="ca")
app.add_typer(device_app, name="device")
app.add_typer(service_app, name="service")
app.add_typer(ledger_app, name="ledger")
app.command("provision")(provision_command)
# `hw reset` needs the registry, which hardware/ may not import: attached here.
hw_app.command("reset")(hw_reset_command)
app.add_typer(hw_app, name="hw")
app.add_typer(broker_app, name="broker")
app.add_typer(agent_app, name="agent")
app.add_typer(fleet_app, name="fleet")
app.add_typer(mqtt_app, name="mqtt")


def _fleet_backend(
    pki: Path | None,
    broker: str | None,
    workdir: Path,
    *,
    into_pki: bool,
    names: Sequence[str],
    warn: Callable[[str], None],
) -> FleetBackend:
    # device_agent may not import the PKI or the broker; the composition root hands them over.
    from iotauth.fleet_backend import simulation_backend

    return simulation_backend(pki, broker, workdir, into_pki=into_pki, names=names, warn=warn)


set_fleet_backend(_fleet_backend)


def _version(value: bool) -> None:
    if value:
        print(f"iotauth {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Trusted identities for IoT devices."""


@app.command()
def demo(
    devices: Annotated[int, typer.Option("--devices", min=2, max=64, help="Virtual devices.")] = 4,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the work directory.")] = False,
    workdir: Annotated[
        Path | None, typer.Option("--workdir", help="Use this work directory (kept).")
    ] = None,
    broker_port: Annotated[
        int, typer.Option("--broker-port", help="Broker port (default: any free one).")
    ] = 0,
) -> None:
    """The whole system end to end: PKI, broker, provisioning, agents, isolation, revocation."""
    from iotauth.demo import run_demo

    code = run_demo(devices=devices, workdir=workdir, keep=keep, broker_port=broker_port)
    if code:
        raise typer.Exit(code)


_METAVARS = {"str": "TEXT", "path": "PATH", "int": "INTEGER", "float": "NUMBER"}


def _plain(command: object) -> None:
    """Plain click help and placeholders with names, on every command below ``command``.

    Typer's rich help draws boxes that cut option names at 80 columns, labels flags ``<bool>``
    and placeholders ``<list[str]>``; click's plain help wraps at any width. Explicit metavars
    (``HOST:PORT``) are kept.
    """
    if hasattr(command, "rich_markup_mode"):
        command.rich_markup_mode = None
    ctx = typer.Context(command)  # type: ignore[arg-type]  # a click Command, as typer made it
    for param in getattr(command, "params", []):
        if param.metavar is not None or getattr(param, "is_flag", False):
            continue
        if param.param_type_name == "argument":
            param.metavar = param.name.upper()  # 'DEVICE_ID' in usage lines and errors
            continue
        label = param.display_type(ctx).strip("<>").removeprefix("list[").removesuffix("]")
        label = label.removesuffix(" range")
        param.metavar = f"[{label}]" if "|" in label else _METAVARS.get(label, label.upper())
    for sub in getattr(command, "commands", {}).values():
        _plain(sub)


def _command_path(command: object, args: list[str]) -> str:
    """``iotauth ca init`` for ``['ca', 'init', '--bogus']``: the sub-commands named in ``args``."""
    path = ["iotauth"]
    for arg in args:
        sub = getattr(command, "commands", {}).get(arg)
        if sub is None:
            break
        path.append(arg)
        command = sub
    return " ".join(path)


def _usage_error(exc: typer.TyperException, command: object) -> int:
    """A usage error as one line: what is wrong, and where the help is."""
    ctx = getattr(exc, "ctx", None)
    if ctx is not None and exc.format_message() == ctx.get_help():
        print(exc.format_message(), file=sys.stderr)  # a bare group (`iotauth ca`): its help
        return exc.exit_code
    message = " ".join(exc.format_message().split()).rstrip(".")
    # Some errors come from the option parser before a context exists: find the command by name.
    where = ctx.command_path if ctx is not None else _command_path(command, sys.argv[1:])
    print(f"error: {message}; see '{where} --help'", file=sys.stderr)
    return exc.exit_code


def root_command() -> TyperGroup:
    """The ``iotauth`` command tree as :func:`main` runs it (plain help, named placeholders)."""
    command = typer.main.get_command(app)
    _plain(command)
    return cast("TyperGroup", command)  # the root Typer has sub-commands: a group


def main() -> None:
    command = root_command()
    try:
        # standalone_mode=False: usage errors come here as exceptions, to be printed as one line.
        code = command.main(prog_name="iotauth", standalone_mode=False)
    except typer.TyperException as exc:
        sys.exit(_usage_error(exc, command))
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # a bug, not bad input: still one line for the user
        if os.environ.get("IOTAUTH_DEBUG"):
            raise
        print(
            f"internal error: {type(exc).__name__}: {exc} (set IOTAUTH_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        sys.exit(70)
    sys.exit(code if isinstance(code, int) else 0)
