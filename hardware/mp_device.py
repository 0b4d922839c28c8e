"""The device responder as a program, for MicroPython (and CPython): bytes on a tty or on stdio.

Usage, from the directory that holds the ``hardware`` package::

    micropython -m hardware.mp_device [--serial SN] [--max-payload N] STORE [TTY]

``STORE`` is the credential directory (``CredentialStore``). With ``TTY`` (a UART such as
``/dev/serial0``, a USB gadget port ``/dev/ttyGS0``, a pty) the device opens it with
``open(path, "r+b")`` and puts it in raw mode with ``termios.setraw``; without it (or with ``-``)
it speaks on stdin/stdout, like a USB-CDC console, e.g. behind
``socat pty,raw,echo=0,link=ttyHOST EXEC:"micropython -m hardware.mp_device STORE"``. It prints one
line to stderr when it is ready and serves until the line goes away or it is interrupted.

Keys are never generated here: MicroPython has no EC key generation, so the responder runs with
``NoKeygenBackend``, HELLO says so, and the station injects the key (``--keygen auto`` picks that).

MicroPython quirks this loop works around:

* a stream's ``read(n)`` blocks until all ``n`` bytes arrived, so the loop waits with
  ``select.poll`` and then reads one byte at a time while more is ready;
* ``flush()`` on a tty raises ``EINVAL`` (it fsyncs), so writes are never flushed (the file is
  unbuffered anyway).

On a board without a tty the same loop applies to ``machine.UART``: feed
``uart.read(uart.any() or 1)`` to ``Responder.receive_data`` and write back what it returns.
"""

import hashlib
import select
import sys

from hardware._compat import TYPE_CHECKING
from hardware.codec import MAX_PAYLOAD
from hardware.errors import StoreError
from hardware.keygen import NoKeygenBackend
from hardware.responder import Responder
from hardware.store import CredentialStore

if TYPE_CHECKING:
    from typing import BinaryIO

__all__ = ["main", "serve"]

USAGE = "usage: mp_device [--serial SN] [--max-payload N] STORE [TTY|-]"
_IDLE_MS = 50  # how long to wait for bytes before looking at pending work
_BURST = 2048  # at most this many bytes per receive_data call (two full frames)


class _UsageError(Exception):
    pass


def _parse(argv: "list[str]") -> "tuple[str, str, str, int]":
    """``(store, port, hardware_serial, max_payload)``; MicroPython has no argparse."""
    serial = ""
    max_payload = MAX_PAYLOAD
    positional: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("--serial", "--max-payload"):
            if not args:
                raise _UsageError(arg + " needs a value")
            value = args.pop(0)
            if arg == "--serial":
                serial = value
            else:
                try:
                    max_payload = int(value)
                except ValueError:
                    raise _UsageError("--max-payload needs a number") from None
        elif arg.startswith("--"):
            raise _UsageError("unknown option " + arg)
        else:
            positional.append(arg)
    if not 1 <= len(positional) <= 2:
        raise _UsageError("expected STORE and optionally TTY")
    store = positional[0]
    port = positional[1] if len(positional) == 2 else "-"
    if not serial:
        # Stable per store, like a chip's eFuse MAC; MicroPython has no os.path.abspath.
        serial = "MP-" + hashlib.sha256(store.encode()).digest()[:4].hex().upper()
    return store, port, serial, max_payload


def _open_tty(path: str) -> "BinaryIO":
    """The tty, unbuffered and raw: no echo, no CR/LF translation, no flow-control characters."""
    import termios

    stream: BinaryIO = open(path, "r+b", 0)  # noqa: SIM115 - lives as long as the process
    setraw = getattr(termios, "setraw", None)  # MicroPython's termios has setraw; CPython's not
    if setraw is None:
        import tty

        setraw = tty.setraw
    setraw(stream.fileno())
    return stream


def _stdio() -> "tuple[BinaryIO, BinaryIO]":
    # MicroPython's sys.std*.buffer are unbuffered; CPython's buffered readers would hold bytes
    # that poll() cannot see, so take their raw files.
    reader = sys.stdin.buffer
    writer = sys.stdout.buffer
    return getattr(reader, "raw", reader), getattr(writer, "raw", writer)


def _read_burst(stream: "BinaryIO", poller: "select.poll") -> bytes:
    """What is waiting on the line, one byte per read (see the module docstring); b"" at EOF."""
    data = bytearray()
    while len(data) < _BURST:
        byte = stream.read(1)
        if not byte:
            break
        data += byte
        if not poller.poll(0):
            break
    return bytes(data)


def _write_all(stream: "BinaryIO", data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[stream.write(view) :]


def serve(responder: Responder, reader: "BinaryIO", writer: "BinaryIO") -> None:
    """Answer requests until the line closes (EOF or an I/O error such as a hung-up tty)."""
    poller = select.poll()
    poller.register(reader, select.POLLIN)
    while True:
        if not poller.poll(_IDLE_MS):
            if responder.has_work:
                responder.work()
            continue
        try:
            data = _read_burst(reader, poller)
        except OSError:
            return
        if not data:
            return
        out = responder.receive_data(data)
        if out:
            try:
                _write_all(writer, out)
            except OSError:
                return


def main(argv: "list[str] | None" = None) -> int:
    try:
        store_dir, port, serial, max_payload = _parse(sys.argv[1:] if argv is None else argv)
        store = CredentialStore(store_dir)
        responder = Responder(
            store, hardware_serial=serial, backend=NoKeygenBackend(), max_payload=max_payload
        )
    except _UsageError as exc:
        print("error: " + str(exc), file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    except (StoreError, ValueError) as exc:
        print("error: " + str(exc), file=sys.stderr)
        return 1
    if port == "-":
        reader, writer = _stdio()
        where = "stdio"
    else:
        try:
            reader = writer = _open_tty(port)
        except OSError as exc:
            print("error: cannot open " + port + ": " + str(exc), file=sys.stderr)
            return 1
        where = port
    implementation = sys.implementation.name
    print(f"mp_device {serial} ready on {where} ({implementation})", file=sys.stderr)
    try:
        serve(responder, reader, writer)
    except KeyboardInterrupt:  # MicroPython has no contextlib
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
