"""BrokerCore on its own, through recording links: takeover, wills, QoS 2, the in-flight window,
backpressure (hold, release, stuck) and the offline queue, each in milliseconds, without sleeps.

The end-to-end twins of these cases (real TLS, real clients) stay in test_broker_acl.py and
test_broker_delivery.py; here the core's decisions are checked packet by packet.
"""

from __future__ import annotations

import pytest

from broker import mqtt
from broker.settings import Limits
from tests.broker.recording_link import connect, make_core, publish

CMD = "devices/dev-1/commands/x"


# -- takeover and wills ----------------------------------------------------------------------------


@pytest.mark.parametrize("clean", [True, False], ids=["clean", "persistent"])
def test_takeover_closes_the_old_link_with_its_will_and_serves_the_new_one(clean: bool) -> None:
    """MQTT-3.1.4-2 and MQTT-3.1.2-8: the old connection is closed (no DISCONNECT from its client,
    so its will is published) before the new one is attached."""
    core = make_core()
    sink, sink_link, _ = connect(core, "sink", service=True)
    core.subscribe(sink, mqtt.Subscribe(1, [("devices/+/state", 0)]))
    sink_link.take()
    old, old_link, _ = connect(
        core, "dev-1", clean=clean, will=("devices/dev-1/state", b"x", False)
    )
    core.subscribe(old, mqtt.Subscribe(1, [("devices/dev-1/commands/#", 1)]))
    old_link.take()
    new, new_link, present = connect(core, "dev-1", clean=clean)
    assert old_link.closed == (True, "takeover")
    assert sink_link.publishes() == [("devices/dev-1/state", 0, 0, b"x", False, False)]
    assert core.live["dev-1"] is new
    assert present is (not clean)  # a persistent session is resumed, a clean one replaced
    assert (new is old) is (not clean)
    assert core.audit.events("kick", reason="takeover", client_id="dev-1")
    if not clean:  # the subscription came with the session
        publish(core, sink, CMD, b"to-new", qos=1)
        assert [p[3] for p in new_link.publishes()] == [b"to-new"]


def test_a_takeover_by_another_identity_does_not_inherit_the_session() -> None:
    """A session is only resumed by the identity that made it."""
    core = make_core()
    first, link, _ = connect(core, "dev-1", clean=False)
    core.subscribe(first, mqtt.Subscribe(1, [("devices/dev-1/commands/#", 1)]))
    link.close(will=False)
    _, _, present = connect(core, "dev-1", clean=False, service=True)
    assert present is False


@pytest.mark.parametrize("reason", ["revoked", "operator"])
def test_a_kick_discards_the_will(reason: str) -> None:
    """The negative twin of the takeover: revocation and operator kicks publish no will."""
    core = make_core()
    sink, sink_link, _ = connect(core, "sink", service=True)
    core.subscribe(sink, mqtt.Subscribe(1, [("devices/+/state", 0)]))
    sink_link.take()
    dev, dev_link, _ = connect(core, "dev-1", will=("devices/dev-1/state", b"gone", True))
    if reason == "revoked":
        assert core.kick_revoked(frozenset({int(dev.authenticated.credential, 16)})) == 1
    else:
        assert core.kick("dev-1", reason)
    assert dev_link.closed == (False, reason)
    assert sink_link.take() == []
    assert core.retained.get("devices/dev-1/state") is None
    assert "dev-1" not in core.live


def test_a_lost_connection_publishes_and_retains_its_will() -> None:
    core = make_core()
    sink, sink_link, _ = connect(core, "sink", service=True)
    core.subscribe(sink, mqtt.Subscribe(1, [("devices/+/state", 0)]))
    sink_link.take()
    _, dev_link, _ = connect(core, "dev-1", will=("devices/dev-1/state", b"gone", True))
    dev_link.close(will=True)
    assert sink_link.publishes() == [("devices/dev-1/state", 0, 0, b"gone", False, False)]
    late, late_link, _ = connect(core, "sink", service=True)
    core.subscribe(late, mqtt.Subscribe(2, [("devices/+/state", 0)]))
    packets = late_link.take()
    assert [p.kind for p in packets] == [9, 3]  # SUBACK, then the retained will
    assert packets[1].publish == ("devices/dev-1/state", 0, 0, b"gone", True, False)


# -- QoS 2 and the in-flight window ----------------------------------------------------------------


