"""Byte pipes for the device responder: a real tty, a pty pair, a TCP listener, a noise model.

These adapters only move bytes; every protocol decision lives in ``responder`` and ``client``.
The station side needs none of this: it opens the other end with pyserial (the pty's slave path,
or ``socket://HOST:PORT``), exactly as it would open a USB-UART adapter.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import socket
import termios
import tty

__all__ = [
    "BAUD_RATES",
    "BOOT_LOG",
    "FaultInjector",
    "PtyLink",
    "SocketLink",
    "TtyLink",
    "parse_socket_url",
]

# What an ESP32 prints when DTR/RTS reset it: the kind of text a real line carries before the
# application speaks. It contains no zero byte, so only the frame delimiters resynchronise past it.
BOOT_LOG = (
    b"\r\nESP-ROM:esp32c3-api1-20210207\r\nBuild:Feb  7 2021\r\n"
    b"rst:0x1 (POWERON),boot:0xc (SPI_FAST_FLASH_BOOT)\r\n"
    b"SPIWP:0xee\r\nmode:DIO, clock div:1\r\nload:0x3fcd5820,len:0x1714\r\n"
    b"entry 0x403cc710\r\nI (30) boot: iotauth virtual device\r\n"
)


class FaultInjector:
    """A seeded model of a bad cable: per-byte bit flips, drops and bursts of garbage."""

    def __init__(
        self,
        *,
        seed: int = 0,
        flip_rate: float = 0.0,
        drop_rate: float = 0.0,
        garbage_rate: float = 0.0,
        max_garbage: int = 8,
    ) -> None:
        for name, rate in (("flip", flip_rate), ("drop", drop_rate), ("garbage", garbage_rate)):
            if not 0.0 <= rate < 1.0:
                msg = f"{name}_rate must be in [0, 1), got {rate}"
                raise ValueError(msg)
        # Not for secrets: a reproducible noise pattern is the point.
        self._random = random.Random(seed)  # noqa: S311
        self.flip_rate = flip_rate
        self.drop_rate = drop_rate
        self.garbage_rate = garbage_rate
        self.max_garbage = max_garbage
        self.counts = {"flip": 0, "drop": 0, "garbage": 0}

    @property
    def active(self) -> bool:
        return bool(self.flip_rate or self.drop_rate or self.garbage_rate)

    def mangle(self, data: bytes) -> bytes:
        if not self.active:
            return data
        rnd = self._random.random
        out = bytearray()
        for byte in data:
            if rnd() < self.garbage_rate:
                self.counts["garbage"] += 1
                out += self._random.randbytes(self._random.randint(1, self.max_garbage))
            if rnd() < self.drop_rate:
                self.counts["drop"] += 1
                continue
            if rnd() < self.flip_rate:
                self.counts["flip"] += 1
                out.append(byte ^ (1 << self._random.randrange(8)))
            else:
                out.append(byte)
        return bytes(out)


class _FdLink:
    """Bytes over one file descriptor (a pty master or a tty); subclasses open it."""

    path: str
    _fd: int
    _closed: bool
    _extra_fds: tuple[int, ...] = ()

    @property
    def address(self) -> str:
        return self.path

    def receive(self, timeout: float) -> bytes:
        """Whatever the station wrote, waiting up to ``timeout``; ``b""`` if nothing."""
        if self._closed:
            return b""
        readable, _, _ = select.select([self._fd], [], [], timeout)
        if not readable:
            return b""
        try:
            return os.read(self._fd, 4096)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            # A USB gadget port reads EIO while the host side is unplugged: wait, do not spin.
            select.select([], [], [], timeout)
            return b""

    def send(self, data: bytes) -> None:
        if self._closed or not data:
            return
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                select.select([], [self._fd], [], 1.0)
            except OSError:
                return  # the cable is out; the station retransmits once it is back

    def close(self) -> None:
        """Pull the cable: the station's next read fails instead of waiting forever."""
        if self._closed:
            return
        self._closed = True
        for fd in (self._fd, *self._extra_fds):
            with contextlib.suppress(OSError):
                os.close(fd)


