"""MQTT 5.0 in the per-connection protocol object and the core, in milliseconds.

Each client is a ``ClientProtocol`` over a fake wire (bytes and ``now`` in, bytes out); what the
broker sends is read back with the codec's client-side reader, whose rules the codec tests check
against paho-mqtt's tables. End-to-end twins with paho-mqtt (MQTTv5) and mosquitto_pub/sub
``-V mqttv5`` are in ``test_broker_mqtt5.py``. Statement numbers are MQTT 5.0's.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from broker import mqtt
from broker.auth import Authenticated
from broker.errors import Refused
from broker.mqtt import Properties, Reason, SubscriptionOptions
from broker.protocol import Authenticate, ClientProtocol, State
from broker.settings import Limits
from provisioning.identity import Identity
from tests.broker.recording_link import DOMAIN, connect, make_core
from tests.broker.test_broker_protocol import FakeWire

_DEFAULT_OPTIONS = SubscriptionOptions()


class Client5:
    """One MQTT 5 client connection on a shared core."""

    def __init__(self, core: Any, name: str = "dev-1", *, service: bool = False) -> None:
        self.core = core
        self.name = name
        self.service = service
        self.wire = FakeWire()
        self.protocol = ClientProtocol(core, self.wire, f"127.0.0.1:{id(self) % 60000}", 0.0)
        self.protocol.handshake_done("TLSv1.3")
        self.reader = mqtt.ClientPacketReader(1 << 28, 5)
        self._pending: list[Any] = []  # read behind a CONNACK or SUBACK, for the next out()

    def feed(self, data: bytes, now: float = 1.0) -> Authenticate | None:
        return self.protocol.receive_data(data, now)

    def out(self) -> list[Any]:
        packets, self._pending = self._pending + self.reader.feed(self.protocol.data_to_send()), []
        return packets

    def connect(
        self,
        *,
        clean: bool = True,
        keepalive: int = 60,
        props: Properties = mqtt.NO_PROPERTIES,
        will: tuple[str, bytes, Properties] | None = None,
        now: float = 1.0,
    ) -> mqtt.Connack:
        packet = mqtt.Connect(5, self.name, clean, keepalive, properties=props)
        if will is not None:
            packet.will_topic, packet.will_payload, packet.will_properties = will
        event = self.feed(mqtt.encode_connect(packet), now)
        assert isinstance(event, Authenticate)
        identity = (
            Identity.service(self.name, DOMAIN)
            if self.service
            else Identity.device(self.name, DOMAIN)
        )
        serial = format(sum(map(ord, self.name)) + 0x100, "x")  # one certificate per name
        self.protocol.authenticated(event.connect, Authenticated(identity, "mtls", serial), now)
        connack, *self._pending = self.out()
        assert isinstance(connack, mqtt.Connack)
        return connack

    def subscribe(
        self,
        topic_filter: str,
        qos: int = 0,
        options: SubscriptionOptions = _DEFAULT_OPTIONS,
        *,
        identifier: int | None = None,
        pid: int = 1,
    ) -> list[int]:
        props = (
            Properties(subscription_identifiers=(identifier,)) if identifier else mqtt.NO_PROPERTIES
        )
        packet = mqtt.Subscribe(pid, [(topic_filter, qos)], (options,), props)
        self.feed(mqtt.encode_subscribe(packet, 5))
        suback, *self._pending = self.out()
        assert isinstance(suback, mqtt.Suback), suback
        return suback.reason_codes

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        *,
        pid: int = 0,
        retain: bool = False,
        props: Properties = mqtt.NO_PROPERTIES,
        now: float = 1.0,
    ) -> None:
        wire = mqtt.encode_properties(props, mqtt.PUBLISH)
        self.feed(mqtt.encode_publish5(topic.encode(), payload, qos, retain, pid, False, wire), now)


def _pair(core: Any = None) -> tuple[Client5, Client5]:
    core = core or make_core()
    dev = Client5(core, "dev-1")
    dev.connect()
    sink = Client5(core, "sink", service=True)
    sink.connect()
    return dev, sink


def _sink(core: Any, topic_filter: str, qos: int = 0, **connect: Any) -> Client5:
    """The service client "sink", connected (``connect``: its CONNECT's options) and
    subscribed to ``topic_filter``."""
    sink = Client5(core, "sink", service=True)
    sink.connect(**connect)
    sink.subscribe(topic_filter, qos)
    return sink


# -- CONNECT / CONNACK -----------------------------------------------------------------------------


def test_connack_announces_what_the_server_allows() -> None:
    """3.2.2.3: Receive Maximum, Maximum Packet Size, Topic Alias Maximum, Retain / Wildcard /
    Subscription Identifier / Shared Subscription Available; Server Keep Alive when the broker
    changed the client's (MQTT-3.2.2-21); Maximum QoS absent, since 2 may not be sent."""
    limits = Limits(max_keepalive=120, receive_maximum=20, topic_alias_maximum=8)
    dev = Client5(make_core(limits))
    connack = dev.connect(keepalive=600)
    props = connack.properties
    assert connack.reason_code == 0
    assert props.receive_maximum == 20
    assert props.topic_alias_maximum == 8
    assert props.maximum_packet_size == limits.max_packet_bytes
    assert props.server_keep_alive == 120
    assert props.maximum_qos is None
    assert (props.retain_available, props.wildcard_subscription_available) == (1, 1)
    assert props.subscription_identifier_available == 1
    assert props.shared_subscription_available == 1
    assert dev.protocol.negotiated.keepalive_window == 120 * limits.keepalive_factor


def test_connack_keeps_quiet_about_a_keepalive_it_accepted() -> None:
    dev = Client5(make_core())
    assert dev.connect(keepalive=60).properties.server_keep_alive is None


def test_session_expiry_above_the_broker_maximum_is_lowered_and_said() -> None:
    """3.2.2.3.2: the CONNACK carries the Session Expiry Interval the broker uses."""
    dev = Client5(make_core(session_expiry=100))
    connack = dev.connect(props=Properties(session_expiry_interval=5000))
    assert connack.properties.session_expiry_interval == 100
    dev2 = Client5(make_core(session_expiry=100), "dev-2")
    connack = dev2.connect(props=Properties(session_expiry_interval=50))
    assert connack.properties.session_expiry_interval is None  # the client's own value stands


def test_session_expiry_zero_ends_the_session_with_the_connection() -> None:
    """3.1.2.11.2: absent or 0, the session ends when the network connection closes."""
    core = make_core()
    dev = Client5(core)
    dev.connect(clean=False)
    dev.subscribe("devices/dev-1/commands/#", 1)
    dev.protocol.connection_lost()
    assert "dev-1" not in core.sessions


def test_session_expiry_keeps_the_session_and_clean_start_resumes_it() -> None:
    """MQTT-3.1.2-23: a session with an expiry interval outlives the connection; Clean Start 0
    resumes it (session present, MQTT-3.2.2-3), and its queued QoS 1 message is delivered."""
    core = make_core()
    dev = Client5(core)
    dev.connect(props=Properties(session_expiry_interval=300))
    dev.subscribe("devices/dev-1/commands/#", 1)
    dev.protocol.connection_lost()
    assert "dev-1" in core.sessions
    svc = Client5(core, "ops", service=True)
    svc.connect()
    svc.publish("devices/dev-1/commands/reboot", b"now", 1, pid=7)
    again = Client5(core)
    connack = again.connect(clean=False, props=Properties(session_expiry_interval=300))
    assert connack.session_present
    [message] = again.out()
    assert (message.topic, message.payload, message.qos) == (
        "devices/dev-1/commands/reboot",
        b"now",
        1,
    )


def test_clean_start_discards_the_session() -> None:
    """MQTT-3.1.2-4: Clean Start 1 starts a new session (session present 0)."""
    core = make_core()
    dev = Client5(core)
    dev.connect(props=Properties(session_expiry_interval=300))
    dev.protocol.connection_lost()
    again = Client5(core)
    assert not again.connect(
        clean=True, props=Properties(session_expiry_interval=300)
    ).session_present


def test_expired_sessions_are_forgotten_on_their_own_interval() -> None:
    core = make_core()
    dev = Client5(core)
    dev.connect(props=Properties(session_expiry_interval=10))
    dev.protocol.connection_lost()
    gone = core.sessions["dev-1"].disconnected_at
    core.expire_sessions(gone + 5)
    assert "dev-1" in core.sessions
    core.expire_sessions(gone + 10)
    assert "dev-1" not in core.sessions


def test_disconnect_cannot_set_an_expiry_after_zero() -> None:
    """3.14.2.2.2: Session Expiry 0 at CONNECT and non-zero at DISCONNECT is a Protocol Error."""
    core = make_core()
    dev = Client5(core)
    dev.connect()
    dev.feed(mqtt.disconnect5(0, Properties(session_expiry_interval=60), from_client=True))
    [disconnect] = dev.out()
    assert isinstance(disconnect, mqtt.Disconnect)
    assert disconnect.reason_code == Reason.PROTOCOL_ERROR
    assert dev.protocol.closed


@pytest.mark.parametrize(
    ("connack", "reason", "code"),
    [
        (mqtt.CONNACK_IDENTIFIER_REJECTED, "client-id-mismatch", 0x85),
        (mqtt.CONNACK_BAD_CREDENTIALS, "bad-token", 0x86),
        (mqtt.CONNACK_NOT_AUTHORIZED, "revoked", 0x87),
        (mqtt.CONNACK_NOT_AUTHORIZED, "method-not-allowed", 0x8C),
    ],
)
def test_a_refusal_is_its_mqtt5_reason_code(connack: int, reason: str, code: int) -> None:
    """An authenticator's ``Refused.connack`` (3.1.1 codes) maps to its 5.0 reason (table 3-1),
    a method the listener does not take is 0x8C; the connection closes (MQTT-3.2.2-7)."""
    dev = Client5(make_core())
    event = dev.feed(mqtt.encode_connect(mqtt.Connect(5, "dev-1", True, 60)))
    assert isinstance(event, Authenticate)
    dev.protocol.refused(Refused(reason, "why", connack=connack))
    [answer] = dev.out()
    assert isinstance(answer, mqtt.Connack)
    assert (answer.reason_code, answer.session_present) == (code, False)
    assert answer.properties.reason_string == reason
    assert dev.wire.ended is True


def test_client_id_other_than_the_identity_is_0x85() -> None:
    """The client_id binding (docs/BROKER.md) refuses with Client Identifier not valid."""
    dev = Client5(make_core(), "dev-2")
    event = dev.feed(mqtt.encode_connect(mqtt.Connect(5, "dev-2", True, 60)))
    assert isinstance(event, Authenticate)
    dev.protocol.authenticated(
        event.connect, Authenticated(Identity.device("dev-1", DOMAIN), "mtls", "1"), 1.0
    )
    [answer] = dev.out()
    assert answer.reason_code == Reason.CLIENT_IDENTIFIER_NOT_VALID
    assert "dev-2" not in dev.core.sessions


def _connect_as(
    core: Any, client_id: str, identity: Identity, *, level: int = 5, **fields: Any
) -> tuple[Client5, mqtt.Connack]:
    """A CONNECT with ``client_id`` from a client the authenticator proved to be ``identity``."""
    client = Client5(core, client_id)
    if level != 5:
        client.reader = mqtt.ClientPacketReader(1 << 28, level)
    event = client.feed(mqtt.encode_connect(mqtt.Connect(level, client_id, True, 60, **fields)))
    assert isinstance(event, Authenticate)
    client.protocol.authenticated(event.connect, Authenticated(identity, "mtls", "1"), 1.0)
    connack, *client._pending = client.out()
    assert isinstance(connack, mqtt.Connack)
    return client, connack


def test_an_empty_client_id_is_assigned_the_identity() -> None:
    """MQTT-3.1.3-6, MQTT-3.1.3-7, 3.2.2.3.7: a zero-length client id is accepted and the one
    assigned (the identity's name, the only id it may use) is in CONNACK's Assigned Client
    Identifier; the session lives under it, with the identity's grants."""
    core = make_core()
    dev, connack = _connect_as(core, "", Identity.device("dev-1", DOMAIN))
    assert connack.reason_code == 0
    assert connack.properties.assigned_client_identifier == "dev-1"
    assert core.live["dev-1"].link is dev.protocol
    assert "" not in core.sessions
    sink = Client5(core, "sink", service=True)
    sink.connect()
    assert sink.subscribe("devices/+/telemetry/#") == [0]
    dev.publish("devices/dev-1/telemetry/t", b"x")
    [message] = sink.out()
    assert message.topic == "devices/dev-1/telemetry/t"
    assert dev.subscribe("devices/dev-2/#") == [Reason.NOT_AUTHORIZED]  # grants of dev-1 only


def test_a_named_client_is_not_told_an_assigned_identifier() -> None:
    """Twin: MQTT-3.2.2-16 allows the property only for a zero-length client id."""
    _, connack = _connect_as(make_core(), "dev-1", Identity.device("dev-1", DOMAIN))
    assert connack.reason_code == 0
    assert connack.properties.assigned_client_identifier is None


def test_an_empty_client_id_at_311_is_still_refused() -> None:
    """Twin: MQTT 3.1.1 is unchanged: a zero-length client id is refused with return code 0x02
    (3.1.1's MQTT-3.1.3-9), and no session is made."""
    core = make_core()
    _, connack = _connect_as(core, "", Identity.device("dev-1", DOMAIN), level=4)
    assert connack.reason_code == mqtt.CONNACK_IDENTIFIER_REJECTED
    assert not core.sessions


def test_an_assigned_client_id_keeps_the_will_check() -> None:
    """Twin: the will topic is judged for the identity as with a named client id (0x87 and no
    session when it is outside the grants)."""
    core = make_core()
    will = {"will_topic": "devices/dev-2/status", "will_payload": b"gone"}
    _, connack = _connect_as(core, "", Identity.device("dev-1", DOMAIN), **will)
    assert connack.reason_code == Reason.NOT_AUTHORIZED
    assert not core.sessions


def test_a_second_empty_client_id_of_one_identity_takes_over() -> None:
    """The assigned id is unique among live connections: one client id, one connection
    (MQTT-3.1.4-3): the earlier connection gets DISCONNECT 0x8E."""
    core = make_core()
    first, _ = _connect_as(core, "", Identity.device("dev-1", DOMAIN))
    second, connack = _connect_as(core, "", Identity.device("dev-1", DOMAIN))
    assert connack.properties.assigned_client_identifier == "dev-1"
    [disconnect] = first.out()
    assert isinstance(disconnect, mqtt.Disconnect)
    assert disconnect.reason_code == Reason.SESSION_TAKEN_OVER
    assert core.live["dev-1"].link is second.protocol


def test_a_malformed_level5_connect_gets_connack_with_its_code() -> None:
    """MQTT-3.2.2-7 / 4.13: a CONNECT that breaks a property rule is answered by a CONNACK with
    the reason code (here a duplicate Receive Maximum: 0x82) and closed."""
    dev = Client5(make_core())
    good = mqtt.encode_connect(
        mqtt.Connect(5, "dev-1", True, 60, properties=Properties(receive_maximum=5))
    )
    # the property block "\x03\x21\x00\x05" becomes "\x06\x21\x00\x05\x21\x00\x05"
    bad = bytearray(good.replace(b"\x03\x21\x00\x05", b"\x06\x21\x00\x05\x21\x00\x05"))
    bad[1] += 3
    assert dev.feed(bytes(bad)) is None
    [answer] = dev.out()
    assert answer.reason_code == Reason.PROTOCOL_ERROR
    assert dev.protocol.closed


# -- PUBLISH in: reason codes instead of silent drops ----------------------------------------------


def test_a_denied_qos1_publish_gets_puback_0x87_and_the_connection_stays() -> None:
    """3.4.2.1: PUBACK 0x87 Not authorized, audited; not routed; the connection lives on.
    Twin: an allowed one gets 0x00 and is routed."""
    dev, sink = _pair()
    sink.subscribe("devices/+/telemetry/#", 1)
    dev.publish("devices/dev-2/telemetry/t", b"x", 1, pid=3)
    [ack] = dev.out()
    assert (ack.kind, ack.packet_id, ack.reason_code) == (mqtt.PUBACK, 3, 0x87)
    assert ack.properties.reason_string == "denied"
    assert sink.out() == []
    assert dev.protocol.state is State.LIVE
    assert any(e.get("action") == "publish" for e in _events(dev.core, "deny"))
    dev.publish("devices/dev-1/telemetry/t", b"y", 1, pid=4)
    [ack] = dev.out()
    assert (ack.packet_id, ack.reason_code) == (4, 0)
    [message] = sink.out()
    assert message.payload == b"y"


def test_a_denied_qos2_publish_gets_pubrec_0x87_and_nothing_waits_for_pubrel() -> None:
    dev, _ = _pair()
    dev.publish("devices/dev-2/state", b"x", 2, pid=9)
    [rec] = dev.out()
    assert (rec.kind, rec.reason_code) == (mqtt.PUBREC, 0x87)
    assert 9 not in dev.core.sessions["dev-1"].incoming_qos2


def test_a_denied_qos0_publish_is_dropped_and_audited() -> None:
    dev, sink = _pair()
    sink.subscribe("devices/+/telemetry/#")
    dev.publish("devices/dev-2/telemetry/t", b"x")
    assert dev.out() == []
    assert sink.out() == []
    assert dev.protocol.state is State.LIVE
    assert _events(dev.core, "deny")


def test_no_reason_string_when_problem_information_is_refused() -> None:
    """MQTT-3.1.2-29: Request Problem Information 0: no Reason String on a PUBACK."""
    core = make_core()
    dev = Client5(core)
    dev.connect(props=Properties(request_problem_information=0))
    dev.publish("devices/dev-2/telemetry/t", b"x", 1, pid=3)
    [ack] = dev.out()
    assert ack.reason_code == 0x87
    assert ack.properties.reason_string is None


def test_a_denied_subscription_gets_suback_0x87_an_invalid_one_0x8f() -> None:
    dev, _ = _pair()
    assert dev.subscribe("devices/dev-2/#", 1) == [0x87]
    assert dev.subscribe("devices/dev-1/#", 1) == [1]


def test_unsuback_names_what_did_not_exist() -> None:
    """3.11.3: 0x00 Success, 0x11 No subscription existed."""
    dev, _ = _pair()
    dev.subscribe("devices/dev-1/commands/#", 1)
    dev.feed(
        mqtt.encode_unsubscribe(
            mqtt.Unsubscribe(2, ["devices/dev-1/commands/#", "devices/dev-1/x"]), 5
        )
    )
    [unsuback] = dev.out()
    assert unsuback.reason_codes == [0x00, 0x11]


# -- properties pass through, and are lost on the way to MQTT 3.1.1 --------------------------------


def test_request_response_properties_pass_through() -> None:
    """MQTT-3.3.2-15, -16: Response Topic and Correlation Data (and user properties, content
    type, payload format, MQTT-3.3.2-17, -18, -20, 3.3.2.3.2) go to the receiver unaltered."""
    dev, sink = _pair()
    sink.subscribe("devices/+/telemetry/#", 1)
    props = Properties(
        response_topic="devices/dev-1/commands/reply",
        correlation_data=b"\x00\x01",
        content_type="text/plain",
        payload_format_indicator=1,
        user_properties=(("a", "1"), ("a", "2")),
    )
    dev.publish("devices/dev-1/telemetry/t", b"hi", 1, pid=1, props=props)
    dev.out()
    [message] = sink.out()
    got = message.properties
    assert got.response_topic == "devices/dev-1/commands/reply"
    assert got.correlation_data == b"\x00\x01"
    assert got.content_type == "text/plain"
    assert got.payload_format_indicator == 1
    assert got.user_properties == (("a", "1"), ("a", "2"))


def test_the_response_is_judged_by_the_responders_publish_grants() -> None:
    """A Response Topic is no grant: the responder's PUBLISH to it is checked like any other.
    Twin: to a topic its grants allow, it goes through."""
    dev, sink = _pair()
    sink.subscribe("devices/+/telemetry/#", 1)
    dev.publish(
        "devices/dev-1/telemetry/q",
        b"?",
        1,
        pid=1,
        props=Properties(response_topic="devices/dev-2/telemetry/forged"),
    )
    dev.out()
    [request] = sink.out()
    sink.publish(request.properties.response_topic, b"!", 1, pid=2)
    [ack] = sink.out()
    assert ack.reason_code == 0x87
    sink.publish("devices/dev-1/commands/answer", b"!", 1, pid=3)
    [ack] = sink.out()
    assert ack.reason_code == 0


def test_an_mqtt5_message_reaches_a_311_subscriber_without_properties() -> None:
    """A 3.1.1 receiver gets the topic, payload and QoS; the properties cannot be said in 3.1.1
    (the 5.0 spec's compatibility note: a server forwarding to a 3.1.1 client drops them)."""
    from tests.broker.recording_link import connect as connect311

    core = make_core()
    dev = Client5(core)
    dev.connect()
    _, link, _ = connect311(core, "sink", service=True)
    link.take()
    core.subscribe(core.sessions["sink"], mqtt.Subscribe(1, [("devices/+/telemetry/#", 0)]))
    link.take()
    dev.publish("devices/dev-1/telemetry/t", b"v", props=Properties(user_properties=(("k", "v"),)))
    assert link.publishes() == [("devices/dev-1/telemetry/t", 0, 0, b"v", False, False)]


# -- expiry ----------------------------------------------------------------------------------------


def test_message_expiry_counts_down_and_expired_queued_messages_are_dropped() -> None:
    """MQTT-3.3.2-6: the forwarded Message Expiry Interval is what is left; 3.3.2.3.3: a message
    whose interval passed before delivery is not delivered (twin: one still in time is)."""
    core = make_core()
    dev = Client5(core)
    dev.connect(props=Properties(session_expiry_interval=300))
    dev.subscribe("devices/dev-1/commands/#", 1)
    dev.protocol.connection_lost()
    svc = Client5(core, "ops", service=True)
    svc.connect()
    svc.publish(
        "devices/dev-1/commands/a",
        b"short",
        1,
        pid=1,
        props=Properties(message_expiry_interval=5),
        now=10.0,
    )
    svc.publish(
        "devices/dev-1/commands/b",
        b"long",
        1,
        pid=2,
        props=Properties(message_expiry_interval=100),
        now=10.0,
    )
    again = Client5(core)
    event = again.feed(
        mqtt.encode_connect(
            mqtt.Connect(5, "dev-1", False, 60, properties=Properties(session_expiry_interval=300))
        ),
        30.0,
    )
    assert isinstance(event, Authenticate)
    again.protocol.authenticated(
        event.connect, Authenticated(Identity.device("dev-1", DOMAIN), "mtls", "1"), 30.0
    )
    _connack, message = again.out()
    assert message.payload == b"long"
    assert message.properties.message_expiry_interval == 80
    assert core.expired == 1


# -- wills -----------------------------------------------------------------------------------------


def _will(delay: int) -> tuple[str, bytes, Properties]:
    return ("devices/dev-1/state", b"gone", Properties(will_delay_interval=delay))


def test_a_delayed_will_is_published_after_the_delay() -> None:
    """MQTT-3.1.3-9: the will waits its Will Delay Interval; twin: not before it."""
    core = make_core()
    sink = _sink(core, "devices/+/state")
    dev = Client5(core)
    dev.connect(props=Properties(session_expiry_interval=300), will=_will(10), now=1.0)
    dev.protocol.connection_lost()
    core.tick(5.0)
    assert sink.out() == []
    core.tick(11.5)
    [will] = sink.out()
    assert will.payload == b"gone"


def test_a_wills_message_expiry_counts_from_its_publication() -> None:
    """3.1.3.2.4: the Will's Message Expiry Interval is sent as the PUBLISH's when the will is
    published: a device connected for longer than the interval still has its will delivered,
    with the whole interval (counted from the CONNECT, it would have expired unsent)."""
    core = make_core()
    sink = _sink(core, "devices/+/state", 1)
    dev = Client5(core)
    dev.connect(will=("devices/dev-1/state", b"gone", Properties(message_expiry_interval=30)))
    dev.feed(b"\xc0\x00", 50.0)  # PINGREQ: connected for 49 s, more than 30
    dev.protocol.connection_lost()
    [will] = sink.out()
    assert (will.payload, will.properties.message_expiry_interval) == (b"gone", 30)
    assert core.expired == 0


def test_a_delayed_will_is_not_published_when_the_session_resumes() -> None:
    """MQTT-3.1.3-9 (the session resumes before the delay passes)."""
    core = make_core()
    sink = _sink(core, "devices/+/state")
    dev = Client5(core)
    dev.connect(props=Properties(session_expiry_interval=300), will=_will(10))
    dev.protocol.connection_lost()
    Client5(core).connect(clean=False, props=Properties(session_expiry_interval=300), now=3.0)
    core.tick(20.0)
    assert sink.out() == []


def test_a_revoked_session_never_publishes_its_delayed_will() -> None:
    """A revoked identity speaks no more: neither at the kick nor after a pending delay."""
    core = make_core()
    sink = _sink(core, "devices/+/state")
    dev = Client5(core)
    dev.connect(props=Properties(session_expiry_interval=300), will=_will(10))
    dev.protocol.connection_lost()  # the will is now pending
    serial = int(core.sessions["dev-1"].authenticated.credential, 16)
    core.kick_revoked(frozenset({serial}))
    core.tick(20.0)
    assert sink.out() == []


def test_disconnect_with_will_0x04_publishes_it_and_0x00_discards_it() -> None:
    """3.14.2.1 / MQTT-3.1.2-10."""
    core = make_core()
    sink = _sink(core, "devices/+/state")
    for code, expected in ((0x04, [b"gone"]), (0x00, [])):
        dev = Client5(core)
        dev.connect(will=("devices/dev-1/state", b"gone", mqtt.NO_PROPERTIES))
        dev.feed(mqtt.disconnect5(code, from_client=True))
        assert [m.payload for m in sink.out()] == expected


# -- flow control ----------------------------------------------------------------------------------


def test_receive_maximum_exceeded_is_disconnect_0x93() -> None:
    """3.3.4 / MQTT-3.3.4-7: more QoS 2 PUBLISH unacknowledged than our Receive Maximum.
    Twin: up to the maximum they are accepted."""
    core = make_core(Limits(receive_maximum=2))
    dev = Client5(core)
    dev.connect()
    dev.publish("devices/dev-1/t", b"1", 2, pid=1)
    dev.publish("devices/dev-1/t", b"2", 2, pid=2)
    assert [p.reason_code for p in dev.out()] == [0, 0]
    dev.publish("devices/dev-1/t", b"3", 2, pid=3)
    [disconnect] = dev.out()
    assert disconnect.reason_code == Reason.RECEIVE_MAXIMUM_EXCEEDED
    assert dev.protocol.closed


def test_the_clients_receive_maximum_bounds_what_we_send() -> None:
    """MQTT-3.3.4-9: no more unacknowledged QoS 1 PUBLISH than the client's Receive Maximum."""
    core = make_core()
    sink = _sink(core, "devices/+/telemetry/#", 1, props=Properties(receive_maximum=2))
    dev = Client5(core)
    dev.connect()
    for i in range(5):
        dev.publish("devices/dev-1/telemetry/t", bytes([i]), 1, pid=i + 1)
    assert len(sink.out()) == 2
    sink.feed(mqtt.ack5(mqtt.PUBACK, 1))
    assert len(sink.out()) == 1


def test_never_more_than_the_clients_maximum_packet_size() -> None:
    """MQTT-3.1.2-25: a message too large for the client is discarded for it (and only for it);
    twin: a small one is delivered."""
    core = make_core()
    sink = _sink(core, "devices/+/telemetry/#", 1, props=Properties(maximum_packet_size=64))
    dev = Client5(core)
    dev.connect()
    dev.publish("devices/dev-1/telemetry/t", b"x" * 100, 1, pid=1)
    dev.publish("devices/dev-1/telemetry/t", b"small", 1, pid=2)
    [message] = sink.out()
    assert message.payload == b"small"


def test_a_packet_above_our_maximum_is_disconnect_0x95() -> None:
    core = make_core(Limits(max_packet_bytes=128))
    dev = Client5(core)
    dev.connect()
    dev.publish("devices/dev-1/t", b"x" * 200)
    [disconnect] = dev.out()
    assert disconnect.reason_code == Reason.PACKET_TOO_LARGE


@pytest.mark.parametrize("alias", [0, 9])
def test_topic_alias_zero_or_above_the_maximum_is_0x94(alias: int) -> None:
    """MQTT-3.3.2-8, -9."""
    core = make_core(Limits(topic_alias_maximum=8))
    dev = Client5(core)
    dev.connect()
    dev.publish("devices/dev-1/t", b"x", props=Properties(topic_alias=alias))
    [disconnect] = dev.out()
    assert disconnect.reason_code == Reason.TOPIC_ALIAS_INVALID


def test_a_topic_alias_stands_for_its_topic_and_grants_still_apply() -> None:
    """3.3.2.3.4: the alias is set with a topic and used without; the topic it stands for is
    judged by the publish grants like a spelled-out one (twin: an alias set on a denied topic
    is still denied when used)."""
    dev, sink = _pair()
    sink.subscribe("devices/+/telemetry/#", 1)
    dev.publish("devices/dev-1/telemetry/t", b"1", 1, pid=1, props=Properties(topic_alias=1))
    dev.publish("", b"2", 1, pid=2, props=Properties(topic_alias=1))
    assert [a.reason_code for a in dev.out()] == [0, 0]
    assert [(m.topic, m.payload) for m in sink.out()] == [
        ("devices/dev-1/telemetry/t", b"1"),
        ("devices/dev-1/telemetry/t", b"2"),
    ]
    dev.publish("devices/dev-2/telemetry/t", b"3", 1, pid=3, props=Properties(topic_alias=2))
    dev.publish("", b"4", 1, pid=4, props=Properties(topic_alias=2))
    assert [a.reason_code for a in dev.out()] == [0x87, 0x87]
    assert sink.out() == []


def test_an_unset_topic_alias_is_a_protocol_error() -> None:
    dev, _ = _pair()
    dev.publish("", b"x", props=Properties(topic_alias=3))
    [disconnect] = dev.out()
    assert disconnect.reason_code == Reason.PROTOCOL_ERROR


def test_we_use_topic_aliases_within_the_clients_maximum() -> None:
    """3.3.2.3.4 (server to client): the first PUBLISH of a topic sets an alias, the next ones
    use it with an empty topic; never more aliases than the client's Topic Alias Maximum."""
    core = make_core()
    sink = _sink(core, "devices/+/telemetry/#", props=Properties(topic_alias_maximum=1))
    dev = Client5(core)
    dev.connect()
    for topic in (
        "devices/dev-1/telemetry/a",
        "devices/dev-1/telemetry/a",
        "devices/dev-1/telemetry/b",
    ):
        dev.publish(topic, b"x")
    first, second, third = sink.out()
    assert (first.topic, first.properties.topic_alias) == ("devices/dev-1/telemetry/a", 1)
    assert (second.topic, second.properties.topic_alias) == ("", 1)
    assert (third.topic, third.properties.topic_alias) == ("devices/dev-1/telemetry/b", None)


# -- subscription options and identifiers ----------------------------------------------------------


def test_no_local_keeps_a_clients_own_messages_from_it() -> None:
    """MQTT-3.8.3-3; twin: without No Local it gets them."""
    core = make_core()
    dev = Client5(core)
    dev.connect()
    dev.subscribe("devices/dev-1/a", 0, SubscriptionOptions(no_local=True))
    dev.subscribe("devices/dev-1/b", 0, pid=2)
    dev.publish("devices/dev-1/a", b"1")
    dev.publish("devices/dev-1/b", b"2")
    assert [m.payload for m in dev.out()] == [b"2"]


def test_retain_as_published_and_retain_handling() -> None:
    """MQTT-3.3.1-12/-13 (RETAIN flag on live messages), MQTT-3.3.1-9/-10 (retained messages
    at subscribe by Retain Handling 0, 1, 2)."""
    core = make_core()
    dev = Client5(core)
    dev.connect()
    dev.publish("devices/dev-1/state", b"on", retain=True)
    sink = Client5(core, "sink", service=True)
    sink.connect()
    assert sink.subscribe("devices/+/state", 0, SubscriptionOptions(retain_handling=2)) == [0]
    assert sink.out() == []
    assert sink.subscribe("devices/+/state", 0, SubscriptionOptions(retain_handling=1)) == [0]
    assert sink.out() == []  # not a new subscription
    sink.subscribe("devices/+/state", 0, SubscriptionOptions(retain_handling=0))
    [retained] = sink.out()
    assert retained.retain
    dev.publish("devices/dev-1/state", b"off", retain=True)
    [live] = sink.out()
    assert not live.retain
    sink.subscribe(
        "devices/+/state", 0, SubscriptionOptions(retain_as_published=True, retain_handling=2)
    )
    dev.publish("devices/dev-1/state", b"on", retain=True)
    [live] = sink.out()
    assert live.retain


def test_subscription_identifiers_go_with_the_messages_they_matched() -> None:
    """MQTT-3.3.4-3, -4: every matching subscription's identifier."""
    core = make_core()
    sink = Client5(core, "sink", service=True)
    sink.connect()
    sink.subscribe("devices/+/telemetry/#", identifier=7)
    sink.subscribe("devices/dev-1/telemetry/+", identifier=9, pid=2)
    dev = Client5(core)
    dev.connect()
    dev.publish("devices/dev-1/telemetry/t", b"x")
    [message] = sink.out()
    assert sorted(message.properties.subscription_identifiers) == [7, 9]


def test_a_retained_message_follows_the_receive_grants() -> None:
    """A retained message reaches only a subscriber whose grants let it receive the topic,
    through any MQTT 5 option (twin: the owner's own subtree)."""
    core = make_core()
    dev = Client5(core)
    dev.connect()
    dev.publish("devices/dev-1/state", b"on", retain=True)
    other = Client5(core, "dev-2")
    other.connect()
    assert other.subscribe("devices/dev-1/state") == [0x87]
    assert other.out() == []
    assert dev.subscribe("devices/dev-1/state") == [0]
    [retained] = dev.out()
    assert retained.payload == b"on"


# -- server-sent DISCONNECT ------------------------------------------------------------------------


def test_takeover_is_disconnect_0x8e() -> None:
    """MQTT-3.1.4-3: the old connection is told Session taken over."""
    core = make_core()
    first = Client5(core)
    first.connect()
    Client5(core).connect()
    [disconnect] = first.out()
    assert disconnect.reason_code == Reason.SESSION_TAKEN_OVER


def test_keepalive_timeout_is_disconnect_0x8d() -> None:
    """MQTT-3.1.2-22: 1.5 keep-alives without a packet; twin: a PINGREQ in time keeps it."""
    dev = Client5(make_core())
    dev.connect(keepalive=10)
    dev.feed(b"\xc0\x00", now=10.0)
    dev.out()
    dev.protocol.tick(20.0)
    assert dev.protocol.state is State.LIVE
    dev.protocol.tick(26.0)
    [disconnect] = dev.out()
    assert disconnect.reason_code == Reason.KEEP_ALIVE_TIMEOUT


@pytest.mark.parametrize(
    ("reason", "code"), [("revoked", 0x87), ("operator", 0x98), ("shutdown", 0x8B)]
)
def test_kicks_say_why(reason: str, code: int) -> None:
    """A revocation is 0x87 Not authorized (docs/BROKER.md), an operator's kick 0x98, a
    shutdown 0x8B."""
    core = make_core()
    dev = Client5(core)
    dev.connect()
    if reason == "shutdown":
        core.close_all()
    else:
        core.kick("dev-1", reason)
    [disconnect] = dev.out()
    assert disconnect.reason_code == code


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\x30\x04\x00\x01a\x09", Reason.MALFORMED_PACKET),  # property length past the packet
        (b"\x30\x06\x00\x01a\x02\x7f\x00", Reason.MALFORMED_PACKET),  # unknown property 0x7f
        (b"\x30\x05\x00\x01a\x01\x01", Reason.MALFORMED_PACKET),  # a value past its length
    ],
)
def test_bad_input_closes_that_connection_with_its_code_and_nobody_else_notices(
    data: bytes, code: int
) -> None:
    """A malformed MQTT 5 packet: DISCONNECT with its reason code, the will published (abnormal
    end), and the other session carries on."""
    core = make_core()
    dev, sink = _pair(core)
    sink.subscribe("devices/+/telemetry/#")
    dev.feed(data)
    [disconnect] = dev.out()
    assert disconnect.reason_code == code
    assert dev.protocol.closed
    assert sink.protocol.state is State.LIVE
    other = Client5(core, "dev-2")
    other.connect()
    other.publish("devices/dev-2/telemetry/t", b"fine")
    [message] = sink.out()
    assert message.payload == b"fine"