def test_qos2_to_a_subscriber_runs_pubrec_pubrel_pubcomp() -> None:
    core = make_core()
    dev, link, _ = connect(core, "dev-1")
    core.subscribe(dev, mqtt.Subscribe(1, [("devices/dev-1/commands/#", 2)]))
    assert [p.kind for p in link.take()] == [9]
    sink, _, _ = connect(core, "sink", service=True)
    publish(core, sink, CMD, b"q2", qos=2)
    [(topic, qos, pid, payload, _, dup)] = link.publishes()
    assert (topic, qos, payload, dup) == (CMD, 2, b"q2", False)
    core.acked(dev, mqtt.PUBACK, pid)  # the wrong acknowledgement for QoS 2: ignored
    assert pid in dev.inflight
    core.acked(dev, mqtt.PUBREC, pid)
    [pubrel] = link.take()
    assert (pubrel.kind, pubrel.flags, pubrel.packet_id) == (6, 2, pid)
    core.acked(dev, mqtt.PUBCOMP, pid)
    assert dev.inflight == {}
    core.acked(dev, mqtt.PUBCOMP, pid)  # a late duplicate changes nothing
    assert link.take() == []


def test_a_released_qos2_message_is_resumed_with_pubrel_not_publish() -> None:
    """MQTT-4.4.0-1: on resume, PUBREL for what was PUBRECed, PUBLISH with DUP for the rest."""
    core = make_core()
    dev, link, _ = connect(core, "dev-1", clean=False)
    core.subscribe(dev, mqtt.Subscribe(1, [("devices/dev-1/commands/#", 2)]))
    link.take()
    sink, _, _ = connect(core, "sink", service=True)
    publish(core, sink, CMD, b"a", qos=2)
    publish(core, sink, CMD, b"b", qos=2)
    (_, _, pid_a, _, _, _), (_, _, pid_b, _, _, _) = link.publishes()
    core.acked(dev, mqtt.PUBREC, pid_a)
    link.close(will=True)
    _, back, present = connect(core, "dev-1", clean=False)
    assert present
    pubrel, again = back.take()
    assert (pubrel.kind, pubrel.packet_id) == (6, pid_a)
    assert again.publish == (CMD, 2, pid_b, b"b", False, True)


def test_the_inflight_window_holds_the_rest_until_acknowledged() -> None:
    core = make_core(Limits(max_inflight=3))
    dev, link, _ = connect(core, "dev-1")
    core.subscribe(dev, mqtt.Subscribe(1, [("devices/dev-1/commands/#", 1)]))
    link.take()
    sink, _, _ = connect(core, "sink", service=True)
    for n in range(5):
        publish(core, sink, CMD, b"m%d" % n, qos=1)
    first = link.publishes()
    assert [p[3] for p in first] == [b"m0", b"m1", b"m2"]
    core.acked(dev, mqtt.PUBACK, first[0][2])
    assert [p[3] for p in link.publishes()] == [b"m3"]
    core.acked(dev, mqtt.PUBACK, first[1][2])
    assert [p[3] for p in link.publishes()] == [b"m4"]


# -- backpressure ----------------------------------------------------------------------------------


def test_a_slow_receiver_holds_its_publisher_until_it_is_down_to_a_quarter() -> None:
    limits = Limits(max_inflight=5, outbound_max_messages=20)
    core = make_core(limits)
    dev, dev_link, _ = connect(core, "dev-1")
    core.subscribe(dev, mqtt.Subscribe(1, [("devices/dev-1/commands/#", 1)]))
    dev_link.take()
    sink, sink_link, _ = connect(core, "sink", service=True)
    for n in range(15):  # 5 in flight, 10 queued: half of outbound_max_messages
        publish(core, sink, CMD, b"%d" % n, qos=1)
    assert sink_link.log == [("hold", "dev-1")]
    assert sink_link in dev.waiters
    pids = [p[2] for p in dev_link.publishes()]
    # Each acknowledgement lets one queued message go; the hold ends below a quarter.
    while sink_link.holds:
        assert len(dev.queue) * 4 >= limits.outbound_max_messages
        core.acked(dev, mqtt.PUBACK, pids.pop(0))
        pids += [p[2] for p in dev_link.publishes()]
    assert len(dev.queue) == 4
    assert sink_link.log == [("hold", "dev-1"), ("release", "dev-1")]
    assert dev.waiters == set()
    assert core.outbound_dropped == 0


def test_a_qos0_receiver_with_unsent_bytes_holds_its_publisher_and_drops_past_the_limit() -> None:
    limits = Limits(outbound_max_bytes=64 * 1024)
    core = make_core(limits)
    dev, dev_link, _ = connect(core, "dev-1")
    core.subscribe(dev, mqtt.Subscribe(1, [("devices/dev-1/commands/#", 0)]))
    dev_link.take()
    sink, sink_link, _ = connect(core, "sink", service=True)
    dev_link.unsent = limits.outbound_max_bytes // 2 + 1  # the socket took little of it
    publish(core, sink, CMD, b"held")
    assert sink_link.log == [("hold", "dev-1")]
    dev_link.unsent = limits.outbound_max_bytes + 1
    publish(core, sink, CMD, b"dropped")
    assert core.outbound_dropped == 1
    assert [p[3] for p in dev_link.publishes()] == [b"held"]
    dev_link.unsent = 0
    core.drained(dev)  # the socket drained (resume_writing)
    assert sink_link.log[-1] == ("release", "dev-1")


