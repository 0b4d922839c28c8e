"""The per-connection protocol object on its own: bytes and time in, bytes and events out.

No socket, TLS, event loop or clock: every input carries ``now``, so the deadlines are tested
by passing times, and the CONNECT, acknowledgement and lifecycle rules by feeding bytes.
"""

from __future__ import annotations

import struct

import pytest

from broker import mqtt
from broker.auth import Authenticated
from broker.errors import Refused
from broker.protocol import TRANSITIONS, Authenticate, ClientProtocol, LifecycleError, State
from broker.settings import Limits
from provisioning.identity import Identity
from tests.broker.broker_helpers import connect_packet, publish_packet, subscribe_packet
from tests.broker.recording_link import DOMAIN, Sent, connect, make_core, parse

PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


def _publish(topic: str, payload: bytes, qos: int, pid: int) -> bytes:
    var = struct.pack("!H", len(topic)) + topic.encode() + struct.pack("!H", pid)
    return bytes([0x30 | (qos << 1), len(var) + len(payload)]) + var + payload


def _ack(kind: int, pid: int) -> bytes:
    return bytes([(kind << 4) | (2 if kind == mqtt.PUBREL else 0), 2]) + struct.pack("!H", pid)


class FakeWire:
    """Records what the protocol asks of its transport."""

    def __init__(self) -> None:
        self.woken = 0
        self.unsent = 0
        self.reading = True
        self.unholds = 0
        self.ended: bool | None = None  # the flush flag of Wire.end

    def wake(self) -> None:
        self.woken += 1

    def buffered(self) -> int:
        return self.unsent

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def unhold_soon(self) -> None:
        self.unholds += 1

    def end(self, *, flush: bool) -> None:
        assert self.ended is None, "ended twice"
        self.ended = flush


class Client:
    """A protocol object after its TLS handshake, and what it sends."""

    def __init__(self, limits: Limits | None = None, **settings: object) -> None:
        self.core = make_core(limits, **settings)
        self.wire = FakeWire()
        self.protocol = ClientProtocol(self.core, self.wire, "127.0.0.1:5", now=0.0)
        self.protocol.handshake_done("TLSv1.3")

    def feed(self, data: bytes, now: float = 1.0) -> Authenticate | None:
        return self.protocol.receive_data(data, now)

    def out(self) -> list[Sent]:
        return parse(self.protocol.data_to_send())

    def live(
        self, name: str = "dev-1", *, keepalive: int = 60, will: bool = False, service: bool = False
    ) -> None:
        packet = connect_packet(
            name, keepalive=keepalive, will=("devices/dev-1/state", b"gone") if will else None
        )
        event = self.feed(packet)
        assert isinstance(event, Authenticate)
        identity = Identity.service(name, DOMAIN) if service else Identity.device(name, DOMAIN)
        self.protocol.authenticated(event.connect, Authenticated(identity, "mtls", "1"), 1.0)
        assert self.protocol.state is State.LIVE
        [connack] = self.out()
        assert (connack.kind, connack.body) == (2, b"\x00\x00")


# -- the lifecycle table ---------------------------------------------------------------------------


def test_every_state_is_in_the_table_and_closed_is_final() -> None:
    assert set(TRANSITIONS) == set(State)
    assert TRANSITIONS[State.CLOSED] == frozenset()
    assert all(State.CLOSED in targets for state, targets in TRANSITIONS.items() if targets)


def test_a_transition_outside_the_table_is_refused() -> None:
    """A LIVE connection cannot go back to the authenticator (MQTT-3.1.0-2 is the codec's; the
    table makes the same promise for the lifecycle)."""
    c = Client()
    c.live()
    with pytest.raises(LifecycleError, match="live -> auth"):
        c.protocol._go(State.AUTH)
    fresh = ClientProtocol(make_core(), FakeWire(), "p", now=0.0)
    with pytest.raises(LifecycleError, match="handshake -> live"):
        fresh._go(State.LIVE)


# -- CONNECT ---------------------------------------------------------------------------------------


def test_connect_asks_for_authentication_and_holds_what_follows_until_connack() -> None:
    c = Client()
    event = c.feed(connect_packet("dev-1") + PINGREQ)
    assert isinstance(event, Authenticate)
    assert event.connect.client_id == "dev-1"
    assert c.protocol.state is State.AUTH
    assert not c.wire.reading  # nothing more is read while the authenticator decides
    assert c.out() == []  # the PINGREQ waits behind the CONNACK
    c.protocol.authenticated(
        event.connect, Authenticated(Identity.device("dev-1", DOMAIN), "mtls", "1"), 2.0
    )
    assert [p.kind for p in c.out()] == [2, 13]  # CONNACK, then PINGRESP
    assert c.wire.reading


