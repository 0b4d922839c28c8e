"""The wire format of the serial provisioning protocol, with no I/O at all.

Theory of operation
-------------------
A frame on the wire is ``00 | COBS(body) | 00``. COBS removes every zero byte from the body, so a
zero always means "frame boundary": a receiver that lost sync (boot log on the line, a flipped bit,
a dropped byte) simply throws away everything up to the next zero and is back in step. The leading
zero is not redundant: without it, a good frame that follows garbage would be glued to the garbage
and lost with it. Two zeros in a row are an empty frame and mean nothing (idle / flush).

The body is little-endian::

    ver u8 | cmd u8 | seq u8 | status u8 | len u16 | payload[len] | crc32 u32

``crc32`` (zlib/binascii, IEEE) covers ``ver..payload``. Requests use ``cmd`` 0x01..0x7F and status
0; a response echoes ``seq`` and sets ``cmd | 0x80``. The receiver never answers a damaged frame
(no NACK storms on a noisy line): garbage, bad CRC, a wrong version or an oversize frame is dropped
and counted in ``FrameDecoder.stats``; the station retransmits on timeout instead.

This module is shared by the device and the station, and runs unchanged under MicroPython: the
format needs only ``struct``/``binascii``, and ``hardware._compat`` stands in for ``enum``,
``dataclasses`` and ``struct.Struct`` where MicroPython lacks them.
"""

import binascii

from hardware._compat import IntEnum, Struct, dataclass, field, member_name

__all__ = [
    "BITS_PER_BYTE",
    "BODY_OVERHEAD",
    "MAX_ENCODED_FRAME",
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "RESPONSE_FLAG",
    "Command",
    "DecoderStats",
    "DeviceFlag",
    "DeviceState",
    "Frame",
    "FrameDecoder",
    "ObjectKind",
    "Status",
    "cobs_decode",
    "cobs_encode",
    "command_name",
    "crc32",
    "encode_frame",
    "max_encoded_size",
    "status_name",
]

PROTOCOL_VERSION = 1
RESPONSE_FLAG = 0x80
# 1 KiB keeps one frame under ~90 ms at 115200 8N1, so a retransmit costs little; a device may
# advertise less in HELLO and the station then uses the smaller value.
MAX_PAYLOAD = 1024
# A UART (8N1) sends a start bit, 8 data bits and a stop bit for every byte: the wire time of a
# frame, for the station's timeouts and the emulator's simulated cable alike.
BITS_PER_BYTE = 10

_HEADER = Struct("<BBBBH")
_CRC = Struct("<I")
BODY_OVERHEAD = _HEADER.size + _CRC.size


class Command(IntEnum):
    """Request codes (a response carries ``code | RESPONSE_FLAG``)."""

    HELLO = 0x01
    GENKEY = 0x02
    PUT_BEGIN = 0x03
    PUT_DATA = 0x04
    COMMIT = 0x05
    VERIFY = 0x06
    READ = 0x07
    LOCK = 0x08
    FACTORY_RESET = 0x09


class Status(IntEnum):
    """Result codes in a response's status byte."""

    OK = 0x00
    UNKNOWN_COMMAND = 0x01
    BAD_ARGS = 0x02
    BAD_STATE = 0x03
    LOCKED = 0x04
    HASH_MISMATCH = 0x05
    NO_KEY = 0x06
    KEY_MISMATCH = 0x07
    STORAGE_ERROR = 0x08
    TOO_LARGE = 0x09
    UNSUPPORTED = 0x0A
    BUSY = 0x0B
    VERSION = 0x0C
    NOT_FOUND = 0x0D
    FORBIDDEN = 0x0E
    BAD_DEVICE_ID = 0x0F
    BAD_TOKEN = 0x10


class ObjectKind(IntEnum):
    """The objects a device holds; the numbers double as bit positions in COMMIT's result mask."""

    KEY = 0
    CSR = 1
    CERT = 2
    CHAIN = 3
    CA = 4
    IDENTITY = 5


class DeviceState(IntEnum):
    """What HELLO reports: nothing committed, a key and certificate committed, or locked."""

    FACTORY = 0
    PROVISIONED = 1
    LOCKED = 2


class DeviceFlag(IntEnum):
    """Capability and content bits in HELLO's ``flags`` byte."""

    CAN_GENKEY = 0x01
    HAS_KEY = 0x02
    HAS_CERT = 0x04
    STAGED = 0x08
    TPM_KEYS = 0x10
    """Generated keys are made and kept in a TPM: the key object is a TPM-wrapped blob, and the
    device takes no injected key."""


def command_name(code: int) -> str:
    """A readable name for a command byte, request or response, known or not."""
    base = code & ~RESPONSE_FLAG
    name = member_name(Command, base)
    return f"CMD_0x{base:02x}" if name is None else name


def status_name(code: int) -> str:
    """A readable name for a status byte, known or not."""
    name = member_name(Status, code)
    return f"STATUS_0x{code:02x}" if name is None else name


