"""Payload layouts of every command, packed and unpacked in one place for both sides.

All integers are little-endian; ``sha256`` is the 32-byte digest; ``id`` is ASCII.

============= ======================================= =========================================
command       request payload                         OK response payload
============= ======================================= =========================================
HELLO         ``proto_ver u8``                        ``proto_ver u8 | state u8 | flags u8 |
                                                      max_payload u16 | serial_len u8 | serial |
                                                      id_len u8 | id`` (the locked id, or empty)
GENKEY        ``flags u8 (bit0 FORCE) | id``          ``csr_len u32 | sha256(csr DER)``;
                                                      BUSY until the key exists
PUT_BEGIN     ``kind u8 | total_len u32 | sha256``    ``watermark u32``
PUT_DATA      ``kind u8 | offset u32 | data``         ``watermark u32``
COMMIT        empty (commits everything staged)       ``state u8 | stored_mask u8``
VERIFY        ``kind u8``                             ``len u32 | sha256`` of the stored object
READ          ``kind u8 | offset u32 | max_len u16``  ``data`` (shorter than asked at the end)
LOCK          ``id``                                  ``state u8 | id`` (the id, echoed)
FACTORY_RESET ``b"FACTORY-RESET:" + hardware serial`` ``state u8``
============= ======================================= =========================================

Unpack functions raise ``ValueError`` on a malformed payload: the responder turns that into
BAD_ARGS, the station client into ``ProtocolViolationError``. The device-side half sticks to
``struct`` and tuples; the module runs unchanged under MicroPython (see ``hardware._compat``).
"""

from hardware._compat import Struct, dataclass
from hardware.codec import PROTOCOL_VERSION, DeviceFlag, DeviceState

__all__ = [
    "DEVICE_ID_MAX",
    "GENKEY_FORCE",
    "RESET_TOKEN_PREFIX",
    "SHA256_SIZE",
    "HelloInfo",
    "device_id_problem",
    "pack_commit_response",
    "pack_genkey_request",
    "pack_genkey_response",
    "pack_hello_request",
    "pack_hello_response",
    "pack_lock_response",
    "pack_put_begin_request",
    "pack_put_data_request",
    "pack_read_request",
    "pack_reset_response",
    "pack_verify_response",
    "pack_watermark",
    "reset_token",
    "unpack_commit_response",
    "unpack_genkey_request",
    "unpack_genkey_response",
    "unpack_hello_response",
    "unpack_kind",
    "unpack_lock_response",
    "unpack_put_begin_request",
    "unpack_put_data_request",
    "unpack_read_request",
    "unpack_reset_response",
    "unpack_verify_response",
    "unpack_watermark",
]

SHA256_SIZE = 32
DEVICE_ID_MAX = 64
GENKEY_FORCE = 0x01
RESET_TOKEN_PREFIX = b"FACTORY-RESET:"

_ID_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-")
_U32 = Struct("<I")
_PUT_BEGIN = Struct("<BI32s")
_PUT_DATA = Struct("<BI")
_READ = Struct("<BIH")
_DIGEST = Struct("<I32s")
_HELLO_HEAD = Struct("<BBBHB")


def device_id_problem(value: bytes) -> str | None:
    """Why ``value`` is not a device id, or ``None``.

    A deliberately minimal copy of the identity rule (docs/ARCHITECTURE.md): the device must
    refuse nonsense before it lands in a CSR subject or a lock marker, but
    ``provisioning.identity`` remains the authority and the station validates with it before it
    ever sends an id.
    """
    if not 1 <= len(value) <= DEVICE_ID_MAX:
        return f"must be 1-{DEVICE_ID_MAX} characters, got {len(value)}"
    for byte in value:
        if byte not in _ID_CHARS:
            return "only a-z, 0-9 and '-' are allowed"
    if value[0] == 0x2D:
        return "must start with a letter or digit"
    return None


