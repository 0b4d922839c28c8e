"""The broker's state on disk (broker/store.py), driven through the core with recording links.

Each test writes state with one core, "restarts" by replaying the directory into a fresh core,
and checks what came back: the log's real bytes on a real filesystem, no mocks. The end-to-end
twins (a real ``iotauth broker run`` killed with SIGKILL, a full tmpfs) are in
test_broker_persistence.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from broker import mqtt
from broker.core import BrokerCore, Session
from broker.errors import ConfigError
from broker.mqtt import Properties, SubscriptionOptions
from broker.protocol import State
from broker.settings import Limits
from broker.store import Opened, open_store
from tests.broker.recording_link import DOMAIN, RecordingLink, connect, make_core, publish
from tests.broker.test_broker_protocol5 import Client5
from tests.conftest import fill_disk

CMD = "devices/dev-1/commands/x"


def _open(tmp_path: Path, core: BrokerCore, domain: str = DOMAIN) -> Opened:
    opened = open_store(tmp_path / "state", pki_dir=tmp_path, trust_domain=domain, core=core)
    core.store = opened.store
    return opened


def _commit(opened: Opened) -> None:
    """What the Committer does once per event-loop turn: one frame, fsynced."""
    body, seq = opened.store.take()
    if body:
        opened.log.append(body)
    opened.store.durable = seq
    opened.store.release_acks()


def _restart(tmp_path: Path, opened: Opened, **settings: object) -> tuple[BrokerCore, Opened]:
    _commit(opened)
    opened.close()
    core = make_core(**settings)  # type: ignore[arg-type]
    return core, _open(tmp_path, core)


def _subscriber(core: BrokerCore, *, clean: bool) -> tuple[Session, RecordingLink]:
    """dev-1 connected (``clean``: its Clean Session flag) and subscribed at QoS 1 to its
    commands, which ``CMD`` is one of."""
    dev, link, _ = connect(core, "dev-1", clean=clean)
    core.subscribe(dev, mqtt.Subscribe(1, [("devices/dev-1/commands/#", 1)]))
    return dev, link


def test_sessions_queues_inflight_and_retained_messages_survive_a_restart(tmp_path: Path) -> None:
    """MQTT-4.4.0-1: after the restart the resumed session gets its in-flight PUBLISHes again
    with their packet ids and DUP set, PUBREL where PUBREC had come, then its queue."""
    core = make_core(limits=Limits(max_inflight=3))
    opened = _open(tmp_path, core)
    svc, _, _ = connect(core, "ops", service=True)
    dev, link, _ = connect(core, "dev-1", clean=False)
    core.subscribe(dev, mqtt.Subscribe(1, [("devices/dev-1/commands/#", 2)]))
    link.take()
    for n in range(5):
        publish(core, svc, CMD, b"m%d" % n, qos=2 if n % 2 else 1)
    sent = link.publishes()
    assert [p[3] for p in sent] == [b"m0", b"m1", b"m2"]  # 3 in flight, 2 queued
    core.acked(dev, mqtt.PUBREC, sent[1][2])  # m1: PUBREC came, we owe PUBREL
    assert link.take() == []  # only once the PUBREC is on disk (a crash must not undo it)
    _commit(opened)
    assert [p.kind for p in link.take()] == [mqtt.PUBREL]
    core.qos2_waiting(dev, 77, waiting=True)  # dev's own QoS 2 PUBLISH 77 waits for PUBREL
    for topic, payload in [("state", b"on"), ("x", b"on"), ("x", b"")]:  # x: set, cleared
        assert (
            core.publish(dev, mqtt.Publish(f"devices/dev-1/{topic}", payload, 1, True, False, 5))
            is None
        )
    link.close(will=False)

    core2, opened2 = _restart(tmp_path, opened, limits=Limits(max_inflight=3))
    assert opened2.report.damage is None
    assert (opened2.report.sessions, opened2.report.queued, opened2.report.inflight) == (1, 2, 3)
    assert core2.retained.get("devices/dev-1/state") is not None
    assert core2.retained.get("devices/dev-1/x") is None
    assert set(core2.sessions) == {"dev-1"}  # the clean session "ops" was never stored
    dev2 = core2.sessions["dev-1"]
    assert dev2.incoming_qos2 == {77}
    _, link2, present = connect(core2, "dev-1", clean=False)
    assert present
    packets = link2.take()
    assert [(p.kind, p.publish[2] if p.kind == 3 else p.packet_id) for p in packets] == [
        (3, sent[0][2]),
        (6, sent[1][2]),
        (3, sent[2][2]),
    ]
    assert all(p.publish[5] for p in packets if p.kind == 3)  # DUP on the re-sent PUBLISHes
    core2.acked(dev2, mqtt.PUBACK, sent[0][2])
    assert [p[3] for p in link2.publishes()] == [b"m3"]  # the queue follows, in order
    opened2.close()


def test_an_acknowledgement_waits_until_its_message_is_durable(tmp_path: Path) -> None:
    """The promise: PUBACK only once the message is on disk for each persistent subscriber."""
    core = make_core()
    opened = _open(tmp_path, core)
    svc, svc_link, _ = connect(core, "ops", service=True)
    _subscriber(core, clean=False)
    _commit(opened)
    svc_link.take()
    publish(core, svc, CMD, b"x", qos=1)
    core.ack(svc_link, mqtt.puback(1))
    assert svc_link.take() == []  # not yet on disk
    _commit(opened)
    assert [p.kind for p in svc_link.take()] == [mqtt.PUBACK]
    opened.close()


def test_without_a_persistent_subscriber_nothing_is_written(tmp_path: Path) -> None:
    core = make_core()
    opened = _open(tmp_path, core)
    svc, svc_link, _ = connect(core, "ops", service=True)
    _subscriber(core, clean=True)
    connect(core, "dev-2", clean=False)  # a record waits for the disk meanwhile
    assert opened.store.dirty
    mark = core.mark()
    publish(core, svc, CMD, b"x", qos=1)
    assert core.mark() == mark  # nothing written for this message
    core.ack(svc_link, mqtt.puback(1), mark)
    assert [p.kind for p in svc_link.take()] == [mqtt.PUBACK]  # sent at once
    # Its negative twin: an answer that cannot say what it waits for waits for everything.
    core.ack(svc_link, mqtt.puback(2))
    assert svc_link.take() == []
    _commit(opened)
    assert [p.kind for p in svc_link.take()] == [mqtt.PUBACK]
    opened.close()


def test_records_follow_the_session_as_it_becomes_persistent_and_stops_being_so(
    tmp_path: Path,
) -> None:
    """The core calls the per-message hooks only for sessions the store keeps (Session.stored):
    a persistent session's deliveries are recorded, the same client's clean session's are
    not, and once it is persistent again they are (and survive a restart)."""
    core = make_core()
    opened = _open(tmp_path, core)
    svc, _, _ = connect(core, "ops", service=True)

    def delivery_writes(clean: bool, payload: bytes) -> bool:
        _, link = _subscriber(core, clean=clean)
        _commit(opened)
        link.take()  # SUBACK; a resumed session's earlier message again (DUP)
        mark = core.mark()
        publish(core, svc, CMD, payload, qos=1)
        assert [p[3] for p in link.publishes()] == [payload]
        wrote = core.mark() != mark
        link.close(will=False)
        _commit(opened)
        return wrote

    assert delivery_writes(clean=False, payload=b"kept")
    assert not delivery_writes(clean=True, payload=b"not kept")
    assert delivery_writes(clean=False, payload=b"kept again")
    core, opened = _restart(tmp_path, opened)
    assert _queued(core) == []  # nothing was acknowledged by dev-1: in flight, not queued
    assert [m.payload for m, _, _ in core.sessions["dev-1"].inflight.values()] == [b"kept again"]
    opened.close()


def _state_with_three_batches(tmp_path: Path) -> tuple[Path, list[int]]:
    """A log of a snapshot and three batches of one queued message each; the batch offsets."""
    core = make_core()
    opened = _open(tmp_path, core)
    svc, _, _ = connect(core, "ops", service=True)
    _, link = _subscriber(core, clean=False)
    link.close(will=False)
    _commit(opened)
    offsets = []
    for n in range(3):
        offsets.append(opened.log.size)
        publish(core, svc, CMD, b"m%d" % n, qos=1)
        _commit(opened)
    opened.close()
    return tmp_path / "state" / "state.log", offsets


def _queued(core: BrokerCore) -> list[bytes]:
    return [m.payload for m, _ in core.sessions["dev-1"].queue]


def test_a_torn_last_write_keeps_everything_before_it(tmp_path: Path) -> None:
    path, offsets = _state_with_three_batches(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-3])  # the crash came in the middle of the last write
    core = make_core()
    opened = _open(tmp_path, core)
    assert _queued(core) == [b"m0", b"m1"]
    damage = opened.report.damage
    assert damage is not None
    assert "\n" not in damage
    assert f"damaged at byte {offsets[2]}" in damage
    assert "torn write" in damage
    kept = [p for p in path.parent.iterdir() if p.name.startswith("state.log.damaged-")]
    assert [p.read_bytes() for p in kept] == [data[:-3]]  # nothing is deleted
    opened.close()
    # The damage was written away: the next start is clean and has the same state.
    core = make_core()
    opened = _open(tmp_path, core)
    assert opened.report.damage is None
    assert _queued(core) == [b"m0", b"m1"]
    opened.close()


def test_random_bytes_in_the_middle_keep_what_came_before(tmp_path: Path) -> None:
    path, offsets = _state_with_three_batches(tmp_path)
    data = bytearray(path.read_bytes())
    data[offsets[1] + 20 : offsets[1] + 28] = os.urandom(8)
    path.write_bytes(bytes(data))
    core = make_core()
    opened = _open(tmp_path, core)
    assert _queued(core) == [b"m0"]
    assert opened.report.damage is not None
    assert f"damaged at byte {offsets[1]}" in opened.report.damage
    opened.close()


def test_a_file_of_garbage_starts_empty_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.log").write_bytes(os.urandom(300))
    core = make_core()
    opened = _open(tmp_path, core)
    assert core.sessions == {}
    assert opened.report.damage is not None
    assert "no state header" in opened.report.damage
    opened.close()


def test_state_of_another_trust_domain_is_refused(tmp_path: Path) -> None:
    core = make_core()
    opened = _open(tmp_path, core)
    connect(core, "dev-1", clean=False)
    _commit(opened)
    opened.close()
    with pytest.raises(ConfigError, match="belongs to another PKI") as info:
        _open(tmp_path, make_core(), domain="other.example")
    assert "\n" not in str(info.value)
    # The negative twin: the same trust domain opens it.
    _open(tmp_path, make_core()).close()


def test_one_directory_serves_one_broker(tmp_path: Path) -> None:
    opened = _open(tmp_path, make_core())
    with pytest.raises(ConfigError, match="in use by another broker"):
        _open(tmp_path, make_core())
    opened.close()


def test_session_expiry_keeps_counting_while_the_broker_is_down(tmp_path: Path) -> None:
    core = make_core(session_expiry=3600)
    opened = _open(tmp_path, core)
    for name in ("dev-1", "dev-2"):
        session, link, _ = connect(core, name, clean=False)
        core.subscribe(session, mqtt.Subscribe(1, [(f"devices/{name}/commands/#", 1)]))
        link.close(will=False)
    _commit(opened)
    # dev-1 went away two hours ago (as if the broker had been down that long).
    opened.store.session_detached(core.sessions["dev-1"], time.time() - 7200)
    core2, opened2 = _restart(tmp_path, opened, session_expiry=3600)
    assert set(core2.sessions) == {"dev-2"}
    assert opened2.report.expired == 1
    opened2.close()


def test_a_forgotten_session_stays_forgotten(tmp_path: Path) -> None:
    """A revoked identity's stored session and queue are deleted for good."""
    core = make_core()
    opened = _open(tmp_path, core)
    svc, _, _ = connect(core, "ops", service=True)
    dev, link = _subscriber(core, clean=False)
    link.close(will=False)
    publish(core, svc, CMD, b"secret", qos=1)
    _commit(opened)
    core.kick_revoked(frozenset({int(dev.authenticated.credential, 16)}))
    core2, opened2 = _restart(tmp_path, opened)
    assert core2.sessions == {}
    assert b"secret" not in (tmp_path / "state" / "state.log").read_bytes()  # compacted away
    opened2.close()


