"""A virtual device: the real responder and credential store behind a pty or a TCP port.

The station cannot tell it from hardware: it opens the printed pty path or ``socket://HOST:PORT``
with pyserial and speaks the protocol. Faults are injected on the byte stream in both directions,
so tests see exactly what a bad cable does to the real code on both sides.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from hardware.codec import BITS_PER_BYTE, MAX_PAYLOAD
from hardware.keygen import CryptographyBackend, KeyBackend, NoKeygenBackend
from hardware.responder import Responder
from hardware.store import CredentialStore
from hardware.transport import (
    BOOT_LOG,
    FaultInjector,
    PtyLink,
    SocketLink,
    TtyLink,
    parse_socket_url,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import TracebackType

__all__ = [
    "FaultConfig",
    "VirtualDevice",
    "run_emulator",
]

_POLL = 0.02  # how long the loop waits for bytes before it looks at stop requests and jobs


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """What goes wrong on the virtual cable; rates are per byte, in each direction."""

    seed: int = 0
    flip_rate: float = 0.0
    drop_rate: float = 0.0
    garbage_rate: float = 0.0
    boot_log: bool = False
    """Print an ESP32-style boot log at power-on and after every reboot."""
    reboot_every: int = 0
    """Reboot after every N-th executed request, losing its answer and all volatile state."""


def default_serial(store_dir: str | Path) -> str:
    """A stable hardware serial per store directory, like a chip's eFuse MAC."""
    digest = hashlib.sha256(os.path.abspath(store_dir).encode()).hexdigest()
    return "EMU-" + digest[:8].upper()


class VirtualDevice:
    """The responder served on ``link``: ``"pty"``, ``"socket://HOST:PORT"`` or a tty path."""

    def __init__(
        self,
        store_dir: str | Path,
        link: str = "pty",
        *,
        hardware_serial: str | None = None,
        can_genkey: bool = True,
        backend: KeyBackend | None = None,
        faults: FaultConfig | None = None,
        max_payload: int = MAX_PAYLOAD,
        baudrate: int | None = None,
    ) -> None:
        if baudrate is not None and baudrate <= 0:
            msg = "baudrate must be positive"
            raise ValueError(msg)
        self.store_dir = str(store_dir)
        # With a baud rate, every byte costs the time it would take on a UART (8N1),
        # so benchmarks over a pty or socket see the wire time of a real cable.
        self.byte_time = BITS_PER_BYTE / baudrate if baudrate else 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.hardware_serial = hardware_serial or default_serial(store_dir)
        if backend is None:
            backend = CryptographyBackend() if can_genkey else NoKeygenBackend()
        self.backend = backend
        self.max_payload = max_payload
        self.faults = faults or FaultConfig()
        self.inbound = self._injector(self.faults.seed)
        self.outbound = self._injector(self.faults.seed + 1)
        self._link: PtyLink | SocketLink | TtyLink
        if link == "pty":
            self._link = PtyLink()
        elif link.startswith("socket://"):
            host, port = parse_socket_url(link)
            self._link = SocketLink(host, port)
        else:  # a real serial device: this "virtual" device is then the real responder
            self._link = TtyLink(link, baudrate or 115200)
            self.byte_time = 0.0  # the UART itself paces the bytes
        self.reboots = 0
        self.responder = self._power_on()
        self._stop = threading.Event()
        self._reboot_requested = threading.Event()
        self._thread: threading.Thread | None = None

    def _injector(self, seed: int) -> FaultInjector:
        return FaultInjector(
            seed=seed,
            flip_rate=self.faults.flip_rate,
            drop_rate=self.faults.drop_rate,
            garbage_rate=self.faults.garbage_rate,
        )

    @property
    def address(self) -> str:
        """What a station opens: the pty slave path, or ``socket://HOST:PORT`` (real port)."""
        return self._link.address

    @property
    def port(self) -> int | None:
        """The bound TCP port of a socket link, else ``None``."""
        return self._link.port if isinstance(self._link, SocketLink) else None

    def _power_on(self) -> Responder:
        # Reopening the store is what a real boot does: it finishes or discards a commit that a
        # power cut interrupted.
        store = CredentialStore(self.store_dir)
        return Responder(
            store,
            hardware_serial=self.hardware_serial,
            backend=self.backend,
            max_payload=self.max_payload,
        )

    def _boot(self) -> None:
        if self.faults.boot_log:
            self._link.send(BOOT_LOG)

    def reboot(self) -> None:
        """Ask the device to reboot at its next idle moment (thread-safe)."""
        self._reboot_requested.set()

    def _do_reboot(self) -> None:
        self.reboots += 1
        self.responder = self._power_on()
        self._boot()

    def serve(self, stop: threading.Event | None = None) -> None:
        """Run until ``stop`` (or ``self.stop()``) is set."""
        stop = stop or self._stop
        self._boot()
        every = self.faults.reboot_every
        while not stop.is_set() and not self._stop.is_set():
            if self._reboot_requested.is_set():
                self._reboot_requested.clear()
                self._do_reboot()
            data = self._link.receive(_POLL)
            if data:
                self.bytes_in += len(data)
                self._on_the_wire(len(data))
                before = self.responder.stats.executed
                out = self.responder.receive_data(self.inbound.mangle(data))
                after = self.responder.stats.executed
                if every and after // every > before // every:
                    self._do_reboot()
                elif out:
                    self.bytes_out += len(out)
                    self._on_the_wire(len(out))
                    self._link.send(self.outbound.mangle(out))
            if self.responder.has_work:
                self.responder.work()

    def _on_the_wire(self, count: int) -> None:
        if self.byte_time:
            time.sleep(count * self.byte_time)

    @property
    def wire_seconds(self) -> float:
        """What the bytes exchanged so far take on a UART at the configured (or 115200) baud."""
        return (self.bytes_in + self.bytes_out) * (self.byte_time or 10.0 / 115200)

    def start(self) -> Self:
        """Serve in a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.serve, name="virtual-device", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and pull the cable (close the pty or the TCP port)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._link.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _announce(device: VirtualDevice) -> None:
    print(f"virtual device {device.hardware_serial} listening on {device.address}", flush=True)


def run_emulator(
    store_dir: str | Path,
    link: str = "pty",
    *,
    hardware_serial: str | None = None,
    can_genkey: bool = True,
    faults: FaultConfig | None = None,
    max_payload: int = MAX_PAYLOAD,
    baudrate: int | None = None,
    backend: KeyBackend | None = None,
    on_ready: Callable[[VirtualDevice], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve a virtual device in the foreground until ``stop`` is set or Ctrl-C.

    ``link`` is ``"pty"`` (the slave path is announced) or ``"socket://HOST:PORT"`` (port 0
    picks a free port; the real one is announced). ``backend`` is the key store (default: keys
    made with ``cryptography``, or none if not ``can_genkey``). ``on_ready`` receives the running
    device; by default one line naming its serial and address is printed to stdout.
    """
    device = VirtualDevice(
        store_dir,
        link,
        hardware_serial=hardware_serial,
        can_genkey=can_genkey,
        backend=backend,
        faults=faults,
        max_payload=max_payload,
        baudrate=baudrate,
    )
    try:
        (on_ready or _announce)(device)
        device.serve(stop)
    except KeyboardInterrupt:
        pass
    finally:
        device.stop()
