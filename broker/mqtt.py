"""MQTT 3.1.1 on the wire, sans-IO: a framer that turns bytes into packets, and the encoders.

Nothing here touches a socket, a clock or the broker's state, so every rule can be tested by
feeding bytes. The broker's connection (``broker.connection``) feeds what TLS decrypted into
:class:`PacketReader` and writes what the encoders return.

The reader is strict where a lax reader has bitten brokers (research/amqtt.md): the length of a
packet is checked against ``max_packet_bytes`` as soon as its header is complete, before the body
is buffered; reserved flag bits, QoS 3, a PUBLISH topic with wildcards or U+0000, a zero packet id
and a packet type only a server may send are all :class:`ProtocolViolation`; strings must be
UTF-8. Decoding builds small slotted objects, and a PUBLISH body is sliced once, because this is
the hot path of the broker.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.errors import BrokerError

__all__ = [
    "CONNACK_ACCEPTED",
    "CONNACK_BAD_CREDENTIALS",
    "CONNACK_IDENTIFIER_REJECTED",
    "CONNACK_NOT_AUTHORIZED",
    "CONNACK_UNACCEPTABLE_PROTOCOL",
    "CONNECT",
    "DISCONNECT",
    "PINGREQ",
    "PUBACK",
    "PUBCOMP",
    "PUBLISH",
    "PUBREC",
    "PUBREL",
    "SUBACK_FAILURE",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "Connect",
    "PacketReader",
    "PacketTooLarge",
    "ProtocolViolation",
    "Publish",
    "Subscribe",
    "Unsubscribe",
    "connack",
    "encode_publish",
    "pingresp",
    "puback",
    "pubcomp",
    "pubrec",
    "pubrel",
    "suback",
    "unsuback",
]

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

CONNACK_ACCEPTED = 0
CONNACK_UNACCEPTABLE_PROTOCOL = 1
CONNACK_IDENTIFIER_REJECTED = 2
CONNACK_BAD_CREDENTIALS = 4  # "bad user name or password": a token or secret that does not verify
CONNACK_NOT_AUTHORIZED = 5
SUBACK_FAILURE = 0x80

# Flags the fixed header must carry (MQTT-2.2.2-1); PUBLISH's flags are its own.
_REQUIRED_FLAGS = {
    CONNECT: 0,
    PUBACK: 0,
    PUBREC: 0,
    PUBREL: 2,
    PUBCOMP: 0,
    SUBSCRIBE: 2,
    UNSUBSCRIBE: 2,
    PINGREQ: 0,
    DISCONNECT: 0,
}
_NAMES = {
    1: "CONNECT",
    2: "CONNACK",
    3: "PUBLISH",
    4: "PUBACK",
    5: "PUBREC",
    6: "PUBREL",
    7: "PUBCOMP",
    8: "SUBSCRIBE",
    9: "SUBACK",
    10: "UNSUBSCRIBE",
    11: "UNSUBACK",
    12: "PINGREQ",
    13: "PINGRESP",
    14: "DISCONNECT",
}


class ProtocolViolation(BrokerError):  # noqa: N818 - it names the event
    """The peer broke the protocol or a limit; ``reason`` is the audit token.

    Raised by :meth:`PacketReader.feed`, ``packets`` holds the packets that came before the
    offending one in the same chunk: they were valid, and how TCP split the stream must not
    decide whether they count.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        self.packets: list[Packet] = []
        super().__init__(f"{reason}: {detail}")


class PacketTooLarge(ProtocolViolation):
    pass


def _malformed(detail: str) -> ProtocolViolation:
    return ProtocolViolation("malformed", detail)


# -- decoded packets -----------------------------------------------------------------------------


@dataclass(slots=True)
class Connect:
    protocol_level: int
    client_id: str
    clean_session: bool
    keepalive: int
    username: str | None = None
    password: bytes | None = None
    will_topic: str | None = None
    will_payload: bytes = b""
    will_qos: int = 0
    will_retain: bool = False