def test_a_full_offline_queue_is_counted_and_audited_per_reason(tmp_path: Path) -> None:
    """Issue 15: no silent drop. One audit line per session per interval, with the count."""
    core = make_core(limits=Limits(offline_queue_max=2))
    svc, _, _ = connect(core, "ops", service=True)
    dev, link = _subscriber(core, clean=False)
    link.close(will=False)
    for n in range(5):
        publish(core, svc, CMD, b"m%d" % n, qos=1)
    assert len(dev.queue) == 2
    assert core.metrics.value("iotauth_broker_dropped_total", reason="offline-queue-full") == 3
    lines = core.audit.events("drop", client_id="dev-1")
    assert [(r["reason"], r["count"]) for r in lines] == [("offline-queue-full", 1)]


def test_the_offline_queue_is_bounded_by_bytes_too(tmp_path: Path) -> None:
    core = make_core(limits=Limits(offline_queue_max_bytes=10))
    svc, _, _ = connect(core, "ops", service=True)
    dev, link = _subscriber(core, clean=False)
    link.close(will=False)
    for _ in range(3):
        publish(core, svc, CMD, b"12345", qos=1)
    assert len(dev.queue) == 2
    assert core.metrics.value("iotauth_broker_dropped_total", reason="offline-queue-bytes") == 1


