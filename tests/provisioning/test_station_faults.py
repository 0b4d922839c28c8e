"""The station's clear errors for what goes wrong on a real bench, and a long noisy run."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hardware import FaultConfig, VirtualDevice
from hardware.codec import Frame, FrameDecoder, encode_frame
from provisioning.pki import PKI
from provisioning.station import StationError, StationSettings, provision
from tests.conftest import CLI, fill_disk, openssl_verify

FAST = StationSettings(timeout=0.15, retries=8, reconnects=2, reconnect_delay=0.2)


# At memory speed an answer takes milliseconds: a short timeout makes each recovery from noise
# quick, and many retries keep a loaded machine's stalls from failing a frame.
QUICK = StationSettings(timeout=0.05, retries=40, reconnects=2, reconnect_delay=0.2)


def _noisy_run(
    pki: PKI, root: Path, count: int, *, link: str, baudrate: int | None, settings: StationSettings
) -> None:
    """``count`` devices in a row at 0.1 % per-byte faults with a boot log, each verified."""
    noise = 0.001 / 3
    results = []
    for n in range(count):
        faults = FaultConfig(
            seed=n, flip_rate=noise, drop_rate=noise, garbage_rate=noise, boot_log=True
        )
        store = root / f"d{n}"
        with VirtualDevice(
            store, link, faults=faults, baudrate=baudrate, can_genkey=n % 3 != 0
        ) as dev:
            results.append(provision(pki, dev.address, settings=settings))
        assert openssl_verify(pki.path, store / "device.crt").returncode == 0
    assert all(r.ok for r in results), [r.reason for r in results if not r.ok]
    assert sum(r.retransmits for r in results) > 0, "the noise never hit: the test proves nothing"
    assert pki.registry.count() == count
    assert pki.verify_ledger().entries == count + 1


@pytest.mark.slow
def test_fifty_devices_in_a_row_over_a_noisy_link(pki: PKI, tmp_path: Path) -> None:
    """The soak: 50 in a row over ptys, noise and boot logs, both key modes; unpaced and with a
    short timeout, so it takes seconds (the UART's timing is what the next test proves)."""
    _noisy_run(pki, tmp_path, 50, link="pty", baudrate=None, settings=QUICK)


def test_devices_over_a_noisy_link_paced_like_a_115200_uart(pki: PKI, tmp_path: Path) -> None:
    """Three devices (both key modes) with every byte paced at 115200 8N1: the station's timeouts
    and retransmissions hold at wire speed, not only at memory speed."""
    _noisy_run(pki, tmp_path, 3, link="socket://127.0.0.1:0", baudrate=115200, settings=FAST)


@pytest.fixture
def socat_ptys(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Two linked ptys, as a USB-UART cable between a bench PC and a device would be."""
    socat = shutil.which("socat")
    if socat is None:
        pytest.fail("socat is not installed; .ci/run installs it")
    device_end, station_end = tmp_path / "ttyDEVICE", tmp_path / "ttySTATION"
    proc = subprocess.Popen(
        [socat, "-d", f"pty,raw,echo=0,link={device_end}", f"pty,raw,echo=0,link={station_end}"],
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        if device_end.exists() and station_end.exists():
            break
        time.sleep(0.05)
    try:
        yield device_end, station_end
    finally:
        proc.terminate()
        proc.wait(10)


def test_hw_serve_on_a_real_tty(
    pki: PKI, pki_dir: Path, tmp_path: Path, socat_ptys: tuple[Path, Path]
) -> None:
    """`iotauth hw serve` (what runs on a Pi's /dev/serial0) against `iotauth provision`."""
    device_end, station_end = socat_ptys
    store = tmp_path / "store"
    args = ["--port", str(device_end), "--store", str(store), "--serial", "RPI-1"]
    serve = subprocess.Popen(
        [*CLI, "hw", "serve", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert serve.stdout is not None
        assert "answering on" in serve.stdout.readline()
        second = subprocess.run(
            [*CLI, "hw", "serve", "--port", str(device_end), "--store", str(tmp_path / "other")],
            capture_output=True, text=True, check=False, timeout=30,
        )  # fmt: skip
        assert second.returncode == 1
        assert "busy" in second.stderr
        done = subprocess.run(
            [*CLI, "provision", "--pki", str(pki_dir), "--port", str(station_end)],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "dev-rpi-1" in done.stdout
    finally:
        serve.terminate()
        serve.wait(10)
    assert openssl_verify(pki_dir, store / "device.crt").returncode == 0
    assert pki.registry.active("dev-rpi-1") is not None


def test_protocol_version_mismatch_is_named(pki: PKI) -> None:
    """A device that answers in protocol version 2 frames: the station says so."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def future_device() -> None:
        conn, _ = listener.accept()
        conn.settimeout(0.1)
        decoder = FrameDecoder()
        with conn:
            while not stop.is_set():
                try:
                    data = conn.recv(4096)
                except TimeoutError:
                    continue
                if not data:
                    return
                decoder.receive_data(data)
                while (frame := decoder.next_frame()) is not None:
                    conn.sendall(
                        encode_frame(Frame(frame.cmd | 0x80, frame.seq, 0, b""), version=2)
                    )

    thread = threading.Thread(target=future_device, daemon=True)
    thread.start()
    try:
        with pytest.raises(StationError, match="protocol version mismatch"):
            provision(
                pki, f"socket://127.0.0.1:{port}", settings=StationSettings(timeout=0.05, retries=2)
            )
    finally:
        stop.set()
        listener.close()
    assert pki.registry.count() == 0


def test_device_storage_full_is_reported(pki: PKI, tmpfs: Callable[[str], Path]) -> None:
    """A device whose flash is full says so; the certificate it may hold is revoked, not active."""
    tiny_disk = tmpfs("64k")
    fill_disk(tiny_disk, 4096)  # room for the store's first files only
    with (
        VirtualDevice(
            tiny_disk / "store", "socket://127.0.0.1:0", hardware_serial="SN-FULL"
        ) as dev,
        pytest.raises(StationError, match="storage is full or failing"),
    ):
        provision(pki, dev.address, settings=FAST)
    assert pki.registry.active("dev-sn-full") is None