class PtyLink(_FdLink):
    """A pseudo-terminal pair: the device owns the master, a station opens ``path``.

    The slave stays open here too: otherwise every time the station closes its end the master
    reads EIO, and bytes written meanwhile are lost instead of waiting like on a real UART.
    """

    def __init__(self) -> None:
        self._fd, slave = os.openpty()
        self._extra_fds = (slave,)
        # A fresh pty echoes and translates CR/LF; a UART does neither.
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        self._closed = False


BAUD_RATES: dict[int, int] = {
    rate: getattr(termios, f"B{rate}")
    for rate in (9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)
    if hasattr(termios, f"B{rate}")
}


class TtyLink(_FdLink):
    """A real serial device on the device side: ``/dev/serial0``, ``/dev/ttyGS0``, a pty slave.

    Raw mode (no echo, no CR/LF translation, no flow control), the given baud rate, and an
    exclusive open (TIOCEXCL) so a getty or a second responder cannot share the port.
    """

    def __init__(self, path: str, baudrate: int = 115200) -> None:
        if baudrate not in BAUD_RATES:
            msg = f"unsupported baud rate {baudrate}; use one of {sorted(BAUD_RATES)}"
            raise ValueError(msg)
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            if not os.isatty(self._fd):
                msg = f"{path} is not a serial device"
                raise OSError(msg)
            import fcntl

            try:
                # flock is what pyserial's exclusive=True takes too; TIOCEXCL alone does not stop
                # root, and a station or getty running as root must not share the port.
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                msg = f"{path} is busy: another program holds it"
                raise OSError(msg) from None
            fcntl.ioctl(self._fd, termios.TIOCEXCL)
            tty.setraw(self._fd)
            attrs = termios.tcgetattr(self._fd)
            attrs[4] = attrs[5] = BAUD_RATES[baudrate]  # ispeed, ospeed
            attrs[2] |= termios.CLOCAL | termios.CREAD  # ignore modem lines: a 3-wire UART
            attrs[2] &= ~getattr(termios, "CRTSCTS", 0)
            termios.tcsetattr(self._fd, termios.TCSANOW, attrs)
            termios.tcflush(self._fd, termios.TCIOFLUSH)  # drop what a console left behind
        except BaseException:
            os.close(self._fd)
            raise
        self._closed = False


def parse_socket_url(url: str) -> tuple[str, int]:
    """``socket://HOST:PORT`` -> ``(host, port)``; port 0 asks the OS for a free one."""
    prefix = "socket://"
    if not url.startswith(prefix):
        msg = f"expected socket://HOST:PORT, got {url!r}"
        raise ValueError(msg)
    host, sep, port_text = url[len(prefix) :].partition("?")[0].rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 0xFFFF:
        msg = f"expected socket://HOST:PORT, got {url!r}"
        raise ValueError(msg)
    return host.strip("[]"), int(port_text)


class SocketLink:
    """A TCP listener standing in for a UART: pyserial's ``socket://`` connects to it.

    One station at a time; a new connection replaces the old one, as a re-plugged cable would.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._listener = socket.create_server((host, port))
        self.port: int = self._listener.getsockname()[1]
        self._conn: socket.socket | None = None
        self._closed = False

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"socket://{host}:{self.port}"

    def receive(self, timeout: float) -> bytes:
        if self._closed:
            return b""
        watch = [self._listener] if self._conn is None else [self._listener, self._conn]
        readable, _, _ = select.select(watch, [], [], timeout)
        if self._listener in readable:
            conn, _ = self._listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._drop_connection()
            self._conn = conn
            return b""
        if self._conn is None or self._conn not in readable:
            return b""
        try:
            data = self._conn.recv(4096)
        except OSError:
            data = b""
        if not data:
            self._drop_connection()
        return data

    def send(self, data: bytes) -> None:
        if self._conn is None or not data:
            return
        try:
            self._conn.sendall(data)
        except OSError:
            self._drop_connection()

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_connection()
        with contextlib.suppress(OSError):
            self._listener.close()
