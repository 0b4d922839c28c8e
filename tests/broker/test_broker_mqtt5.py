"""MQTT 5.0 end to end: real paho-mqtt clients in MQTTv5 mode, and mosquitto_pub/sub ``-V mqttv5``
as an independent peer, against the real broker over mutual TLS on 127.0.0.1.

The protocol rules themselves are tested in milliseconds in ``test_broker_protocol5.py``; here
each feature is shown to work with clients we did not write (statement numbers are MQTT 5.0's).
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.server import BrokerThread
from broker.settings import Limits
from provisioning.tls import client_context_for_credentials
from tests.broker.broker_helpers import (
    BrokerFactory,
    Fleet,
    Peer,
    mosquitto_tls_args,
    tls_socket,
    wait_until,
)
from tests.conftest import MOSQUITTO_PUB, MOSQUITTO_SUB, needs_mosquitto_clients


class Peer5:
    """A paho-mqtt client in MQTTv5 mode; callbacks become lists and events."""

    def __init__(self, port: int, creds: Path, client_id: str) -> None:
        self.port = port
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            reconnect_on_failure=False,
        )
        self.client.tls_set_context(client_context_for_credentials(creds))
        self.connack: Any = None
        self.connack_props: Any = None
        self.disconnect_rc: Any = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.messages: list[Any] = []
        self.subacks: dict[int, list[int]] = {}
        self.pubacks: dict[int, int] = {}
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda c, u, msg: self.messages.append(msg)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connack, self.connack_props = rc, props
        if not rc.is_failure:
            self.connected.set()

    def _on_disconnect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        self.disconnect_rc = rc
        self.disconnected.set()

    def _on_subscribe(self, c: Any, u: Any, mid: int, codes: Any, props: Any) -> None:
        self.subacks[mid] = [int(getattr(rc, "value", rc)) for rc in codes]

    def _on_publish(self, c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        self.pubacks[mid] = int(getattr(rc, "value", rc))

    def connect(self, *, clean: bool = True, props: Properties | None = None) -> Peer5:
        self.client.connect("127.0.0.1", self.port, 60, clean_start=clean, properties=props)
        self.client.loop_start()
        assert wait_until(lambda: self.connack is not None or self.disconnected.is_set())
        return self

    def subscribe(self, topic_filter: str, qos: int = 0, **options: Any) -> list[int]:
        opts = paho.SubscribeOptions(qos=qos, **options)
        _, mid = self.client.subscribe(topic_filter, options=opts)
        assert mid is not None
        assert wait_until(lambda: mid in self.subacks or self.disconnected.is_set())
        return self.subacks.get(mid, [])

    def publish(
        self, topic: str, payload: bytes, qos: int = 0, props: Properties | None = None
    ) -> int | None:
        info = self.client.publish(topic, payload, qos=qos, properties=props)
        if not qos:
            return None
        assert wait_until(lambda: info.mid in self.pubacks or self.disconnected.is_set())
        return self.pubacks.get(info.mid)

    def close(self) -> None:
        if self.connected.is_set() and not self.disconnected.is_set():
            self.client.disconnect()
            wait_until(self.disconnected.is_set, 2)
        self.client.loop_stop()


def _peer(broker: BrokerThread, fleet: Fleet, name: str, *, service: bool = False) -> Peer5:
    return Peer5(broker.port, fleet.creds(name, service=service), name)


def test_paho_v5_connects_and_reads_the_servers_limits(
    make_broker: BrokerFactory, fleet: Fleet
) -> None:
    """3.2.2.3: the CONNACK properties paho reads back."""
    broker = make_broker()
    dev = _peer(broker, fleet, "dev-1").connect()
    try:
        assert dev.connected.is_set(), dev.connack
        props = dev.connack_props
        assert props.ReceiveMaximum == 100
        assert props.TopicAliasMaximum == 64
        assert props.MaximumPacketSize == 256 * 1024
        assert props.SharedSubscriptionAvailable == 1
        assert props.SubscriptionIdentifierAvailable == 1
    finally:
        dev.close()


def test_paho_v5_empty_client_id_is_assigned(make_broker: BrokerFactory, fleet: Fleet) -> None:
    """MQTT-3.1.3-6, -7, 3.2.2.3.7: paho in MQTTv5 with a zero-length client id is accepted and
    told its id (the identity's name) in Assigned Client Identifier; it then publishes within
    its grants (PUBACK 0) and not outside them (0x87). Twin: paho in MQTT 3.1.1 with a
    zero-length client id is refused with 0x02, as before MQTT 5."""
    broker = make_broker()
    dev = Peer5(broker.port, fleet.creds("dev-1"), "").connect()
    try:
        assert dev.connected.is_set(), dev.connack
        assert dev.connack_props.AssignedClientIdentifier == "dev-1"
        assert dev.publish("devices/dev-1/telemetry/t", b"x", 1) == 0
        assert dev.publish("devices/dev-2/telemetry/t", b"x", 1) == 0x87
    finally:
        dev.close()
    named = _peer(broker, fleet, "dev-1").connect()
    try:
        assert not hasattr(named.connack_props, "AssignedClientIdentifier")
    finally:
        named.close()
    refused: list[Any] = []
    old = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="", protocol=paho.MQTTv311, clean_session=True
    )
    old.tls_set_context(client_context_for_credentials(fleet.creds("dev-1")))
    old.on_connect = lambda c, u, flags, rc, props: refused.append(rc)
    old.connect("127.0.0.1", broker.port, 60)
    old.loop_start()
    try:
        assert wait_until(lambda: bool(refused))
        # 3.1.1 CONNACK 0x02 (identifier rejected); paho 2 names it by its 5.0 code, 0x85
        assert refused[0].value == 0x85
    finally:
        old.loop_stop()


def test_paho_v5_request_response_and_a_311_subscriber(
    make_broker: BrokerFactory, fleet: Fleet
) -> None:
    """MQTT-3.3.2-15, -16, -17: Response Topic, Correlation Data and User Properties reach a
    5.0 subscriber unaltered; a 3.1.1 subscriber gets the same message without them. The
    responder answers on the response topic within its own grants (PUBACK 0)."""
    broker = make_broker()
    sink = _peer(broker, fleet, "sink", service=True).connect()
    old = Peer(broker.port, fleet.creds("dev-2"), "dev-2").connect()
    dev = _peer(broker, fleet, "dev-1").connect()
    try:
        assert sink.subscribe("devices/+/telemetry/#", 1) == [1]
        assert old.subscribe("devices/dev-2/#", 1) == [1]
        assert dev.subscribe("devices/dev-1/commands/#", 1) == [1]
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "devices/dev-1/commands/reply"
        props.CorrelationData = b"req-1"
        props.UserProperty = [("unit", "C")]
        assert dev.publish("devices/dev-1/telemetry/t", b"21", 1, props) == 0
        assert wait_until(lambda: sink.messages)
        request = sink.messages[0]
        assert request.properties.ResponseTopic == "devices/dev-1/commands/reply"
        assert request.properties.CorrelationData == b"req-1"
        assert request.properties.UserProperty == [("unit", "C")]
        answer = Properties(PacketTypes.PUBLISH)
        answer.CorrelationData = request.properties.CorrelationData
        assert sink.publish(request.properties.ResponseTopic, b"ok", 1, answer) == 0
        assert wait_until(lambda: dev.messages)
        assert dev.messages[0].properties.CorrelationData == b"req-1"
        # the 3.1.1 twin: a service's command to dev-2 arrives, bare
        assert sink.publish("devices/dev-2/commands/x", b"c", 1, props) == 0
        assert wait_until(lambda: old.messages)
        assert old.messages == [("devices/dev-2/commands/x", b"c", False)]
    finally:
        for peer in (sink, old, dev):
            peer.close()


def test_paho_v5_refusals_are_reason_codes(make_broker: BrokerFactory, fleet: Fleet) -> None:
    """A denied PUBLISH is PUBACK 0x87 and the connection stays (twin: allowed is 0x00); a denied
    subscription is SUBACK 0x87; a client id that is not the identity is CONNACK 0x85."""
    broker = make_broker()
    dev = _peer(broker, fleet, "dev-1").connect()
    try:
        assert dev.publish("devices/dev-2/telemetry/t", b"x", 1) == 0x87
        assert dev.publish("devices/dev-1/telemetry/t", b"x", 1) == 0
        assert dev.subscribe("devices/dev-2/#", 1) == [0x87]
        assert not dev.disconnected.is_set()
    finally:
        dev.close()
    wrong = Peer5(broker.port, fleet.creds("dev-1"), "dev-2").connect()
    try:
        assert wrong.connack.value == 0x85
    finally:
        wrong.close()


def test_paho_v5_takeover_and_operator_kick_say_why(
    make_broker: BrokerFactory, fleet: Fleet
) -> None:
    """MQTT-3.1.4-3: the old connection gets DISCONNECT 0x8E; an operator's kick 0x98."""
    broker = make_broker()
    first = _peer(broker, fleet, "dev-1").connect()
    second = _peer(broker, fleet, "dev-1").connect()
    try:
        assert wait_until(first.disconnected.is_set)
        assert first.disconnect_rc.value == 0x8E
        assert broker.call(broker.broker.kick("dev-1"))
        assert wait_until(second.disconnected.is_set)
        assert second.disconnect_rc.value == 0x98
    finally:
        first.close()
        second.close()


def test_paho_v5_session_expiry_and_message_expiry(
    make_broker: BrokerFactory, fleet: Fleet
) -> None:
    """MQTT-3.1.2-23: the session outlives the connection and resumes with Clean Start 0; the
    queued message arrives with its remaining Message Expiry Interval (MQTT-3.3.2-6)."""
    broker = make_broker()
    connect = Properties(PacketTypes.CONNECT)
    connect.SessionExpiryInterval = 300
    dev = _peer(broker, fleet, "dev-1").connect(props=connect)
    assert dev.subscribe("devices/dev-1/commands/#", 1) == [1]
    dev.close()
    sink = _peer(broker, fleet, "sink", service=True).connect()
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = 120
    try:
        assert sink.publish("devices/dev-1/commands/go", b"1", 1, props) == 0
    finally:
        sink.close()
    again = _peer(broker, fleet, "dev-1").connect(clean=False, props=connect)
    try:
        assert wait_until(lambda: again.messages)
        assert again.messages[0].payload == b"1"
        assert 0 < again.messages[0].properties.MessageExpiryInterval <= 120
    finally:
        again.close()


def test_paho_v5_topic_alias_and_subscription_identifier(
    make_broker: BrokerFactory, fleet: Fleet
) -> None:
    """3.3.2.3.4: paho publishing with a Topic Alias (set, then used alone); MQTT-3.3.4-3: the
    subscription's identifier comes with the message."""
    broker = make_broker()
    sink = _peer(broker, fleet, "sink", service=True).connect()
    dev = _peer(broker, fleet, "dev-1").connect()
    try:
        sub = Properties(PacketTypes.SUBSCRIBE)
        sub.SubscriptionIdentifier = 42
        _, mid = sink.client.subscribe("devices/+/telemetry/#", 1, properties=sub)
        assert wait_until(lambda: mid in sink.subacks)
        first = Properties(PacketTypes.PUBLISH)
        first.TopicAlias = 1
        assert dev.publish("devices/dev-1/telemetry/t", b"a", 1, first) == 0
        assert dev.publish("", b"b", 1, first) == 0
        assert wait_until(lambda: len(sink.messages) == 2)
        assert [m.topic for m in sink.messages] == ["devices/dev-1/telemetry/t"] * 2
        assert sink.messages[0].properties.SubscriptionIdentifier == [42]
    finally:
        sink.close()
        dev.close()


# -- mosquitto_pub / mosquitto_sub -V mqttv5 ---------------------------------------------------


def _args(creds: Path, port: int, client_id: str) -> list[str]:
    return ["-V", "mqttv5", *mosquitto_tls_args(creds, port, client_id)]


@needs_mosquitto_clients
def test_mosquitto_v5_clients_pass_properties(make_broker: BrokerFactory, fleet: Fleet) -> None:
    """mosquitto_pub -V mqttv5 with user property, response topic and correlation data;
    mosquitto_sub -V mqttv5 prints them (-F %P %R %D)."""
    assert MOSQUITTO_SUB is not None
    assert MOSQUITTO_PUB is not None
    broker = make_broker()
    sub = subprocess.Popen(
        [
            MOSQUITTO_SUB,
            *_args(fleet.creds("sink", service=True), broker.port, "sink"),
            "-t",
            "devices/+/telemetry/#",
            "-F",
            "%t %p %R %D %P",
            "-C",
            "1",
            "-W",
            "10",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert wait_until(lambda: "sink" in broker.broker.connected())
    time.sleep(0.2)  # the SUBSCRIBE lands after CONNACK
    pub = subprocess.run(
        [
            MOSQUITTO_PUB,
            *_args(fleet.creds("dev-1"), broker.port, "dev-1"),
            "-t",
            "devices/dev-1/telemetry/t",
            "-m",
            "42",
            "-q",
            "1",
            "-D",
            "publish",
            "user-property",
            "unit",
            "C",
            "-D",
            "publish",
            "response-topic",
            "devices/dev-1/commands/r",
            "-D",
            "publish",
            "correlation-data",
            "c1",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert pub.returncode == 0, pub.stderr
    out, err = sub.communicate(timeout=15)
    assert out.strip() == "devices/dev-1/telemetry/t 42 devices/dev-1/commands/r c1 unit:C", err


@needs_mosquitto_clients
def test_mosquitto_v5_pub_is_told_0x87_for_a_denied_publish(
    make_broker: BrokerFactory, fleet: Fleet
) -> None:
    """mosquitto_pub -d prints the PUBACK's reason code: 135 (0x87) denied; twin: 0 allowed."""
    assert MOSQUITTO_PUB is not None
    broker = make_broker()

    def pub(topic: str) -> str:
        result = subprocess.run(
            [
                MOSQUITTO_PUB,
                *_args(fleet.creds("dev-1"), broker.port, "dev-1"),
                "-t",
                topic,
                "-m",
                "x",
                "-q",
                "1",
                "-d",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        return result.stdout + result.stderr

    denied = pub("devices/dev-2/telemetry/t")
    assert "received PUBACK (Mid: 1, RC:135)" in denied
    assert "Publish 1 failed: Not authorized." in denied
    allowed = pub("devices/dev-1/telemetry/t")
    assert "received PUBACK (Mid: 1, RC:0)" in allowed
    assert "failed" not in allowed


def test_paho_v5_shared_subscription_splits_the_messages(
    make_broker: BrokerFactory, fleet: Fleet
) -> None:
    """4.8.2 with real clients: two paho services in `$share/g/...` get each message once
    between them; a device cannot join a share of a filter outside its grants (SUBACK 0x87)."""
    broker = make_broker()
    fleet.creds("svc-a", service=True)
    a = _peer(broker, fleet, "svc-a", service=True).connect()
    b = _peer(broker, fleet, "sink", service=True).connect()
    dev = _peer(broker, fleet, "dev-1").connect()
    try:
        assert a.subscribe("$share/g/devices/+/telemetry/#", 1) == [1]
        assert b.subscribe("$share/g/devices/+/telemetry/#", 1) == [1]
        assert dev.subscribe("$share/g/devices/+/telemetry/#", 1) == [0x87]
        for i in range(6):
            assert dev.publish("devices/dev-1/telemetry/t", str(i).encode(), 1) == 0
        assert wait_until(lambda: len(a.messages) + len(b.messages) == 6)
        payloads = sorted(m.payload for m in a.messages + b.messages)
        assert payloads == [str(i).encode() for i in range(6)]
        assert a.messages
        assert b.messages
    finally:
        for peer in (a, b, dev):
            peer.close()


def test_a_malformed_v5_packet_closes_only_that_connection(
    make_broker: BrokerFactory, fleet: Fleet
) -> None:
    """Bad input over real TLS: an unknown property identifier is DISCONNECT 0x81 for that
    client; a paho v5 session beside it carries on (twin: it still gets its messages)."""
    from broker import mqtt

    broker = make_broker()
    sink = _peer(broker, fleet, "sink", service=True).connect()
    other = _peer(broker, fleet, "dev-2").connect()
    sock = tls_socket(broker.port, fleet.creds("dev-1"), root=fleet.pki_dir / "root.crt")
    try:
        assert sink.subscribe("devices/+/telemetry/#") == [0]
        sock.sendall(mqtt.encode_connect(mqtt.Connect(5, "dev-1", True, 30)))
        reader = mqtt.ClientPacketReader(1 << 20, 5)
        packets: list[Any] = []
        while not packets:
            packets += reader.feed(sock.recv(4096))
        assert packets[0].reason_code == 0
        sock.sendall(b"\x30\x07\x00\x01a\x02\x7f\x00x")  # property 0x7f does not exist
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        [disconnect] = reader.feed(data)
        assert disconnect.reason_code == mqtt.Reason.MALFORMED_PACKET
        assert other.publish("devices/dev-2/telemetry/t", b"still here", 1) == 0
        assert wait_until(lambda: sink.messages)
        assert sink.messages[0].payload == b"still here"
    finally:
        sock.close()
        sink.close()
        other.close()


def test_paho_v5_revocation_kick_is_0x87_and_never_publishes_the_will(
    make_broker: BrokerFactory, fleet: Fleet
) -> None:
    """A revoked device is told DISCONNECT 0x87 Not authorized (docs/BROKER.md: 0x87, not
    0x98) and its will, delayed or not, is never published; twin: another device's will on a
    dropped connection is."""
    broker = make_broker()
    sink = _peer(broker, fleet, "sink", service=True).connect()
    will_props = Properties(PacketTypes.WILLMESSAGE)
    will_props.WillDelayInterval = 1
    session = Properties(PacketTypes.CONNECT)
    session.SessionExpiryInterval = 60
    dev = _peer(broker, fleet, "dev-1")
    dev.client.will_set("devices/dev-1/state", b"gone", properties=will_props)
    dev.connect(props=session)
    other = _peer(broker, fleet, "dev-2")
    other.client.will_set("devices/dev-2/state", b"dropped")
    other.connect()
    try:
        assert sink.subscribe("devices/+/state") == [0]
        fleet.pki.revoke("dev-1", reason="key-compromise")
        # read the CRL now (False if the 0.2 s background poll already did)
        broker.call(broker.broker.check_revocations())
        assert wait_until(dev.disconnected.is_set)
        assert dev.disconnect_rc.value == 0x87
        other.client.socket().close()  # vanish without DISCONNECT: its will goes out
        assert wait_until(lambda: sink.messages)
        time.sleep(1.5)  # past dev-1's will delay
        assert [m.payload for m in sink.messages] == [b"dropped"]
    finally:
        sink.close()
        dev.close()
        other.client.loop_stop()


@needs_mosquitto_clients
def test_mosquitto_v5_sub_is_told_0x87_for_a_denied_subscription(
    make_broker: BrokerFactory, fleet: Fleet
) -> None:
    """mosquitto_sub -V mqttv5 reads SUBACK 0x87 and says every subscription was denied;
    twin: its own subtree is granted (it then waits for messages until -W ends it)."""
    assert MOSQUITTO_SUB is not None
    broker = make_broker()

    def sub(topic: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                MOSQUITTO_SUB,
                *_args(fleet.creds("dev-1"), broker.port, "dev-1"),
                "-t",
                topic,
                "-d",
                "-W",
                "2",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )

    denied = sub("devices/dev-2/#")
    assert "received SUBACK" in denied.stdout
    assert "All subscription requests were denied." in denied.stdout + denied.stderr
    granted = sub("devices/dev-1/#")
    assert "received SUBACK" in granted.stdout
    assert "denied" not in granted.stdout + granted.stderr


def _offline_telemetry_sink(broker: BrokerThread, fleet: Fleet) -> None:
    """A persistent MQTT 5 subscriber to every device's telemetry (QoS 1) that went away."""
    sink = _peer(broker, fleet, "sink", service=True)
    session = Properties(PacketTypes.CONNECT)
    session.SessionExpiryInterval = 300
    sink.connect(props=session)
    assert sink.subscribe("devices/+/telemetry/#", 1) == [1]
    sink.close()


def test_paho_v5_is_told_0x97_when_every_matching_queue_is_full(
    make_broker: BrokerFactory, fleet: Fleet
) -> None:
    """Issue 15, full queues are never silent: the only subscriber's offline queue holds 2;
    paho's on_publish reads PUBACK 0x00 twice, then 0x97 Quota exceeded (3.4.2.1), and the
    connection stays (the next publish is answered too). Twin: a topic nobody subscribes to
    is 0x00."""
    broker = make_broker(limits=Limits(offline_queue_max=2))
    _offline_telemetry_sink(broker, fleet)
    dev = _peer(broker, fleet, "dev-1").connect()
    try:
        codes = [dev.publish("devices/dev-1/telemetry/t", b"%d" % n, 1) for n in range(4)]
        assert codes == [0, 0, 0x97, 0x97]
        assert dev.publish("devices/dev-1/state", b"up", 1) == 0
        assert not dev.disconnected.is_set()
    finally:
        dev.close()


@needs_mosquitto_clients
def test_mosquitto_v5_pub_reads_0x97_when_every_matching_queue_is_full(
    make_broker: BrokerFactory, fleet: Fleet
) -> None:
    """mosquitto_pub -V mqttv5 -q 1 -d prints the PUBACK's reason code: 0 while the queue has
    room (twin), 151 (0x97) once it is full, with "Publish 1 failed: Quota exceeded" and our
    Reason String."""
    assert MOSQUITTO_PUB is not None
    broker = make_broker(limits=Limits(offline_queue_max=1))
    _offline_telemetry_sink(broker, fleet)

    def pub() -> str:
        result = subprocess.run(
            [
                MOSQUITTO_PUB,
                *_args(fleet.creds("dev-1"), broker.port, "dev-1"),
                "-t",
                "devices/dev-1/telemetry/t",
                "-m",
                "x",
                "-q",
                "1",
                "-d",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return result.stdout + result.stderr

    first = pub()
    assert "received PUBACK (Mid: 1, RC:0)" in first, first
    second = pub()
    assert "received PUBACK (Mid: 1, RC:151)" in second, second
    assert "Publish 1 failed: Quota exceeded" in second, second
    assert "queues-full" in second, second