def test_a_user_property_flood_is_0x97() -> None:
    dev, sink = _pair()
    props = Properties(user_properties=tuple((f"k{i}", "v") for i in range(100)))
    dev.publish("devices/dev-1/telemetry/t", b"x", props=props)
    [disconnect] = dev.out()
    assert disconnect.reason_code == Reason.QUOTA_EXCEEDED
    assert sink.protocol.state is State.LIVE


def _events(core: Any, kind: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = core.audit.events(kind)
    return events


# -- shared subscriptions (4.8.2) ------------------------------------------------------------------

SHARE = "$share/g/devices/+/telemetry/#"


def _services(core: Any, *names: str) -> list[Client5]:
    out = []
    for name in names:
        client = Client5(core, name, service=True)
        client.connect()
        out.append(client)
    return out


def test_a_shared_subscription_gives_each_message_to_one_member_per_group() -> None:
    """4.8.2: members of one group share the messages (in turn here); another group gets all."""
    core = make_core()
    a, b, c = _services(core, "svc-a", "svc-b", "svc-c")
    assert a.subscribe(SHARE, 1) == [1]
    assert b.subscribe(SHARE, 1) == [1]
    assert c.subscribe("$share/h/devices/+/telemetry/#", 1) == [1]
    dev = Client5(core)
    dev.connect()
    for i in range(4):
        dev.publish("devices/dev-1/telemetry/t", bytes([i]), 1, pid=i + 1)
    got_a, got_b = [m.payload for m in a.out()], [m.payload for m in b.out()]
    assert sorted(got_a + got_b) == [b"\x00", b"\x01", b"\x02", b"\x03"]
    assert len(got_a) == len(got_b) == 2
    assert len(c.out()) == 4


def test_the_acl_judges_the_filter_inside_the_share() -> None:
    """The share prefix neither widens nor narrows a grant: `$share/g/{filter}` is allowed
    exactly when `{filter}` is (twins: a device's own subtree yes, another's no; `$share/g/#`
    for a service no)."""
    core = make_core()
    dev = Client5(core)
    dev.connect()
    assert dev.subscribe("$share/g/devices/dev-1/commands/#") == [0]
    assert dev.subscribe("$share/g/devices/dev-2/commands/#") == [0x87]
    [svc] = _services(core, "svc-a")
    assert svc.subscribe("$share/g/#") == [0x87]
    assert svc.subscribe("$share/g/devices/+/state") == [0]
    assert svc.subscribe("$share/g+/devices/+/state") == [0x8F]  # MQTT-4.8.2-2


def test_a_shared_subscription_is_no_way_around_receive() -> None:
    """A member whose grants do not let it receive the topic is passed over; the message goes
    to one that may (twin), and never to the one that may not."""
    core = make_core()
    a, b = _services(core, "svc-a", "svc-b")
    a.subscribe(SHARE)
    b.subscribe(SHARE)
    # svc-a's grants as they would be after a policy change resumed its session: dev-9 only
    core.sessions["svc-a"].grants = core.policy.for_identity(Identity.device("dev-9", DOMAIN))
    dev = Client5(core)
    dev.connect()
    for _ in range(3):
        dev.publish("devices/dev-1/telemetry/t", b"x")
    assert a.out() == []
    assert len(b.out()) == 3


def test_a_member_that_leaves_hands_its_inflight_messages_to_another() -> None:
    """4.8.2: what a member was sent and did not acknowledge goes to another member."""
    core = make_core()
    a, b = _services(core, "svc-a", "svc-b")
    a.subscribe(SHARE, 1)
    b.subscribe(SHARE, 1)
    dev = Client5(core)
    dev.connect()
    dev.publish("devices/dev-1/telemetry/t", b"one", 1, pid=1)
    dev.publish("devices/dev-1/telemetry/t", b"two", 1, pid=2)
    [to_a] = a.out()
    [to_b] = b.out()
    a.protocol.connection_lost()  # never acknowledged
    [handed] = b.out()
    assert handed.payload == to_a.payload
    assert to_b.payload != to_a.payload


def test_leaving_a_shared_subscription_stops_its_messages() -> None:
    core = make_core()
    a, b = _services(core, "svc-a", "svc-b")
    a.subscribe(SHARE)
    b.subscribe(SHARE)
    a.feed(mqtt.encode_unsubscribe(mqtt.Unsubscribe(5, [SHARE]), 5))
    assert a.out()[0].reason_codes == [0]
    dev = Client5(core)
    dev.connect()
    dev.publish("devices/dev-1/telemetry/t", b"x")
    dev.publish("devices/dev-1/telemetry/t", b"y")
    assert a.out() == []
    assert len(b.out()) == 2
    b.protocol.connection_lost()
    assert SHARE not in core.groups


# -- isolation on the MQTT 5 paths: more negative twins --------------------------------------------


def test_our_topic_aliases_never_carry_a_message_outside_the_receivers_grants() -> None:
    """A receiver that lets the broker use aliases gets them only on what its grants let it
    receive: dev-2 (own subtree) never sees dev-1's telemetry; twin: its own commands arrive."""
    core = make_core()
    dev2 = Client5(core, "dev-2")
    dev2.connect(props=Properties(topic_alias_maximum=10))
    assert dev2.subscribe("devices/dev-2/#") == [0]
    dev = Client5(core)
    dev.connect()
    dev.publish("devices/dev-1/telemetry/t", b"x", props=Properties(topic_alias=1))
    dev.publish("", b"y", props=Properties(topic_alias=1))
    assert dev2.out() == []
    [svc] = _services(core, "ops")
    svc.publish("devices/dev-2/commands/a", b"c")
    svc.publish("devices/dev-2/commands/a", b"d")
    first, second = dev2.out()
    assert (first.topic, first.properties.topic_alias) == ("devices/dev-2/commands/a", 1)
    assert (second.topic, second.payload) == ("", b"d")


def test_a_delayed_will_is_judged_by_the_grants_when_it_fires() -> None:
    """A will that waited its delay goes out only if its topic is still within the publisher's
    grants (here the session's grants as a policy change would leave them); twin: the first
    test of the wills above, where they are."""
    core = make_core()
    sink = _sink(core, "devices/+/state")
    dev = Client5(core)
    dev.connect(props=Properties(session_expiry_interval=300), will=_will(5))
    dev.protocol.connection_lost()
    core.sessions["dev-1"].grants = core.policy.for_identity(Identity.device("dev-9", DOMAIN))
    core.tick(10.0)
    assert sink.out() == []
    assert any(e.get("action") == "will" for e in _events(core, "deny"))


def test_a_311_client_is_untouched_by_share_syntax() -> None:
    """MQTT 3.1.1 has no shared subscriptions: `$share/...` is an ordinary filter there and the
    policy judges it as written (denied by default), exactly as before MQTT 5."""
    from tests.broker.recording_link import connect as connect311

    core = make_core()
    session, link, _ = connect311(core, "sink", service=True)
    link.take()
    core.subscribe(session, mqtt.Subscribe(1, [("$share/g/devices/+/telemetry/#", 0)]))
    [suback] = link.take()
    assert suback.body[-1] == mqtt.SUBACK_FAILURE
    assert not core.groups


# -- full queues are never silent (issue 15) -------------------------------------------------------


def _full_sink(core: Any, name: str = "sink") -> Client5:
    """A persistent MQTT 5 subscriber to devices/+/telemetry/# (QoS 1) that went offline."""
    sink = Client5(core, name, service=True)
    sink.connect(props=Properties(session_expiry_interval=300))
    sink.subscribe("devices/+/telemetry/#", 1)
    sink.protocol.connection_lost()
    return sink


def test_a_publish_no_matching_receiver_could_take_is_0x97() -> None:
    """3.4.2.1 / 3.5.2.1: PUBACK and PUBREC 0x97 Quota exceeded when the message matched and
    every matching queue was full (each drop counted and audited per receiver); a QoS 2 one
    then waits for no PUBREL (4.3.3). The connection stays. Twins: while there is room, 0x00;
    a message nobody subscribes to is 0x00 too (never 0x10: who subscribes is not the
    publisher's to know); a retained one is kept, so 0x00."""
    core = make_core(Limits(offline_queue_max=2))
    _full_sink(core)
    dev = Client5(core)
    dev.connect()
    for pid in (1, 2, 3):
        dev.publish("devices/dev-1/telemetry/t", b"%d" % pid, 1, pid=pid)
    dev.publish("devices/dev-1/telemetry/t", b"4", 2, pid=4)
    dev.publish("devices/dev-1/other", b"5", 1, pid=5)  # no subscriber
    dev.publish("devices/dev-1/telemetry/t", b"6", 1, pid=6, retain=True)
    assert [(a.kind, a.packet_id, a.reason_code) for a in dev.out()] == [
        (mqtt.PUBACK, 1, 0),
        (mqtt.PUBACK, 2, 0),
        (mqtt.PUBACK, 3, Reason.QUOTA_EXCEEDED),
        (mqtt.PUBREC, 4, Reason.QUOTA_EXCEEDED),
        (mqtt.PUBACK, 5, 0),
        (mqtt.PUBACK, 6, 0),
    ]
    assert dev.protocol.state is State.LIVE
    assert 4 not in core.sessions["dev-1"].incoming_qos2
    assert core.metrics.value("iotauth_broker_dropped_total", reason="offline-queue-full") == 3
    assert core.metrics.value("iotauth_broker_quota_exceeded_total") == 2
    [line] = core.audit.events("drop", client_id="sink")
    assert (line["reason"], line["count"]) == ("offline-queue-full", 1)


def test_a_message_one_receiver_took_is_not_0x97() -> None:
    """0x97 only when *no* matching receiver took it: one full queue among others is a drop
    for that receiver (counted, audited), and the publisher gets 0x00."""
    core = make_core(Limits(offline_queue_max=1))
    _full_sink(core)
    live = Client5(core, "ops", service=True)
    live.connect()
    live.subscribe("devices/+/telemetry/#", 1)
    dev = Client5(core)
    dev.connect()
    for pid in (1, 2):
        dev.publish("devices/dev-1/telemetry/t", b"%d" % pid, 1, pid=pid)
    assert [a.reason_code for a in dev.out()] == [0, 0]
    assert len(live.out()) == 2
    assert core.metrics.value("iotauth_broker_dropped_total", reason="offline-queue-full") == 1


def test_a_311_publisher_is_acknowledged_when_queues_are_full() -> None:
    """3.1.1 has no negative PUBACK. A full queue is the receiver's limit, not a fault of the
    publisher (as the full disk is): the PUBACK goes, the connection stays, and the drop is
    counted and audited for the receiver (docs/BROKER.md, "Full queues"). Twin: the MQTT 5
    publisher of the same message is told 0x97."""
    core = make_core(Limits(offline_queue_max=1))
    _full_sink(core)
    old, link, _ = connect(core, "dev-2")
    for pid in (7, 8):  # the first fills the queue
        packet = mqtt.Publish("devices/dev-2/telemetry/t", b"x", 1, False, False, pid)
        assert core.publish(old, packet) is None  # None: no reason to close the connection
    assert not link.closed
    assert core.metrics.value("iotauth_broker_dropped_total", reason="offline-queue-full") == 1
    dev = Client5(core)
    dev.connect()
    dev.publish("devices/dev-1/telemetry/t", b"y", 1, pid=1)
    assert [a.reason_code for a in dev.out()] == [Reason.QUOTA_EXCEEDED]


def test_every_mqtt5_drop_has_a_reason_and_an_audit_line() -> None:
    """Issue 15: a message larger than the receiver's Maximum Packet Size (MQTT-3.1.2-25) and
    a message for a shared subscription with no member connected are drops like the others:
    counted by reason, audited (rate-limited) per session or subscription; the publisher of a
    message nobody took is told 0x97. Twin: the small message is delivered, PUBACK 0x00."""
    core = make_core()
    sink = _sink(core, "devices/+/telemetry/#", 1, props=Properties(maximum_packet_size=64))
    dev = Client5(core)
    dev.connect()
    dev.publish("devices/dev-1/telemetry/t", b"x" * 100, 1, pid=1)
    dev.publish("devices/dev-1/telemetry/t", b"small", 1, pid=2)
    assert [a.reason_code for a in dev.out()] == [Reason.QUOTA_EXCEEDED, 0]
    assert [m.payload for m in sink.out()] == [b"small"]
    value = core.metrics.value
    assert value("iotauth_broker_dropped_total", reason="too-large-for-client") == 1
    [line] = core.audit.events("drop", client_id="sink")
    assert line["reason"] == "too-large-for-client"
    member = Client5(core, "ops", service=True)
    member.connect()
    member.subscribe("$share/g/devices/+/state", 1)
    member.protocol.connection_lost()  # a clean session: it leaves the group
    worker = Client5(core, "svc", service=True)
    worker.connect(props=Properties(session_expiry_interval=300))
    worker.subscribe("$share/w/devices/+/state", 1)
    worker.protocol.connection_lost()  # persistent: still a member, not connected
    dev.publish("devices/dev-1/state", b"up", 1, pid=3)
    assert [a.reason_code for a in dev.out()] == [Reason.QUOTA_EXCEEDED]
    assert value("iotauth_broker_dropped_total", reason="shared-no-member") == 1
    [line] = core.audit.events("drop", subscription="$share/w/devices/+/state")
    assert (line["reason"], line["count"]) == ("shared-no-member", 1)


def test_a_revoked_secret_s_session_never_publishes_its_delayed_will() -> None:
    """kick(forget_session=True) is how a revoked service secret or identity-provider service
    is ended: like a revoked certificate, its pending will is dropped. Twin: a session that
    simply expires publishes it (the session ended, 3.1.3.2.2)."""
    core = make_core()
    base = time.monotonic()  # the core's clock for session expiry
    sink = _sink(core, "devices/+/state", now=base)
    for name in ("dev-1", "dev-2"):
        dev = Client5(core, name)
        will = (f"devices/{name}/state", b"gone", Properties(will_delay_interval=1000))
        dev.connect(props=Properties(session_expiry_interval=300), will=will, now=base)
        dev.protocol.connection_lost()
    core.kick("dev-1", "secret-revoked", forget_session=True)
    core.expire_sessions(base + 301)
    core.tick(base + 2000)
    assert [m.topic for m in sink.out()] == ["devices/dev-2/state"]
    assert core.pending_wills == {}
