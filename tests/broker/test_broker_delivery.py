"""MQTT delivery semantics of the broker core: QoS 1 and 2 both ways, persistent sessions,
re-sending what was in flight, the in-flight window and the bounded queues behind it.

Raw TLS sockets play the clients whose acknowledgements we need to control; their packets are
decoded here with a few lines written for the test, not with the broker's own codec.
"""

from __future__ import annotations

import ssl
import struct
import time
from collections.abc import Callable
from typing import Any

from broker.server import BrokerThread
from broker.settings import Limits
from tests.broker.broker_helpers import (
    BrokerFactory,
    Fleet,
    Peer,
    connect_packet,
    subscribe_packet,
    tls_socket,
    wait_until,
)

TOPIC = "devices/dev-1/commands/x"


class RawClient:
    """A TLS socket speaking MQTT by hand: it acknowledges only when told to."""

    def __init__(self, broker: BrokerThread, fleet: Fleet, name: str, *, clean: bool) -> None:
        service = name == "sink"
        self.sock = tls_socket(
            broker.port, fleet.creds(name, service=service), root=fleet.pki_dir / "root.crt"
        )
        self.sock.sendall(connect_packet(name, clean=clean))
        first = self.sock.recv(4)
        assert first[:2] == b"\x20\x02", first
        assert first[3] == 0, first
        self.session_present = bool(first[2] & 1)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def subscribe(self, topic_filter: str, qos: int) -> bytes:
        """SUBSCRIBE (packet id 1); the SUBACK's body."""
        self.send(subscribe_packet(topic_filter, qos=qos))
        [(kind, _, body)] = self.packets(1)
        assert kind == 9, kind
        return body

    def packets(self, count: int, timeout: float = 5) -> list[tuple[int, int, bytes]]:
        """The next ``count`` packets as (type, flags, body)."""
        out: list[tuple[int, int, bytes]] = []
        end = time.monotonic() + timeout
        while len(out) < count:
            parsed = self._parse()
            if parsed is not None:
                out.append(parsed)
                continue
            left = end - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLError, OSError):
                break
            if not chunk:
                break
            self.buf += chunk
        return out

    def _parse(self) -> tuple[int, int, bytes] | None:
        if len(self.buf) < 2:
            return None
        length, mult, i = 0, 1, 1
        while True:
            if i >= len(self.buf):
                return None
            byte = self.buf[i]
            length += (byte & 0x7F) * mult
            mult *= 128
            i += 1
            if not byte & 0x80:
                break
        if len(self.buf) < i + length:
            return None
        first, body = self.buf[0], self.buf[i : i + length]
        self.buf = self.buf[i + length :]
        return first >> 4, first & 0x0F, body

    def close(self) -> None:
        self.sock.close()


def _publish(topic: str, payload: bytes, qos: int, pid: int, *, dup: bool = False) -> bytes:
    var = struct.pack("!H", len(topic)) + topic.encode()
    if qos:
        var += struct.pack("!H", pid)
    body = var + payload
    first = 0x30 | (qos << 1) | (0x08 if dup else 0)
    assert len(body) < 128
    return bytes([first, len(body)]) + body


def _publish_fields(flags: int, body: bytes) -> tuple[str, int, int, bytes, bool]:
    """(topic, qos, packet id, payload, dup) of a PUBLISH the broker sent."""
    tlen = struct.unpack("!H", body[:2])[0]
    topic = body[2 : 2 + tlen].decode()
    qos = (flags >> 1) & 3
    at, pid = 2 + tlen, 0
    if qos:
        pid = struct.unpack("!H", body[at : at + 2])[0]
        at += 2
    return topic, qos, pid, body[at:], bool(flags & 0x08)


def _ack(kind: int, pid: int) -> bytes:
    return bytes([(kind << 4) | (2 if kind == 6 else 0), 2]) + struct.pack("!H", pid)


def _qos_recorder(peer: Peer) -> list[tuple[str, bytes, int]]:
    got: list[tuple[str, bytes, int]] = []

    def on_message(c: Any, u: Any, msg: Any) -> None:
        got.append((msg.topic, bytes(msg.payload), msg.qos))

    peer.client.on_message = on_message
    return got


def test_qos2_is_delivered_exactly_once_both_ways(
    broker: BrokerThread, peers: Callable[..., Peer]
) -> None:
    sink = peers(broker.port, "sink", service=True).connect()
    got = _qos_recorder(sink)
    assert sink.subscribe("devices/+/telemetry/#", qos=2) == [2]
    dev = peers(broker.port, "dev-1").connect()
    dev.publish("devices/dev-1/telemetry/t", b"exactly-once", qos=2)
    assert wait_until(lambda: got)
    time.sleep(0.2)
    assert got == [("devices/dev-1/telemetry/t", b"exactly-once", 2)]