def test_the_state_file_says_whose_it_is(tmp_path: Path) -> None:
    (tmp_path / "root.crt").write_bytes(b"a root")
    _open(tmp_path, make_core()).close()
    meta = json.loads((tmp_path / "state" / "state.json").read_text())
    assert meta["trust_domain"] == DOMAIN
    assert meta["schema"] == 1
    (tmp_path / "root.crt").write_bytes(b"another root, same trust domain name")
    with pytest.raises(ConfigError, match="another PKI"):
        _open(tmp_path, make_core())


def test_a_full_disk_at_start_is_one_clear_error(
    tmp_path: Path, tmpfs: Callable[[str], Path]
) -> None:
    disk = tmpfs("64k")
    fill_disk(disk, 0)
    with pytest.raises(ConfigError, match="No space left on device") as info:
        open_store(disk / "state", pki_dir=tmp_path, trust_domain=DOMAIN, core=make_core())
    assert "\n" not in str(info.value)


# -- MQTT 5 sessions and messages on disk ---------------------------------------------------------


def test_an_mqtt5_session_comes_back_with_its_options_properties_and_expiry(
    tmp_path: Path,
) -> None:
    """An MQTT 5 session with a Session Expiry Interval is stored like a 3.1.1 clean-session-0
    one (MQTT-3.1.2-23), with its subscription options and identifier (3.8.3.1), its shared
    subscription (4.8.2), and its queued message's properties and remaining Message Expiry
    (MQTT-3.3.2-6)."""
    core = make_core(session_expiry=3600)
    opened = _open(tmp_path, core)
    dev = Client5(core, "dev-1")
    dev.connect(props=Properties(session_expiry_interval=60), now=time.monotonic())
    options = SubscriptionOptions(no_local=True, retain_as_published=True, retain_handling=1)
    dev.subscribe("devices/dev-1/commands/#", 1, options, identifier=9)
    dev.subscribe("$share/g/devices/dev-1/state/#", 1, pid=2)
    dev.protocol.connection_lost()
    ops = Client5(core, "ops", service=True)
    ops.connect()
    props = Properties(content_type="text/plain", message_expiry_interval=600)
    ops.publish(CMD, b"go", 1, pid=1, props=props, now=time.monotonic())

    core2, opened2 = _restart(tmp_path, opened, session_expiry=3600)
    session = core2.sessions["dev-1"]
    assert (session.v5, session.expiry) == (True, 60.0)
    state = session.options["devices/dev-1/commands/#"]
    assert (state.options, state.identifier) == (options, 9)
    assert session.subscriptions == {
        "devices/dev-1/commands/#": 1,
        "$share/g/devices/dev-1/state/#": 1,
    }
    assert core2.groups["$share/g/devices/dev-1/state/#"].members == [session]
    [(message, qos)] = session.queue
    assert (message.topic, message.payload, qos) == (CMD, b"go", 1)
    assert message.properties.content_type == "text/plain"
    assert message.expires_at is not None
    assert 590 < message.expires_at - time.monotonic() <= 600
    assert "ops" not in core2.sessions  # Session Expiry Interval 0: never stored
    opened2.close()


