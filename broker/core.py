"""The broker's state and rules: sessions, routing, retained messages, wills, policy on every path.

Synchronous on purpose. A connection's protocol object (``broker.protocol``) hands a decoded
packet to :class:`BrokerCore`, which decides and queues bytes on the receiving connections
before it returns: no task, queue hop or plugin event per message. That, and not TLS, is what
made amqtt 0.12.1 cost ~110 us of CPU per delivered message here (docs/BENCHMARKS.md, "where
the time goes").

The rules it enforces (each was a gap in amqtt 0.12.1, research/amqtt.md):

1. Identity before state. The authenticator says who the peer is, the client_id must equal that
   identity and the will topic must pass the publish policy *before* the session table is touched.
2. One live connection per client_id: a second valid CONNECT closes the first one (its will is
   published: it ended without a DISCONNECT, MQTT-3.1.2-8), then resumes the session if it
   belongs to the same identity, or replaces it.
3. Every message obeys the policy: PUBLISH (denied ones are audited, never routed or retained),
   SUBSCRIBE by containment, RECEIVE for live, retained *and* queued messages. Retained messages
   go only to the subscription that asked for them. Decisions are cached per session and topic
   (the policy of a connected identity does not change; a revocation closes the session).
4. Bounded: at most ``max_inflight`` unacknowledged QoS 1/2 messages per session, then a queue of
   ``outbound_max_messages`` / ``outbound_max_bytes``; QoS 0 to a connection whose unsent bytes
   exceed ``outbound_max_bytes`` is dropped; ``offline_queue_max`` / ``offline_queue_max_bytes``
   for a disconnected persistent session. Every drop is counted per reason and audited.
5. Backpressure before loss. A receiver whose queue or unsent bytes pass half of those limits
   holds the publishers that feed it: the broker stops reading their sockets (TCP slows them, an
   agent keeps its messages in its own queue) until the receiver is down to a quarter. A receiver
   that does not recover within ``backpressure_timeout`` is marked stuck: publishers are released
   and what no longer fits its queue is dropped, so one dead subscriber cannot stall a fleet.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from broker import mqtt
from broker.audit import AuditLog
from broker.auth import CERTIFICATE_METHODS, Authenticated
from broker.errors import Refused, TopicError
from broker.metrics import Metrics
from broker.policy import Action, Grants, Policy
from broker.router import RetainedStore, SubscriptionIndex
from broker.settings import BrokerSettings
from broker.topics import validate_filter, validate_topic
from provisioning.errors import InvalidIdentityError
from provisioning.identity import validate_name

if TYPE_CHECKING:
    from broker.store import Store

__all__ = ["BrokerCore", "Link", "Message", "Session"]

log = logging.getLogger("iotauth.broker")

_ACL_CACHE_MAX = 1024  # topics remembered per session and action
_DROP_AUDIT_EVERY = 10.0  # seconds between two "drop" audit lines for one session


class Link(Protocol):
    """What the core needs of a connection (``broker.protocol.ClientProtocol``)."""

    holds: set[Session]

    peer: str
    tls_version: str | None

    def send(self, data: bytes) -> None:
        """Queue bytes for the peer; they are written at the end of this loop iteration."""

    def backlog(self) -> int:
        """Bytes queued for the peer and not yet accepted by the socket."""

    def hold(self, receiver: Session) -> None:
        """Stop reading from this peer until ``release(receiver)`` (backpressure)."""

    def release(self, receiver: Session) -> None:
        """``receiver`` no longer holds this peer; reading resumes when nothing does."""

    def close(self, *, will: bool, reason: str | None = None) -> None:
        """Abort the connection and :meth:`BrokerCore.detach` its session (with the will if
        ``will``); ``reason`` is audited as the disconnect reason."""


@dataclass(slots=True, frozen=True)
class Message:
    topic: str
    topic_bytes: bytes
    payload: bytes
    qos: int
    retain: bool


@dataclass(slots=True, eq=False)
class Session:
    client_id: str
    authenticated: Authenticated
    grants: Grants
    persistent: bool = False
    link: Link | None = None
    subscriptions: dict[str, int] = field(default_factory=dict)
    # Outgoing QoS 1/2 messages awaiting PUBACK / PUBREC (False) or PUBCOMP (True), by packet id,
    # in the order they were sent (re-sent in that order on resume, MQTT-4.6.0-1).
    inflight: dict[int, tuple[Message, int, bool]] = field(default_factory=dict)
    queue: collections.deque[tuple[Message, int]] = field(default_factory=collections.deque)
    queued_bytes: int = 0
    next_id: int = 1
    incoming_qos2: set[int] = field(default_factory=set)
    will: Message | None = None
    disconnected_at: float | None = None
    publish_ok: dict[str, bool] = field(default_factory=dict)
    receive_ok: dict[str, bool] = field(default_factory=dict)
    # Publishers' links held until this session's backlog shrinks; ``stuck``: it did not in time.
    waiters: set[Link] = field(default_factory=set)
    stuck: bool = False

    def packet_id(self) -> int:
        pid = self.next_id
        while pid in self.inflight:
            pid = pid % 65535 + 1
        self.next_id = pid % 65535 + 1
        return pid


def _decide(cache: dict[str, bool], grants: Grants, action: Action, topic: str) -> bool:
    """The policy's answer, remembered per session: the grants of a connected identity do not
    change (a revocation closes the session), and topics repeat (telemetry, commands)."""
    if len(cache) >= _ACL_CACHE_MAX:
        cache.clear()
    allowed = cache[topic] = grants.allows(action, topic)
    return allowed


class BrokerCore:
    def __init__(self, settings: BrokerSettings, *, audit: AuditLog, metrics: Metrics) -> None:
        self.settings = settings
        self.limits = settings.limits
        # Unsent bytes to one receiver from which its publishers are held (checked per delivery).
        self._hold_bytes = settings.limits.outbound_max_bytes // 2
        self.policy: Policy = settings.policy
        self.audit = audit
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.live: dict[str, Session] = {}
        self.index: SubscriptionIndex[Session] = SubscriptionIndex()
        self.retained: RetainedStore[Message] = RetainedStore()
        # Persistence (broker/store.py): None runs in memory. Every call into it below is a
        # hook marked "store:"; it records only persistent sessions and retained messages.
        self.store: Store | None = None
        # Drops not yet audited, per client_id: (time of the last audit line, count since).
        self._drop_audit: dict[str, tuple[float, int]] = {}
        # Hot counters are plain ints read at scrape time: Metrics.inc costs a dict build per call.
        self.messages_in = 0
        self.messages_out = 0
        self.outbound_dropped = 0
        self.offline_dropped = 0
        self.holds = 0
        self.stuck = 0
        metrics.gauge("iotauth_broker_connections", lambda: len(self.live))
        metrics.gauge("iotauth_broker_messages_in_total", lambda: self.messages_in)
        metrics.gauge("iotauth_broker_messages_out_total", lambda: self.messages_out)
        metrics.gauge("iotauth_broker_outbound_dropped_total", lambda: self.outbound_dropped)
        metrics.gauge("iotauth_broker_offline_dropped_total", lambda: self.offline_dropped)
        metrics.gauge("iotauth_broker_backpressure_holds_total", lambda: self.holds)
        metrics.gauge("iotauth_broker_backpressure_stuck_total", lambda: self.stuck)

    # -- CONNECT -------------------------------------------------------------------------------

    def check_connect(self, connect: mqtt.Connect, authenticated: Authenticated) -> None:
        """Refused unless the client_id is this identity's name and the will is allowed."""
        identity = authenticated.identity
        client_id = connect.client_id
        try:
            validate_name(client_id, what="client_id")
        except InvalidIdentityError as exc:
            raise Refused(
                "client-id-invalid",
                exc.reason,
                connack=mqtt.CONNACK_IDENTIFIER_REJECTED,
                identity=str(identity),
            ) from None
        if client_id != identity.name:
            raise Refused(
                "client-id-mismatch",
                f"client_id {client_id!r} is not {identity.name!r}",
                connack=mqtt.CONNACK_IDENTIFIER_REJECTED,
                identity=str(identity),
            )
        if connect.will_topic is not None:
            topic = connect.will_topic
            try:
                validate_topic(topic)
            except TopicError as exc:
                raise Refused("will-invalid", exc.reason, identity=str(identity)) from None
            if (
                topic.startswith("$")
                or not self.policy.decide(identity, Action.PUBLISH, topic).allowed
            ):
                self.denied(str(identity), client_id, "will", topic)
                raise Refused(
                    "will-denied", f"will topic {topic!r} is not allowed", identity=str(identity)
                )

    def attach(
        self, link: Link, connect: mqtt.Connect, authenticated: Authenticated
    ) -> tuple[Session, bool]:
        """Bind ``link`` to its session (taking over a live one); returns (session, present)."""
        client_id = connect.client_id
        current = self.live.get(client_id)
        if current is not None and current.link is not None:
            self.kick_session(current, "takeover", will=True)
        session = self.sessions.get(client_id)
        if session is not None and (
            connect.clean_session or session.authenticated.identity != authenticated.identity
        ):
            self.forget(session)
            session = None
        present = session is not None
        if session is None:
            grants = self.policy.for_identity(authenticated.identity)
            session = Session(client_id, authenticated, grants)
            self.sessions[client_id] = session
        session.authenticated = authenticated
        session.persistent = not connect.clean_session
        session.link = link
        session.disconnected_at = None
        session.will = None
        if connect.will_topic is not None:
            topic = connect.will_topic
            session.will = Message(
                topic, topic.encode(), connect.will_payload, connect.will_qos, connect.will_retain
            )
        self.live[client_id] = session
        if self.store is not None and session.persistent:
            self.store.session_saved(session)  # store: created or resumed
        return session, present

    def resume(self, session: Session) -> None:
        """After CONNACK: re-send what was in flight (DUP), then what was queued."""
        link = session.link
        if link is None:
            return
        for pid, (message, qos, released) in list(session.inflight.items()):
            if released:
                link.send(mqtt.pubrel(pid))
            else:
                link.send(
                    mqtt.encode_publish(
                        message.topic_bytes, message.payload, qos, message.retain, pid, True
                    )
                )
        self._drain(session)

    def detach(self, session: Session, link: Link, *, will: bool) -> None:
        """The connection ``link`` of ``session`` has ended."""
        if session.link is not link:
            return  # taken over: the new connection owns the session
        session.link = None
        if self.live.get(session.client_id) is session:
            del self.live[session.client_id]
        self._release_waiters(session)
        message = session.will
        session.will = None
        if will and message is not None:
            if message.retain:
                self.retain(message)
            self.route(message, None)
        if not session.persistent:
            self.forget(session)
        else:
            session.disconnected_at = time.monotonic()
            if self.store is not None:
                self.store.session_detached(session, time.time())  # store: expiry counts

    def forget(self, session: Session) -> None:
        """Drop a session and everything it holds (subscriptions, queued messages)."""
        if self.store is not None:
            self.store.session_forgotten(session)  # store: before its queue is cleared
        for topic_filter in session.subscriptions:
            self.index.remove(topic_filter, session)
        session.subscriptions.clear()
        session.queue.clear()
        session.inflight.clear()
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]

    def expire_sessions(self, now: float) -> None:
        ttl = self.settings.session_expiry
        if ttl is None:
            return
        for session in list(self.sessions.values()):
            gone = session.disconnected_at
            if session.link is None and gone is not None and now - gone >= ttl:
                self.forget(session)

    # -- PUBLISH in ----------------------------------------------------------------------------

    def publish(self, session: Session, packet: mqtt.Publish) -> str | None:
        """Route a client's PUBLISH; returns a violation reason when the link must close."""
        topic = packet.topic
        if topic.startswith("$"):
            self.denied(str(session.authenticated.identity), session.client_id, "publish", topic)
            return "invalid-publish-topic"
        allowed = session.publish_ok.get(topic)
        if allowed is None:
            allowed = _decide(session.publish_ok, session.grants, Action.PUBLISH, topic)
        if not allowed:
            self.denied(str(session.authenticated.identity), session.client_id, "publish", topic)
            if self.settings.denied_publish == "disconnect":
                return "publish-denied"
            return None
        store = self.store
        if (
            store is not None
            and store.failed is not None
            and packet.qos
            and (packet.retain or any(store.is_persistent(s) for s, _ in self.index.route(topic)))
        ):
            # store: it cannot be made durable, so it must not be acknowledged (issue 15).
            # TODO(mqtt5): a 5.0 publisher gets PUBACK/PUBREC 0x97 instead of the close.
            self._dropped(session, "storage-failed")
            return "storage-failed"
        self.messages_in += 1
        message = Message(topic, topic.encode(), packet.payload, packet.qos, packet.retain)
        if packet.retain:
            self.retain(message)
        self.route(message, session)
        return None

    def retain(self, message: Message) -> None:
        if message.payload:
            self.retained.set(message.topic, message)
            if self.store is not None:
                self.store.retained_set(message)  # store
        else:
            self.retained.delete(message.topic)  # MQTT-3.3.1-10: an empty retained PUBLISH clears
            if self.store is not None:
                self.store.retained_cleared(message.topic)  # store

    def route(self, message: Message, publisher: Session | None) -> None:
        """Deliver to every subscriber the policy lets receive it; ``publisher`` may be held."""
        topic = message.topic
        qos0: bytes | None = None  # one encoding shared by every QoS 0 receiver
        # TODO(mqtt5): count the subscribers that took it; none (all queues full) -> the
        # publisher's PUBACK carries 0x97 (issue 15). 3.1.1 has no code for it: the drop is
        # counted and audited per receiver (_dropped).
        for session, granted in self.index.route(topic):
            allowed = session.receive_ok.get(topic)
            if allowed is None:
                allowed = _decide(session.receive_ok, session.grants, Action.RECEIVE, topic)
            if not allowed:
                self.metrics.inc("iotauth_broker_acl_denials_total", action="receive")
                continue
            qos = message.qos if message.qos < granted else granted
            if qos == 0:
                link = session.link
                if link is None:
                    continue  # QoS 0 is not kept for offline sessions
                backlog = link.backlog()
                if backlog > self.limits.outbound_max_bytes:
                    self.outbound_dropped += 1
                    self._dropped(session, "slow-subscriber-qos0")
                    continue
                if qos0 is None:
                    qos0 = mqtt.encode_publish(message.topic_bytes, message.payload, 0, False)
                link.send(qos0)
                self.messages_out += 1
                if backlog > self._hold_bytes and publisher is not None:
                    self._hold(session, publisher)
            else:
                self.enqueue(session, message, qos, retain=False)
                if publisher is not None and self._pressed(session, 2):
                    self._hold(session, publisher)

    def enqueue(self, session: Session, message: Message, qos: int, *, retain: bool) -> None:
        """A QoS 1/2 message for ``session``: sent now if the window allows, else queued."""
        if retain != message.retain:
            message = Message(
                message.topic, message.topic_bytes, message.payload, message.qos, retain
            )
        link = session.link
        if (
            link is not None
            and not session.queue
            and len(session.inflight) < self.limits.max_inflight
            and link.backlog() <= self.limits.outbound_max_bytes
        ):
            self._send(session, link, message, qos)
            return
        size = session.queued_bytes + len(message.payload)
        if link is None:
            limits = self.limits
            if len(session.queue) >= limits.offline_queue_max:
                self.offline_dropped += 1
                self._dropped(session, "offline-queue-full")
                return
            if size > limits.offline_queue_max_bytes:
                self.offline_dropped += 1
                self._dropped(session, "offline-queue-bytes")
                return
        elif len(session.queue) >= self.limits.outbound_max_messages:
            self.outbound_dropped += 1
            self._dropped(session, "outbound-queue-full")
            return
        elif size > self.limits.outbound_max_bytes:
            self.outbound_dropped += 1
            self._dropped(session, "outbound-queue-bytes")
            return
        session.queue.append((message, qos))
        session.queued_bytes += len(message.payload)
        if self.store is not None:
            self.store.queued(session, message, qos)  # store

    def _send(
        self, session: Session, link: Link, message: Message, qos: int, *, queued: bool = False
    ) -> None:
        pid = session.packet_id()
        session.inflight[pid] = (message, qos, False)
        if self.store is not None:
            self.store.sent(session, pid, message, qos, queued=queued)  # store
        link.send(
            mqtt.encode_publish(message.topic_bytes, message.payload, qos, message.retain, pid)
        )
        self.messages_out += 1

    def _drain(self, session: Session) -> None:
        link = session.link
        queue = session.queue
        while (
            link is not None
            and queue
            and len(session.inflight) < self.limits.max_inflight
            and link.backlog() <= self.limits.outbound_max_bytes
        ):
            message, qos = queue.popleft()
            session.queued_bytes -= len(message.payload)
            # The receiver's grants are re-checked: it may be a resumed session.
            if session.grants.allows(Action.RECEIVE, message.topic):
                self._send(session, link, message, qos, queued=True)
            elif self.store is not None:
                self.store.unqueued(session, message)  # store

    def drained(self, session: Session) -> None:
        """Room for more (an acknowledgement, or the socket buffer emptied): send what waited,
        and let the held publishers go once the backlog is down to a quarter."""
        if session.queue:
            self._drain(session)
        if (session.waiters or session.stuck) and not self._pressed(session, 4):
            self._release_waiters(session)

    # -- backpressure --------------------------------------------------------------------------

    def _pressed(self, session: Session, fraction: int) -> bool:
        """Is the backlog of ``session`` above 1/fraction of its limits?"""
        limits = self.limits
        link = session.link
        return (
            len(session.queue) * fraction >= limits.outbound_max_messages
            or session.queued_bytes * fraction >= limits.outbound_max_bytes
            or (link is not None and link.backlog() * fraction >= limits.outbound_max_bytes)
        )

    def _hold(self, receiver: Session, publisher: Session) -> None:
        link = publisher.link
        if (
            receiver.stuck
            or receiver.link is None  # an offline session's queue is bounded, never waited for
            or link is None
            or publisher is receiver
            or link in receiver.waiters
        ):
            return
        receiver.waiters.add(link)
        self.holds += 1
        link.hold(receiver)

    def _release_waiters(self, session: Session) -> None:
        session.stuck = False
        waiters, session.waiters = session.waiters, set()
        for link in waiters:
            link.release(session)

    def give_up(self, link: Link) -> None:
        """``link`` was held for ``backpressure_timeout``: its receivers are stuck; let it go."""
        for receiver in list(link.holds):
            if not receiver.stuck:
                self.stuck += 1
                log.warning(
                    "%s did not take its messages for %.0f s: publishers released, its excess "
                    "is dropped until it catches up",
                    receiver.client_id,
                    self.limits.backpressure_timeout,
                )
            receiver.stuck = True
            receiver.waiters.discard(link)
            link.release(receiver)

    # -- acknowledgements ----------------------------------------------------------------------

    def acked(self, session: Session, kind: int, pid: int) -> None:
        """PUBACK, PUBREC or PUBCOMP from the client for a message we sent."""
        entry = session.inflight.get(pid)
        if entry is None:
            return  # unknown or duplicate: nothing to do (MQTT allows late duplicates)
        message, qos, released = entry
        if kind == mqtt.PUBREC:
            if qos != 2:
                return
            session.inflight[pid] = (message, qos, True)
            if self.store is not None:
                self.store.pubrec(session, pid)  # store: we owe PUBREL now
            if session.link is not None:
                session.link.send(mqtt.pubrel(pid))
            return
        if (kind == mqtt.PUBACK and qos == 1) or (kind == mqtt.PUBCOMP and released):
            del session.inflight[pid]
            if self.store is not None:
                self.store.completed(session, pid, message)  # store
            self.drained(session)

    # -- SUBSCRIBE / UNSUBSCRIBE ---------------------------------------------------------------

    def subscribe(self, session: Session, packet: mqtt.Subscribe) -> None:
        link = session.link
        codes: list[int] = []
        accepted: list[tuple[str, int]] = []
        for topic_filter, qos in packet.topics:
            try:
                validate_filter(topic_filter)
            except TopicError:
                codes.append(mqtt.SUBACK_FAILURE)
                continue
            if not session.grants.allows(Action.SUBSCRIBE, topic_filter):
                self.denied(
                    str(session.authenticated.identity),
                    session.client_id,
                    "subscribe",
                    topic_filter,
                )
                codes.append(mqtt.SUBACK_FAILURE)
                continue
            session.subscriptions[topic_filter] = qos
            self.index.add(topic_filter, session, qos)
            if self.store is not None:
                self.store.subscribed(session, topic_filter, {"qos": qos})  # store
            accepted.append((topic_filter, qos))
            codes.append(qos)
        if link is not None:
            link.send(mqtt.suback(packet.packet_id, codes))
        # Retained messages for this subscription only, after the SUBACK, within the grants.
        for topic_filter, granted in accepted:
            for topic, message in self.retained.matching(topic_filter):
                if not session.grants.allows(Action.RECEIVE, topic):
                    continue
                qos = min(message.qos, granted)
                if qos == 0:
                    if link is None:
                        continue
                    if link.backlog() > self.limits.outbound_max_bytes:
                        self.outbound_dropped += 1
                        self._dropped(session, "slow-subscriber-qos0")
                        continue
                    link.send(mqtt.encode_publish(message.topic_bytes, message.payload, 0, True))
                    self.messages_out += 1
                else:
                    self.enqueue(session, message, qos, retain=True)

    def unsubscribe(self, session: Session, packet: mqtt.Unsubscribe) -> None:
        for topic_filter in packet.topics:
            if session.subscriptions.pop(topic_filter, None) is not None:
                self.index.remove(topic_filter, session)
                if self.store is not None:
                    self.store.unsubscribed(session, topic_filter)  # store
        if session.link is not None:
            session.link.send(mqtt.unsuback(packet.packet_id))

    # -- closing sessions ----------------------------------------------------------------------

    def kick_session(
        self, session: Session, reason: str, detail: str | None = None, *, will: bool = False
    ) -> None:
        """Close the live connection of ``session``. Without its will by default: an operator,
        a revocation or an expiry ended it, and a revoked identity speaks no more. A takeover
        passes ``will=True`` (MQTT-3.1.2-8: the old connection ends without a DISCONNECT)."""
        link = session.link
        if link is None:
            return
        self.kick_record(session, reason, detail)
        link.close(will=will, reason=reason)

    def kick_record(self, session: Session, reason: str, detail: str | None = None) -> None:
        self.metrics.inc("iotauth_broker_kicks_total", reason=reason)
        link = session.link
        self.audit.emit(
            "kick",
            identity=str(session.authenticated.identity),
            client_id=session.client_id,
            peer=link.peer if link is not None else None,
            reason=reason,
            detail=detail,
            credential=session.authenticated.credential,
        )

    def kick(self, client_id: str, reason: str, *, forget_session: bool = False) -> bool:
        session = self.live.get(client_id)
        if session is not None:
            self.kick_session(session, reason)
        if forget_session:
            stored = self.sessions.get(client_id)
            if stored is not None:
                self.forget(stored)
        return session is not None

    def kick_revoked(self, revoked: frozenset[int]) -> int:
        """Close every session whose certificate serial is in ``revoked`` (mutual TLS, and device
        tokens, which name their certificate); forget its state, including offline persistent
        sessions (they hold queued messages)."""
        kicked = 0
        for session in list(self.sessions.values()):
            auth = session.authenticated
            if auth.method not in CERTIFICATE_METHODS or int(auth.credential, 16) not in revoked:
                continue
            if session.link is not None:
                self.kick_session(session, "revoked")
                kicked += 1
            self.forget(session)
        return kicked

    def kick_expired(self, now_ts: float) -> None:
        for session in list(self.live.values()):
            not_after = session.authenticated.not_after
            if not_after is not None and not_after.timestamp() <= now_ts:
                self.kick_session(session, "expired")

    def close_all(self) -> None:
        """Shutdown: end every connection without wills."""
        for session in list(self.live.values()):
            link = session.link
            if link is not None:
                link.close(will=False, reason="shutdown")

    # -- acknowledgements to publishers ---------------------------------------------------------

    def qos2_waiting(self, session: Session, pid: int, *, waiting: bool) -> None:
        """A client's QoS 2 packet id waits for PUBREL (routed once, MQTT-4.3.3-2), or not."""
        if waiting:
            session.incoming_qos2.add(pid)
        else:
            session.incoming_qos2.discard(pid)
        if self.store is not None:
            self.store.qos2_incoming(session, pid, waiting=waiting)  # store

    def mark(self) -> int:
        """Where the store's records are before a packet is handled (see :meth:`ack`)."""
        store = self.store
        return store.seq if store is not None else 0

    def ack(self, link: Link, data: bytes, since: int | None = None) -> None:
        """PUBACK, PUBREC or PUBCOMP to a publisher: with a store, only once what it promises
        is on disk (issue 15), in the order they were made (MQTT-4.6.0-2, MQTT-4.6.0-3).
        ``since``: :meth:`mark` before the packet was handled; if it wrote nothing, the answer
        waits only behind the link's earlier ones (None: behind everything not yet on disk)."""
        store = self.store
        if store is None:
            link.send(data)
        else:
            store.ack(link, data, since)

    # -- audit helpers -------------------------------------------------------------------------

    def _dropped(self, session: Session, reason: str) -> None:
        """A message ``session`` should have had is dropped: a metric per reason, and an audit
        line per session at most every _DROP_AUDIT_EVERY seconds with the count since."""
        self.metrics.inc("iotauth_broker_dropped_total", reason=reason)
        now = time.monotonic()
        last, count = self._drop_audit.get(session.client_id, (0.0, 0))
        count += 1
        if now - last < _DROP_AUDIT_EVERY:
            self._drop_audit[session.client_id] = (last, count)
            return
        if len(self._drop_audit) > 10_000:
            self._drop_audit.clear()
        self._drop_audit[session.client_id] = (now, 0)
        self.audit.emit(
            "drop",
            identity=str(session.authenticated.identity),
            client_id=session.client_id,
            reason=reason,
            count=count,
        )

    def denied(self, identity: str, client_id: str, action: str, topic: str) -> None:
        self.metrics.inc("iotauth_broker_acl_denials_total", action=action)
        self.audit.emit("deny", identity=identity, client_id=client_id, action=action, topic=topic)

    def refused(
        self,
        peer: str,
        reason: str,
        detail: str,
        identity: str | None = None,
        client_id: str | None = None,
    ) -> None:
        self.metrics.inc("iotauth_broker_refusals_total", reason=reason)
        self.audit.emit(
            "refuse",
            peer=peer,
            reason=reason,
            detail=detail,
            identity=identity,
            client_id=client_id,
            stage="mqtt",
        )