def test_a_refused_connect_gets_its_connack_then_the_connection_ends() -> None:
    c = Client()
    event = c.feed(connect_packet("dev-1"))
    assert isinstance(event, Authenticate)
    c.protocol.refused(Refused("revoked", "the certificate is revoked"), "dev-1")
    assert [(p.kind, p.body) for p in c.out()] == [(2, b"\x00\x05")]
    assert c.wire.ended is True  # flushed: the CONNACK goes out first
    assert c.protocol.state is State.CLOSED
    assert c.core.audit.events("refuse", reason="revoked", client_id="dev-1")


def test_a_client_id_that_is_not_the_identity_gets_connack_2() -> None:
    c = Client()
    event = c.feed(connect_packet("dev-2"))
    assert isinstance(event, Authenticate)
    c.protocol.authenticated(
        event.connect, Authenticated(Identity.device("dev-1", DOMAIN), "mtls", "1"), 1.0
    )
    assert [(p.kind, p.body) for p in c.out()] == [(2, b"\x00\x02")]
    assert "dev-2" not in c.core.sessions
    assert "dev-1" not in c.core.sessions


def test_an_unsupported_protocol_level_gets_connack_1() -> None:
    """MQTT-3.1.2-2: a level the broker does not speak (6) is answered with return code 1."""
    c = Client()
    packet = bytearray(connect_packet("dev-1"))
    packet[8] = 6  # the protocol level byte, after the fixed header and "MQTT"
    assert c.feed(bytes(packet)) is None
    assert [(p.kind, p.body) for p in c.out()] == [(2, b"\x00\x01")]
    assert c.wire.ended is True


@pytest.mark.parametrize("topic", ["", "devices/dev-1/#"], ids=repr)
def test_a_malformed_will_topic_ends_the_connection_without_connack(topic: str) -> None:
    """MQTT-3.1.4-1 with MQTT-4.7.3-1 / MQTT-4.7.1-1."""
    c = Client()
    assert c.feed(connect_packet("dev-1", will=(topic, b"x"))) is None
    assert c.out() == []
    assert c.wire.ended is False
    assert c.core.audit.events("refuse", reason="malformed")


# -- packets of a live connection ------------------------------------------------------------------


def test_qos1_is_acknowledged_and_qos2_routed_once_per_packet_id() -> None:
    """MQTT-4.3.2-2 (PUBACK) and MQTT-4.3.3-2 (QoS 2: routed once until PUBREL)."""
    c = Client()
    sink, sink_link, _ = connect(c.core, "sink", service=True)
    c.core.subscribe(sink, mqtt.Subscribe(1, [("devices/+/telemetry/#", 2)]))
    sink_link.take()
    c.live()
    topic = "devices/dev-1/telemetry/t"
    c.feed(_publish(topic, b"one", 1, 3))
    assert [(p.kind, p.packet_id) for p in c.out()] == [(4, 3)]
    c.feed(_publish(topic, b"two", 2, 7) + _publish(topic, b"two", 2, 7))
    assert [(p.kind, p.packet_id) for p in c.out()] == [(5, 7), (5, 7)]
    c.feed(_ack(mqtt.PUBREL, 7))
    assert [(p.kind, p.packet_id) for p in c.out()] == [(7, 7)]
    c.feed(_publish(topic, b"three", 2, 7))  # the id is free again: a new message
    assert [(p.kind, p.packet_id) for p in c.out()] == [(5, 7)]
    assert [p[3] for p in sink_link.publishes()] == [b"one", b"two", b"three"]


def test_pingreq_gets_pingresp_and_subscribe_suback() -> None:
    c = Client()
    c.live()
    c.feed(PINGREQ + subscribe_packet("devices/dev-1/#", packet_id=9, qos=1))
    assert [(p.kind, p.body) for p in c.out()] == [(13, b""), (9, b"\x00\x09\x01")]


def test_disconnect_discards_the_will_and_a_lost_connection_publishes_it() -> None:
    """MQTT-3.14.4-3 and MQTT-3.1.2-8, side by side."""
    for ending, published in ((DISCONNECT, False), (None, True)):
        c = Client()
        sink, sink_link, _ = connect(c.core, "sink", service=True)
        c.core.subscribe(sink, mqtt.Subscribe(1, [("devices/+/state", 0)]))
        sink_link.take()
        c.live(will=True)
        if ending is None:
            c.protocol.connection_lost()  # TCP gone, or a TLS close_notify
        else:
            c.feed(ending)
        assert c.protocol.state is State.CLOSED
        assert c.wire.ended is False
        assert bool(sink_link.take()) is published
        assert "dev-1" not in c.core.live


def test_a_denied_publish_closes_the_connection_with_the_will() -> None:
    c = Client()
    c.live()
    c.feed(publish_packet("devices/dev-2/commands/x", b"forged"))
    assert c.protocol.state is State.CLOSED
    assert c.core.audit.events("kick", reason="publish-denied", client_id="dev-1")


