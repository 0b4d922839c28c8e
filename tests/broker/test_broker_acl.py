"""Every path a message can take obeys the policy: publish, subscribe, retained, will, takeover."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from broker.policy import load_policy
from broker.server import BrokerThread
from tests.broker.broker_helpers import (
    BrokerFactory,
    Fleet,
    Peer,
    closed_by_peer,
    connect_packet,
    publish_packet,
    read_connack,
    tls_socket,
    wait_until,
)


def test_allowed_flows_work(broker: BrokerThread, peers: Callable[..., Peer]) -> None:
    """Telemetry device -> service, command service -> device, state retained for services."""
    sink = peers(broker.port, "sink", service=True).connect()
    assert sink.subscribe("devices/+/telemetry/#") == [0]
    dev = peers(broker.port, "dev-1").connect()
    assert dev.subscribe("devices/dev-1/commands/#", qos=1) == [1]
    dev.publish("devices/dev-1/telemetry/temp", b"21.5", qos=1)
    sink.publish("devices/dev-1/commands/reboot", b"now", qos=1)
    assert wait_until(lambda: sink.messages and dev.messages)
    assert sink.messages == [("devices/dev-1/telemetry/temp", b"21.5", False)]
    assert dev.messages == [("devices/dev-1/commands/reboot", b"now", False)]


def test_denied_publish_is_not_delivered_retained_or_kept(
    broker: BrokerThread, peers: Callable[..., Peer]
) -> None:
    """dev-1 writing into dev-2's subtree: audited, never delivered or retained, then closed."""
    victim = peers(broker.port, "dev-2").connect()
    assert victim.subscribe("devices/dev-2/#") == [0]
    dev = peers(broker.port, "dev-1").connect()
    dev.publish("devices/dev-2/commands/unlock", b"FORGED", qos=1, retain=True)
    assert wait_until(dev.disconnected.is_set)
    assert broker.broker.audit.events("deny", action="publish", client_id="dev-1")
    late = peers(broker.port, "dev-2", clean=True)
    victim.close()
    late.connect()
    assert late.subscribe("devices/dev-2/#") == [0]
    assert not wait_until(lambda: late.messages, 0.3)
    assert victim.messages == []


def test_denied_publish_in_drop_mode_keeps_the_connection(
    make_broker: BrokerFactory, peers: Callable[..., Peer]
) -> None:
    """denied_publish='drop': acknowledged and discarded (MQTT-3.3.5-2), the device stays."""
    broker = make_broker(denied_publish="drop")
    victim = peers(broker.port, "dev-2").connect()
    assert victim.subscribe("devices/dev-2/#") == [0]
    dev = peers(broker.port, "dev-1").connect()
    dev.publish("devices/dev-2/commands/unlock", b"FORGED", qos=1)
    dev.publish("devices/dev-2/state", b"own-goal", qos=1)
    dev.publish("devices/dev-1/state", b"ok", qos=1)
    assert not dev.disconnected.is_set()
    assert broker.broker.audit.events("deny", action="publish")
    # A delivery of the denied messages would have been queued to the victim before their
    # PUBACKs; a sentinel published after them arrives behind any such delivery.
    sink = peers(broker.port, "sink", service=True).connect()
    sink.publish("devices/dev-2/commands/sentinel", b"after", qos=1)
    assert wait_until(lambda: victim.messages)
    assert victim.messages == [("devices/dev-2/commands/sentinel", b"after", False)]


def test_subscribe_outside_the_grant_is_refused(
    broker: BrokerThread, peers: Callable[..., Peer]
) -> None:
    """SUBACK 0x80 for another subtree, '#', '$SYS/#' and a wildcard that escapes the subtree."""
    dev = peers(broker.port, "dev-1").connect()
    for topic_filter in ("devices/dev-2/#", "#", "$SYS/#", "devices/+/commands/#", "+/dev-1/#"):
        assert dev.subscribe(topic_filter) == [128], topic_filter
    assert dev.subscribe("devices/dev-1/+/x") == [0]
    assert len(broker.broker.audit.events("deny", action="subscribe")) == 5