def test_a_resent_qos2_publish_is_routed_once(
    broker: BrokerThread, fleet: Fleet, peers: Callable[..., Peer]
) -> None:
    """MQTT-4.3.3-2: the same packet id before PUBREL is the same message."""
    sink = peers(broker.port, "sink", service=True).connect()
    got = _qos_recorder(sink)
    assert sink.subscribe("devices/+/telemetry/#", qos=2) == [2]
    dev = RawClient(broker, fleet, "dev-1", clean=True)
    try:
        dev.send(_publish("devices/dev-1/telemetry/t", b"once", 2, 7))
        dev.send(_publish("devices/dev-1/telemetry/t", b"once", 2, 7, dup=True))
        assert [(k, b) for k, _, b in dev.packets(2)] == [(5, b"\x00\x07"), (5, b"\x00\x07")]
        dev.send(_ack(6, 7))  # PUBREL
        assert [(k, b) for k, _, b in dev.packets(1)] == [(7, b"\x00\x07")]  # PUBCOMP
        # After PUBREL the id is free again: a new message with it is a new message.
        dev.send(_publish("devices/dev-1/telemetry/t", b"twice", 2, 7))
        assert [k for k, _, _ in dev.packets(1)] == [5]
    finally:
        dev.close()
    assert wait_until(lambda: len(got) == 2)
    time.sleep(0.2)
    assert [payload for _, payload, _ in got] == [b"once", b"twice"]


def test_unacknowledged_qos1_is_resent_with_dup_on_resume(
    broker: BrokerThread, fleet: Fleet, peers: Callable[..., Peer]
) -> None:
    dev = RawClient(broker, fleet, "dev-1", clean=False)
    assert dev.subscribe("devices/dev-1/commands/#", 1) == b"\x00\x01\x01"
    sink = peers(broker.port, "sink", service=True).connect()
    sink.publish(TOPIC, b"ack-me", qos=1)
    [(kind, flags, body)] = dev.packets(1)
    assert kind == 3
    topic, qos, pid, payload, dup = _publish_fields(flags, body)
    assert (topic, qos, payload, dup) == (TOPIC, 1, b"ack-me", False)
    dev.close()  # without PUBACK
    assert wait_until(lambda: "dev-1" not in broker.broker.connected())
    back = RawClient(broker, fleet, "dev-1", clean=False)
    try:
        assert back.session_present
        [(kind, flags, body)] = back.packets(1)
        assert kind == 3
        assert _publish_fields(flags, body) == (TOPIC, 1, pid, b"ack-me", True)
        back.send(_ack(4, pid))
        assert back.packets(1, timeout=0.5) == []  # acknowledged: not sent again
    finally:
        back.close()


def test_the_inflight_window_holds_the_rest_until_acknowledged(
    make_broker: BrokerFactory, fleet: Fleet, peers: Callable[..., Peer]
) -> None:
    broker = make_broker(limits=Limits(max_inflight=3))
    dev = RawClient(broker, fleet, "dev-1", clean=True)
    try:
        assert dev.subscribe("devices/dev-1/commands/#", 1) == b"\x00\x01\x01"
        sink = peers(broker.port, "sink", service=True).connect()
        for n in range(5):
            sink.publish(TOPIC, b"m%d" % n, qos=1)
        first = dev.packets(3)
        assert dev.packets(1, timeout=0.5) == []  # the window is full
        pids = [_publish_fields(f, b)[2] for _, f, b in first]
        assert [_publish_fields(f, b)[3] for _, f, b in first] == [b"m0", b"m1", b"m2"]
        dev.send(_ack(4, pids[0]))
        [(_, flags, body)] = dev.packets(1)
        assert _publish_fields(flags, body)[3] == b"m3"
        dev.send(_ack(4, pids[1]))
        [(_, flags, body)] = dev.packets(1)
        assert _publish_fields(flags, body)[3] == b"m4"
    finally:
        dev.close()


def test_qos2_to_a_subscriber_runs_pubrec_pubrel_pubcomp(
    broker: BrokerThread, fleet: Fleet, peers: Callable[..., Peer]
) -> None:
    dev = RawClient(broker, fleet, "dev-1", clean=True)
    try:
        assert dev.subscribe("devices/dev-1/commands/#", 2) == b"\x00\x01\x02"
        sink = peers(broker.port, "sink", service=True).connect()
        sink.publish(TOPIC, b"q2", qos=2)
        [(kind, flags, body)] = dev.packets(1)
        topic, qos, pid, payload, _ = _publish_fields(flags, body)
        assert (kind, topic, qos, payload) == (3, TOPIC, 2, b"q2")
        dev.send(_ack(5, pid))  # PUBREC
        assert dev.packets(1) == [(6, 2, struct.pack("!H", pid))]  # PUBREL
        dev.send(_ack(7, pid))  # PUBCOMP
        assert dev.packets(1, timeout=0.5) == []
    finally:
        dev.close()


