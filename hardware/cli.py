"""``iotauth hw``: the virtual device. Mounted by :mod:`iotauth.cli`.

``hw reset`` needs the registry and ledger, so it lives in ``provisioning`` and is attached to
this group by the composition root.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from hardware.emulator import FaultConfig, VirtualDevice, run_emulator
from hardware.errors import HardwareError

__all__ = ["hw_app"]

hw_app = typer.Typer(help="Serial hardware: virtual devices, factory reset.", no_args_is_help=True)


@hw_app.command("emulate")
def emulate(
    store: Annotated[
        Path, typer.Option("--store", help="Directory the device keeps its credentials in.")
    ],
    link: Annotated[
        str,
        typer.Option("--link", help="'pty' or socket://HOST:PORT (listens there; port 0 = any)."),
    ] = "pty",
    serial: Annotated[
        str | None,
        typer.Option("--serial", help="Hardware serial to report (default: from --store)."),
    ] = None,
    no_keygen: Annotated[
        bool, typer.Option("--no-keygen", help="Behave like a part that cannot generate keys.")
    ] = False,
    noise: Annotated[
        float,
        typer.Option(
            "--noise",
            min=0.0,
            max=0.05,
            help="Per-byte fault rate, split among flips/drops/garbage.",
        ),
    ] = 0.0,
    boot_log: Annotated[
        bool, typer.Option("--boot-log", help="Print a boot log at power-on.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the noise.")] = 0,
) -> None:
    """Run a virtual device until Ctrl-C; prints the serial path or URL a station should open."""
    if link != "pty" and not link.startswith("socket://"):
        typer.echo(f"error: --link must be 'pty' or socket://HOST:PORT, not {link!r}", err=True)
        raise typer.Exit(1)
    if link.startswith("socket://") and not link.startswith(
        ("socket://127.0.0.1:", "socket://localhost:")
    ):
        typer.echo("warning: the virtual device listens beyond this machine", err=True)
    third = noise / 3
    faults = FaultConfig(
        seed=seed, flip_rate=third, drop_rate=third, garbage_rate=third, boot_log=boot_log
    )

    def ready(device: VirtualDevice) -> None:
        mode = "key injection only" if no_keygen else "on-device key generation"
        print(f"virtual device {device.hardware_serial} ({mode}), store {store}", flush=True)
        print(f"station port: {device.address}", flush=True)
        print(f"  iotauth provision --pki ./pki --port {device.address}", flush=True)

    try:
        store.mkdir(parents=True, exist_ok=True)
        run_emulator(
            store,
            link,
            hardware_serial=serial,
            can_genkey=not no_keygen,
            faults=faults,
            on_ready=ready,
        )
    except (HardwareError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