def reset_token(hardware_serial: str) -> bytes:
    """FACTORY_RESET's confirmation: naming the unit's serial stops a reset of the wrong unit."""
    return RESET_TOKEN_PREFIX + hardware_serial.encode("ascii")


def _need(payload: bytes, size: int, what: str) -> None:
    if len(payload) < size:
        msg = f"{what} payload is {len(payload)} bytes, needs at least {size}"
        raise ValueError(msg)


# -- HELLO -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloInfo:
    """What a device says about itself in its HELLO response."""

    __match_args__ = (  # the field order MicroPython needs
        "protocol_version",
        "state",
        "flags",
        "max_payload",
        "hardware_serial",
        "device_id",
    )
    protocol_version: int
    state: DeviceState
    flags: int
    max_payload: int
    hardware_serial: str
    device_id: str

    @property
    def can_genkey(self) -> bool:
        return bool(self.flags & DeviceFlag.CAN_GENKEY)

    @property
    def has_key(self) -> bool:
        return bool(self.flags & DeviceFlag.HAS_KEY)

    @property
    def has_cert(self) -> bool:
        return bool(self.flags & DeviceFlag.HAS_CERT)

    @property
    def keys_in_tpm(self) -> bool:
        return bool(self.flags & DeviceFlag.TPM_KEYS)

    @property
    def has_staged(self) -> bool:
        return bool(self.flags & DeviceFlag.STAGED)


def pack_hello_request() -> bytes:
    return bytes([PROTOCOL_VERSION])


def pack_hello_response(
    state: int, flags: int, max_payload: int, hardware_serial: bytes, device_id: bytes
) -> bytes:
    head = _HELLO_HEAD.pack(PROTOCOL_VERSION, state, flags, max_payload, len(hardware_serial))
    return head + hardware_serial + bytes([len(device_id)]) + device_id


def unpack_hello_response(payload: bytes) -> HelloInfo:
    _need(payload, _HELLO_HEAD.size, "HELLO")
    version, state, flags, max_payload, serial_len = _HELLO_HEAD.unpack_from(payload)
    at = _HELLO_HEAD.size
    _need(payload, at + serial_len + 1, "HELLO")
    serial = payload[at : at + serial_len]
    at += serial_len
    id_len = payload[at]
    at += 1
    if len(payload) != at + id_len:
        msg = f"HELLO payload is {len(payload)} bytes, its fields say {at + id_len}"
        raise ValueError(msg)
    try:
        device_state = DeviceState(state)
    except ValueError:
        msg = f"HELLO reports unknown state {state}"
        raise ValueError(msg) from None
    return HelloInfo(
        protocol_version=version,
        state=device_state,
        flags=flags,
        max_payload=max_payload,
        hardware_serial=serial.decode("ascii", "replace"),
        device_id=payload[at:].decode("ascii", "replace"),
    )


# -- GENKEY ------------------------------------------------------------------------------------


def pack_genkey_request(device_id: bytes, *, force: bool = False) -> bytes:
    return bytes([GENKEY_FORCE if force else 0]) + device_id


def unpack_genkey_request(payload: bytes) -> tuple[bool, bytes]:
    """``(force, device_id)``."""
    _need(payload, 1, "GENKEY")
    return bool(payload[0] & GENKEY_FORCE), bytes(payload[1:])


def pack_genkey_response(csr_len: int, csr_sha256: bytes) -> bytes:
    return _DIGEST.pack(csr_len, csr_sha256)


def unpack_genkey_response(payload: bytes) -> tuple[int, bytes]:
    """``(csr_len, sha256)``."""
    return _unpack_digest(payload, "GENKEY")


# -- PUT_BEGIN / PUT_DATA ----------------------------------------------------------------------


def pack_put_begin_request(kind: int, total_len: int, sha256: bytes) -> bytes:
    return _PUT_BEGIN.pack(kind, total_len, sha256)