def test_offline_queue_keeps_qos1_drops_qos0_and_is_bounded(
    make_broker: BrokerFactory, peers: Callable[..., Peer]
) -> None:
    broker = make_broker(limits=Limits(offline_queue_max=5))
    dev = peers(broker.port, "dev-1", clean=False).connect()
    assert dev.subscribe("devices/dev-1/commands/#", qos=1) == [1]
    dev.close()
    sink = peers(broker.port, "sink", service=True).connect()
    sink.publish(TOPIC, b"qos0-lost", qos=0)
    for n in range(8):
        sink.publish(TOPIC, b"q%d" % n, qos=1)
    back = peers(broker.port, "dev-1", clean=False).connect()
    assert back.session_present
    assert wait_until(lambda: len(back.messages) >= 5)
    time.sleep(0.3)
    assert [payload for _, payload, _ in back.messages] == [b"q%d" % n for n in range(5)]
    metrics = broker.broker.metrics
    assert metrics.value("iotauth_broker_offline_dropped_total") == 3


def test_clean_session_forgets_everything(broker: BrokerThread, peers: Callable[..., Peer]) -> None:
    dev = peers(broker.port, "dev-1", clean=False).connect()
    assert dev.subscribe("devices/dev-1/commands/#", qos=1) == [1]
    dev.close()
    clean = peers(broker.port, "dev-1", clean=True).connect()
    assert not clean.session_present
    clean.close()
    sink = peers(broker.port, "sink", service=True).connect()
    sink.publish(TOPIC, b"nobody", qos=1)
    again = peers(broker.port, "dev-1", clean=False).connect()
    assert not again.session_present
    time.sleep(0.3)
    assert again.messages == []


def test_unsubscribe_stops_delivery(broker: BrokerThread, peers: Callable[..., Peer]) -> None:
    dev = peers(broker.port, "dev-1").connect()
    assert dev.subscribe("devices/dev-1/commands/#", qos=1) == [1]
    sink = peers(broker.port, "sink", service=True).connect()
    sink.publish(TOPIC, b"before", qos=1)
    assert wait_until(lambda: dev.messages)
    dev.client.unsubscribe("devices/dev-1/commands/#")
    time.sleep(0.3)
    sink.publish(TOPIC, b"after", qos=1)
    time.sleep(0.3)
    assert [payload for _, payload, _ in dev.messages] == [b"before"]


def test_an_empty_retained_publish_clears_the_retained_message(
    broker: BrokerThread, peers: Callable[..., Peer]
) -> None:
    dev = peers(broker.port, "dev-1").connect()
    dev.publish("devices/dev-1/state", b"online", qos=1, retain=True)
    first = peers(broker.port, "sink", service=True).connect()
    assert first.subscribe("devices/+/state") == [0]
    assert wait_until(lambda: first.messages)
    assert first.messages == [("devices/dev-1/state", b"online", True)]
    first.close()
    dev.publish("devices/dev-1/state", b"", qos=1, retain=True)
    second = peers(broker.port, "sink", service=True).connect()
    assert second.subscribe("devices/+/state") == [0]
    time.sleep(0.3)
    assert second.messages == []


def test_a_non_acknowledging_qos1_subscriber_is_bounded(
    make_broker: BrokerFactory, fleet: Fleet, peers: Callable[..., Peer]
) -> None:
    """In flight + queued never exceed the limits; the rest is dropped and counted."""
    broker = make_broker(limits=Limits(max_inflight=10, outbound_max_messages=20))
    dev = RawClient(broker, fleet, "dev-1", clean=True)
    try:
        assert dev.subscribe("devices/dev-1/commands/#", 1) == b"\x00\x01\x01"
        sink = peers(broker.port, "sink", service=True).connect()
        for n in range(100):
            sink.client.publish(TOPIC, b"%d" % n, qos=1)
        metrics = broker.broker.metrics
        assert wait_until(lambda: metrics.value("iotauth_broker_outbound_dropped_total") == 70)
        assert len(dev.packets(11, timeout=1)) == 10
    finally:
        dev.close()


def test_expired_persistent_sessions_are_forgotten(
    make_broker: BrokerFactory, peers: Callable[..., Peer]
) -> None:
    broker = make_broker(session_expiry=60)
    dev = peers(broker.port, "dev-1", clean=False).connect()
    assert dev.subscribe("devices/dev-1/commands/#", qos=1) == [1]
    dev.close()
    core = broker.broker._core
    assert wait_until(lambda: "dev-1" not in broker.broker.connected())

    async def sweep(offset: float) -> None:
        core.expire_sessions(time.monotonic() + offset)

    broker.call(sweep(30))
    assert "dev-1" in core.sessions
    broker.call(sweep(61))
    assert "dev-1" not in core.sessions
    back = peers(broker.port, "dev-1", clean=False).connect()
    assert not back.session_present


