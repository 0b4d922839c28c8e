"""Limits amqtt lacks: CONNECT deadline, handshake cap, packet size, keep-alive, slow readers."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable

import pytest

from broker import Limits
from broker.server import BrokerThread
from tests.broker.broker_helpers import (
    BrokerFactory,
    Fleet,
    Peer,
    closed_by_peer,
    connect_packet,
    publish_header,
    read_connack,
    subscribe_packet,
    tls_socket,
    wait_until,
)


def _device_still_served(broker: BrokerThread, peers: Callable[..., Peer]) -> None:
    dev = peers(broker.port, "dev-2").connect()
    assert dev.subscribe("devices/dev-2/#") == [0]
    dev.close()


def test_slow_loris_without_connect_is_closed(
    make_broker: BrokerFactory, fleet: Fleet, peers: Callable[..., Peer]
) -> None:
    """TLS open, no CONNECT (and TCP open, no handshake): closed at the deadline."""
    broker = make_broker(limits=Limits(connect_timeout=1.0))
    idle_tls = tls_socket(broker.port, fleet.creds("dev-1"), root=fleet.pki_dir / "root.crt")
    idle_tcp = socket.create_connection(("127.0.0.1", broker.port))
    _device_still_served(broker, peers)
    assert closed_by_peer(idle_tls, 10)
    assert closed_by_peer(idle_tcp, 10)

    def reasons() -> set[str]:
        return {e["reason"] for e in broker.broker.audit.events("refuse")}

    assert wait_until(lambda: {"connect-timeout", "handshake-timeout"} <= reasons()), reasons()
    idle_tls.close()
    idle_tcp.close()


@pytest.mark.slow
def test_200_half_open_handshakes_do_not_lock_out_a_device(
    make_broker: BrokerFactory, peers: Callable[..., Peer]
) -> None:
    """At the handshake cap the oldest half-open connection is dropped, not the newcomer."""
    broker = make_broker(limits=Limits(max_handshakes=64, connect_timeout=30))
    flood = [socket.create_connection(("127.0.0.1", broker.port)) for _ in range(200)]
    try:
        assert wait_until(
            lambda: len(broker.broker.audit.events("refuse", reason="handshake-evicted")) >= 136
        )
        _device_still_served(broker, peers)
        assert broker.broker.metrics.value("iotauth_broker_handshakes_in_progress") <= 64
    finally:
        for sock in flood:
            sock.close()


def test_connections_over_the_limit_are_refused_not_queued(
    make_broker: BrokerFactory, fleet: Fleet
) -> None:
    """amqtt queues the 4th connection on a semaphore; we close it at once."""
    broker = make_broker(limits=Limits(max_connections=3))
    held = []
    for name in ("dev-1", "dev-2", "sink"):
        sock = tls_socket(
            broker.port, fleet.creds(name, service=name == "sink"), root=fleet.pki_dir / "root.crt"
        )
        sock.sendall(connect_packet(name))
        assert read_connack(sock) == 0
        held.append(sock)
    extra = socket.create_connection(("127.0.0.1", broker.port))
    assert closed_by_peer(extra, 5)
    assert wait_until(lambda: broker.broker.audit.events("refuse", reason="connection-limit"))
    extra.close()
    held.pop().close()
    assert wait_until(lambda: len(broker.broker.connected()) == 2)
    again = tls_socket(broker.port, fleet.creds("dev-3"), root=fleet.pki_dir / "root.crt")
    again.sendall(connect_packet("dev-3"))
    assert read_connack(again) == 0
    for sock in [*held, again]:
        sock.close()


def test_16_mib_publish_closes_the_connection(
    broker: BrokerThread, fleet: Fleet, peers: Callable[..., Peer]
) -> None:
    """A PUBLISH announcing 16 MiB is refused from its header, before the body is buffered."""
    sink = peers(broker.port, "sink", service=True).connect()
    assert sink.subscribe("devices/+/telemetry/#") == [0]
    sock = tls_socket(broker.port, fleet.creds("dev-1"), root=fleet.pki_dir / "root.crt")
    sock.sendall(connect_packet("dev-1"))
    assert read_connack(sock) == 0
    sock.sendall(publish_header("devices/dev-1/telemetry/big", 16 * 1024 * 1024))
    try:
        for _ in range(64):
            sock.sendall(b"\0" * 65536)
    except (OSError, ssl.SSLError):
        pass  # the broker hung up while we were still sending
    assert closed_by_peer(sock, 5)
    sock.close()
    assert wait_until(lambda: broker.broker.audit.events("kick", reason="packet-too-large"))
    assert sink.messages == []
    _device_still_served(broker, peers)


def test_packet_just_under_the_limit_is_accepted(
    make_broker: BrokerFactory, peers: Callable[..., Peer]
) -> None:
    """The positive twin: a 200 KiB telemetry message under the 256 KiB limit is delivered."""
    broker = make_broker()
    sink = peers(broker.port, "sink", service=True).connect()
    assert sink.subscribe("devices/+/telemetry/#") == [0]
    dev = peers(broker.port, "dev-1").connect()
    dev.publish("devices/dev-1/telemetry/blob", b"x" * 200 * 1024, qos=1)
    assert wait_until(lambda: sink.messages)
    assert len(sink.messages[0][1]) == 200 * 1024


def test_keepalive_is_enforced(
    make_broker: BrokerFactory, fleet: Fleet, peers: Callable[..., Peer]
) -> None:
    """keep-alive 1 s and silence: closed (at 1.5x); a pinging client with keep-alive 1 stays."""
    broker = make_broker()
    silent = tls_socket(broker.port, fleet.creds("dev-1"), root=fleet.pki_dir / "root.crt")
    silent.sendall(connect_packet("dev-1", keepalive=1))
    assert read_connack(silent) == 0
    pinging = peers(broker.port, "dev-2", keepalive=1).connect()
    assert closed_by_peer(silent, 10)
    assert wait_until(lambda: broker.broker.audit.events("kick", reason="keepalive"))
    time.sleep(0.5)
    assert not pinging.disconnected.is_set()
    silent.close()


@pytest.mark.slow
def test_non_reading_subscriber_cannot_grow_the_broker(
    make_broker: BrokerFactory, fleet: Fleet, peers: Callable[..., Peer]
) -> None:
    """A subscriber that never reads: its backlog is capped (drops counted), others are served."""
    broker = make_broker(limits=Limits(outbound_max_messages=50, outbound_max_bytes=256 * 1024))
    stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", broker.port))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(fleet.pki_dir / "root.crt")
    creds = fleet.creds("sink")
    ctx.load_cert_chain(creds / "device.crt", creds / "device.key")
    stuck_tls = ctx.wrap_socket(stuck, server_hostname="127.0.0.1")
    stuck_tls.sendall(connect_packet("sink") + subscribe_packet("devices/+/telemetry/#"))
    assert read_connack(stuck_tls) == 0
    dev = peers(broker.port, "dev-1").connect()
    payload = b"p" * 1024
    for i in range(5000):
        dev.client.publish("devices/dev-1/telemetry/t", payload, qos=0)
        if i % 500 == 0:
            time.sleep(0.01)
    metrics = broker.broker.metrics
    assert wait_until(lambda: metrics.value("iotauth_broker_outbound_dropped_total") > 1000, 20)
    _device_still_served(broker, peers)
    stuck_tls.close()