def test_a_stuck_receiver_releases_its_publishers_and_its_excess_is_dropped() -> None:
    """After backpressure_timeout (the protocol's tick calls give_up), the publisher goes free;
    the receiver's queue stays bounded and it holds nobody until it catches up."""
    limits = Limits(max_inflight=5, outbound_max_messages=20)
    core = make_core(limits)
    dev, dev_link, _ = connect(core, "dev-1")
    core.subscribe(dev, mqtt.Subscribe(1, [("devices/dev-1/commands/#", 1)]))
    dev_link.take()
    sink, sink_link, _ = connect(core, "sink", service=True)
    other, other_link, _ = connect(core, "dev-2")
    core.subscribe(other, mqtt.Subscribe(1, [("devices/dev-2/commands/#", 1)]))
    other_link.take()
    for n in range(15):
        publish(core, sink, CMD, b"%d" % n, qos=1)
    assert sink_link.holds == {dev}
    core.give_up(sink_link)
    assert dev.stuck
    assert sink_link.holds == set()
    assert core.stuck == 1
    for n in range(15, 100):
        publish(core, sink, CMD, b"%d" % n, qos=1)
    assert sink_link.log == [("hold", "dev-1"), ("release", "dev-1")]  # never held again
    assert core.outbound_dropped == 100 - 5 - 20
    publish(core, sink, "devices/dev-2/commands/x", b"for-dev-2", qos=1)
    assert [p[3] for p in other_link.publishes()] == [b"for-dev-2"]
    assert len(dev_link.publishes()) == 5
    # Caught up: no longer stuck, so it may hold publishers again.
    dev.queue.clear()
    dev.queued_bytes = 0
    core.drained(dev)
    assert not dev.stuck


def test_a_publisher_closed_while_held_is_no_longer_waited_for() -> None:
    limits = Limits(max_inflight=5, outbound_max_messages=20)
    core = make_core(limits)
    dev, _, _ = connect(core, "dev-1")
    core.subscribe(dev, mqtt.Subscribe(1, [("devices/dev-1/commands/#", 1)]))
    sink, sink_link, _ = connect(core, "sink", service=True)
    for n in range(15):
        publish(core, sink, CMD, b"%d" % n, qos=1)
    assert dev.waiters == {sink_link}
    sink_link.close(will=True)
    assert dev.waiters == set()


# -- offline sessions ------------------------------------------------------------------------------


def test_offline_queue_keeps_qos1_drops_qos0_and_is_bounded() -> None:
    core = make_core(Limits(offline_queue_max=5))
    dev, link, _ = connect(core, "dev-1", clean=False)
    core.subscribe(dev, mqtt.Subscribe(1, [("devices/dev-1/commands/#", 1)]))
    link.close(will=True)
    assert dev.disconnected_at is not None
    sink, _, _ = connect(core, "sink", service=True)
    publish(core, sink, CMD, b"qos0-lost", qos=0)
    for n in range(8):
        publish(core, sink, CMD, b"q%d" % n, qos=1)
    assert core.offline_dropped == 3
    _, back, present = connect(core, "dev-1", clean=False)
    assert present
    assert [(p[3], p[5]) for p in back.publishes()] == [(b"q%d" % n, False) for n in range(5)]


def test_a_clean_session_forgets_the_offline_queue() -> None:
    core = make_core()
    dev, link, _ = connect(core, "dev-1", clean=False)
    core.subscribe(dev, mqtt.Subscribe(1, [("devices/dev-1/commands/#", 1)]))
    link.close(will=True)
    sink, _, _ = connect(core, "sink", service=True)
    publish(core, sink, CMD, b"kept", qos=1)
    _, clean, present = connect(core, "dev-1", clean=True)
    assert not present
    assert clean.take() == []
    publish(core, sink, CMD, b"nobody", qos=1)
    assert clean.take() == []  # the subscription went with the session


def test_expired_persistent_sessions_are_forgotten() -> None:
    core = make_core(session_expiry=60)
    dev, link, _ = connect(core, "dev-1", clean=False)
    link.close(will=True)
    gone = dev.disconnected_at
    assert gone is not None
    core.expire_sessions(gone + 59)
    assert "dev-1" in core.sessions
    core.expire_sessions(gone + 60)
    assert "dev-1" not in core.sessions