def unpack_put_begin_request(payload: bytes) -> tuple[int, int, bytes]:
    """``(kind, total_len, sha256)``."""
    if len(payload) != _PUT_BEGIN.size:
        msg = f"PUT_BEGIN payload must be {_PUT_BEGIN.size} bytes, got {len(payload)}"
        raise ValueError(msg)
    kind, total, digest = _PUT_BEGIN.unpack(payload)
    return kind, total, digest


def pack_put_data_request(kind: int, offset: int, data: bytes) -> bytes:
    return _PUT_DATA.pack(kind, offset) + data


def unpack_put_data_request(payload: bytes) -> tuple[int, int, bytes]:
    """``(kind, offset, data)``."""
    _need(payload, _PUT_DATA.size, "PUT_DATA")
    kind, offset = _PUT_DATA.unpack_from(payload)
    return kind, offset, bytes(payload[_PUT_DATA.size :])


def pack_watermark(watermark: int) -> bytes:
    return _U32.pack(watermark)


def unpack_watermark(payload: bytes) -> int:
    if len(payload) != _U32.size:
        msg = f"watermark payload must be 4 bytes, got {len(payload)}"
        raise ValueError(msg)
    (value,) = _U32.unpack(payload)
    return int(value)


# -- COMMIT ------------------------------------------------------------------------------------


def pack_commit_response(state: int, stored_mask: int) -> bytes:
    return bytes([state, stored_mask])


def unpack_commit_response(payload: bytes) -> tuple[DeviceState, int]:
    """``(state, stored_mask)``; bit ``ObjectKind`` is set for each object the device holds."""
    if len(payload) != 2:
        msg = f"COMMIT payload must be 2 bytes, got {len(payload)}"
        raise ValueError(msg)
    return DeviceState(payload[0]), payload[1]


# -- VERIFY / READ -----------------------------------------------------------------------------


def unpack_kind(payload: bytes) -> int:
    """VERIFY's request: a single kind byte."""
    if len(payload) != 1:
        msg = f"payload must be a single kind byte, got {len(payload)} bytes"
        raise ValueError(msg)
    return payload[0]


def pack_verify_response(length: int, sha256: bytes) -> bytes:
    return _DIGEST.pack(length, sha256)


def unpack_verify_response(payload: bytes) -> tuple[int, bytes]:
    """``(length, sha256)`` of the stored object."""
    return _unpack_digest(payload, "VERIFY")


def pack_read_request(kind: int, offset: int, max_len: int) -> bytes:
    return _READ.pack(kind, offset, max_len)


def unpack_read_request(payload: bytes) -> tuple[int, int, int]:
    """``(kind, offset, max_len)``."""
    if len(payload) != _READ.size:
        msg = f"READ payload must be {_READ.size} bytes, got {len(payload)}"
        raise ValueError(msg)
    kind, offset, max_len = _READ.unpack(payload)
    return kind, offset, max_len


def _unpack_digest(payload: bytes, what: str) -> tuple[int, bytes]:
    if len(payload) != _DIGEST.size:
        msg = f"{what} payload must be {_DIGEST.size} bytes, got {len(payload)}"
        raise ValueError(msg)
    length, digest = _DIGEST.unpack(payload)
    return length, digest


# -- LOCK / FACTORY_RESET ----------------------------------------------------------------------


def pack_lock_response(state: int, device_id: bytes) -> bytes:
    return bytes([state]) + device_id


def unpack_lock_response(payload: bytes) -> tuple[DeviceState, bytes]:
    """``(state, echoed device id)``."""
    _need(payload, 1, "LOCK")
    return DeviceState(payload[0]), bytes(payload[1:])


def pack_reset_response(state: int) -> bytes:
    return bytes([state])


def unpack_reset_response(payload: bytes) -> DeviceState:
    if len(payload) != 1:
        msg = f"FACTORY_RESET payload must be 1 byte, got {len(payload)}"
        raise ValueError(msg)
    return DeviceState(payload[0])
