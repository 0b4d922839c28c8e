"""MQTT 3.1.1 framing and encoding (``broker.mqtt``) against an encoder and a decoder written here.

The wire bytes in this file come from ``struct`` and the helpers of ``broker_helpers``, never from
``broker.mqtt``; the encoders of ``broker.mqtt`` are read back by a decoder that shares no code
with the reader. Every rule the reader enforces has a packet that breaks it, with its audit reason.
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.mqtt import (
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK_FAILURE,
    Connect,
    Packet,
    PacketReader,
    PacketTooLarge,
    ProtocolViolation,
    Publish,
    Subscribe,
    Unsubscribe,
    connack,
    encode_publish,
    pingresp,
    puback,
    pubcomp,
    pubrec,
    pubrel,
    suback,
    unsuback,
)
from tests.broker.broker_helpers import (
    _remaining,
    connect_packet,
    publish_header,
    publish_packet,
    subscribe_packet,
)

MiB = 1024 * 1024
BIG = 4 * MiB  # a size limit no test packet reaches unless it means to

# -- an independent encoder (struct, section 2 and 3 of the spec) ----------------------------------


def frame(first: int, body: bytes) -> bytes:
    """Fixed header (type and flags, remaining length) in front of ``body``."""
    return bytes([first]) + _remaining(len(body)) + body


def field(value: str | bytes) -> bytes:
    """A length-prefixed string or binary field; bytes are sent as they are (even if not UTF-8)."""
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def connect(
    client_id: str | bytes = "c",
    *,
    clean: bool = True,
    keepalive: int = 60,
    will: tuple[str | bytes, bytes, int, bool] | None = None,
    username: str | bytes | None = None,
    password: bytes | None = None,
    flags: int | None = None,
    name: str = "MQTT",
    level: int = 4,
    extra: bytes = b"",
    first: int = 0x10,
) -> bytes:
    """A CONNECT; ``flags`` overrides the computed connect flags byte (to break the rules)."""
    computed = 0x02 if clean else 0
    payload = field(client_id)
    if will is not None:
        topic, message, qos, retain = will
        computed |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += field(topic) + field(message)
    if username is not None:
        computed |= 0x80
        payload += field(username)
    if password is not None:
        computed |= 0x40
        payload += field(password)
    connect_flags = computed if flags is None else flags
    body = field(name) + struct.pack("!BBH", level, connect_flags, keepalive) + payload + extra
    return frame(first, body)


def publish(
    topic: str | bytes,
    payload: bytes = b"",
    *,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int | None = None,
    flags: int | None = None,
) -> bytes:
    """A PUBLISH; a packet id is written when ``qos`` > 0 or ``packet_id`` is given."""
    computed = (qos << 1) | (1 if retain else 0) | (8 if dup else 0)
    body = field(topic)
    if packet_id is not None or qos:
        body += struct.pack("!H", 1 if packet_id is None else packet_id)
    return frame(0x30 | (computed if flags is None else flags), body + payload)


def subscribe(packet_id: int, filters: list[tuple[str | bytes, int]], *, flags: int = 2) -> bytes:
    body = struct.pack("!H", packet_id)
    for topic_filter, qos in filters:
        body += field(topic_filter) + bytes([qos])
    return frame(0x80 | flags, body)


def unsubscribe(packet_id: int, filters: list[str | bytes], *, flags: int = 2) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(field(f) for f in filters)
    return frame(0xA0 | flags, body)


ACK_FLAGS = {PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0}


def ack(kind: int, packet_id: int, *, flags: int | None = None) -> bytes:
    first = (kind << 4) | (ACK_FLAGS[kind] if flags is None else flags)
    return frame(first, struct.pack("!H", packet_id))


PINGREQ_BYTES = b"\xc0\x00"
DISCONNECT_BYTES = b"\xe0\x00"

# -- an independent decoder for what the broker sends ----------------------------------------------


def unframe(data: bytes) -> tuple[int, bytes]:
    """(first byte, body) of exactly one packet; fails on trailing bytes or a long length."""
    length, multiplier, at = 0, 1, 1
    while True:
        byte = data[at]
        at += 1
        length += (byte & 0x7F) * multiplier
        multiplier *= 128
        if byte < 0x80:
            break
        assert at < 5, "remaining length longer than 4 bytes"
    assert len(data) == at + length, (len(data), at, length)
    return data[0], data[at:]


def read_publish(data: bytes) -> tuple[str, bytes, int, bool, bool, int]:
    """(topic, payload, qos, retain, dup, packet_id) of an encoded PUBLISH."""
    first, body = unframe(data)
    assert first >> 4 == PUBLISH
    qos = (first >> 1) & 3
    (tlen,) = struct.unpack_from("!H", body)
    topic = body[2 : 2 + tlen].decode()
    at, packet_id = 2 + tlen, 0
    if qos:
        (packet_id,) = struct.unpack_from("!H", body, at)
        at += 2
    return topic, body[at:], qos, bool(first & 1), bool(first & 8), packet_id


# -- helpers ---------------------------------------------------------------------------------------


def connected_reader(max_bytes: int = BIG) -> PacketReader:
    reader = PacketReader(max_bytes)
    assert reader.feed(connect()) == [Connect(4, "c", True, 60)]
    assert reader.connected
    return reader


def feed_all(reader: PacketReader, chunks: list[bytes]) -> list[Packet]:
    out: list[Packet] = []
    for chunk in chunks:
        out += reader.feed(chunk)
    return out


def violation(*chunks: bytes, connected: bool = True, max_bytes: int = BIG) -> ProtocolViolation:
    """Feed ``chunks`` (after a CONNECT if ``connected``) and return the violation raised."""
    reader = connected_reader(max_bytes) if connected else PacketReader(max_bytes)
    with pytest.raises(ProtocolViolation) as info:
        feed_all(reader, list(chunks))
    return info.value


# -- generated packets: wire bytes and what the reader must make of them ---------------------------

text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=10)
topic_names = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00+#"), min_size=1, max_size=10
)
packet_ids = st.integers(1, 0xFFFF)
qos_levels = st.integers(0, 2)
Wire = tuple[bytes, Packet]


@st.composite
def connects(draw: st.DrawFn) -> Wire:
    client_id = draw(text)
    clean = draw(st.booleans())
    keepalive = draw(st.integers(0, 0xFFFF))
    name, level = draw(st.sampled_from([("MQTT", 4), ("MQIsdp", 3)]))
    expected = Connect(level, client_id, clean, keepalive)
    will: tuple[str | bytes, bytes, int, bool] | None = None
    if draw(st.booleans()):
        will_topic, will_payload = draw(topic_names), draw(st.binary(max_size=20))
        will_qos, will_retain = draw(qos_levels), draw(st.booleans())
        will = (will_topic, will_payload, will_qos, will_retain)
        expected.will_topic, expected.will_payload = will_topic, will_payload
        expected.will_qos, expected.will_retain = will_qos, will_retain
    username: str | None = None
    password: bytes | None = None
    if draw(st.booleans()):
        username = expected.username = draw(text)
        if draw(st.booleans()):
            password = expected.password = draw(st.binary(max_size=20))
    wire = connect(
        client_id,
        clean=clean,
        keepalive=keepalive,
        will=will,
        username=username,
        password=password,
        name=name,
        level=level,
    )
    return wire, expected


@st.composite
def publishes(draw: st.DrawFn) -> Wire:
    topic = draw(topic_names)
    payload = draw(st.binary(max_size=40))
    qos = draw(qos_levels)
    retain = draw(st.booleans())
    dup = draw(st.booleans()) if qos else False
    packet_id = draw(packet_ids) if qos else 0
    wire = publish(topic, payload, qos=qos, retain=retain, dup=dup, packet_id=packet_id or None)
    return wire, Publish(topic, payload, qos, retain, dup, packet_id)


@st.composite
def subscribes(draw: st.DrawFn) -> Wire:
    packet_id = draw(packet_ids)
    filters = draw(st.lists(st.tuples(text, qos_levels), min_size=1, max_size=4))
    wire = subscribe(packet_id, [(f, q) for f, q in filters])
    return wire, Subscribe(packet_id, filters)


@st.composite
def unsubscribes(draw: st.DrawFn) -> Wire:
    packet_id = draw(packet_ids)
    filters = draw(st.lists(text, min_size=1, max_size=4))
    return unsubscribe(packet_id, [*filters]), Unsubscribe(packet_id, filters)


@st.composite
def acks(draw: st.DrawFn) -> Wire:
    kind = draw(st.sampled_from([PUBACK, PUBREC, PUBREL, PUBCOMP]))
    packet_id = draw(packet_ids)
    return ack(kind, packet_id), (kind, packet_id)


after_connect = st.one_of(
    publishes(),
    subscribes(),
    unsubscribes(),
    acks(),
    st.just((PINGREQ_BYTES, (PINGREQ, 0))),
    st.just((DISCONNECT_BYTES, (DISCONNECT, 0))),
)
sessions = st.tuples(connects(), st.lists(after_connect, max_size=8))


def _wire(session: tuple[Wire, list[Wire]]) -> tuple[list[bytes], list[Packet]]:
    first, rest = session
    wires = [first[0]] + [w for w, _ in rest]
    return wires, [first[1]] + [p for _, p in rest]


# -- round trips -----------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(sessions)
def test_a_session_in_one_chunk_decodes_to_what_was_encoded(
    session: tuple[Wire, list[Wire]],
) -> None:
    """CONNECT and the packets behind it, in one read, decode field for field."""
    wires, expected = _wire(session)
    reader = PacketReader(BIG)
    assert reader.feed(b"".join(wires)) == expected
    assert reader.connected
    assert not reader.partial


@settings(max_examples=100, deadline=None)
@given(sessions)
def test_a_session_byte_by_byte_decodes_the_same(session: tuple[Wire, list[Wire]]) -> None:
    """One byte per read: each packet comes out with its last byte, ``partial`` in between."""
    wires, expected = _wire(session)
    data = b"".join(wires)
    ends: set[int] = set()
    at = 0
    for wire in wires:
        at += len(wire)
        ends.add(at)
    reader = PacketReader(BIG)
    out: list[Packet] = []
    for i in range(len(data)):
        got = reader.feed(data[i : i + 1])
        assert len(got) == (1 if i + 1 in ends else 0)
        out += got
        assert reader.partial is (i + 1 not in ends)
    assert out == expected


@settings(max_examples=150, deadline=None)
@given(sessions, st.data())
def test_a_session_in_random_chunks_decodes_the_same(
    session: tuple[Wire, list[Wire]], data: st.DataObject
) -> None:
    """Chunk borders anywhere (inside the header, the length, a string, or empty chunks)."""
    wires, expected = _wire(session)
    stream = b"".join(wires)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    reader = PacketReader(BIG)
    assert feed_all(reader, chunks) == expected
    assert not reader.partial


def test_helper_packets_decode() -> None:
    """The raw packets other broker tests send are what the reader expects."""
    reader = PacketReader(BIG)
    stream = (
        connect_packet("dev-1", keepalive=30, clean=False)
        + subscribe_packet("devices/+/state", packet_id=7, qos=1)
        + publish_packet("devices/dev-1/state", b"on")
    )
    assert reader.feed(stream) == [
        Connect(4, "dev-1", False, 30),
        Subscribe(7, [("devices/+/state", 1)]),
        Publish("devices/dev-1/state", b"on", 0, False, False, 0),
    ]


def test_connect_fields_are_decoded() -> None:
    """Will, user name and binary password land in their fields; MQIsdp (3.1) is accepted."""
    wire = connect(
        "dev-1",
        clean=False,
        keepalive=0xFFFF,
        will=("devices/dev-1/status", b"\x00gone", 2, True),
        username="user",
        password=b"\xff\x00pw",
    )
    expected = Connect(4, "dev-1", False, 0xFFFF, "user", b"\xff\x00pw")
    expected.will_topic, expected.will_payload = "devices/dev-1/status", b"\x00gone"
    expected.will_qos, expected.will_retain = 2, True
    assert PacketReader(BIG).feed(wire) == [expected]
    old = connect("", name="MQIsdp", level=3, username="")
    assert PacketReader(BIG).feed(old) == [Connect(3, "", True, 60, username="")]


def test_publish_fields_are_decoded() -> None:
    """QoS, retain, DUP and packet id come from the header; the payload is the rest, maybe empty."""
    reader = connected_reader()
    stream = (
        publish("a/b", b"x", qos=2, retain=True, dup=True, packet_id=0xFFFF)
        + publish("$x//", qos=1, packet_id=1)
        + publish("\u00e9/\U0001f600", b"\x00\x01", retain=True)
    )
    assert reader.feed(stream) == [
        Publish("a/b", b"x", 2, True, True, 0xFFFF),
        Publish("$x//", b"", 1, False, False, 1),
        Publish("\u00e9/\U0001f600", b"\x00\x01", 0, True, False, 0),
    ]


def test_ping_and_disconnect_decode_to_tuples() -> None:
    reader = connected_reader()
    assert reader.feed(PINGREQ_BYTES + DISCONNECT_BYTES) == [(PINGREQ, 0), (DISCONNECT, 0)]


# -- remaining length ------------------------------------------------------------------------------

LENGTH_BOUNDARIES = [
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (16383, b"\xff\x7f"),
    (16384, b"\x80\x80\x01"),
    (2097151, b"\xff\xff\x7f"),
    (2097152, b"\x80\x80\x80\x01"),
]


@pytest.mark.parametrize(("length", "encoded"), LENGTH_BOUNDARIES)
def test_remaining_length_boundaries_are_encoded_and_decoded(length: int, encoded: bytes) -> None:
    """encode_publish writes the minimal 1-4 byte length; the reader reads it whole or split."""
    assert _remaining(length) == encoded  # the test's own encoder agrees with section 2.2.3
    payload = b"p" * (length - 3)  # topic 't' takes 3 bytes of the body
    wire = encode_publish(b"t", payload, 0, False)
    assert wire[0] == 0x30
    assert wire[1 : 1 + len(encoded)] == encoded
    assert len(wire) == 1 + len(encoded) + length
    expected = [Publish("t", payload, 0, False, False, 0)]
    assert connected_reader(len(wire)).feed(wire) == expected
    reader = connected_reader(len(wire))
    assert reader.feed(wire[:2]) == []  # inside the length (or just after a 1-byte one)
    assert reader.partial
    assert reader.feed(wire[2:]) == expected
    assert not reader.partial


def test_remaining_length_zero() -> None:
    """A zero remaining length is one byte: PINGREQ/DISCONNECT in, PINGRESP out."""
    assert _remaining(0) == b"\x00"
    assert pingresp() == b"\xd0\x00"
    assert unframe(pingresp()) == (0xD0, b"")
    reader = connected_reader()
    assert reader.feed(b"\xc0") == []
    assert reader.partial
    assert reader.feed(b"\x00") == [(PINGREQ, 0)]
    assert not reader.partial


def test_largest_four_byte_length_is_accepted_when_the_limit_allows() -> None:
    """0xFF 0xFF 0xFF 0x7F (268435455) is legal: waits for the body if the limit permits it."""
    header = b"\x30\xff\xff\xff\x7f"
    reader = connected_reader(268435455 + 5)
    assert reader.feed(header) == []
    assert reader.partial
    with pytest.raises(PacketTooLarge):
        connected_reader(256 * 1024).feed(header)


# -- violations ------------------------------------------------------------------------------------


@pytest.mark.parametrize("connected", [False, True])
def test_oversized_packet_is_refused_from_its_header_alone(connected: bool) -> None:
    """The first 5 bytes of a 16 MiB PUBLISH are enough: no body is buffered or awaited."""
    header = publish_header("t", 16 * MiB)[:5]
    reader = connected_reader(256 * 1024) if connected else PacketReader(256 * 1024)
    assert reader.feed(header[:4]) == []  # the length is not complete yet
    with pytest.raises(PacketTooLarge) as info:
        reader.feed(header[4:5])
    assert info.value.reason == "packet-too-large"
    assert isinstance(info.value, ProtocolViolation)


def test_size_limit_counts_the_whole_packet() -> None:
    """A packet of exactly the limit (header included) passes; one byte more does not."""
    wire = publish("t", b"x" * 200)
    expected = [Publish("t", b"x" * 200, 0, False, False, 0)]
    assert connected_reader(len(wire)).feed(wire) == expected
    reader = connected_reader(len(wire) - 1)
    with pytest.raises(PacketTooLarge):
        reader.feed(wire[:3])  # first byte, 2-byte length: the header is complete


def test_five_byte_remaining_length_is_malformed() -> None:
    """A continuation bit on the 4th length byte is refused without waiting for a 5th."""
    reader = connected_reader(1 << 40)
    assert reader.feed(b"\x30\xff\xff\xff") == []
    with pytest.raises(ProtocolViolation) as info:
        reader.feed(b"\xff")
    assert info.value.reason == "malformed"
    assert not isinstance(info.value, PacketTooLarge)
    assert violation(b"\x30\x80\x80\x80\x80\x01", max_bytes=1 << 40).reason == "malformed"


BAD_FLAGS = {
    "connect-flags-1": (connect(first=0x11), False),
    "connect-flags-2": (connect(first=0x12), False),
    "connect-flags-f": (connect(first=0x1F), False),
    "puback-flags": (ack(PUBACK, 1, flags=2), True),
    "pubrec-flags": (ack(PUBREC, 1, flags=1), True),
    "pubrel-without-2": (ack(PUBREL, 1, flags=0), True),
    "pubrel-3": (ack(PUBREL, 1, flags=3), True),
    "pubcomp-flags": (ack(PUBCOMP, 1, flags=8), True),
    "subscribe-without-2": (subscribe(1, [("a", 0)], flags=0), True),
    "subscribe-3": (subscribe(1, [("a", 0)], flags=3), True),
    "subscribe-a": (subscribe(1, [("a", 0)], flags=0xA), True),
    "unsubscribe-without-2": (unsubscribe(1, ["a"], flags=0), True),
    "unsubscribe-6": (unsubscribe(1, ["a"], flags=6), True),
    "pingreq-flags": (b"\xc1\x00", True),
    "disconnect-flags": (b"\xe2\x00", True),
}


@pytest.mark.parametrize(("wire", "connected"), BAD_FLAGS.values(), ids=BAD_FLAGS.keys())
def test_reserved_header_flags_must_be_exact(wire: bytes, connected: bool) -> None:
    """MQTT-2.2.2-1/2: every type but PUBLISH has fixed flags (2 for PUBREL, (UN)SUBSCRIBE)."""
    assert violation(wire, connected=connected).reason == "malformed"


def test_required_flags_are_accepted() -> None:
    """The positive twin: the same packets with their required flags decode."""
    reader = connected_reader()
    stream = (
        ack(PUBACK, 1)
        + ack(PUBREC, 2)
        + ack(PUBREL, 3)
        + ack(PUBCOMP, 4)
        + subscribe(5, [("a", 0)])
        + unsubscribe(6, ["a"])
    )
    assert reader.feed(stream) == [
        (PUBACK, 1),
        (PUBREC, 2),
        (PUBREL, 3),
        (PUBCOMP, 4),
        Subscribe(5, [("a", 0)]),
        Unsubscribe(6, ["a"]),
    ]


PUBLISH_VIOLATIONS = {
    "qos-3": (publish("a", b"x", flags=0x6, packet_id=1), "malformed"),
    "qos-3-retain-dup": (publish("a", b"x", flags=0xF, packet_id=1), "malformed"),
    "dup-on-qos-0": (publish("a", b"x", dup=True), "malformed"),
    "qos-1-packet-id-0": (publish("a", b"x", qos=1, packet_id=0), "malformed"),
    "qos-2-packet-id-0": (publish("a", b"x", qos=2, packet_id=0), "malformed"),
    "qos-1-no-packet-id": (frame(0x32, field("a")), "malformed"),
    "qos-1-half-packet-id": (frame(0x32, field("a") + b"\x01"), "malformed"),
    "empty-topic": (publish(""), "invalid-publish-topic"),
    "plus-level": (publish("a/+"), "invalid-publish-topic"),
    "plus-inside": (publish("a+b"), "invalid-publish-topic"),
    "hash": (publish("#"), "invalid-publish-topic"),
    "hash-last": (publish("a/#", qos=1, packet_id=5), "invalid-publish-topic"),
    "nul-in-topic": (publish("a\x00b"), "malformed"),
    "invalid-utf8": (publish(b"a\xffb"), "malformed"),
    "utf8-surrogate": (publish(b"\xed\xa0\x80"), "malformed"),
    "overlong-nul": (publish(b"a\xc0\x80"), "malformed"),
    "truncated-utf8": (publish(b"a\xe2\x82"), "malformed"),
    "topic-past-end": (frame(0x30, b"\x00\x0aab"), "malformed"),
    "topic-length-cut": (frame(0x30, b"\x00"), "malformed"),
    "empty-body": (frame(0x30, b""), "malformed"),
}


@pytest.mark.parametrize(
    ("wire", "reason"), PUBLISH_VIOLATIONS.values(), ids=PUBLISH_VIOLATIONS.keys()
)
def test_publish_violations(wire: bytes, reason: str) -> None:
    """MQTT-3.3.1-2/4, 2.3.1-1, 3.3.2-2, 1.5.3-1/2: each broken PUBLISH and its audit reason."""
    assert violation(wire).reason == reason


PACKET_ID_ZERO = {
    "subscribe": subscribe(0, [("a", 0)]),
    "unsubscribe": unsubscribe(0, ["a"]),
    "puback": ack(PUBACK, 0),
    "pubrec": ack(PUBREC, 0),
    "pubrel": ack(PUBREL, 0),
    "pubcomp": ack(PUBCOMP, 0),
}


@pytest.mark.parametrize("wire", PACKET_ID_ZERO.values(), ids=PACKET_ID_ZERO.keys())
def test_packet_id_zero_is_malformed(wire: bytes) -> None:
    """MQTT-2.3.1-1: packet ids are non-zero."""
    assert violation(wire).reason == "malformed"


SUBSCRIPTION_VIOLATIONS = {
    "subscribe-no-filter": frame(0x82, b"\x00\x01"),
    "subscribe-no-packet-id": frame(0x82, b""),
    "subscribe-half-packet-id": frame(0x82, b"\x01"),
    "subscribe-qos-3": subscribe(1, [("a", 3)]),
    "subscribe-qos-reserved-bits": subscribe(1, [("a", 0x80)]),
    "subscribe-qos-4": subscribe(1, [("a", 1), ("b", 4)]),
    "subscribe-filter-without-qos": frame(0x82, b"\x00\x01" + field("a")),
    "subscribe-second-without-qos": frame(0x82, b"\x00\x01" + field("a") + b"\x00" + field("b")),
    "subscribe-filter-past-end": frame(0x82, b"\x00\x01\x00\x05ab"),
    "subscribe-non-utf8": subscribe(1, [(b"\xfe", 0)]),
    "subscribe-nul": subscribe(1, [("a/\x00", 0)]),
    "unsubscribe-no-filter": frame(0xA2, b"\x00\x01"),
    "unsubscribe-no-packet-id": frame(0xA2, b""),
    "unsubscribe-filter-past-end": frame(0xA2, b"\x00\x01\x00\x02a"),
    "unsubscribe-dangling-byte": frame(0xA2, b"\x00\x01" + field("a") + b"\x00"),
    "unsubscribe-non-utf8": unsubscribe(1, [b"\xc3"]),
    "unsubscribe-nul": unsubscribe(1, ["\x00"]),
}


@pytest.mark.parametrize(
    "wire", SUBSCRIPTION_VIOLATIONS.values(), ids=SUBSCRIPTION_VIOLATIONS.keys()
)
def test_subscribe_and_unsubscribe_violations(wire: bytes) -> None:
    """MQTT-3.8.3-3/4, 3.10.3-2: at least one filter, QoS byte 0-2, fields inside the packet."""
    assert violation(wire).reason == "malformed"


ACK_VIOLATIONS = {
    "puback-empty": frame(0x40, b""),
    "puback-1-byte": frame(0x40, b"\x01"),
    "pubrec-3-bytes": frame(0x50, b"\x00\x01\x00"),
    "pubrel-4-bytes": frame(0x62, b"\x00\x01\x00\x02"),
    "pubcomp-empty": frame(0x70, b""),
    "pingreq-with-body": frame(0xC0, b"\x00"),
    "disconnect-with-body": frame(0xE0, b"\x00\x00"),
}


@pytest.mark.parametrize("wire", ACK_VIOLATIONS.values(), ids=ACK_VIOLATIONS.keys())
def test_fixed_size_packets_with_the_wrong_length(wire: bytes) -> None:
    """Acks carry exactly a packet id; PINGREQ and DISCONNECT carry nothing."""
    assert violation(wire).reason == "malformed"


SERVER_ONLY = {
    "reserved-0": b"\x00\x00",
    "connack": b"\x20\x02\x00\x00",
    "suback": b"\x90\x03\x00\x01\x00",
    "unsuback": b"\xb0\x02\x00\x01",
    "pingresp": b"\xd0\x00",
    "reserved-15": b"\xf0\x00",
}


@pytest.mark.parametrize("connected", [False, True])
@pytest.mark.parametrize("wire", SERVER_ONLY.values(), ids=SERVER_ONLY.keys())
def test_packet_types_a_client_never_sends(wire: bytes, connected: bool) -> None:
    """CONNACK, SUBACK, UNSUBACK, PINGRESP and the reserved types 0 and 15 are refused."""
    assert violation(wire, connected=connected).reason == "malformed"


BEFORE_CONNECT = {
    "publish": publish("a", b"x"),
    "publish-qos-1": publish("a", b"x", qos=1, packet_id=1),
    "subscribe": subscribe(1, [("a", 0)]),
    "unsubscribe": unsubscribe(1, ["a"]),
    "puback": ack(PUBACK, 1),
    "pubrel": ack(PUBREL, 1),
    "pingreq": PINGREQ_BYTES,
    "disconnect": DISCONNECT_BYTES,
}


@pytest.mark.parametrize("wire", BEFORE_CONNECT.values(), ids=BEFORE_CONNECT.keys())
def test_nothing_but_connect_comes_first(wire: bytes) -> None:
    """MQTT-3.1.0-1: the first packet is CONNECT; anything else is 'bad-connect'."""
    reader = PacketReader(BIG)
    with pytest.raises(ProtocolViolation) as info:
        reader.feed(wire + connect())
    assert info.value.reason == "bad-connect"
    assert not reader.connected


def test_a_second_connect_is_malformed() -> None:
    """MQTT-3.1.0-2, in a later read and in the same read as the first."""
    assert violation(connect()).reason == "malformed"
    assert violation(connect() + connect(), connected=False).reason == "malformed"


CONNECT_VIOLATIONS = {
    "reserved-bit": (connect(flags=0x03), "malformed"),
    "reserved-bit-only": (connect(flags=0x01), "malformed"),
    "will-qos-3": (connect(will=("w", b"x", 3, False)), "malformed"),
    "will-qos-without-will": (connect(flags=0x02 | 0x08), "malformed"),
    "will-qos-2-without-will": (connect(flags=0x10), "malformed"),
    "will-retain-without-will": (connect(flags=0x22), "malformed"),
    "password-without-username": (
        connect(flags=0x42, extra=field(b"pw")),
        "malformed",
    ),
    "trailing-bytes": (connect(extra=b"\x00"), "malformed"),
    "trailing-after-password": (connect(username="u", password=b"p", extra=b"xx"), "malformed"),
    "username-flag-no-username": (connect(flags=0x82), "malformed"),
    "password-past-end": (connect(username="u", flags=0xC2), "malformed"),
    "will-flag-no-will": (connect(flags=0x06), "malformed"),
    "will-payload-past-end": (connect(flags=0x06, extra=field("w") + b"\x00\x09ab"), "malformed"),
    "client-id-missing": (frame(0x10, field("MQTT") + b"\x04\x02\x00\x3c"), "malformed"),
    "short-variable-header": (frame(0x10, field("MQTT") + b"\x04\x02\x00"), "malformed"),
    "name-past-end": (frame(0x10, b"\x00\x04MQ"), "malformed"),
    "empty-body": (frame(0x10, b""), "malformed"),
    "client-id-non-utf8": (connect(b"\xff\xfe"), "malformed"),
    "client-id-nul": (connect("dev\x00"), "malformed"),
    "will-topic-non-utf8": (connect(will=(b"\xc0\xaf", b"", 0, False)), "malformed"),
    "will-topic-nul": (connect(will=("w\x00", b"", 0, False)), "malformed"),
    "username-non-utf8": (connect(username=b"\x80"), "malformed"),
    "protocol-name": (connect(name="MQTT5"), "bad-connect"),
    "protocol-name-case": (connect(name="mqtt"), "bad-connect"),
    "protocol-name-non-utf8": (frame(0x10, field(b"\xff") + b"\x04\x02\x00\x3c"), "malformed"),
}


@pytest.mark.parametrize(
    ("wire", "reason"), CONNECT_VIOLATIONS.values(), ids=CONNECT_VIOLATIONS.keys()
)
def test_connect_violations(wire: bytes, reason: str) -> None:
    """MQTT-3.1.2-3, -13/14/15, -22, 3.1.3: flags agree with the payload, nothing after it."""
    reader = PacketReader(BIG)
    with pytest.raises(ProtocolViolation) as info:
        reader.feed(wire)
    assert info.value.reason == reason
    assert not reader.connected


def test_violation_carries_reason_and_detail() -> None:
    exc = violation(publish("a/#"))
    assert exc.reason == "invalid-publish-topic"
    assert exc.detail
    assert str(exc) == f"{exc.reason}: {exc.detail}"


# -- partial ---------------------------------------------------------------------------------------


def test_partial_tracks_an_incomplete_packet() -> None:
    """True from the first byte of a packet to its last, false at every packet border."""
    reader = PacketReader(BIG)
    assert not reader.partial
    assert not reader.connected
    assert reader.feed(b"") == []
    assert not reader.partial
    wire = connect()
    assert reader.feed(wire[:1]) == []
    assert reader.partial
    assert reader.feed(wire[1:-1]) == []
    assert reader.partial
    assert not reader.connected
    assert reader.feed(wire[-1:]) == [Connect(4, "c", True, 60)]
    assert not reader.partial
    assert reader.connected
    second = publish("a", b"xyz", qos=1, packet_id=9)
    assert reader.feed(PINGREQ_BYTES + second[:4]) == [(PINGREQ, 0)]
    assert reader.partial
    assert reader.feed(b"") == []
    assert reader.partial
    assert reader.feed(second[4:]) == [Publish("a", b"xyz", 1, False, False, 9)]
    assert not reader.partial


def test_a_packet_in_tiny_chunks_is_appended_not_copied() -> None:
    """A packet at the default limit (256 KiB) sent one byte per TLS record must cost linear time,
    not time quadratic in its size (an event-loop DoS). Checked structurally instead of by the
    clock: once the header is known, every further byte is appended to the same buffer object,
    and nothing is decoded before the last byte."""
    large = publish("t", b"x" * (256 * 1024 - 8))
    reader = connected_reader()
    header = 4  # type byte + 3 length bytes for this size
    for i in range(header):
        assert reader.feed(large[i : i + 1]) == []
    buffer = reader._buf
    for i in range(header, len(large) - 1):
        assert reader.feed(large[i : i + 1]) == []
        assert reader._buf is buffer
    [packet] = reader.feed(large[-1:])
    assert isinstance(packet, Publish)
    assert len(packet.payload) == 256 * 1024 - 8
    assert not reader.partial


# -- encoders, read back by the decoder above ------------------------------------------------------


@pytest.mark.parametrize("code", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("session_present", [False, True])
def test_connack(session_present: bool, code: int) -> None:
    """MQTT-3.2.2-4: session present is 0 whenever the return code is not 0."""
    first, body = unframe(connack(session_present, code))
    assert first == 0x20
    assert body == bytes([1 if session_present and code == 0 else 0, code])


@pytest.mark.parametrize("packet_id", [1, 0xFF, 0x100, 0x1234, 0xFFFF])
def test_acks_encode_their_packet_id(packet_id: int) -> None:
    """PUBACK, PUBREC, PUBREL (flags 2), PUBCOMP, UNSUBACK: type, flags and a big-endian id."""
    for encoder, first in [
        (puback, 0x40),
        (pubrec, 0x50),
        (pubrel, 0x62),
        (pubcomp, 0x70),
        (unsuback, 0xB0),
    ]:
        assert unframe(encoder(packet_id)) == (first, struct.pack("!H", packet_id))


def test_broker_acks_are_readable_by_the_reader_as_client_acks() -> None:
    """What the broker sends as PUBREL/PUBACK/... is what it accepts from clients."""
    reader = connected_reader()
    stream = puback(1) + pubrec(2) + pubrel(3) + pubcomp(0xFFFF)
    assert reader.feed(stream) == [(PUBACK, 1), (PUBREC, 2), (PUBREL, 3), (PUBCOMP, 0xFFFF)]


@pytest.mark.parametrize(
    "codes",
    [[0], [1, 2, SUBACK_FAILURE], [SUBACK_FAILURE] * 3, [2] * 200],
    ids=["one", "mixed", "failures", "two-byte-length"],
)
def test_suback(codes: list[int]) -> None:
    """SUBACK: 0x90, the packet id, one return code per filter in order."""
    first, body = unframe(suback(0x0102, codes))
    assert first == 0x90
    assert body == b"\x01\x02" + bytes(codes)


@settings(max_examples=200, deadline=None)
@given(
    topic=topic_names,
    payload=st.binary(max_size=300),
    qos=qos_levels,
    retain=st.booleans(),
    dup=st.booleans(),
    packet_id=packet_ids,
)
def test_encode_publish_reads_back(
    topic: str, payload: bytes, qos: int, retain: bool, dup: bool, packet_id: int
) -> None:
    """Flags, topic, packet id (only with QoS > 0) and payload, and the reader agrees."""
    wire = encode_publish(topic.encode(), payload, qos, retain, packet_id, dup)
    pid = packet_id if qos else 0
    assert read_publish(wire) == (topic, payload, qos, retain, dup, pid)
    if qos or not dup:  # a QoS 0 PUBLISH with DUP is for the reader to refuse
        expected = Publish(topic, payload, qos, retain, dup, pid)
        assert connected_reader().feed(wire) == [expected]


def test_encode_publish_defaults() -> None:
    """No packet id and no DUP unless asked for."""
    assert encode_publish(b"a/b", b"hi", 0, False) == b"\x30\x07\x00\x03a/bhi"
    assert encode_publish(b"a", b"", 1, True, 0x0102) == b"\x33\x05\x00\x01a\x01\x02"
    assert encode_publish(b"a", b"", 2, False, 7, dup=True) == b"\x3c\x05\x00\x01a\x00\x07"


def test_exported_type_numbers() -> None:
    """The numbers the reader's tuples use are the spec's packet types."""
    assert (CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP) == (1, 3, 4, 5, 6, 7)
    assert (PINGREQ, DISCONNECT) == (12, 14)