def test_an_mqtt5_session_expires_on_its_own_interval_across_a_restart(tmp_path: Path) -> None:
    """3.1.2.11.2: gone 120 s, an MQTT 5 session of 60 s expired on replay; a 3.1.1 session
    (the broker's 3600 s) gone as long did not. A session resumed with Session Expiry 0 is no
    longer kept (MQTT-3.1.2-23 does not apply), even while it is connected."""
    core = make_core(session_expiry=3600)
    opened = _open(tmp_path, core)
    Client5(core, "dev-3").connect(props=Properties(session_expiry_interval=60))
    Client5(core, "dev-3").connect(clean=False)  # takes it over, with no expiry
    assert "dev-3" in core.sessions
    dev = Client5(core, "dev-1")
    dev.connect(props=Properties(session_expiry_interval=60))
    dev.protocol.connection_lost()
    _, link, _ = connect(core, "dev-2", clean=False)
    link.close(will=False)
    for name in ("dev-1", "dev-2"):
        opened.store.session_detached(core.sessions[name], time.time() - 120)
    core2, opened2 = _restart(tmp_path, opened, session_expiry=3600)
    assert set(core2.sessions) == {"dev-2"}
    assert opened2.report.expired == 1
    opened2.close()


def _persistent_dev_and_ops(
    tmp_path: Path, *, ops_expiry: int
) -> tuple[BrokerCore, Opened, Client5, Client5]:
    """dev-1 (MQTT 5, a persistent session subscribed to its commands at QoS 2) and ops, the
    publisher (MQTT 5, with ``ops_expiry``: > 0 stores its QoS 2 ids), all on disk."""
    core = make_core()
    opened = _open(tmp_path, core)
    dev = Client5(core, "dev-1")
    dev.connect(props=Properties(session_expiry_interval=300))
    dev.subscribe("devices/dev-1/commands/#", 2)
    ops = Client5(core, "ops", service=True)
    ops.connect(props=Properties(session_expiry_interval=ops_expiry))
    _commit(opened)
    return core, opened, dev, ops


