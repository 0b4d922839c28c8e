"""The ``iotauth`` command: mounts every package's sub-commands (DESIGN.md, "Minimal CLI surface").

Packages own their commands; this module only composes them and is the last line of defence
against a traceback reaching a user.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from broker.cli import broker_app
from device_agent.cli import agent_app, fleet_app, set_fleet_backend
from hardware.cli import hw_app
from iotauth import __version__
from iotauth.mqtt_cli import mqtt_app
from provisioning.cli import ca_app, device_app, ledger_app, service_app
from provisioning.station_cli import hw_reset_command, provision_command

__all__ = ["app", "main"]

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


def _fleet_backend(pki: Path, broker: str | None, workdir: Path) -> object:
    # device_agent may not import the PKI or the broker; the composition root hands them over.
    from iotauth.fleet_backend import LocalFleetBackend

    return LocalFleetBackend(pki, broker=broker, workdir=workdir)


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


def main() -> None:
    try:
        app()
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
