"""``iotauth hw``: the virtual device. Mounted by :mod:`iotauth.cli`.

``hw reset`` needs the registry and ledger, so it lives in ``provisioning`` and is attached to
this group by the composition root.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from hardware.emulator import FaultConfig, VirtualDevice, run_emulator
from hardware.errors import HardwareError
from hardware.keygen import KEYSTORES, KeyBackend, NoKeygenBackend, TpmBackend, backend_for

__all__ = ["hw_app"]

hw_app = typer.Typer(help="Serial hardware: virtual devices, factory reset.", no_args_is_help=True)

_KEYSTORE_HELP = (
    "Where the device makes and keeps its key: 'file' (device.key, PEM) or 'tpm' "
    "(inside a TPM 2.0; device.key keeps only the TPM-wrapped blob)."
)
_TPM_HELP = "TSS2 TCTI of the TPM (default: $IOTAUTH_TPM_TCTI, else device:/dev/tpmrm0)."


def _key_backend(keystore: str, tpm: str | None, *, no_keygen: bool) -> KeyBackend:
    """The device's key store from the options; one ``error:`` line and exit 1 if unusable."""
    problem = None
    if keystore not in KEYSTORES:
        problem = f"--keystore must be one of {', '.join(KEYSTORES)}, not {keystore!r}"
    elif tpm is not None and keystore != "tpm":
        problem = "--tpm needs --keystore tpm"
    elif no_keygen and keystore == "tpm":
        problem = "--no-keygen contradicts --keystore tpm (a TPM device makes its own key)"
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        raise typer.Exit(1)
    if no_keygen:
        return NoKeygenBackend()
    backend = backend_for(keystore, tpm)
    if isinstance(backend, TpmBackend):
        try:
            backend.tpm.check()  # fail now, not on the station's first GENKEY
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(1) from None
    return backend


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
    baud: Annotated[
        int | None, typer.Option("--baud", min=300, help="Pace bytes like a UART at this rate.")
    ] = None,
    keystore: Annotated[str, typer.Option("--keystore", help=_KEYSTORE_HELP)] = "file",
    tpm: Annotated[str | None, typer.Option("--tpm", help=_TPM_HELP)] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON line with the port as soon as it listens."),
    ] = False,
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
    backend = _key_backend(keystore, tpm, no_keygen=no_keygen)

    def ready(device: VirtualDevice) -> None:
        if as_json:
            _ready_json(device, store, keygen=not no_keygen)
            return
        mode = "key injection only" if no_keygen else "on-device key generation"
        if isinstance(backend, TpmBackend):
            mode = f"keys made in the TPM at {backend.tcti}"
        print(f"virtual device {device.hardware_serial} ({mode}), store {store}", flush=True)
        print(f"station port: {device.address}", flush=True)
        print(f"  iotauth provision --pki ./pki --port {device.address}", flush=True)

    try:
        _make_store(store)
        run_emulator(
            store,
            link,
            hardware_serial=serial,
            can_genkey=not no_keygen,
            backend=backend,
            faults=faults,
            baudrate=baud,
            on_ready=ready,
        )
    except (HardwareError, OSError, ValueError) as exc:
        print(f"error: {_said(exc)}", file=sys.stderr)
        raise typer.Exit(1) from None


def _ready_json(device: VirtualDevice, store: Path, *, keygen: bool) -> None:
    """The line a script waits for (docs/JSON.md): JSON Lines, one event per line."""
    doc = {
        "event": "listening",
        "port": device.address,
        "hardware_serial": device.hardware_serial,
        "store": str(store),
        "keygen": keygen,
    }
    print(json.dumps(doc, sort_keys=True), flush=True)


def _make_store(store: Path) -> None:
    if store.exists() and not store.is_dir():
        msg = f"--store {store} is a file; give a directory (it is created if missing)"
        raise ValueError(msg)
    store.mkdir(parents=True, exist_ok=True, mode=0o700)


def _said(exc: Exception) -> str:
    # "[Errno 2] No such file or directory: 'x'" reads as Python; name the path the user gave.
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


def machine_serial() -> str | None:
    """This machine's hardware serial: a Raspberry Pi's SoC serial, else the machine id."""
    for path in ("/proc/device-tree/serial-number", "/sys/firmware/devicetree/base/serial-number"):
        try:
            value = Path(path).read_bytes().strip(b"\0\n ").decode("ascii", "replace")
        except OSError:
            continue
        if value:
            return "RPI-" + value.lstrip("0").upper()
    try:
        return "HOST-" + Path("/etc/machine-id").read_text().strip()[:12].upper()
    except OSError:
        return None


@hw_app.command("serve")
def serve(
    port: Annotated[
        str, typer.Option("--port", help="The device's serial port: /dev/serial0, /dev/ttyGS0, ...")
    ],
    store: Annotated[Path, typer.Option("--store", help="Credential directory of this device.")],
    baud: Annotated[
        int, typer.Option("--baud", help="UART baud rate (ignored by USB gadgets).")
    ] = 115200,
    serial: Annotated[
        str | None, typer.Option("--serial", help="Hardware serial (default: the SoC's).")
    ] = None,
    no_keygen: Annotated[
        bool, typer.Option("--no-keygen", help="Refuse GENKEY; the station injects the key.")
    ] = False,
    keystore: Annotated[str, typer.Option("--keystore", help=_KEYSTORE_HELP)] = "file",
    tpm: Annotated[str | None, typer.Option("--tpm", help=_TPM_HELP)] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON line when the device answers.")
    ] = False,
) -> None:
    """Run the device-side responder on a real serial port until Ctrl-C (on the device)."""
    backend = _key_backend(keystore, tpm, no_keygen=no_keygen)
    where = f", key in the TPM at {backend.tcti}" if isinstance(backend, TpmBackend) else ""

    def ready(device: VirtualDevice) -> None:
        if as_json:
            _ready_json(device, store, keygen=not no_keygen)
            return
        print(
            f"device {device.hardware_serial} answering on {device.address}, store {store}{where}",
            flush=True,
        )

    try:
        _make_store(store)
        run_emulator(
            store,
            port,
            hardware_serial=serial or machine_serial(),
            can_genkey=not no_keygen,
            backend=backend,
            baudrate=baud,
            on_ready=ready,
        )
    except (HardwareError, OSError, ValueError) as exc:
        print(f"error: {port}: {_said(exc)}", file=sys.stderr)
        raise typer.Exit(1) from None