def test_mqtt5_acknowledgements_wait_until_durable(tmp_path: Path) -> None:
    """PUBACK, PUBREC and PUBCOMP with reason codes keep the 3.1.1 promise: sent only once what
    they acknowledge is on disk (issue 15), in order (MQTT-4.6.0-2, -3)."""
    _, opened, _, ops = _persistent_dev_and_ops(tmp_path, ops_expiry=300)
    ops.publish(CMD, b"one", 1, pid=1)
    ops.publish(CMD, b"two", 2, pid=2)
    assert ops.out() == []  # not yet on disk
    _commit(opened)
    assert [(a.kind, a.packet_id, a.reason_code) for a in ops.out()] == [
        (mqtt.PUBACK, 1, 0),
        (mqtt.PUBREC, 2, 0),
    ]
    ops.feed(mqtt.ack5(mqtt.PUBREL, 2))
    assert ops.out() == []  # the QoS 2 id's release is a record too
    _commit(opened)
    assert [(a.kind, a.packet_id) for a in ops.out()] == [(mqtt.PUBCOMP, 2)]
    # Twin: a message no persistent session matches writes nothing and is answered at once.
    ops.publish("devices/dev-9/commands/x", b"three", 1, pid=3)
    assert [(a.kind, a.packet_id, a.reason_code) for a in ops.out()] == [(mqtt.PUBACK, 3, 0)]
    opened.close()


def test_a_publish_the_store_cannot_take_is_0x97_for_mqtt5(tmp_path: Path) -> None:
    """The disk refuses: an MQTT 5 publisher gets PUBACK/PUBREC 0x97 Quota exceeded
    (3.4.2.1) and keeps its connection, where 3.1.1's is closed; nothing is routed and no QoS
    2 id waits for PUBREL. Twin: a message no persistent session needs is still served."""
    core, opened, dev, ops = _persistent_dev_and_ops(tmp_path, ops_expiry=0)
    opened.store.failed = "no space left on device"
    ops.publish(CMD, b"one", 1, pid=1)
    ops.publish(CMD, b"two", 2, pid=2)
    assert [(a.kind, a.packet_id, a.reason_code) for a in ops.out()] == [
        (mqtt.PUBACK, 1, 0x97),
        (mqtt.PUBREC, 2, 0x97),
    ]
    assert ops.protocol.state is State.LIVE
    assert 2 not in core.sessions["ops"].incoming_qos2
    assert dev.out() == []
    ops.publish("devices/dev-9/commands/x", b"three", 1, pid=3)
    assert [(a.kind, a.reason_code) for a in ops.out()] == [(mqtt.PUBACK, 0)]
    opened.close()