@dataclass(slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int


@dataclass(slots=True)
class Subscribe:
    packet_id: int
    topics: list[tuple[str, int]]


@dataclass(slots=True)
class Unsubscribe:
    packet_id: int
    topics: list[str]


Packet = Connect | Publish | Subscribe | Unsubscribe | tuple[int, int]
"""What :meth:`PacketReader.feed` yields: a decoded packet, or ``(type, packet_id)`` for the
acknowledgements (PUBACK, PUBREC, PUBREL, PUBCOMP) and ``(type, 0)`` for PINGREQ and DISCONNECT."""


def _string(body: bytes, at: int) -> tuple[str, int]:
    if at + 2 > len(body):
        raise _malformed("string runs past the packet")
    end = at + 2 + ((body[at] << 8) | body[at + 1])
    if end > len(body):
        raise _malformed("string runs past the packet")
    try:
        text = body[at + 2 : end].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation("malformed", "a string is not UTF-8") from None
    if "\x00" in text:
        raise _malformed("a string contains U+0000")
    return text, end


def _binary(body: bytes, at: int) -> tuple[bytes, int]:
    if at + 2 > len(body):
        raise _malformed("field runs past the packet")
    end = at + 2 + ((body[at] << 8) | body[at + 1])
    if end > len(body):
        raise _malformed("field runs past the packet")
    return body[at + 2 : end], end


def _packet_id(body: bytes, at: int) -> int:
    if at + 2 > len(body):
        raise _malformed("packet id missing")
    pid = (body[at] << 8) | body[at + 1]
    if pid == 0:
        raise _malformed("packet id 0")  # MQTT-2.3.1-1
    return pid


def decode_connect(body: bytes) -> Connect:
    name, at = _string(body, 0)
    if at + 4 > len(body):
        raise _malformed("CONNECT variable header is short")
    level, flags = body[at], body[at + 1]
    keepalive = (body[at + 2] << 8) | body[at + 3]
    at += 4
    if name not in ("MQTT", "MQIsdp"):
        raise ProtocolViolation("bad-connect", f"protocol name {name!r}")
    if flags & 0x01:
        raise _malformed("CONNECT reserved flag set")  # MQTT-3.1.2-3
    client_id, at = _string(body, at)
    packet = Connect(level, client_id, bool(flags & 0x02), keepalive)
    will_qos = (flags >> 3) & 0x03
    if flags & 0x04:
        if will_qos == 3:
            raise _malformed("will QoS 3")
        packet.will_topic, at = _string(body, at)
        packet.will_payload, at = _binary(body, at)
        packet.will_qos, packet.will_retain = will_qos, bool(flags & 0x20)
    elif will_qos or flags & 0x20:
        raise _malformed("will QoS or retain without a will")  # MQTT-3.1.2-13/15
    if flags & 0x80:
        packet.username, at = _string(body, at)
    if flags & 0x40:
        if not flags & 0x80:
            raise _malformed("password without user name")  # MQTT-3.1.2-22
        packet.password, at = _binary(body, at)
    if at != len(body):
        raise _malformed("bytes after the CONNECT payload")
    return packet


def _decode_publish(flags: int, body: bytes) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise _malformed("PUBLISH with QoS 3")
    topic, at = _string(body, 0)
    if not topic or "+" in topic or "#" in topic:
        raise ProtocolViolation("invalid-publish-topic", "empty or wildcard topic name")
    pid = 0
    if qos:
        pid = _packet_id(body, at)
        at += 2
    elif flags & 0x08:
        raise _malformed("DUP set on QoS 0")  # MQTT-3.3.1-2
    return Publish(topic, body[at:], qos, bool(flags & 0x01), bool(flags & 0x08), pid)


def _decode_subscribe(body: bytes) -> Subscribe:
    pid = _packet_id(body, 0)
    at, topics = 2, []
    while at < len(body):
        topic, at = _string(body, at)
        if at >= len(body):
            raise _malformed("SUBSCRIBE filter without QoS")
        qos = body[at]
        if qos > 2:
            raise _malformed("SUBSCRIBE QoS above 2 or reserved bits set")  # MQTT-3.8.3-4
        topics.append((topic, qos))
        at += 1
    if not topics:
        raise ProtocolViolation("malformed", "SUBSCRIBE without a filter")  # MQTT-3.8.3-3
    return Subscribe(pid, topics)


def _decode_unsubscribe(body: bytes) -> Unsubscribe:
    pid = _packet_id(body, 0)
    at, topics = 2, []
    while at < len(body):
        topic, at = _string(body, at)
        topics.append(topic)
    if not topics:
        raise _malformed("UNSUBSCRIBE without a filter")  # MQTT-3.10.3-2
    return Unsubscribe(pid, topics)


class PacketReader:
    """Bytes in, packets out. Keeps at most one partial packet (bounded by the size limit)."""

    __slots__ = ("_buf", "_max", "_need", "connected")

    def __init__(self, max_packet_bytes: int) -> None:
        # A partial packet. A bytearray, so a packet trickling in small TLS records is appended
        # to, not copied again per record (which would be quadratic in the packet size).
        self._buf = bytearray()
        self._need = 0  # the partial packet's total size once its header is complete
        self._max = max_packet_bytes
        # Until a CONNECT was read only CONNECT may arrive (MQTT-3.1.0-1), then never again
        # (MQTT-3.1.0-2).
        self.connected = False

    @property
    def partial(self) -> bool:
        """A packet has started and is not complete (the packet timeout applies)."""
        return bool(self._buf)

    def feed(self, data: bytes) -> list[Packet]:
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return []
            buf = bytes(self._buf)
            self._buf = bytearray()
        else:
            buf = data
        self._need = 0
        out: list[Packet] = []
        try:
            return self._frame(buf, out)
        except ProtocolViolation as exc:
            exc.packets = out
            raise

    def _frame(self, buf: bytes, out: list[Packet]) -> list[Packet]:
        at, size = 0, len(buf)
        while at < size:
            first = buf[at]
            # Remaining length: 1 to 4 bytes, 7 bits each (section 2.2.3).
            length, shift, i = 0, 0, at + 1
            while True:
                if i >= size:
                    self._buf = bytearray(buf[at:])
                    return out
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                i += 1
                if not byte & 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise _malformed("remaining length longer than 4 bytes")
            total = i - at + length
            if total > self._max:
                raise PacketTooLarge("packet-too-large", f"{total} bytes > {self._max}")
            end = i + length
            if end > size:
                self._buf = bytearray(buf[at:])
                self._need = total
                return out
            out.append(self._decode(first, buf[i:end]))
            at = end
        return out

    def _decode(self, first: int, body: bytes) -> Packet:
        kind, flags = first >> 4, first & 0x0F
        if kind == PUBLISH:
            if not self.connected:
                raise ProtocolViolation("bad-connect", "PUBLISH before CONNECT")
            return _decode_publish(flags, body)
        required = _REQUIRED_FLAGS.get(kind)
        if required is None:
            name = _NAMES.get(kind, f"type {kind}")
            raise _malformed(f"{name} is not sent by clients")
        if flags != required:
            raise _malformed(f"{_NAMES[kind]} with flags {flags:#x}")
        if kind == CONNECT:
            if self.connected:
                raise ProtocolViolation("malformed", "second CONNECT")
            packet = decode_connect(body)
            self.connected = True  # packets behind it in the same read are decoded as such
            return packet
        if not self.connected:
            raise ProtocolViolation("bad-connect", f"{_NAMES[kind]} before CONNECT")
        if kind in (PUBACK, PUBREC, PUBREL, PUBCOMP):
            if len(body) != 2:
                raise _malformed(f"{_NAMES[kind]} of {len(body)} bytes")
            return (kind, _packet_id(body, 0))
        if kind == SUBSCRIBE:
            return _decode_subscribe(body)
        if kind == UNSUBSCRIBE:
            return _decode_unsubscribe(body)
        if body:
            raise _malformed(f"{_NAMES[kind]} with a body")
        return (kind, 0)


# -- encoders ------------------------------------------------------------------------------------


def _length(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def encode_publish(
    topic: bytes, payload: bytes, qos: int, retain: bool, packet_id: int = 0, dup: bool = False
) -> bytes:
    """A PUBLISH packet; ``topic`` is already UTF-8 (the broker encodes each topic once)."""
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (8 if dup else 0)
    tlen = len(topic)
    if qos:
        body_len = 4 + tlen + len(payload)
        head = bytes((tlen >> 8, tlen & 0xFF)) + topic + packet_id.to_bytes(2, "big")
    else:
        body_len = 2 + tlen + len(payload)
        head = bytes((tlen >> 8, tlen & 0xFF)) + topic
    return bytes((first,)) + _length(body_len) + head + payload


def connack(session_present: bool, code: int) -> bytes:
    return bytes((0x20, 2, 1 if session_present and code == 0 else 0, code))


def _ack(first: int, packet_id: int) -> bytes:
    return bytes((first, 2, packet_id >> 8, packet_id & 0xFF))


def puback(packet_id: int) -> bytes:
    return _ack(0x40, packet_id)


def pubrec(packet_id: int) -> bytes:
    return _ack(0x50, packet_id)


def pubrel(packet_id: int) -> bytes:
    return _ack(0x62, packet_id)


def pubcomp(packet_id: int) -> bytes:
    return _ack(0x70, packet_id)


def suback(packet_id: int, codes: list[int]) -> bytes:
    return b"\x90" + _length(2 + len(codes)) + packet_id.to_bytes(2, "big") + bytes(codes)


def unsuback(packet_id: int) -> bytes:
    return _ack(0xB0, packet_id)


def pingresp() -> bytes:
    return b"\xd0\x00"