def test_packets_before_a_broken_one_in_the_same_data_still_count() -> None:
    c = Client()
    c.live()
    c.feed(PINGREQ + b"\x00\x00")
    assert c.protocol.state is State.CLOSED
    assert c.core.audit.events("kick", reason="malformed")


# -- deadlines and limits --------------------------------------------------------------------------


def test_connect_deadline() -> None:
    c = Client(Limits(connect_timeout=10))
    c.protocol.tick(9.9)
    assert c.protocol.state is State.WAIT_CONNECT
    c.protocol.tick(10.0)
    assert c.protocol.state is State.CLOSED
    assert c.core.audit.events("refuse", reason="connect-timeout")


def test_handshake_deadline_is_the_same_connect_deadline() -> None:
    protocol = ClientProtocol(make_core(Limits(connect_timeout=10)), FakeWire(), "p", now=5.0)
    assert not protocol.handshake_expired(14.9)
    assert protocol.handshake_expired(15.0)


@pytest.mark.parametrize(("asked", "granted"), [(10, 10), (0, 300), (1000, 300)])
def test_keepalive_is_negotiated_and_enforced(asked: int, granted: int) -> None:
    """MQTT-3.1.2-24: 1.5 x the keep-alive; 0 ("never") and too long get max_keepalive."""
    c = Client(Limits(max_keepalive=300))
    c.live(keepalive=asked)
    assert c.protocol.negotiated.keepalive == granted
    c.feed(PINGREQ, now=2.0)
    c.protocol.tick(2.0 + granted * 1.5)
    assert c.protocol.state is State.LIVE
    c.protocol.tick(2.0 + granted * 1.5 + 0.01)
    assert c.protocol.state is State.CLOSED
    assert c.core.audit.events("kick", reason="keepalive")


def test_a_stalled_packet_is_closed_after_packet_timeout() -> None:
    c = Client(Limits(packet_timeout=30))
    c.live(keepalive=300)
    c.feed(b"\x30\x10", now=5.0)  # a PUBLISH header, body never comes
    c.protocol.tick(35.0)
    assert c.protocol.state is State.LIVE
    c.protocol.tick(35.01)
    assert c.core.audit.events("kick", reason="packet-timeout")


def test_a_client_that_never_reads_is_closed_at_twice_the_outbound_limit() -> None:
    limits = Limits(outbound_max_bytes=64 * 1024)
    c = Client(limits)
    c.live()
    c.wire.unsent = 2 * limits.outbound_max_bytes
    c.feed(PINGREQ)
    c.protocol.data_to_send()
    c.protocol.sent()
    assert c.protocol.state is State.LIVE
    c.wire.unsent += 1
    c.protocol.sent()
    assert c.protocol.state is State.CLOSED
    assert c.core.audit.events("kick", reason="slow-reader")


def test_a_held_publisher_waits_then_is_given_up_after_the_backpressure_timeout() -> None:
    """Held: not read, its packets kept in order, keep-alive not judged; a receiver that does
    not recover within backpressure_timeout is given up on and the publisher runs again."""
    limits = Limits(max_inflight=5, outbound_max_messages=20, backpressure_timeout=2.0)
    c = Client(limits)
    dev, dev_link, _ = connect(c.core, "dev-1")
    c.core.subscribe(dev, mqtt.Subscribe(1, [("devices/dev-1/commands/#", 1)]))
    dev_link.take()
    c.live("sink", service=True)
    data = b"".join(_publish("devices/dev-1/commands/x", b"%d" % n, 1, n + 1) for n in range(20))
    c.feed(data, now=10.0)
    assert c.protocol.holds == {dev}
    assert not c.wire.reading
    acked = [p.packet_id for p in c.out()]
    assert acked == list(range(1, 16))  # the rest waits, unacknowledged, in order
    c.protocol.tick(10.0 + 500)  # far past keep-alive: not judged while held
    assert c.protocol.state is State.LIVE
    assert c.protocol.holds == set()  # past backpressure_timeout: given up
    assert dev.stuck
    assert c.wire.unholds == 1
    c.protocol.unhold(511.0)
    assert [p.packet_id for p in c.out()] == list(range(16, 21))
    assert c.wire.reading
    assert len(dev_link.publishes()) == 5  # the in-flight window; the rest queued or dropped


def test_the_protocol_module_does_no_io_and_reads_no_clock() -> None:
    """Sans-IO by construction: protocol.py imports nothing that does I/O or tells the time."""
    import ast
    from pathlib import Path

    import broker.protocol

    tree = ast.parse(Path(broker.protocol.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    forbidden = {"asyncio", "ssl", "socket", "selectors", "time", "datetime", "threading"}
    assert imported & forbidden == set()
    assert imported >= {"broker"}
