"""MQTT 3.1.1 and 5.0 on the wire, sans-IO: a framer that turns bytes into packets, and encoders.

Nothing here touches a socket, a clock or the broker's state, so every rule can be tested by
feeding bytes. The broker's connection (``broker.connection``) feeds what TLS decrypted into
:class:`PacketReader` and writes what the encoders return.

The reader is strict where a lax reader has bitten brokers (research/amqtt.md): the length of a
packet is checked against ``max_packet_bytes`` as soon as its header is complete, before the body
is buffered; reserved flag bits, QoS 3, a PUBLISH topic with wildcards or U+0000, a zero packet id
and a packet type only a server may send are all :class:`ProtocolViolation`; strings must be
UTF-8. Decoding builds small slotted objects, and a PUBLISH body is sliced once, because this is
the hot path of the broker.

The protocol level of the CONNECT decides how every later packet of the connection is read:
levels 3 and 4 (MQTT 3.1 and 3.1.1) exactly as before MQTT 5 existed here, level 5 with its
properties and reason codes. A :class:`ProtocolViolation` carries the MQTT 5 reason code the spec
names for it (``code``), so a level-5 peer can be told why in a CONNACK or DISCONNECT. Section and
statement numbers in the comments (``MQTT-3.8.3-5``, "3.1.2.11.3") are those of the MQTT 5.0
specification where the rule is MQTT 5 only, and of 3.1.1 on the 3.1.1 paths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, NamedTuple

from broker.errors import BrokerError

__all__ = [
    "AUTH",
    "CONNACK_ACCEPTED",
    "CONNACK_BAD_CREDENTIALS",
    "CONNACK_IDENTIFIER_REJECTED",
    "CONNACK_NOT_AUTHORIZED",
    "CONNACK_UNACCEPTABLE_PROTOCOL",
    "CONNECT",
    "DISCONNECT",
    "MAX_USER_PROPERTIES",
    "MAX_USER_PROPERTY_BYTES",
    "NO_PROPERTIES",
    "PINGREQ",
    "PROPERTY_PACKETS",
    "PUBACK",
    "PUBCOMP",
    "PUBLISH",
    "PUBREC",
    "PUBREL",
    "REASON_CODES",
    "SUBACK_FAILURE",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "WILL",
    "Ack",
    "Auth",
    "ClientPacketReader",
    "Connack",
    "Connect",
    "Disconnect",
    "PacketReader",
    "PacketTooLarge",
    "Properties",
    "ProtocolViolation",
    "Publish",
    "Reason",
    "Suback",
    "Subscribe",
    "SubscriptionOptions",
    "Unsuback",
    "Unsubscribe",
    "ack5",
    "auth5",
    "connack",
    "connack5",
    "decode_properties",
    "disconnect5",
    "encode_connect",
    "encode_properties",
    "encode_publish",
    "encode_publish5",
    "encode_subscribe",
    "encode_unsubscribe",
    "pingresp",
    "puback",
    "pubcomp",
    "pubrec",
    "pubrel",
    "suback",
    "suback5",
    "unsuback",
    "unsuback5",
]

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
AUTH = 15  # MQTT 5 only
WILL = 0
"""Not a packet type (0 is reserved): the will properties of a CONNECT, in the property tables."""

CONNACK_ACCEPTED = 0
CONNACK_UNACCEPTABLE_PROTOCOL = 1
CONNACK_IDENTIFIER_REJECTED = 2
CONNACK_BAD_CREDENTIALS = 4  # "bad user name or password": a token or secret that does not verify
CONNACK_NOT_AUTHORIZED = 5
SUBACK_FAILURE = 0x80

MAX_USER_PROPERTIES = 64
"""Default bound on the User Properties of one property set (a CONNECT, its will, a PUBLISH ...).
The spec sets none; an unbounded list lets one client make the broker keep and copy, for every
subscriber, as many small pairs as fit in a packet. More is Quota exceeded (0x97)."""
MAX_USER_PROPERTY_BYTES = 8 * 1024
"""Default bound on the wire bytes (length prefixes included) of the User Properties of one
property set. More is Quota exceeded (0x97)."""

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
# The same for MQTT 5 (MQTT-2.1.3-1), where a client may also send AUTH (MQTT-3.15.1-1).
_REQUIRED_FLAGS5 = {**_REQUIRED_FLAGS, AUTH: 0}
_NAMES = {
    0: "will properties",
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
    15: "AUTH",
}


# -- reason codes (MQTT 5.0 section 2.4, table 2-6) -----------------------------------------------


class Reason(IntEnum):
    """Every MQTT 5.0 reason code, named as the spec names it (0x00 has three names)."""

    SUCCESS = 0x00
    NORMAL_DISCONNECTION = 0x00
    GRANTED_QOS_0 = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL_MESSAGE = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    RE_AUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


_ACK_CODES = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})  # tables 3-4, 3-5
REASON_CODES: dict[int, frozenset[int]] = {
    # table 3-1; 0x99 is in table 2-6 and 3-1 (a will whose payload is not its format, 3.1.3.2.3)
    CONNACK: frozenset(
        {0x00, *range(0x80, 0x8B), 0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}
    ),
    PUBACK: _ACK_CODES,
    PUBREC: _ACK_CODES,
    PUBREL: frozenset({0x00, 0x92}),  # table 3-6
    PUBCOMP: frozenset({0x00, 0x92}),  # table 3-7
    SUBACK: frozenset({0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2}),
    UNSUBACK: frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91}),  # table 3-9
    # table 3-10, plus 0x8C, which table 2-6 lists for DISCONNECT (a failed re-authentication)
    DISCONNECT: frozenset(
        {0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8C, 0x8D, 0x8E, 0x8F, 0x90}
        | set(range(0x93, 0xA3))
    ),
    AUTH: frozenset({0x00, 0x18, 0x19}),  # table 3-11
}
"""Which reason codes each packet may carry (MQTT-3.2.2-8, -3.4.2-1, -3.5.2-1, -3.6.2-1, -3.7.2-1,
-3.9.3-2, -3.11.3-2, -3.14.2-1, -3.15.2-1)."""

# What a client may send: table 3-10's "sent by" column, table 3-11's for AUTH (0x00 is the
# server's). Anything else from a client is a Protocol Error here.
_CLIENT_DISCONNECT_CODES = frozenset(
    {0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99}
)
_SERVER_DISCONNECT_CODES = REASON_CODES[DISCONNECT] - {0x04}
_CLIENT_AUTH_CODES = frozenset({0x18, 0x19})
_SERVER_AUTH_CODES = frozenset({0x00, 0x18})


# -- errors ----------------------------------------------------------------------------------------


class ProtocolViolation(BrokerError):  # noqa: N818 - it names the event
    """The peer broke the protocol or a limit; ``reason`` is the audit token.

    ``code`` is the MQTT 5 reason code for it (0x81 Malformed Packet, 0x82 Protocol Error, 0x95
    Packet too large, ...), to send in a CONNACK or DISCONNECT to a level-5 peer.

    Raised by :meth:`PacketReader.feed`, ``packets`` holds the packets that came before the
    offending one in the same chunk: they were valid, and how TCP split the stream must not
    decide whether they count.
    """

    def __init__(self, reason: str, detail: str, code: int = Reason.MALFORMED_PACKET) -> None:
        self.reason = reason
        self.detail = detail
        self.code = code
        self.packets: list[Packet] = []
        super().__init__(f"{reason}: {detail}")


class PacketTooLarge(ProtocolViolation):
    pass


def _malformed(detail: str) -> ProtocolViolation:
    return ProtocolViolation("malformed", detail)


def _protocol_error(detail: str) -> ProtocolViolation:
    return ProtocolViolation("protocol-error", detail, Reason.PROTOCOL_ERROR)


# -- MQTT 5 properties (section 2.2.2) -------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, repr=False)
class Properties:
    """The properties of one MQTT 5 packet, or of a will; a field left at its default is absent.

    Decoded values are as on the wire (absent is ``None``, not the spec's default value), so a
    forwarded message carries exactly what its publisher sent (MQTT-3.3.2-4, -15 to -18, -20).
    """

    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_identifiers: tuple[int, ...] = ()
    session_expiry_interval: int | None = None
    assigned_client_identifier: str | None = None
    server_keep_alive: int | None = None
    authentication_method: str | None = None
    authentication_data: bytes | None = None
    request_problem_information: int | None = None
    will_delay_interval: int | None = None
    request_response_information: int | None = None
    response_information: str | None = None
    server_reference: str | None = None
    reason_string: str | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    topic_alias: int | None = None
    maximum_qos: int | None = None
    retain_available: int | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    maximum_packet_size: int | None = None
    wildcard_subscription_available: int | None = None
    subscription_identifier_available: int | None = None
    shared_subscription_available: int | None = None

    def __repr__(self) -> str:
        items = self.__dict__.items()
        shown = ", ".join(f"{k}={v!r}" for k, v in items if v is not None and v != ())
        return f"Properties({shown})"


NO_PROPERTIES = Properties()
"""The properties of a packet that has none (and of every MQTT 3.1.1 packet); shared, frozen."""

_BYTE, _TWO, _FOUR, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_ANY = frozenset(
    {WILL, CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, SUBACK}
    | {UNSUBSCRIBE, UNSUBACK, DISCONNECT, AUTH}
)
_MESSAGE = frozenset({PUBLISH, WILL})
_REASONED = frozenset({CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK})
# Table 2-4: identifier -> (field, type, where it may appear).
_PROPERTY_TABLE: dict[int, tuple[str, int, frozenset[int]]] = {
    0x01: ("payload_format_indicator", _BYTE, _MESSAGE),
    0x02: ("message_expiry_interval", _FOUR, _MESSAGE),
    0x03: ("content_type", _UTF8, _MESSAGE),
    0x08: ("response_topic", _UTF8, _MESSAGE),
    0x09: ("correlation_data", _BINARY, _MESSAGE),
    0x0B: ("subscription_identifiers", _VARINT, frozenset({PUBLISH, SUBSCRIBE})),
    0x11: ("session_expiry_interval", _FOUR, frozenset({CONNECT, CONNACK, DISCONNECT})),
    0x12: ("assigned_client_identifier", _UTF8, frozenset({CONNACK})),
    0x13: ("server_keep_alive", _TWO, frozenset({CONNACK})),
    0x15: ("authentication_method", _UTF8, frozenset({CONNECT, CONNACK, AUTH})),
    0x16: ("authentication_data", _BINARY, frozenset({CONNECT, CONNACK, AUTH})),
    0x17: ("request_problem_information", _BYTE, frozenset({CONNECT})),
    0x18: ("will_delay_interval", _FOUR, frozenset({WILL})),
    0x19: ("request_response_information", _BYTE, frozenset({CONNECT})),
    0x1A: ("response_information", _UTF8, frozenset({CONNACK})),
    0x1C: ("server_reference", _UTF8, frozenset({CONNACK, DISCONNECT})),
    0x1F: ("reason_string", _UTF8, _REASONED | {DISCONNECT, AUTH}),
    0x21: ("receive_maximum", _TWO, frozenset({CONNECT, CONNACK})),
    0x22: ("topic_alias_maximum", _TWO, frozenset({CONNECT, CONNACK})),
    0x23: ("topic_alias", _TWO, frozenset({PUBLISH})),
    0x24: ("maximum_qos", _BYTE, frozenset({CONNACK})),
    0x25: ("retain_available", _BYTE, frozenset({CONNACK})),
    0x26: ("user_properties", _PAIR, _ANY),
    0x27: ("maximum_packet_size", _FOUR, frozenset({CONNECT, CONNACK})),
    0x28: ("wildcard_subscription_available", _BYTE, frozenset({CONNACK})),
    0x29: ("subscription_identifier_available", _BYTE, frozenset({CONNACK})),
    0x2A: ("shared_subscription_available", _BYTE, frozenset({CONNACK})),
}
PROPERTY_PACKETS: dict[str, frozenset[int]] = {f: p for f, _, p in _PROPERTY_TABLE.values()}
"""Property (field of :class:`Properties`) -> the packet types (and :data:`WILL`) it may be on."""
_BY_FIELD = {f: (pid, kind, p) for pid, (f, kind, p) in _PROPERTY_TABLE.items()}
assert set(_BY_FIELD) == {f.name for f in fields(Properties)}  # noqa: S101 - table and type agree

# Values the spec rules out, each a Protocol Error (0x82): identifier -> (allowed?, what).
_ZERO_OR_ONE = (lambda v: v <= 1, "a value other than 0 or 1")
_NOT_ZERO = (lambda v: v != 0, "the value 0")
_VALUE_RULES: dict[int, tuple[Callable[[int], bool], str]] = {
    # 3.3.2.3.2 and 3.1.3.2.3 define only 0 and 1 (Mosquitto refuses others the same way).
    0x01: _ZERO_OR_ONE,
    0x0B: _NOT_ZERO,  # 3.3.2.3.8, 3.8.2.1.2
    0x17: _ZERO_OR_ONE,  # 3.1.2.11.7
    0x19: _ZERO_OR_ONE,  # 3.1.2.11.6
    0x21: _NOT_ZERO,  # 3.1.2.11.3, 3.2.2.3.3
    0x24: _ZERO_OR_ONE,  # 3.2.2.3.4
    0x25: _ZERO_OR_ONE,  # 3.2.2.3.5
    0x27: _NOT_ZERO,  # 3.1.2.11.4, 3.2.2.3.6
    0x28: _ZERO_OR_ONE,  # 3.2.2.3.11
    0x29: _ZERO_OR_ONE,  # 3.2.2.3.12
    0x2A: _ZERO_OR_ONE,  # 3.2.2.3.13
}
_USER_LIMITS = (MAX_USER_PROPERTIES, MAX_USER_PROPERTY_BYTES)
# Per packet type, the properties it may carry with their rules: one lookup per property read.
_ALLOWED: dict[int, dict[int, tuple[str, int, tuple[Callable[[int], bool], str] | None]]] = {
    packet: {
        pid: (name, kind, _VALUE_RULES.get(pid))
        for pid, (name, kind, where) in _PROPERTY_TABLE.items()
        if packet in where
    }
    for packet in _ANY
}


def _varint(body: bytes, at: int, end: int) -> tuple[int, int]:
    """A Variable Byte Integer (1.5.5): at most 4 bytes (else malformed), minimal (MQTT-1.5.5-1)."""
    value, shift, start = 0, 0, at
    while True:
        if at >= end:
            raise _malformed("variable byte integer runs past its field")
        byte = body[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if not byte and at - start > 1:
                raise _malformed("variable byte integer not in its shortest form")  # MQTT-1.5.5-1
            return value, at
        shift += 7
        if shift > 21:
            raise _malformed("variable byte integer longer than 4 bytes")


def _byte(body: bytes, at: int, end: int) -> tuple[int, int]:
    if at >= end:
        raise _malformed("property runs past the properties")
    return body[at], at + 1


def _two(body: bytes, at: int, end: int) -> tuple[int, int]:
    if at + 2 > end:
        raise _malformed("property runs past the properties")
    return (body[at] << 8) | body[at + 1], at + 2


def _four(body: bytes, at: int, end: int) -> tuple[int, int]:
    if at + 4 > end:
        raise _malformed("property runs past the properties")
    return int.from_bytes(body[at : at + 4], "big"), at + 4


def _utf8_in(body: bytes, at: int, end: int) -> tuple[str, int]:
    return _string(body, at)  # ``body`` is the properties alone, so its end is ``end``


def _binary_in(body: bytes, at: int, end: int) -> tuple[bytes, int]:
    return _binary(body, at)


_READERS: dict[int, Callable[[bytes, int, int], tuple[Any, int]]] = {
    _BYTE: _byte,
    _TWO: _two,
    _FOUR: _four,
    _VARINT: _varint,
    _UTF8: _utf8_in,
    _BINARY: _binary_in,
}


def _properties(  # noqa: PLR0912, PLR0915 - one pass over the wire, each rule where it is read
    body: bytes, at: int, packet: int, limits: tuple[int, int] = _USER_LIMITS
) -> tuple[Properties, int]:
    """The property length and properties at ``at`` (2.2.2) -> (properties, offset after them)."""
    size = len(body)
    if at >= size:
        # MQTT-2.2.2-1: no properties is a Property Length of zero, never a missing one.
        raise _malformed(f"{_NAMES[packet]} without its property length")
    length = body[at]
    if length < 0x80:
        at += 1
    else:
        length, at = _varint(body, at, size)
    if not length:
        return NO_PROPERTIES, at
    end = at + length
    if end > size:
        raise _malformed(f"{_NAMES[packet]} property length runs past the packet")
    # Read inside a copy of just the properties, so a value that runs past the property length
    # is caught by the same bounds check as one that runs past the packet.
    region = body[at:end]
    props = object.__new__(Properties)
    values = props.__dict__
    users: list[tuple[str, str]] | None = None
    subscription_ids: list[int] | None = None
    user_bytes = 0
    allowed = _ALLOWED[packet]
    i = 0
    while i < length:
        pid = region[i]
        i += 1
        entry = allowed.get(pid)  # an identifier of 0x80 or more is never in it
        if entry is None:
            # 2.2.2.2: "an Identifier which is not valid for its packet type ... is a Malformed
            # Packet" (an unknown one is valid for none).
            known = _PROPERTY_TABLE.get(pid)
            if known is None:
                raise _malformed(f"unknown property identifier {pid:#04x}")
            raise _malformed(f"property {known[0]} is not allowed in {_NAMES[packet]}")
        name, kind, rule = entry
        if kind == _TWO:  # inline: Topic Alias, the most frequent property of a PUBLISH
            if i + 2 > length:
                raise _malformed(f"property {name} runs past the properties")
            value: Any = (region[i] << 8) | region[i + 1]
            i += 2
        elif kind == _PAIR:  # a User Property (MQTT-1.5.7-1)
            start = i
            key, i = _string(region, i)
            text, i = _string(region, i)
            if users is None:
                users = []
            users.append((key, text))
            user_bytes += i - start
            if len(users) > limits[0] or user_bytes > limits[1]:
                raise ProtocolViolation(
                    "user-property-flood",
                    f"more than {limits[0]} user properties or {limits[1]} bytes of them",
                    Reason.QUOTA_EXCEEDED,
                )
            continue
        else:
            value, i = _READERS[kind](region, i, length)
        if rule is not None and not rule[0](value):
            raise _protocol_error(f"property {name} with {rule[1]}")
        if pid == 0x0B:
            if subscription_ids is None:
                subscription_ids = []
            subscription_ids.append(value)
            # Several only where a server forwards one message for several subscriptions
            # (3.3.4); a SUBSCRIBE carries at most one (3.8.2.1.2).
            if packet == PUBLISH or len(subscription_ids) == 1:
                continue
        elif name not in values:
            values[name] = value
            continue
        # Each section 3.x.2 property: "It is a Protocol Error to include ... more than once".
        raise _protocol_error(f"property {name} more than once in {_NAMES[packet]}")
    if users:
        values["user_properties"] = tuple(users)
    if subscription_ids:
        values["subscription_identifiers"] = tuple(subscription_ids)
    return props, end


def _topic_name_rule(topic: str | None) -> str:
    """Why ``topic`` cannot be a Response Topic, or ''."""
    if topic is None:
        return ""
    if not topic:
        return "an empty Response Topic"  # MQTT-4.7.3-1
    if "+" in topic or "#" in topic:
        return "a Response Topic with wildcards"  # MQTT-3.3.2-14
    return ""


# -- decoded packets -----------------------------------------------------------------------------


@dataclass(slots=True)
class Connect:
    protocol_level: int
    client_id: str
    clean_session: bool  # Clean Start at level 5
    keepalive: int
    username: str | None = None
    password: bytes | None = None
    will_topic: str | None = None
    will_payload: bytes = b""
    will_qos: int = 0
    will_retain: bool = False
    properties: Properties = NO_PROPERTIES
    will_properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class Publish:
    topic: str  # empty at level 5 when a Topic Alias stands for it (3.3.2.3.4)
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int
    properties: Properties = NO_PROPERTIES


class SubscriptionOptions(NamedTuple):
    """The MQTT 5 options of one topic filter beside its QoS (3.8.3.1)."""

    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(slots=True)
class Subscribe:
    packet_id: int
    topics: list[tuple[str, int]]
    # Level 5: the options of ``topics[i]`` are ``options[i]``; empty at level 3 and 4.
    options: tuple[SubscriptionOptions, ...] = ()
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class Unsubscribe:
    packet_id: int
    topics: list[str]
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class Ack:
    """A level-5 PUBACK, PUBREC, PUBREL or PUBCOMP (``kind``), with its reason code."""

    kind: int
    packet_id: int
    reason_code: int = Reason.SUCCESS
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class Disconnect:
    """A level-5 DISCONNECT (at level 3 and 4 it is ``(DISCONNECT, 0)``)."""

    reason_code: int = Reason.NORMAL_DISCONNECTION
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class Auth:
    """A level-5 AUTH: a step of an extended authentication exchange (4.12)."""

    reason_code: int
    properties: Properties


@dataclass(slots=True)
class Connack:
    """A CONNACK, as :class:`ClientPacketReader` reads it (``reason_code`` is the 3.1.1 return
    code at level 3 and 4)."""

    session_present: bool
    reason_code: int
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class Suback:
    """A SUBACK: one reason code (granted QoS or failure) per filter of the SUBSCRIBE."""

    packet_id: int
    reason_codes: list[int]
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class Unsuback:
    """An UNSUBACK: one reason code per filter at level 5, none at level 3 and 4."""

    packet_id: int
    reason_codes: list[int]
    properties: Properties = NO_PROPERTIES


Packet = (
    Connect
    | Publish
    | Subscribe
    | Unsubscribe
    | Ack
    | Disconnect
    | Auth
    | Connack
    | Suback
    | Unsuback
    | tuple[int, int]
)
"""What :meth:`PacketReader.feed` yields: a decoded packet, or ``(type, packet_id)`` for the
acknowledgements (PUBACK, PUBREC, PUBREL, PUBCOMP) of level 3 and 4 and ``(type, 0)`` for
PINGREQ and PINGRESP (every level) and DISCONNECT (level 3 and 4). Level 5 acknowledgements are
:class:`Ack`, its DISCONNECT a :class:`Disconnect`. :class:`Connack`, :class:`Suback` and
:class:`Unsuback` come from a :class:`ClientPacketReader` only."""


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


def _packet_id5(body: bytes, at: int) -> int:
    if at + 2 > len(body):
        raise _malformed("packet id missing")
    pid = (body[at] << 8) | body[at + 1]
    if pid == 0:
        # MQTT-2.2.1-3. A zero parses; it is not allowed (1.2: a Protocol Error).
        raise _protocol_error("packet id 0")
    return pid


def _connect_level(body: bytes) -> int:
    """The protocol level byte of a CONNECT body, or 0 if it is not there."""
    if len(body) < 2:
        return 0
    at = 2 + ((body[0] << 8) | body[1])
    return body[at] if at < len(body) else 0


def decode_connect(  # noqa: PLR0912 - one branch per connect flag, in the spec's order
    body: bytes, limits: tuple[int, int] = _USER_LIMITS
) -> Connect:
    name, at = _string(body, 0)
    if at + 4 > len(body):
        raise _malformed("CONNECT variable header is short")
    level, flags = body[at], body[at + 1]
    keepalive = (body[at + 2] << 8) | body[at + 3]
    at += 4
    v5 = level == 5
    if name not in ("MQTT", "MQIsdp") or (v5 and name != "MQTT"):
        # MQTT-3.1.2-1: a level-5 peer may be answered with 0x84 before the connection closes.
        raise ProtocolViolation(
            "bad-connect", f"protocol name {name!r}", Reason.UNSUPPORTED_PROTOCOL_VERSION
        )
    if flags & 0x01:
        raise _malformed("CONNECT reserved flag set")  # MQTT-3.1.2-3
    properties = NO_PROPERTIES
    if v5:
        properties, at = _properties(body, at, CONNECT, limits)
        if properties.authentication_data is not None and properties.authentication_method is None:
            # 3.1.2.11.10
            raise _protocol_error("Authentication Data without Authentication Method")
    client_id, at = _string(body, at)
    packet = Connect(level, client_id, bool(flags & 0x02), keepalive)
    packet.properties = properties
    will_qos = (flags >> 3) & 0x03
    if flags & 0x04:
        if will_qos == 3:
            raise _malformed("will QoS 3")  # 5.0: MQTT-3.1.2-12
        if v5:
            packet.will_properties, at = _properties(body, at, WILL, limits)  # MQTT-3.1.3-1
            why = _topic_name_rule(packet.will_properties.response_topic)
            if why:
                raise _protocol_error(f"will with {why}")
        packet.will_topic, at = _string(body, at)
        packet.will_payload, at = _binary(body, at)
        packet.will_qos, packet.will_retain = will_qos, bool(flags & 0x20)
    elif will_qos or flags & 0x20:
        raise _malformed("will QoS or retain without a will")  # MQTT-3.1.2-13/15; 5.0: -11/-13
    if flags & 0x80:
        packet.username, at = _string(body, at)
    if flags & 0x40:
        if not flags & 0x80 and not v5:
            # MQTT-3.1.2-22; MQTT 5 allows a password without a user name (3.1.2.9).
            raise _malformed("password without user name")
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
    return Publish(topic, body[at:], qos, (flags & 0x01) != 0, (flags & 0x08) != 0, pid)


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


# -- level 5 decoders ------------------------------------------------------------------------------


def _decode_publish5(
    flags: int, body: bytes, limits: tuple[int, int], from_client: bool = True
) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise _malformed("PUBLISH with QoS 3")  # MQTT-3.3.1-4
    topic, at = _string(body, 0)
    if "+" in topic or "#" in topic:
        # MQTT-3.3.2-2. It parses, so not Malformed; 0x90 is the code that names the field.
        raise ProtocolViolation(
            "invalid-publish-topic", "wildcard in a topic name", Reason.TOPIC_NAME_INVALID
        )
    pid = 0
    if qos:
        pid = _packet_id5(body, at)
        at += 2
    elif flags & 0x08:
        raise _malformed("DUP set on QoS 0")  # MQTT-3.3.1-2
    size = len(body)
    if at < size and not body[at]:
        props, at = NO_PROPERTIES, at + 1  # the common case: no properties, nothing to build
    elif (alias_only := _ALIAS_BLOCKS.get(block := body[at : at + 4])) is not None:
        # A Topic Alias alone (the next most common case), as these four bytes were before:
        # one shared object per alias value, as _properties would build it (only the field on
        # the wire in its __dict__).
        props, at = alias_only, at + 4
    elif len(block) == 4 and block[0] == 3 and block[1] == 0x23:
        props, at = _alias_only(block), at + 4  # the first time for this alias value
    else:
        props, at = _properties(body, at, PUBLISH, limits)
        values = props.__dict__
        if from_client and values.get("subscription_identifiers"):
            # MQTT-3.3.4-6
            raise _protocol_error("PUBLISH from a client with a Subscription Identifier")
        if "response_topic" in values:
            why = _topic_name_rule(props.response_topic)
            if why:
                raise _protocol_error(f"PUBLISH with {why}")
    if not topic and props.topic_alias is None:
        raise _protocol_error("PUBLISH without a topic name or a topic alias")  # 3.3.2.1
    return Publish(topic, body[at:], qos, (flags & 0x01) != 0, (flags & 0x08) != 0, pid, props)


# The property block of a Topic Alias alone (03 23 hi lo) -> its Properties: at most 65,536.
_ALIAS_BLOCKS: dict[bytes, Properties] = {}


def _alias_only(block: bytes) -> Properties:
    props = object.__new__(Properties)
    props.__dict__["topic_alias"] = (block[2] << 8) | block[3]
    _ALIAS_BLOCKS[block] = props
    return props


def _decode_ack5(kind: int, body: bytes, limits: tuple[int, int]) -> Ack:
    size = len(body)
    if size == 2 and (body[0] or body[1]):
        # 3.4.2.1: no reason code is 0x00 Success, no properties (the common case, read first)
        return Ack(kind, (body[0] << 8) | body[1])
    pid = _packet_id5(body, 0)
    code = body[2]
    if code not in REASON_CODES[kind]:
        # MQTT-3.4.2-1, -3.5.2-1, -3.6.2-1, -3.7.2-1 ("MUST use one of" the packet's codes)
        raise _protocol_error(f"{_NAMES[kind]} with reason code {code:#04x}")
    if size == 3:
        return Ack(kind, pid, code)  # 3.4.2.2.1: under 4 bytes there is no property length
    props, at = _properties(body, 3, kind, limits)
    if at != size:
        raise _malformed(f"bytes after the {_NAMES[kind]} properties")
    return Ack(kind, pid, code, props)


def _decode_subscribe5(body: bytes, limits: tuple[int, int]) -> Subscribe:
    pid = _packet_id5(body, 0)
    props, at = _properties(body, 2, SUBSCRIBE, limits)
    topics: list[tuple[str, int]] = []
    options: list[SubscriptionOptions] = []
    size = len(body)
    while at < size:
        topic, at = _string(body, at)  # MQTT-3.8.3-1
        if at >= size:
            raise _malformed("SUBSCRIBE filter without subscription options")
        byte = body[at]
        at += 1
        if byte & 0xC0:
            raise _malformed("SUBSCRIBE options with reserved bits set")  # MQTT-3.8.3-5
        qos, retain_handling = byte & 0x03, (byte >> 4) & 0x03
        if qos == 3:
            raise _protocol_error("SUBSCRIBE with maximum QoS 3")  # 3.8.3.1
        if retain_handling == 3:
            raise _protocol_error("SUBSCRIBE with Retain Handling 3")  # 3.8.3.1
        no_local = bool(byte & 0x04)
        if no_local and topic.startswith("$share/"):
            raise _protocol_error("No Local on a shared subscription")  # MQTT-3.8.3-4
        topics.append((topic, qos))
        options.append(SubscriptionOptions(no_local, bool(byte & 0x08), retain_handling))
    if not topics:
        raise _protocol_error("SUBSCRIBE without a filter")  # MQTT-3.8.3-2
    return Subscribe(pid, topics, tuple(options), props)


def _decode_unsubscribe5(body: bytes, limits: tuple[int, int]) -> Unsubscribe:
    pid = _packet_id5(body, 0)
    props, at = _properties(body, 2, UNSUBSCRIBE, limits)
    topics = []
    while at < len(body):
        topic, at = _string(body, at)  # MQTT-3.10.3-1
        topics.append(topic)
    if not topics:
        raise _protocol_error("UNSUBSCRIBE without a filter")  # MQTT-3.10.3-2
    return Unsubscribe(pid, topics, props)


def _decode_disconnect5(
    body: bytes, limits: tuple[int, int], codes: frozenset[int] = _CLIENT_DISCONNECT_CODES
) -> Disconnect:
    if not body:
        return Disconnect()  # 3.14.2.1: no reason code is 0x00 Normal disconnection
    code = body[0]
    if code not in codes:
        # MQTT-3.14.2-1, with the "sent by" column of table 3-10
        raise _protocol_error(f"DISCONNECT with reason code {code:#04x} from this side")
    if len(body) == 1:
        return Disconnect(code)  # 3.14.2.2.1: under 2 bytes there is no property length
    props, at = _properties(body, 1, DISCONNECT, limits)
    if at != len(body):
        raise _malformed("bytes after the DISCONNECT properties")
    return Disconnect(code, props)


def _decode_auth(
    body: bytes, limits: tuple[int, int], codes: frozenset[int] = _CLIENT_AUTH_CODES
) -> Auth:
    # A client sends Continue (0x18) or Re-authenticate (0x19), both with a method, so the
    # short form (Success, no properties: 3.15.2.1) never comes from a client.
    if not body:
        raise _protocol_error("AUTH without Authentication Method")  # 3.15.2.2.2
    code = body[0]
    if code not in codes:
        raise _protocol_error(f"AUTH with reason code {code:#04x} from this side")  # MQTT-3.15.2-1
    props, at = _properties(body, 1, AUTH, limits)
    if at != len(body):
        raise _malformed("bytes after the AUTH properties")
    if props.authentication_method is None:
        raise _protocol_error("AUTH without Authentication Method")  # 3.15.2.2.2
    return Auth(code, props)


class PacketReader:
    """Bytes in, packets out. Keeps at most one partial packet (bounded by the size limit).

    The CONNECT's protocol level decides how the rest of the stream is read (``level``). Level 5
    user properties are bounded per property set by ``max_user_properties`` pairs and
    ``max_user_property_bytes`` wire bytes (Quota exceeded, 0x97, beyond).
    """

    __slots__ = ("_buf", "_limits", "_max", "_need", "_v5", "connected", "level")

    def __init__(
        self,
        max_packet_bytes: int,
        *,
        max_user_properties: int = MAX_USER_PROPERTIES,
        max_user_property_bytes: int = MAX_USER_PROPERTY_BYTES,
    ) -> None:
        # A partial packet. A bytearray, so a packet trickling in small TLS records is appended
        # to, not copied again per record (which would be quadratic in the packet size).
        self._buf = bytearray()
        self._need = 0  # the partial packet's total size once its header is complete
        self._max = max_packet_bytes
        self._limits = (max_user_properties, max_user_property_bytes)
        # Until a CONNECT was read only CONNECT may arrive (MQTT-3.1.0-1), then never again
        # (MQTT-3.1.0-2).
        self.connected = False
        # The CONNECT's protocol level (0 before one arrived). Known even when the rest of that
        # CONNECT is broken, so the refusal can be sent in the peer's own version.
        self.level = 0
        self._v5 = False

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
                    if not byte and shift and self._v5:
                        # 5.0 MQTT-1.5.5-1 (3.1.1 left it open, and 3.1.1 stays as it was).
                        raise _malformed("remaining length not in its shortest form")
                    break
                shift += 7
                if shift > 21:
                    raise _malformed("remaining length longer than 4 bytes")
            total = i - at + length
            if total > self._max:
                # 5.0: 3.2.2.3.6, a packet above the Maximum Packet Size is answered with 0x95.
                raise PacketTooLarge(
                    "packet-too-large", f"{total} bytes > {self._max}", Reason.PACKET_TOO_LARGE
                )
            end = i + length
            if end > size:
                self._buf = bytearray(buf[at:])
                self._need = total
                return out
            if self._v5:
                out.append(self._decode5(first, buf[i:end]))
            else:
                out.append(self._decode(first, buf[i:end]))
            at = end
        return out

    def _decode(self, first: int, body: bytes) -> Packet:  # noqa: PLR0912 - one per packet type
        kind, flags = first >> 4, first & 0x0F
        if kind == PUBLISH:
            if not self.connected:
                raise ProtocolViolation(
                    "bad-connect", "PUBLISH before CONNECT", Reason.PROTOCOL_ERROR
                )
            return _decode_publish(flags, body)
        required = _REQUIRED_FLAGS.get(kind)
        if required is None:
            name = _NAMES.get(kind, f"type {kind}")
            raise _malformed(f"{name} is not sent by clients")
        if flags != required:
            raise _malformed(f"{_NAMES[kind]} with flags {flags:#x}")
        if kind == CONNECT:
            if self.connected:
                raise ProtocolViolation("malformed", "second CONNECT", Reason.PROTOCOL_ERROR)
            try:
                packet = decode_connect(body, self._limits)
            except ProtocolViolation:
                self.level = _connect_level(body)
                raise
            self.connected = True  # packets behind it in the same read are decoded as such
            self.level = packet.protocol_level
            self._v5 = self.level == 5
            return packet
        if not self.connected:
            raise ProtocolViolation(
                "bad-connect", f"{_NAMES[kind]} before CONNECT", Reason.PROTOCOL_ERROR
            )
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

    def _decode5(self, first: int, body: bytes) -> Packet:  # noqa: PLR0911 - one per packet type
        """A packet after a level-5 CONNECT."""
        kind, flags = first >> 4, first & 0x0F
        if kind == PUBLISH:
            return _decode_publish5(flags, body, self._limits)
        required = _REQUIRED_FLAGS5.get(kind)
        if required is None:
            if kind == 0:
                raise _malformed("packet type 0 is reserved")  # 2.1.2
            raise _protocol_error(f"{_NAMES[kind]} is not sent by clients")
        if flags != required:
            raise _malformed(f"{_NAMES[kind]} with flags {flags:#x}")  # MQTT-2.1.3-1
        if kind == CONNECT:
            raise _protocol_error("second CONNECT")  # MQTT-3.1.0-2
        if kind <= PUBCOMP:
            return _decode_ack5(kind, body, self._limits)
        if kind == SUBSCRIBE:
            return _decode_subscribe5(body, self._limits)
        if kind == UNSUBSCRIBE:
            return _decode_unsubscribe5(body, self._limits)
        if kind == DISCONNECT:
            return _decode_disconnect5(body, self._limits)
        if kind == AUTH:
            return _decode_auth(body, self._limits)
        if body:
            raise _malformed("PINGREQ with a body")  # 3.12
        return (kind, 0)


_FROM_SERVER = frozenset({CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, PINGRESP})
_FROM_SERVER |= {DISCONNECT, AUTH}


class ClientPacketReader(PacketReader):
    """The client's side: the server's packets, at the level the client connected with.

    For tests and benchmarks that play a client without paho, and to read back what the broker's
    encoders write. Same framing and limits as :class:`PacketReader`; a packet only a client
    sends is refused here as the server's reader refuses a server's.
    """

    __slots__ = ()

    def __init__(
        self,
        max_packet_bytes: int,
        level: int,
        *,
        max_user_properties: int = MAX_USER_PROPERTIES,
        max_user_property_bytes: int = MAX_USER_PROPERTY_BYTES,
    ) -> None:
        super().__init__(
            max_packet_bytes,
            max_user_properties=max_user_properties,
            max_user_property_bytes=max_user_property_bytes,
        )
        self.connected = True
        self.level = level
        self._v5 = level == 5

    def _decode(self, first: int, body: bytes) -> Packet:
        """A server's packet at level 3 or 4 (MQTT 3.1.1 section 3)."""
        kind, flags = first >> 4, first & 0x0F
        if kind == PUBLISH:
            return _decode_publish(flags, body)
        if flags != (2 if kind == PUBREL else 0):
            raise _malformed(f"{_NAMES.get(kind, kind)} with flags {flags:#x}")
        if kind == CONNACK:
            if len(body) != 2 or body[0] > 1:
                raise _malformed("CONNACK of the wrong size or with reserved bits")  # 3.2.2.1
            return Connack(body[0] == 1, body[1])
        if kind in (PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK):
            if len(body) != 2:
                raise _malformed(f"{_NAMES[kind]} of {len(body)} bytes")
            pid = _packet_id(body, 0)
            return Unsuback(pid, []) if kind == UNSUBACK else (kind, pid)
        if kind == SUBACK:
            codes = list(body[2:])
            if not codes or any(c not in (0, 1, 2, 0x80) for c in codes):
                raise _malformed("SUBACK without return codes or with an unknown one")  # 3.9.3
            return Suback(_packet_id(body, 0), codes)
        if kind == PINGRESP and not body:
            return (kind, 0)
        raise _malformed(f"{_NAMES.get(kind, f'type {kind}')} is not sent by servers")

    def _decode5(self, first: int, body: bytes) -> Packet:  # noqa: PLR0911 - one per packet type
        """A server's packet at level 5."""
        kind, flags = first >> 4, first & 0x0F
        if kind == PUBLISH:
            # 3.3.4: a server's PUBLISH may carry Subscription Identifiers.
            return _decode_publish5(flags, body, self._limits, from_client=False)
        if kind not in _FROM_SERVER:
            if kind == 0:
                raise _malformed("packet type 0 is reserved")  # 2.1.2
            raise _protocol_error(f"{_NAMES[kind]} is not sent by servers")
        if flags != (2 if kind == PUBREL else 0):
            raise _malformed(f"{_NAMES[kind]} with flags {flags:#x}")  # MQTT-2.1.3-1
        if PUBACK <= kind <= PUBCOMP:
            return _decode_ack5(kind, body, self._limits)
        if kind == CONNACK:
            return _decode_connack5(body, self._limits)
        if kind in (SUBACK, UNSUBACK):
            return _decode_suback5(kind, body, self._limits)
        if kind == DISCONNECT:
            return _decode_disconnect5(body, self._limits, _SERVER_DISCONNECT_CODES)
        if kind == AUTH:
            return _decode_auth(body, self._limits, _SERVER_AUTH_CODES)
        if body:
            raise _malformed("PINGRESP with a body")  # 3.13
        return (kind, 0)


def _decode_connack5(body: bytes, limits: tuple[int, int]) -> Connack:
    if len(body) < 2:
        raise _malformed("CONNACK without flags and reason code")
    flags, code = body[0], body[1]
    if flags > 1:
        raise _malformed("CONNACK with reserved flag bits")  # MQTT-3.2.2-1
    if code not in REASON_CODES[CONNACK]:
        raise _protocol_error(f"CONNACK with reason code {code:#04x}")  # MQTT-3.2.2-8
    if flags and code:
        raise _protocol_error("CONNACK refusal with session present")  # MQTT-3.2.2-6
    props, at = _properties(body, 2, CONNACK, limits)
    if at != len(body):
        raise _malformed("bytes after the CONNACK properties")  # 3.2.3: no payload
    return Connack(flags == 1, code, props)


def _decode_suback5(kind: int, body: bytes, limits: tuple[int, int]) -> Suback | Unsuback:
    pid = _packet_id5(body, 0)
    props, at = _properties(body, 2, kind, limits)
    codes = list(body[at:])
    if not codes:
        raise _protocol_error(f"{_NAMES[kind]} without a reason code")  # 3.9.3, 3.11.3
    for code in codes:
        if code not in REASON_CODES[kind]:
            # MQTT-3.9.3-2, MQTT-3.11.3-2
            raise _protocol_error(f"{_NAMES[kind]} with reason code {code:#04x}")
    return (Suback if kind == SUBACK else Unsuback)(pid, codes, props)


# -- encoders ------------------------------------------------------------------------------------


def _length(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    if n < 16384:  # two bytes: a 100-byte payload with its topic lands here (every PUBLISH)
        return bytes(((n & 0x7F) | 0x80, n >> 7))
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


# -- level 5 encoders ------------------------------------------------------------------------------


def _utf8(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ValueError(f"a string of {len(data)} bytes does not fit a UTF-8 string field")
    return len(data).to_bytes(2, "big") + data


def decode_properties(data: bytes, packet: int) -> Properties:
    """The inverse of :func:`encode_properties` (property length, then properties): how the
    broker's store reads back the properties it kept (broker/store.py)."""
    props, at = _properties(data, 0, packet)
    if at != len(data):
        raise _malformed(f"{len(data) - at} bytes after the properties")
    return props


def encode_properties(props: Properties, packet: int) -> bytes:  # noqa: PLR0912 - one per type
    """The property length and properties of ``packet`` (a packet type, or :data:`WILL`).

    A property the packet may not carry is a ``ValueError`` (a bug in the caller, not the peer).
    The result can be kept: the broker encodes a message's properties once for its receivers.
    """
    if props is NO_PROPERTIES:
        return b"\x00"
    out = bytearray()
    for name, value in props.__dict__.items():
        if value is None or value == ():
            continue
        pid, kind, allowed = _BY_FIELD[name]
        if packet not in allowed:
            raise ValueError(f"property {name} is not allowed in {_NAMES[packet]}")
        if kind == _PAIR:
            for key, text in value:
                out.append(pid)
                out += _utf8(key)
                out += _utf8(text)
        elif kind == _VARINT:
            for number in value:
                if not 0 < number <= 268_435_455:
                    raise ValueError(f"subscription identifier {number} out of range")
                out.append(pid)
                out += _length(number)
        else:
            out.append(pid)
            if kind == _BYTE:
                out.append(value)
            elif kind == _TWO:
                out += value.to_bytes(2, "big")
            elif kind == _FOUR:
                out += value.to_bytes(4, "big")
            elif kind == _UTF8:
                out += _utf8(value)
            else:
                out += len(value).to_bytes(2, "big")
                out += value
    return _length(len(out)) + bytes(out)


_ACK_FIRST = {PUBACK: 0x40, PUBREC: 0x50, PUBREL: 0x62, PUBCOMP: 0x70}  # MQTT-3.6.1-1


def _check_code(packet: int, code: int, allowed: frozenset[int] | None = None) -> None:
    if code not in (REASON_CODES[packet] if allowed is None else allowed):
        raise ValueError(f"reason code {code:#04x} is not one {_NAMES[packet]} may carry")


def _frame5(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _length(len(body)) + body


def connack5(session_present: bool, code: int, properties: Properties = NO_PROPERTIES) -> bytes:
    """A level-5 CONNACK; session present only with 0x00 Success (MQTT-3.2.2-6)."""
    _check_code(CONNACK, code)
    flags = 1 if session_present and code == 0 else 0
    return _frame5(0x20, bytes((flags, code)) + encode_properties(properties, CONNACK))


def encode_publish5(
    topic: bytes,
    payload: bytes,
    qos: int,
    retain: bool,
    packet_id: int = 0,
    dup: bool = False,
    properties: bytes = b"\x00",
) -> bytes:
    """A level-5 PUBLISH. ``topic`` is UTF-8 (empty when a Topic Alias stands for it) and
    ``properties`` comes from :func:`encode_properties`: each is encoded once per message."""
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (8 if dup else 0)
    tlen = len(topic)
    if qos:
        head = bytes((tlen >> 8, tlen & 0xFF)) + topic + packet_id.to_bytes(2, "big") + properties
    else:
        head = bytes((tlen >> 8, tlen & 0xFF)) + topic + properties
    return bytes((first,)) + _length(len(head) + len(payload)) + head + payload


def ack5(kind: int, packet_id: int, code: int = 0, properties: Properties = NO_PROPERTIES) -> bytes:
    """A level-5 PUBACK, PUBREC, PUBREL or PUBCOMP, as short as 3.4.2.1 allows."""
    first = _ACK_FIRST[kind]
    if not code and properties is NO_PROPERTIES:
        return _ack(first, packet_id)
    _check_code(kind, code)
    props = encode_properties(properties, kind)
    pid = packet_id.to_bytes(2, "big")
    if props == b"\x00":
        return _ack(first, packet_id) if not code else _frame5(first, pid + bytes((code,)))
    return _frame5(first, pid + bytes((code,)) + props)


def suback5(packet_id: int, codes: list[int], properties: Properties = NO_PROPERTIES) -> bytes:
    for code in codes:
        _check_code(SUBACK, code)  # MQTT-3.9.3-2
    body = packet_id.to_bytes(2, "big") + encode_properties(properties, SUBACK) + bytes(codes)
    return _frame5(0x90, body)


def unsuback5(packet_id: int, codes: list[int], properties: Properties = NO_PROPERTIES) -> bytes:
    for code in codes:
        _check_code(UNSUBACK, code)  # MQTT-3.11.3-2
    body = packet_id.to_bytes(2, "big") + encode_properties(properties, UNSUBACK) + bytes(codes)
    return _frame5(0xB0, body)


def disconnect5(
    code: int = 0, properties: Properties = NO_PROPERTIES, *, from_client: bool = False
) -> bytes:
    """A DISCONNECT from the server (or a client), as short as 3.14.2.1 allows."""
    _check_code(
        DISCONNECT, code, _CLIENT_DISCONNECT_CODES if from_client else _SERVER_DISCONNECT_CODES
    )
    if properties.session_expiry_interval is not None and not from_client:
        # MQTT-3.14.2-2
        raise ValueError("a server never sends a Session Expiry Interval in DISCONNECT")
    props = encode_properties(properties, DISCONNECT)
    if props == b"\x00":
        return b"\xe0\x00" if not code else bytes((0xE0, 1, code))
    return _frame5(0xE0, bytes((code,)) + props)


def auth5(code: int, properties: Properties, *, from_client: bool = False) -> bytes:
    """An AUTH with its method (3.15.2.2.2): 0x00 Success or 0x18 Continue from the server,
    0x18 Continue or 0x19 Re-authenticate from a client (table 3-11)."""
    _check_code(AUTH, code, _CLIENT_AUTH_CODES if from_client else _SERVER_AUTH_CODES)
    if properties.authentication_method is None:
        raise ValueError("an AUTH packet needs its Authentication Method")
    return _frame5(0xF0, bytes((code,)) + encode_properties(properties, AUTH))


# -- level 3, 4 and 5 encoders of what a client sends (tests, benchmarks) ----------------------


def encode_connect(packet: Connect) -> bytes:
    """``packet`` as its protocol level writes it: what :func:`decode_connect` reads back."""
    level, v5 = packet.protocol_level, packet.protocol_level == 5
    flags = 0x02 if packet.clean_session else 0
    payload = _utf8(packet.client_id)
    if packet.will_topic is not None:
        flags |= 0x04 | (packet.will_qos << 3) | (0x20 if packet.will_retain else 0)
        if v5:
            payload += encode_properties(packet.will_properties, WILL)
        payload += _utf8(packet.will_topic)
        payload += len(packet.will_payload).to_bytes(2, "big") + packet.will_payload
    if packet.username is not None:
        flags |= 0x80
        payload += _utf8(packet.username)
    if packet.password is not None:
        flags |= 0x40
        payload += len(packet.password).to_bytes(2, "big") + packet.password
    head = _utf8("MQIsdp" if level == 3 else "MQTT") + bytes((level, flags))
    head += packet.keepalive.to_bytes(2, "big")
    if v5:
        head += encode_properties(packet.properties, CONNECT)
    return _frame5(0x10, head + payload)


def encode_subscribe(packet: Subscribe, level: int) -> bytes:
    """A SUBSCRIBE; at level 5 with ``packet.options`` (3.8.3.1) and properties."""
    body = packet.packet_id.to_bytes(2, "big")
    if level == 5:
        body += encode_properties(packet.properties, SUBSCRIBE)
    options = packet.options or (SubscriptionOptions(),) * len(packet.topics)
    for (topic_filter, qos), opt in zip(packet.topics, options, strict=True):
        byte = qos
        if level == 5:
            byte |= (opt.no_local << 2) | (opt.retain_as_published << 3)
            byte |= opt.retain_handling << 4
        body += _utf8(topic_filter) + bytes((byte,))
    return _frame5(0x82, body)


def encode_unsubscribe(packet: Unsubscribe, level: int) -> bytes:
    body = packet.packet_id.to_bytes(2, "big")
    if level == 5:
        body += encode_properties(packet.properties, UNSUBSCRIBE)
    return _frame5(0xA2, body + b"".join(_utf8(f) for f in packet.topics))