# -- delayed wills (MQTT 5, 3.1.3.2.2) ------------------------------------------------------------

WILL_TOPIC = "devices/dev-1/state"


def _gone_with_will(core: BrokerCore, *, delay: int, expiry: int = 300) -> Client5:
    """dev-1 (MQTT 5, Session Expiry ``expiry``) connected with a will delayed by ``delay`` s,
    and lost its connection: the will is pending."""
    dev = Client5(core, "dev-1")
    will = (WILL_TOPIC, b"gone", Properties(will_delay_interval=delay))
    dev.connect(props=Properties(session_expiry_interval=expiry), will=will, now=time.monotonic())
    dev.protocol.connection_lost()
    assert "dev-1" in core.pending_wills
    return dev


def _sink(core: BrokerCore) -> Client5:
    sink = Client5(core, "sink", service=True)
    sink.connect(now=time.monotonic())
    sink.subscribe("devices/+/state", 1)
    return sink


def test_a_pending_will_survives_a_restart_and_is_published_when_due(tmp_path: Path) -> None:
    """MQTT-3.1.3-9 across a restart: the delay keeps counting from when the connection ended;
    not before it (twin), once after it, and a third start does not publish it again."""
    core = make_core()
    opened = _open(tmp_path, core)
    _gone_with_will(core, delay=30)
    core2, opened2 = _restart(tmp_path, opened)
    sink = _sink(core2)
    now = time.monotonic()
    core2.tick(now + 20)
    assert sink.out() == []  # twin: the delay has not run out
    core2.tick(now + 31)
    [will] = sink.out()
    assert (will.topic, will.payload) == (WILL_TOPIC, b"gone")
    assert "dev-1" in core2.sessions  # the session stays until it expires
    core3, opened3 = _restart(tmp_path, opened2)
    assert core3.pending_wills == {}
    sink3 = _sink(core3)
    core3.tick(time.monotonic() + 60)
    assert sink3.out() == []
    opened3.close()


def test_a_will_due_while_the_broker_was_down_is_published_at_start(tmp_path: Path) -> None:
    """The Will Delay Interval counts across the downtime, as session expiry does."""
    core = make_core()
    opened = _open(tmp_path, core)
    _gone_with_will(core, delay=30)
    session = core.sessions["dev-1"]
    assert session.will is not None
    # The connection ended 40 s ago (as if the broker had been down that long).
    opened.store.session_detached(session, time.time() - 40)
    opened.store.will_pending(session, session.will, time.time() - 10)
    core2, opened2 = _restart(tmp_path, opened)
    sink = _sink(core2)
    core2.tick(time.monotonic())
    assert [m.payload for m in sink.out()] == [b"gone"]
    opened2.close()


def test_a_session_resumed_before_the_restart_has_no_will_after_it(tmp_path: Path) -> None:
    """MQTT-3.1.3-9: a new connection to the session cancels the will, on disk too."""
    core = make_core()
    opened = _open(tmp_path, core)
    _gone_with_will(core, delay=30)
    Client5(core, "dev-1").connect(
        clean=False, props=Properties(session_expiry_interval=300), now=time.monotonic()
    )
    core2, opened2 = _restart(tmp_path, opened)
    assert core2.pending_wills == {}
    sink = _sink(core2)
    core2.tick(time.monotonic() + 60)
    assert sink.out() == []
    opened2.close()