def test_a_retained_will_is_kept_for_later_subscribers(
    broker: BrokerThread, peers: Callable[..., Peer]
) -> None:
    """The agent's offline state is a retained will: a service that starts later still sees it."""
    dev = peers(broker.port, "dev-1", will=("devices/dev-1/state", b"offline", True)).connect()
    dev.drop()
    assert wait_until(lambda: "dev-1" not in broker.broker.connected())
    late = peers(broker.port, "sink", service=True).connect()
    assert late.subscribe("devices/+/state") == [0]
    assert wait_until(lambda: late.messages)
    assert late.messages == [("devices/dev-1/state", b"offline", True)]


def test_packets_before_a_broken_one_in_the_same_read_still_count(
    broker: BrokerThread, fleet: Fleet, peers: Callable[..., Peer]
) -> None:
    """How TCP splits the stream must not decide whether a valid PUBLISH is delivered."""
    sink = peers(broker.port, "sink", service=True).connect()
    assert sink.subscribe("devices/+/telemetry/#") == [0]
    dev = RawClient(broker, fleet, "dev-1", clean=True)
    try:
        garbage = b"\x00\x00"  # packet type 0 is reserved
        dev.send(_publish("devices/dev-1/telemetry/t", b"valid", 0, 0) + garbage)
        assert wait_until(lambda: sink.messages)
        assert sink.messages == [("devices/dev-1/telemetry/t", b"valid", False)]
        assert wait_until(lambda: broker.broker.audit.events("kick", reason="malformed"))
    finally:
        dev.close()


def test_a_slow_qos1_subscriber_slows_the_publisher_instead_of_losing_messages(
    make_broker: BrokerFactory, fleet: Fleet, peers: Callable[..., Peer]
) -> None:
    """Backpressure: the publisher is not read while the receiver's queue is half full."""
    broker = make_broker(limits=Limits(max_inflight=5, outbound_max_messages=20))
    dev = RawClient(broker, fleet, "dev-1", clean=True)
    try:
        assert dev.subscribe("devices/dev-1/commands/#", 1) == b"\x00\x01\x01"
        sink = peers(broker.port, "sink", service=True).connect()
        for n in range(200):
            sink.client.publish(TOPIC, b"%d" % n, qos=1)
        got: list[bytes] = []
        while len(got) < 200:
            batch = dev.packets(1, timeout=3)
            assert batch, f"stalled after {len(got)} messages"
            [(kind, flags, body)] = batch
            assert kind == 3
            _, _, pid, payload, _ = _publish_fields(flags, body)
            got.append(payload)
            time.sleep(0.002)  # a slow consumer: much slower than the publisher
            dev.send(_ack(4, pid))
        assert got == [b"%d" % n for n in range(200)]
        metrics = broker.broker.metrics
        assert metrics.value("iotauth_broker_outbound_dropped_total") == 0
        assert metrics.value("iotauth_broker_backpressure_holds_total") > 0
        assert metrics.value("iotauth_broker_backpressure_stuck_total") == 0
    finally:
        dev.close()


def test_a_stuck_subscriber_releases_its_publishers_after_the_timeout(
    make_broker: BrokerFactory, fleet: Fleet, peers: Callable[..., Peer]
) -> None:
    """The negative twin: a receiver that never acknowledges cannot hold a publisher forever;
    the publisher's own traffic to others flows again and the stuck receiver's excess is
    dropped."""
    broker = make_broker(
        limits=Limits(max_inflight=5, outbound_max_messages=20, backpressure_timeout=0.5)
    )
    stuck = RawClient(broker, fleet, "dev-1", clean=True)
    try:
        assert stuck.subscribe("devices/dev-1/commands/#", 1) == b"\x00\x01\x01"
        other = peers(broker.port, "dev-2").connect()
        assert other.subscribe("devices/dev-2/commands/#", qos=1) == [1]
        sink = peers(broker.port, "sink", service=True).connect()
        for n in range(100):
            sink.client.publish(TOPIC, b"%d" % n, qos=1)
        sink.client.publish("devices/dev-2/commands/x", b"for-dev-2", qos=1)
        assert wait_until(lambda: other.messages, 10)
        assert other.messages == [("devices/dev-2/commands/x", b"for-dev-2", False)]
        metrics = broker.broker.metrics
        assert metrics.value("iotauth_broker_backpressure_stuck_total") == 1
        assert metrics.value("iotauth_broker_outbound_dropped_total") == 100 - 5 - 20
        assert not other.disconnected.is_set()
    finally:
        stuck.close()
