"""``iotauth provision`` and ``iotauth hw reset``: the bench station's commands.

Mounted by :mod:`iotauth.cli`. Gang mode shows one progress line per port and ends with a table;
the exit status is 1 if any port failed.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from hardware import DeviceClient, HardwareError
from provisioning.cli import JsonOpt, PkiOpt, err, out, print_json, user_errors
from provisioning.errors import ProvisioningError
from provisioning.identity import validate_name
from provisioning.pki import PKI, passphrase_from_env
from provisioning.station import (
    DEFAULT_ID_TEMPLATE,
    INTERRUPTED,
    KeyMode,
    ProvisionResult,
    StationInterrupted,
    StationSettings,
    provision_many,
    validate_id_template,
)

__all__ = ["hw_reset_command", "provision_command", "run_with_progress", "summary_table"]

_PHASES = ("hello", "genkey", "upload", "commit", "verify", "lock", "record")


def provision_command(
    pki: PkiOpt,
    port: Annotated[
        list[str],
        typer.Option(
            "--port", help="Serial port: /dev/ttyUSB0, a pty path, socket://H:P (repeat)."
        ),
    ],
    device_id: Annotated[
        str | None, typer.Option("--device-id", help="Id for a single device (default: template).")
    ] = None,
    id_template: Annotated[
        str,
        typer.Option(
            "--id-template",
            help="Id from the hardware serial, e.g. 'dev-{serial}': the text is used as given "
            "(a-z, 0-9, '-'); only the serial is lower-cased, other characters become '-'.",
        ),
    ] = DEFAULT_ID_TEMPLATE,
    keygen: Annotated[
        str,
        typer.Option(
            "--keygen", help="auto (device if it can), device, or station (inject a key made here)."
        ),
    ] = "auto",
    broker: Annotated[
        str | None,
        typer.Option("--broker", help="HOST:PORT written into the device's identity.json."),
    ] = None,
    rotate: Annotated[
        bool, typer.Option("--rotate", help="Replace an active certificate of the same id.")
    ] = False,
    baud: Annotated[int, typer.Option("--baud", help="Baud rate of real UARTs.")] = 115200,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            help="Seconds to wait for an answer, beyond the time the frames take at --baud, "
            "before a retransmit.",
        ),
    ] = 0.5,
    as_json: JsonOpt = False,
) -> None:
    """Provision one device, or several at once (gang mode), over serial."""
    with user_errors():
        if keygen not in ("auto", "device", "station"):
            msg = f"--keygen must be auto, device or station, not {keygen!r}"
            raise ProvisioningError(msg)
        if device_id is not None:
            validate_name(device_id)
        else:
            validate_id_template(id_template)  # before the PKI or any port is opened
        PKI.open(pki, passphrase=passphrase_from_env()).close()  # fail early on a bad --pki
        settings = StationSettings(baudrate=baud, timeout=timeout)
        try:
            results = run_with_progress(
                pki,
                port,
                device_id,
                id_template,
                cast("KeyMode", keygen),  # checked against the three choices above
                broker,
                rotate,
                settings,
            )
        except StationInterrupted as stopped:
            if as_json:
                print_json(results_json(stopped.results, interrupted=True))
            else:
                summary_table(stopped.results, interrupted=True)
            err.print(escape(interrupted_line(stopped.results)))
            raise typer.Exit(130) from None
    if as_json:
        print_json(results_json(results))
        for r in results:
            if not r.ok:
                err.print(f"[red]error:[/red] {escape(f'{r.port}: {r.reason}')}", markup=True)
    else:
        summary_table(results)
    if not all(r.ok for r in results):
        raise typer.Exit(1)


def results_json(results: list[ProvisionResult], *, interrupted: bool = False) -> dict[str, Any]:
    """``provision --json`` (docs/JSON.md): one entry per port, in the order given."""
    return {
        "ok": all(r.ok for r in results) and not interrupted,
        "provisioned": sum(r.ok for r in results),
        "interrupted": interrupted,
        "results": [
            {
                "port": r.port,
                "ok": r.ok,
                "device_id": r.device_id,
                "hardware_serial": r.hardware_serial,
                "key_mode": r.key_mode,
                "serial": r.cert_serial,
                "seconds": r.seconds,
                "retransmits": r.retransmits,
                "resumed": r.resumed,
                "error": r.reason,
            }
            for r in results
        ],
        "warnings": [],
    }


def interrupted_line(results: list[ProvisionResult]) -> str:
    """After Ctrl-C, one line: what was kept, and the ports a rerun still has to do."""
    kept = [r for r in results if r.ok]
    rest = [r.port for r in results if not r.ok]
    names = f" ({', '.join(r.device_id or r.port for r in kept)})" if kept else ""
    line = f"interrupted: kept {len(kept)} provisioned and recorded device(s){names}"
    if rest:
        line += (
            f"; {len(rest)} unfinished kept no certificate (one already sent was revoked); "
            f"rerun with {' '.join('--port ' + p for p in rest)} to resume"
        )
    return line


def run_with_progress(
    pki: Path,
    ports: list[str],
    device_id: str | None,
    id_template: str,
    keygen: KeyMode,
    broker: str | None,
    rotate: bool,
    settings: StationSettings,
) -> list[ProvisionResult]:
    console = Console(stderr=True, highlight=False)
    lock = threading.Lock()
    with Progress(
        TextColumn("{task.fields[port]}", style="bold"),
        TextColumn("{task.fields[phase]:<7}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        tasks: dict[str, TaskID] = {
            p: progress.add_task("", total=len(_PHASES) * 100, port=p, phase="open") for p in ports
        }

        def report(port: str, phase: str, done: int, total: int) -> None:
            index = _PHASES.index(phase) if phase in _PHASES else 0
            fraction = done / total if total else 1.0
            with lock:
                progress.update(
                    tasks[port], completed=index * 100 + int(fraction * 100), phase=phase
                )

        results = provision_many(
            pki,
            ports,
            device_id=device_id,
            id_template=id_template,
            keygen=keygen,
            broker=broker,
            rotate=rotate,
            settings=settings,
            progress=report,
        )
        for result in results:
            final = "done" if result.ok else "failed"
            progress.update(
                tasks[result.port], phase=final, completed=len(_PHASES) * 100 if result.ok else None
            )
    return results


def summary_table(results: list[ProvisionResult], *, interrupted: bool = False) -> None:
    ok = sum(r.ok for r in results)
    table = Table(
        title=f"{ok}/{len(results)} provisioned", title_justify="left", box=box.SIMPLE_HEAD
    )
    for col in ("port", "result", "device", "hardware serial", "key", "secs", "retx"):
        table.add_column(col, no_wrap=True, justify="right" if col in ("secs", "retx") else "left")
    for r in results:
        table.add_row(
            r.port,
            "[green]ok[/]"
            if r.ok
            else "[yellow]stopped[/]"
            if interrupted and r.reason == INTERRUPTED
            else "[red]failed[/]",
            r.device_id or "-",
            r.hardware_serial or "-",
            r.key_mode or "-",
            f"{r.seconds:.1f}",
            str(r.retransmits),
        )
    out.print(table)
    for r in results:
        if not r.ok and not (interrupted and r.reason == INTERRUPTED):
            err.print(f"[red]error:[/red] {escape(f'{r.port}: {r.reason}')}", markup=True)


def hw_reset_command(
    pki: PkiOpt,
    port: Annotated[str, typer.Option("--port", help="Serial port of the device to wipe.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Factory-reset a device: wipe and unlock it, revoke its certificate, log it in the ledger."""
    with user_errors(), PKI.open(pki, passphrase=passphrase_from_env()) as ca:
        try:
            with DeviceClient.open(port) as client:
                info = client.hello()
                holder = ca.registry.active_by_hardware_serial(info.hardware_serial)
                who = holder.name if holder else (info.device_id or "no registered device")
                if not yes and not typer.confirm(
                    f"Wipe {info.hardware_serial} ({who}) on {port}?", err=True
                ):
                    raise typer.Exit(1)
                client.factory_reset()
        except HardwareError as exc:
            msg = f"{port}: {exc}"
            raise ProvisioningError(msg) from exc
        if holder is not None:
            ca.revoke(holder.name, reason="cessation-of-operation")
        ca.record_event(
            "factory-reset",
            {
                "hardware_serial": info.hardware_serial,
                "device_id": holder.name if holder else info.device_id or None,
                "port": port,
                "revoked": holder.serial if holder else None,
            },
        )
        if as_json:
            print_json(
                {
                    "port": port,
                    "hardware_serial": info.hardware_serial,
                    "device_id": holder.name if holder else info.device_id or None,
                    "revoked": [holder.serial] if holder else [],
                    "warnings": [],
                }
            )
            return
        out.print(
            f"Reset {info.hardware_serial} on {port}"
            + (f"; revoked {holder.name} serial {holder.serial}" if holder else "")
        )
