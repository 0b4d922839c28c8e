"""The one exception root of ``hardware`` and its specific failures.

Every error carries the fields a caller needs (port, command, status, device id) and a message that
fits on one line, so a CLI can print ``error: <message>`` and exit non-zero without a traceback.
Caller misuse (a payload that is too long, a bad argument type) stays ``ValueError``/``TypeError``;
``InvalidDeviceIdError`` is both, because it is bad input *and* a hardware-level refusal.

The device side imports this module under MicroPython too (``StoreError``); see ``_ValueError``.
"""

from hardware._compat import MICROPYTHON, TYPE_CHECKING

__all__ = [
    "DeviceGoneError",
    "DeviceRefusedError",
    "HardwareError",
    "IntegrityError",
    "InvalidDeviceIdError",
    "PortError",
    "ProtocolViolationError",
    "StoreError",
]


class HardwareError(Exception):
    """Root of every error raised by ``hardware``."""


if TYPE_CHECKING:
    _ValueError = ValueError
else:
    # MicroPython allows one built-in exception among a class's bases ("instance lay-out
    # conflict"); there the device-id error is a HardwareError only. CPython is unchanged.
    _ValueError = object if MICROPYTHON else ValueError


class InvalidDeviceIdError(HardwareError, _ValueError):
    """A device id that breaks the identity rule (1-64 of ``[a-z0-9-]``, not starting with '-')."""

    def __init__(self, value: str, reason: str) -> None:
        self.value = value
        self.reason = reason
        super().__init__(f"invalid device id {value!r}: {reason}")


class PortError(HardwareError):
    """The serial port (or URL) could not be opened: missing, busy, or locked by another station."""

    def __init__(self, port: str, reason: str) -> None:
        self.port = port
        self.reason = reason
        super().__init__(f"cannot open {port}: {reason}")


class DeviceGoneError(HardwareError):
    """No valid answer after every retry, or the link itself went away (a pulled cable)."""

    def __init__(self, port: str, command: str, attempts: int, reason: str) -> None:
        self.port = port
        self.command = command
        self.attempts = attempts
        self.reason = reason
        super().__init__(
            f"device on {port} is gone: no valid response to {command} after {attempts} "
            f"attempt(s) ({reason})"
        )


class DeviceRefusedError(HardwareError):
    """The device answered, with a status other than OK (locked, hash mismatch, ...)."""

    def __init__(self, command: str, status: int, status_name: str, detail: str = "") -> None:
        self.command = command
        self.status = status
        self.status_name = status_name
        self.detail = detail
        extra = f": {detail}" if detail else ""
        super().__init__(f"device refused {command}: {status_name} (0x{status:02x}){extra}")


class ProtocolViolationError(HardwareError):
    """The device answered with a well-framed response whose payload makes no sense."""

    def __init__(self, command: str, reason: str) -> None:
        self.command = command
        self.reason = reason
        super().__init__(f"malformed response to {command}: {reason}")


class IntegrityError(HardwareError):
    """What the device holds is not what the station sent (read-back hash or CSR hash differs)."""

    def __init__(self, kind: str, expected: str, actual: str) -> None:
        self.kind = kind
        self.expected = expected
        self.actual = actual
        super().__init__(f"{kind}: expected sha256 {expected}, device has {actual}")


class StoreError(HardwareError):
    """The device credential store cannot do what was asked (I/O error, damaged staging)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"credential store {path}: {reason}")