def test_plus_grant_cannot_subscribe_hash_end_to_end(
    make_broker: BrokerFactory, peers: Callable[..., Peer], tmp_path: Path
) -> None:
    """With a one-level grant, 'devices/dev-1/#' is refused and deep topics never arrive."""
    path = tmp_path / "policy.toml"
    path.write_text(
        'version = 1\n[[rule]]\nname = "flat"\nkind = "device"\n'
        'publish = ["devices/{device_id}/#"]\nsubscribe = ["devices/{device_id}/+"]\n'
    )
    broker = make_broker(policy=load_policy(path))
    dev = peers(broker.port, "dev-1").connect()
    assert dev.subscribe("devices/dev-1/#") == [128]
    assert dev.subscribe("devices/dev-1/+") == [0]
    dev.publish("devices/dev-1/deep/nested", b"should-not-arrive", qos=1)
    dev.publish("devices/dev-1/flat", b"arrives", qos=1)
    assert wait_until(lambda: dev.messages)
    assert dev.messages == [("devices/dev-1/flat", b"arrives", False)]


def test_retained_messages_are_not_sent_at_connect(
    broker: BrokerThread, peers: Callable[..., Peer]
) -> None:
    """amqtt sends retained messages for every filter anybody holds at CONNECT; we send none."""
    dev2 = peers(broker.port, "dev-2").connect()
    assert dev2.subscribe("devices/dev-2/#") == [0]
    sink = peers(broker.port, "sink", service=True).connect()
    sink.publish("devices/dev-2/commands/config", b"DEV2-WIFI-PASSWORD", qos=1, retain=True)
    assert wait_until(lambda: dev2.messages)
    dev1 = peers(broker.port, "dev-1").connect()
    assert not wait_until(lambda: dev1.messages, 0.5)


def test_retained_messages_on_subscribe_follow_the_policy(
    broker: BrokerThread, peers: Callable[..., Peer]
) -> None:
    """A service gets a device's retained state on SUBSCRIBE; another device gets nothing."""
    dev2 = peers(broker.port, "dev-2").connect()
    dev2.publish("devices/dev-2/state", b"online", qos=1, retain=True)
    sink = peers(broker.port, "sink", service=True).connect()
    assert sink.subscribe("devices/+/state") == [0]
    assert wait_until(lambda: sink.messages)
    assert sink.messages == [("devices/dev-2/state", b"online", True)]
    dev1 = peers(broker.port, "dev-1").connect()
    assert dev1.subscribe("devices/+/state") == [128]
    assert dev1.subscribe("devices/dev-1/#") == [0]
    assert not wait_until(lambda: dev1.messages, 0.3)


def test_will_outside_the_grant_is_refused_at_connect(
    broker: BrokerThread, peers: Callable[..., Peer]
) -> None:
    """A will is a publish: dev-1 cannot plant one in dev-2's command topic."""
    bad = peers(broker.port, "dev-1", will=("devices/dev-2/commands/reboot", b"FORGED", False))
    assert bad.connect(expect_ok=False).refused
    assert broker.broker.audit.events("refuse", reason="will-denied")
    assert broker.broker.audit.events("deny", action="will")


def test_own_will_is_published_on_abnormal_close(
    broker: BrokerThread, peers: Callable[..., Peer]
) -> None:
    """The positive twin: a will on the device's own state topic reaches the service."""
    sink = peers(broker.port, "sink", service=True).connect()
    assert sink.subscribe("devices/+/state") == [0]
    dev = peers(broker.port, "dev-1", will=("devices/dev-1/state", b"offline", True)).connect()
    dev.drop()
    assert wait_until(lambda: sink.messages)
    assert sink.messages[0][:2] == ("devices/dev-1/state", b"offline")


@pytest.mark.parametrize("topic", ["", "devices/dev-1/+", "devices/dev-1/#"], ids=repr)
def test_a_will_with_a_malformed_topic_closes_the_connection_without_connack(
    broker: BrokerThread, fleet: Fleet, topic: str
) -> None:
    """MQTT-3.1.4-1 with MQTT-4.7.3-1 (a zero-length topic) and MQTT-4.7.1-1 (no wildcards in a
    topic name): a malformed CONNECT is closed, not answered with CONNACK 5."""
    sock = tls_socket(broker.port, fleet.creds("dev-1"), root=fleet.pki_dir / "root.crt")
    try:
        sock.sendall(connect_packet("dev-1", will=(topic, b"gone")))
        assert read_connack(sock) is None
    finally:
        sock.close()
    refusals = broker.broker.audit.events("refuse", reason="malformed")
    assert len(refusals) == 1
    assert refusals[0]["detail"].startswith("will: invalid topic name")
    assert broker.broker.connected() == []