def crc32(data: bytes) -> int:
    """CRC-32/IEEE as zlib and binascii compute it (check value 0xCBF43926)."""
    return binascii.crc32(data) & 0xFFFFFFFF


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: the result contains no zero byte."""
    out = bytearray(b"\x00")
    code_at = 0
    code = 1
    for byte in data:
        if byte == 0:
            out[code_at] = code
            code_at = len(out)
            out.append(0)
            code = 1
            continue
        out.append(byte)
        code += 1
        if code == 0xFF:
            out[code_at] = code
            code_at = len(out)
            out.append(0)
            code = 1
    out[code_at] = code
    return bytes(out)


def cobs_decode(data: bytes) -> bytes | None:
    """Undo ``cobs_encode``; ``None`` when ``data`` is not a valid COBS block."""
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:
            return None
        i += 1
        end = i + code - 1
        if end > n:
            return None
        block = data[i:end]
        if 0 in block:
            return None
        out += block
        i = end
        if code < 0xFF and i < n:
            out.append(0)
    return bytes(out)


def max_encoded_size(max_payload: int) -> int:
    """The longest COBS block (without delimiters) a body with ``max_payload`` can produce."""
    body = BODY_OVERHEAD + max_payload
    return body + body // 254 + 1


MAX_ENCODED_FRAME = max_encoded_size(MAX_PAYLOAD) + 2


@dataclass(frozen=True, slots=True)
class Frame:
    """One protocol message: a request (``cmd`` < 0x80) or a response (``cmd | 0x80``)."""

    __match_args__ = ("cmd", "seq", "status", "payload")  # the field order MicroPython needs
    cmd: int
    seq: int
    status: int = 0
    payload: bytes = b""

    def __post_init__(self) -> None:
        for name in ("cmd", "seq", "status"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= 0xFF:
                msg = f"Frame.{name} must be an int in 0..255, got {value!r}"
                raise ValueError(msg)
        if not isinstance(self.payload, bytes):
            msg = f"Frame.payload must be bytes, got {type(self.payload).__name__}"
            raise TypeError(msg)
        if len(self.payload) > 0xFFFF:
            msg = f"Frame.payload is {len(self.payload)} bytes; the length field is u16"
            raise ValueError(msg)

    @property
    def is_response(self) -> bool:
        return bool(self.cmd & RESPONSE_FLAG)

    @property
    def command(self) -> int:
        """The command code without the response flag."""
        return self.cmd & ~RESPONSE_FLAG

    def reply(self, status: int, payload: bytes = b"") -> "Frame":
        """The response to this request: same ``seq``, ``cmd | 0x80``."""
        return Frame(self.cmd | RESPONSE_FLAG, self.seq, status, payload)


def encode_frame(
    frame: Frame, *, max_payload: int = MAX_PAYLOAD, version: int = PROTOCOL_VERSION
) -> bytes:
    """The bytes to put on the wire for ``frame``, delimiters included."""
    if len(frame.payload) > max_payload:
        msg = f"payload of {len(frame.payload)} bytes exceeds the maximum of {max_payload}"
        raise ValueError(msg)
    head = _HEADER.pack(version, frame.cmd, frame.seq, frame.status, len(frame.payload))
    body = head + frame.payload
    return b"\x00" + cobs_encode(body + _CRC.pack(crc32(body))) + b"\x00"


@dataclass(slots=True)
class DecoderStats:
    """What a ``FrameDecoder`` kept and threw away; drops are counted, never raised."""

    __match_args__ = ("frames", "garbage", "bad_crc", "bad_version", "oversize")
    frames: int = 0
    garbage: int = 0
    bad_crc: int = 0
    bad_version: int = 0
    oversize: int = 0

    @property
    def dropped(self) -> int:
        return self.garbage + self.bad_crc + self.bad_version + self.oversize


@dataclass(slots=True)
class FrameDecoder:
    """Turns a byte stream into frames: ``receive_data`` then ``next_frame`` until ``None``.

    ``None`` means "need more data". Nothing here raises on bad input: a candidate frame that is
    not valid COBS, too short, inconsistent in length, fails its CRC, carries another protocol
    version or is longer than ``max_payload`` allows is dropped and counted in ``stats``.
    """

    __match_args__ = ("max_payload", "stats", "_buffer", "_discarding", "_ready")
    max_payload: int = MAX_PAYLOAD
    stats: DecoderStats = field(default_factory=DecoderStats)
    _buffer: bytearray = field(default_factory=bytearray)
    _discarding: bool = False
    _ready: list[Frame] = field(default_factory=list)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes exactly as they came off the line, in any slicing."""
        limit = max_encoded_size(self.max_payload)
        start = 0
        n = len(data)
        while start < n:
            zero = data.find(b"\x00", start)
            end = n if zero < 0 else zero
            if not self._discarding:
                self._buffer += data[start:end]
                if len(self._buffer) > limit:
                    # Drop now rather than at the delimiter: a line of noise with no zero in it
                    # must not grow the buffer without bound.
                    self.stats.oversize += 1
                    self._discarding = True
                    self._buffer = bytearray()  # MicroPython's bytearray has no clear()
            if zero < 0:
                return
            if not self._discarding and self._buffer:
                self._accept(bytes(self._buffer))
            self._buffer = bytearray()
            self._discarding = False
            start = zero + 1

    def next_frame(self) -> Frame | None:
        """The oldest complete frame, or ``None`` when more bytes are needed."""
        if self._ready:
            return self._ready.pop(0)
        return None

    def _accept(self, block: bytes) -> None:
        body = cobs_decode(block)
        if body is None or len(body) < BODY_OVERHEAD:
            self.stats.garbage += 1
            return
        version, cmd, seq, status, length = _HEADER.unpack_from(body)
        if len(body) != BODY_OVERHEAD + length:
            self.stats.garbage += 1
            return
        end = _HEADER.size + length
        (declared,) = _CRC.unpack_from(body, end)
        if crc32(body[:end]) != declared:
            self.stats.bad_crc += 1
            return
        if version != PROTOCOL_VERSION:
            self.stats.bad_version += 1
            return
        if length > self.max_payload:
            self.stats.oversize += 1
            return
        self.stats.frames += 1
        self._ready.append(Frame(cmd, seq, status, body[_HEADER.size : end]))