def test_a_session_that_expired_while_down_publishes_its_will_then_ends(tmp_path: Path) -> None:
    """3.1.3.2.2: the will goes at the earlier of its delay and the end of the session. A
    session of 60 s with a will of 600 s, gone 120 s: at start the will is published and the
    session is gone (twin: the same session without a will is simply gone)."""
    core = make_core()
    opened = _open(tmp_path, core)
    _gone_with_will(core, delay=600, expiry=60)
    due, _ = core.pending_wills["dev-1"]
    assert due - core.now == 60  # due when the session ends, not after 600 s
    session = core.sessions["dev-1"]
    assert session.will is not None
    opened.store.session_detached(session, time.time() - 120)
    opened.store.will_pending(session, session.will, time.time() - 60)
    core2, opened2 = _restart(tmp_path, opened)
    assert (opened2.report.expired, opened2.report.sessions) == (1, 0)
    sink = _sink(core2)
    now = time.monotonic()
    core2.tick(now)
    core2.expire_sessions(now)
    assert [m.payload for m in sink.out()] == [b"gone"]
    assert "dev-1" not in core2.sessions
    core3, opened3 = _restart(tmp_path, opened2)
    assert "dev-1" not in core3.sessions
    assert core3.pending_wills == {}
    opened3.close()


def test_a_revoked_identity_s_pending_will_is_dropped_across_a_restart(tmp_path: Path) -> None:
    """A revoked identity speaks no more: the CRL at start (kick_revoked before the first tick)
    drops its session and its pending will, and a later start does not bring it back. Twin: a
    revocation of another certificate leaves the will to be published."""
    core = make_core()
    opened = _open(tmp_path, core)
    _gone_with_will(core, delay=30)
    core2, opened2 = _restart(tmp_path, opened)
    serial = int(core2.sessions["dev-1"].authenticated.credential, 16)
    core2.kick_revoked(frozenset({serial + 1}))  # twin: someone else's certificate
    assert "dev-1" in core2.pending_wills
    core2.kick_revoked(frozenset({serial}))
    sink = _sink(core2)
    core2.tick(time.monotonic() + 60)
    assert sink.out() == []
    core3, opened3 = _restart(tmp_path, opened2)
    assert core3.pending_wills == {}
    assert "dev-1" not in core3.sessions
    opened3.close()


# -- the Committer: when a batch goes to disk ------------------------------------------------------


def test_a_batch_nobody_waits_for_waits_for_company(tmp_path: Path) -> None:
    """A subscriber's PUBACK (the DONE record) is lazy: no fsync of its own at once (it would
    delay the next fsync somebody waits for), but on disk within Committer.DEFER. A record an
    acknowledgement waits for goes at once, and takes the lazy ones with it (twin)."""
    from broker.store import Committer

    async def scenario() -> tuple[int, int, int, int]:
        core = make_core()
        opened = _open(tmp_path, core)
        committer = Committer(core, opened)
        svc, svc_link, _ = connect(core, "ops", service=True)
        dev, _ = _subscriber(core, clean=False)
        publish(core, svc, CMD, b"one", qos=1)
        core.ack(svc_link, mqtt.puback(1))
        for _ in range(200):  # an fsync in a worker thread: wait for it
            await asyncio.sleep(0.005)
            if opened.store.durable == opened.store.seq:
                break
        base = committer.commits
        core.acked(dev, mqtt.PUBACK, next(iter(dev.inflight)))  # lazy: DONE
        await asyncio.sleep(0.01)
        lazy_waiting = committer.commits - base  # 0: it waits for company
        publish(core, svc, CMD, b"two", qos=1)
        core.ack(svc_link, mqtt.puback(2))  # urgent: goes now, DONE with it
        for _ in range(200):
            await asyncio.sleep(0.005)
            if opened.store.durable == opened.store.seq:
                break
        together = committer.commits - base
        core.acked(dev, mqtt.PUBACK, next(iter(dev.inflight)))
        await asyncio.sleep(Committer.DEFER * 4)
        alone = committer.commits - base
        dirty = int(opened.store.dirty)
        await committer.close()
        opened.close()
        return lazy_waiting, together, alone, dirty

    lazy_waiting, together, alone, dirty = asyncio.run(scenario())
    assert (lazy_waiting, together, alone, dirty) == (0, 1, 2, 0)
    core2 = make_core()
    opened2 = _open(tmp_path, core2)
    assert core2.sessions["dev-1"].inflight == {}  # both DONE records reached the disk
    opened2.close()