def test_a_will_on_a_valid_topic_is_accepted_by_a_raw_connect(
    broker: BrokerThread, fleet: Fleet
) -> None:
    """The positive twin of the malformed will: the same bytes with a valid topic get CONNACK 0."""
    sock = tls_socket(broker.port, fleet.creds("dev-1"), root=fleet.pki_dir / "root.crt")
    try:
        sock.sendall(connect_packet("dev-1", will=("devices/dev-1/state", b"gone")))
        assert read_connack(sock) == 0
    finally:
        sock.close()


@pytest.mark.parametrize("topic", ["$SYS/broker/x", "devices/dev-1/+", "devices/dev-1/#"])
def test_wildcard_and_dollar_publish_close_the_connection(
    broker: BrokerThread, fleet: Fleet, peers: Callable[..., Peer], topic: str
) -> None:
    """amqtt leaves such a session half-dead; we close it, and nothing is delivered."""
    sink = peers(broker.port, "sink", service=True).connect()
    assert sink.subscribe("devices/+/telemetry/#") == [0]
    sock = tls_socket(broker.port, fleet.creds("dev-1"), root=fleet.pki_dir / "root.crt")
    sock.sendall(connect_packet("dev-1"))
    assert read_connack(sock) == 0
    sock.sendall(publish_packet(topic, b"x"))
    assert closed_by_peer(sock, 5)
    sock.close()
    assert broker.broker.audit.events("kick", reason="invalid-publish-topic")
    assert sink.messages == []


@pytest.mark.parametrize("clean", [True, False], ids=["clean", "persistent"])
def test_takeover_closes_the_old_connection_and_the_new_one_works(
    broker: BrokerThread, peers: Callable[..., Peer], clean: bool
) -> None:
    """MQTT-3.1.4-2: the second CONNECT wins; the first is closed; messages reach the second."""
    old = peers(broker.port, "dev-1", clean=clean).connect()
    assert old.subscribe("devices/dev-1/commands/#") == [0]
    new = peers(broker.port, "dev-1", clean=clean).connect()
    assert wait_until(old.disconnected.is_set)
    assert new.subscribe("devices/dev-1/commands/#") == [0]
    sink = peers(broker.port, "sink", service=True).connect()
    sink.publish("devices/dev-1/commands/x", b"to-new", qos=1)
    assert wait_until(lambda: new.messages)
    assert new.messages == [("devices/dev-1/commands/x", b"to-new", False)]
    assert old.messages == []
    assert broker.broker.connected() == ["dev-1", "sink"]
    assert broker.broker.audit.events("disconnect", reason="takeover")


def test_takeover_publishes_the_old_connections_will(
    broker: BrokerThread, peers: Callable[..., Peer]
) -> None:
    """MQTT-3.1.4-2 with MQTT-3.1.2-8: the old connection is closed without a DISCONNECT from
    its client, so its will is published; the new connection's will is kept for its own end."""
    sink = peers(broker.port, "sink", service=True).connect()
    assert sink.subscribe("devices/+/state") == [0]
    old = peers(broker.port, "dev-1", will=("devices/dev-1/state", b"old-gone", False)).connect()
    new = peers(broker.port, "dev-1", will=("devices/dev-1/state", b"new-gone", False)).connect()
    assert wait_until(old.disconnected.is_set)
    assert wait_until(lambda: sink.messages)
    assert sink.messages == [("devices/dev-1/state", b"old-gone", False)]
    new.close()  # a DISCONNECT: the new connection's will is discarded (MQTT-3.14.4-3)
    dev2 = peers(broker.port, "dev-2").connect()
    dev2.publish("devices/dev-2/state", b"sentinel", qos=1)
    assert wait_until(lambda: len(sink.messages) == 2)
    assert sink.messages[1] == ("devices/dev-2/state", b"sentinel", False)
