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
import dataclasses
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
from broker.store import subscription_fields
from broker.topics import matches, validate_filter, validate_topic
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

    def publish5(self, message: Message, qos: int, packet_id: int, dup: bool) -> bool:
        """Send ``message`` as a level-5 PUBLISH (only called for sessions of MQTT 5 clients);
        False when it was not sent: expired, or larger than the client's Maximum Packet Size."""


@dataclass(slots=True, eq=False)
class Message:
    """One message as the broker keeps it. Never changed once made (``dataclasses.replace``
    makes a receiver's copy); not frozen, because a frozen dataclass's ``__init__`` costs a
    ``object.__setattr__`` per field on the hot path."""

    topic: str
    topic_bytes: bytes
    payload: bytes
    qos: int
    retain: bool
    # MQTT 5: what the publisher sent (no Topic Alias, no Subscription Identifier: those belong
    # to one connection), encoded once for every receiver; b"\x00" is "none" (3.1.1 too).
    properties: mqtt.Properties = mqtt.NO_PROPERTIES
    properties_wire: bytes = b"\x00"
    # Message Expiry Interval as a deadline on the broker's clock (None: never expires).
    expires_at: float | None = None
    # The Subscription Identifiers of the receiver's matching subscriptions (per receiver).
    subscription_ids: tuple[int, ...] = ()
    # Sent through this shared subscription ("$share/{group}/{filter}"; "" if not): a member
    # that leaves hands it to another member.
    share: str = ""
    # broker.store's bookkeeping (0: not in the store): the message's record number in the log
    # and how many of the store's records refer to it. On the message rather than in a dict
    # keyed by ``id()`` because every persistent delivery looks it up; ``init=False`` so that
    # ``dataclasses.replace`` (a receiver's copy, a different record) starts with none.
    store_mid: int = field(default=0, init=False, repr=False)
    store_refs: int = field(default=0, init=False, repr=False)


@dataclass(slots=True, eq=False)
class SharedGroup:
    """The members of one shared subscription ``$share/{group}/{filter}`` (4.8.2): each message
    goes to one of them, in turn."""

    key: str  # "$share/{group}/{filter}"
    topic_filter: str
    members: list[Session] = field(default_factory=list)
    turn: int = 0


def _expired(message: Message, now: float) -> bool:
    return message.expires_at is not None and message.expires_at <= now


@dataclass(slots=True)
class SubscriptionState:
    """An MQTT 5 subscription's options and identifier (3.8.3.1, 3.8.2.1.2)."""

    options: mqtt.SubscriptionOptions
    identifier: int = 0


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
    # MQTT 5. ``v5``: the connected client speaks 5.0; the options of its subscriptions;
    # its Receive Maximum (our in-flight window to it, MQTT-3.3.4-9); Session Expiry Interval
    # (seconds, None: never) and Will Delay Interval.
    v5: bool = False
    options: dict[str, SubscriptionState] = field(default_factory=dict)
    shared: dict[str, SubscriptionState] = field(default_factory=dict)  # by "$share/g/f"
    # topic -> (options, QoS) of the matching subscriptions; cleared when they change
    # (the last: no identifiers and no No Local, so a message goes as it is unless retained)
    matching: dict[
        str,
        tuple[int, bool, tuple[int, ...], list[tuple[SubscriptionState, int]] | None, bool],
    ] = field(default_factory=dict)
    inflight_max: int = 100
    expiry: float | None = None
    will_delay: int = 0
    # store: the persistence store keeps this session (set and cleared by the store). The
    # per-message hooks are called only then: a session it does not keep costs them nothing.
    stored: bool = False

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


def _matching_options(
    session: Session, topic: str, retain: bool, own: bool
) -> tuple[int, bool, tuple[int, ...]]:
    """Over the MQTT 5 subscriptions of ``session`` that match ``topic``: the highest QoS (-1:
    none wants it), the RETAIN flag to send (Retain As Published), the Subscription Identifiers.
    ``own``: the message is the session's own (No Local subscriptions do not take it)."""
    summary = session.matching.get(topic)
    if summary is None:
        # Remembered per topic until the subscriptions change: topics repeat (telemetry).
        if len(session.matching) >= _ACL_CACHE_MAX:
            session.matching.clear()
        states = [
            (state, session.subscriptions[topic_filter])
            for topic_filter, state in session.options.items()
            if matches(topic_filter, topic)
        ]
        ids = tuple(state.identifier for state, _ in states if state.identifier)
        local = states if any(state.options.no_local for state, _ in states) else None
        summary = session.matching[topic] = (
            max((qos for _, qos in states), default=-1),
            any(state.options.retain_as_published for state, _ in states),
            ids,
            local,
            not ids and local is None,
        )
    granted, as_published, ids, local, _ = summary
    if own and local is not None:  # some match is No Local (MQTT-3.8.3-3): without those
        states = [(state, qos) for state, qos in local if not state.options.no_local]
        granted = max((qos for _, qos in states), default=-1)
        as_published = any(state.options.retain_as_published for state, _ in states)
        ids = tuple(state.identifier for state, _ in states if state.identifier)
    return granted, as_published and retain, ids


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
        # MQTT 5 wills waiting for their Will Delay Interval: client_id -> (due, session).
        self.pending_wills: dict[str, tuple[float, Session]] = {}
        # MQTT 5 shared subscriptions: by "$share/{group}/{filter}", and indexed by filter.
        self.groups: dict[str, SharedGroup] = {}
        self.shared_index: SubscriptionIndex[SharedGroup] = SubscriptionIndex()
        # The time of the input being handled (the protocol objects set it): message expiry
        # and delayed wills count on it, so the core reads no clock of its own for them.
        self.now = time.monotonic()
        # Hot counters are plain ints read at scrape time: Metrics.inc costs a dict build per call.
        self.messages_in = 0
        self.messages_out = 0
        self.outbound_dropped = 0
        self.offline_dropped = 0
        self.holds = 0
        self.stuck = 0
        self.expired = 0
        self.queued = 0  # QoS 1/2 messages put in a session's queue (a taker, for publish5)
        self.quota_refused = 0  # MQTT 5 publishes answered 0x97: no matching receiver took them
        metrics.gauge("iotauth_broker_connections", lambda: len(self.live))
        metrics.gauge("iotauth_broker_messages_in_total", lambda: self.messages_in)
        metrics.gauge("iotauth_broker_messages_out_total", lambda: self.messages_out)
        metrics.gauge("iotauth_broker_outbound_dropped_total", lambda: self.outbound_dropped)
        metrics.gauge("iotauth_broker_offline_dropped_total", lambda: self.offline_dropped)
        metrics.gauge("iotauth_broker_backpressure_holds_total", lambda: self.holds)
        metrics.gauge("iotauth_broker_backpressure_stuck_total", lambda: self.stuck)
        metrics.gauge("iotauth_broker_expired_messages_total", lambda: self.expired)
        metrics.gauge("iotauth_broker_quota_exceeded_total", lambda: self.quota_refused)

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
        session.link = link
        session.disconnected_at = None
        session.will = None
        v5 = session.v5 = connect.protocol_level == 5
        # A resumed session's delayed will is not published (MQTT-3.1.3-9); a new one has none.
        pending = self.pending_wills.pop(client_id, None)
        if pending is not None and self.store is not None:
            self.store.will_done(pending[1])  # store: resumed before the delay ran out
        limits = self.limits
        if v5:
            props = connect.properties
            session.expiry = self.session_expiry_for(props.session_expiry_interval or 0)
            session.persistent = session.expiry != 0
            receive_max = props.receive_maximum
            session.inflight_max = (
                min(receive_max, limits.max_inflight) if receive_max else limits.max_inflight
            )
        else:
            session.persistent = not connect.clean_session
            session.expiry = self.settings.session_expiry
            session.inflight_max = limits.max_inflight
        session.will_delay = 0
        if connect.will_topic is not None:
            topic = connect.will_topic
            will_props = connect.will_properties
            if will_props is mqtt.NO_PROPERTIES:
                session.will = Message(
                    topic,
                    topic.encode(),
                    connect.will_payload,
                    connect.will_qos,
                    connect.will_retain,
                )
            else:
                session.will_delay = will_props.will_delay_interval or 0
                # Will Delay is the will's own; the rest are the PUBLISH's (3.1.3.2).
                props = dataclasses.replace(will_props, will_delay_interval=None)
                session.will = self.message(
                    topic,
                    connect.will_payload,
                    connect.will_qos,
                    connect.will_retain,
                    props,
                    self.now,
                )
        self.live[client_id] = session
        if self.store is not None:
            if session.persistent:
                self.store.session_saved(session)  # store: created or resumed
            elif self.store.is_persistent(session):
                # store: MQTT 5 resumed it with Session Expiry 0: it ends with this connection
                self.store.session_forgotten(session)
        return session, present

    def session_expiry_for(self, requested: int) -> float | None:
        """A client's Session Expiry Interval within the broker's maximum (``session_expiry``);
        0xFFFFFFFF is "never" (3.1.2.11.2). Returns seconds, or None for never."""
        cap = self.settings.session_expiry
        if requested == 0xFFFFFFFF:
            return cap
        return float(requested) if cap is None else float(min(requested, cap))

    def set_expiry(self, session: Session, requested: int) -> None:
        """MQTT 5 DISCONNECT changed the Session Expiry Interval (3.14.2.2.2)."""
        session.expiry = self.session_expiry_for(requested)
        session.persistent = session.expiry != 0
        if self.store is not None and session.persistent:
            self.store.session_saved(session)  # store: the new interval counts on replay

    def message(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        props: mqtt.Properties,
        now: float,
    ) -> Message:
        """A message with MQTT 5 properties, as every receiver will see them: the Topic Alias
        and Subscription Identifiers are the connection's, not the message's (3.3.2.3.4,
        MQTT-3.3.4-6), so they are not kept."""
        if props.topic_alias is not None or props.subscription_identifiers:
            props = dataclasses.replace(props, topic_alias=None, subscription_identifiers=())
        interval = props.message_expiry_interval
        return Message(
            topic,
            topic.encode(),
            payload,
            qos,
            retain,
            props,
            mqtt.encode_properties(props, mqtt.PUBLISH),
            None if interval is None else now + interval,
        )

    def resume(self, session: Session) -> None:
        """After CONNACK: re-send what was in flight (DUP), then what was queued."""
        link = session.link
        if link is None:
            return
        for pid, (message, qos, released) in list(session.inflight.items()):
            if released:
                # In order with the PUBLISHes (MQTT-4.6.0-1); its PUBREC came on an earlier
                # connection, so it is on disk already but for the last batch's few ms.
                link.send(mqtt.pubrel(pid))
            elif session.v5:
                link.publish5(message, qos, pid, True)
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
        if session.shared:
            self._hand_off(session)
        message = session.will
        session.will = None
        if will and message is not None:
            if session.will_delay and session.persistent:
                # MQTT-3.1.3-9: published after the delay unless the session resumes first,
                # or when the session ends, whichever comes first (3.1.3.2.2): due then.
                session.will = message
                delay = float(session.will_delay)
                if session.expiry is not None and session.expiry < delay:
                    delay = session.expiry
                self.pending_wills[session.client_id] = (self.now + delay, session)
            else:
                self.publish_will(session, message)
        if not session.persistent:
            self.forget(session)
        else:
            session.disconnected_at = time.monotonic()
            if self.store is not None:
                wall = time.time()
                self.store.session_detached(session, wall)  # store: expiry counts
                pending = self.pending_wills.get(session.client_id)
                if pending is not None and session.will is not None:
                    # store: the will waits on disk too, due at a wall-clock time
                    self.store.will_pending(session, session.will, wall + pending[0] - self.now)

    def publish_will(self, session: Session, message: Message) -> None:
        """A will goes out as its owner's PUBLISH would: the grants are asked again (a delayed
        will is published long after CONNECT checked it)."""
        if not session.grants.allows(Action.PUBLISH, message.topic):
            identity = str(session.authenticated.identity)
            self.denied(identity, session.client_id, "will", message.topic)
            return
        interval = message.properties.message_expiry_interval
        if interval is not None:
            # 3.1.3.2.4: the will's Message Expiry Interval counts from its publication, not
            # from the CONNECT that carried it.
            message = dataclasses.replace(message, expires_at=self.now + interval)
        if message.retain:
            self.retain(message)
        self.route(message, None)

    def forget(self, session: Session, *, will: bool = True) -> None:
        """Drop a session and everything it holds (subscriptions, queued messages); a will
        still waiting for its delay is published now (the session ends), unless ``will`` is
        False (a revocation: a revoked identity speaks no more)."""
        pending = self.pending_wills.get(session.client_id)
        if pending is not None and pending[1] is session:
            del self.pending_wills[session.client_id]
            message, session.will = session.will, None
            if will and message is not None:
                self.publish_will(session, message)
            if self.store is not None:
                self.store.will_done(session)  # store
        if self.store is not None:
            self.store.session_forgotten(session)  # store: before its queue is cleared
        for topic_filter in session.subscriptions:
            if topic_filter in session.shared:
                self._unshare(session, topic_filter)
            else:
                self.index.remove(topic_filter, session)
        session.subscriptions.clear()
        session.options.clear()
        session.shared.clear()
        session.matching.clear()
        session.queue.clear()
        session.inflight.clear()
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]

    def expire_sessions(self, now: float) -> None:
        """Forget disconnected sessions past their Session Expiry Interval (3.1.1 persistent
        sessions: ``settings.session_expiry``)."""
        for session in list(self.sessions.values()):
            gone = session.disconnected_at
            ttl = session.expiry
            if ttl is not None and session.link is None and gone is not None and now - gone >= ttl:
                self.forget(session)

    def tick(self, now: float) -> None:
        """Timers of the core (the listener calls this a few times a second): delayed wills."""
        self.now = now
        if not self.pending_wills:
            return
        for client_id, (due, session) in list(self.pending_wills.items()):
            if due <= now:
                del self.pending_wills[client_id]
                message, session.will = session.will, None
                if message is not None:
                    self.publish_will(session, message)
                if self.store is not None:
                    self.store.will_done(session)  # store: in the batch of its deliveries

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
            and self._unstorable(session, packet, topic)
        ):
            return "storage-failed"
        self.messages_in += 1
        message = Message(topic, topic.encode(), packet.payload, packet.qos, packet.retain)
        if packet.retain:
            self.retain(message)
        self.route(message, session)
        return None

    def _unstorable(self, session: Session, packet: mqtt.Publish, topic: str) -> bool:
        """store: a QoS 1/2 PUBLISH that would have to be stored while the disk refuses cannot
        be made durable, so it must not be acknowledged (issue 15); counted and audited."""
        store = self.store
        if (
            store is not None
            and store.failed is not None
            and packet.qos
            and (packet.retain or any(store.is_persistent(s) for s, _ in self.index.route(topic)))
        ):
            self._dropped(session, "storage-failed")
            return True
        return False

    def publish5(self, session: Session, packet: mqtt.Publish, topic: str, now: float) -> int:
        """Route an MQTT 5 client's PUBLISH (``topic``: its name, or what its Topic Alias stands
        for). Returns the reason code for its PUBACK/PUBREC: 0 routed; 0x87 the policy refuses
        it (audited); 0x97 it cannot be stored now, or it matched receivers and every one of
        them dropped it (full queues; each drop is counted and audited per receiver: issue
        15). A 5.0 publisher is answered with the code instead of having its connection closed
        (QoS 0: dropped)."""
        if topic.startswith("$"):
            allowed = False
        else:
            allowed_or_none = session.publish_ok.get(topic)
            allowed = (
                _decide(session.publish_ok, session.grants, Action.PUBLISH, topic)
                if allowed_or_none is None
                else allowed_or_none
            )
        if not allowed:
            self.denied(str(session.authenticated.identity), session.client_id, "publish", topic)
            return mqtt.Reason.NOT_AUTHORIZED
        store = self.store
        if (
            store is not None
            and store.failed is not None
            and self._unstorable(session, packet, topic)
        ):
            return mqtt.Reason.QUOTA_EXCEEDED
        self.messages_in += 1
        props = packet.properties
        # A decoded property set holds only what was on the wire: a Topic Alias alone is the
        # connection's, not the message's (the alias benchmark's common case).
        if props is mqtt.NO_PROPERTIES or (
            len(props.__dict__) == 1 and props.topic_alias is not None
        ):
            message = Message(topic, topic.encode(), packet.payload, packet.qos, packet.retain)
        else:
            message = self.message(topic, packet.payload, packet.qos, packet.retain, props, now)
        if packet.retain:
            self.retain(message)  # kept as the topic's retained message: taken, whatever follows
        elif packet.qos:
            # Full queues are never silent (issue 15): matched, and none took it -> 0x97. No
            # 0x10 when nothing matched: whether others subscribe is not the publisher's to know.
            dropped = self.outbound_dropped + self.offline_dropped
            taken = self.messages_out + self.queued
            self.route(message, session)
            if (
                self.messages_out + self.queued == taken
                and self.outbound_dropped + self.offline_dropped != dropped
            ):
                self.quota_refused += 1
                return mqtt.Reason.QUOTA_EXCEEDED
            return 0
        self.route(message, session)
        return 0

    def retain(self, message: Message) -> None:
        if message.payload:
            self.retained.set(message.topic, message)
            if self.store is not None:
                self.store.retained_set(message)  # store
        else:
            self.retained.delete(message.topic)  # MQTT-3.3.1-10: an empty retained PUBLISH clears
            if self.store is not None:
                self.store.retained_cleared(message.topic)  # store

    def route(self, message: Message, publisher: Session | None) -> None:  # noqa: PLR0912, PLR0915 - the hot path, one function
        """Deliver to every subscriber the policy lets receive it; ``publisher`` may be held."""
        topic = message.topic
        qos0: bytes | None = None  # one encoding shared by every QoS 0 receiver
        # Every drop below is counted and audited per receiver (_dropped); an MQTT 5 publisher
        # whose message no receiver took is told 0x97 (publish5). 3.1.1 has no code for it.
        for session, granted in self.index.route(topic):
            allowed = session.receive_ok.get(topic)
            if allowed is None:
                allowed = _decide(session.receive_ok, session.grants, Action.RECEIVE, topic)
            if not allowed:
                self.metrics.inc("iotauth_broker_acl_denials_total", action="receive")
                continue
            v5 = session.v5
            if v5:
                # The subscriptions' options decide (3.8.3.1), ``granted`` included. They are
                # remembered per topic; when none changes the message (no identifiers, not
                # retained, no No Local to leave out), this receiver gets it as it is.
                summary = session.matching.get(topic)
                if (
                    summary is not None
                    and not message.retain
                    and (summary[4] or (not summary[2] and publisher is not session))
                ):
                    granted = summary[0]  # noqa: PLW2901
                    out = message
                else:
                    granted, out = self._options5(session, message, publisher)  # noqa: PLW2901
                if granted < 0:
                    continue  # No Local: none of its subscriptions takes its own message
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
                if not v5:
                    if qos0 is None:
                        qos0 = mqtt.encode_publish(message.topic_bytes, message.payload, 0, False)
                    link.send(qos0)
                    self.messages_out += 1
                else:
                    expired = self.expired  # _publish5 written out: this is the hot path
                    if link.publish5(out, 0, 0, False):
                        self.messages_out += 1
                    else:
                        self._not_published5(session, expired)
                if backlog > self._hold_bytes and publisher is not None:
                    self._hold(session, publisher)
            else:
                if v5:
                    self.enqueue(session, out, qos, retain=out.retain)
                else:  # a live delivery to 3.1.1 never has RETAIN set (MQTT-3.3.1-9)
                    self.enqueue(session, message, qos, retain=False)
                if publisher is not None and self._pressed(session, 2):
                    self._hold(session, publisher)
        if self.groups:
            for group, _ in self.shared_index.route(topic):
                self._route_shared(group, message, publisher)

    # -- shared subscriptions (MQTT 5, 4.8.2) -----------------------------------------------------

    def _route_shared(
        self,
        group: SharedGroup,
        message: Message,
        publisher: Session | None,
        leaving: Session | None = None,
    ) -> bool:
        """One member of ``group`` gets ``message``: the next connected one, in turn, that the
        policy lets receive the topic (a shared subscription is no way around RECEIVE)."""
        topic = message.topic
        members = group.members
        count = len(members)
        for step in range(count):
            session = members[(group.turn + step) % count]
            if session is leaving or session.link is None:
                continue
            allowed = session.receive_ok.get(topic)
            if allowed is None:
                allowed = _decide(session.receive_ok, session.grants, Action.RECEIVE, topic)
            if not allowed:
                self.metrics.inc("iotauth_broker_acl_denials_total", action="receive")
                continue
            group.turn = (group.turn + step + 1) % count
            self._deliver_shared(session, group.key, message, publisher)
            return True
        self.outbound_dropped += 1  # no member may take it now (QoS 0 or 1 alike)
        self._drop_line(group.key, "shared-no-member")
        return False

    def _deliver_shared(
        self, session: Session, key: str, message: Message, publisher: Session | None
    ) -> None:
        state = session.shared[key]
        retain = state.options.retain_as_published and message.retain
        ids = (state.identifier,) if state.identifier else ()
        out = dataclasses.replace(message, retain=retain, subscription_ids=ids, share=key)
        granted = session.subscriptions[key]
        qos = message.qos if message.qos < granted else granted
        if qos:
            self.enqueue(session, out, qos, retain=retain)
            if publisher is not None and self._pressed(session, 2):
                self._hold(session, publisher)
            return
        self._send_qos0(session, session.link, out, retain=False)

    def _send_qos0(
        self, session: Session, link: Link | None, message: Message, *, retain: bool
    ) -> None:
        """A QoS 0 delivery (route writes its own out: the hot path): dropped and counted when
        the link is gone or too far behind; ``retain`` is the 3.1.1 RETAIN flag, a level-5
        receiver gets ``message`` as it is."""
        if link is None or link.backlog() > self.limits.outbound_max_bytes:
            self.outbound_dropped += 1
            self._dropped(session, "slow-subscriber-qos0")
            return
        if not session.v5:
            link.send(mqtt.encode_publish(message.topic_bytes, message.payload, 0, retain))
        elif not self._publish5(session, link, message, 0, 0):
            return
        self.messages_out += 1

    def _hand_off(self, session: Session) -> None:
        """A member of shared subscriptions left: the messages it was sent through them and has
        not acknowledged (or not yet received) go to another member (4.8.2)."""
        for pid, (message, _qos, released) in list(session.inflight.items()):
            group = self.groups.get(message.share) if message.share else None
            if group is not None and not released:
                del session.inflight[pid]
                if self.store is not None:
                    self.store.completed(session, pid, message)  # store: another member has it
                self._route_shared(group, message, None, leaving=session)
        if any(message.share for message, _ in session.queue):
            kept: collections.deque[tuple[Message, int]] = collections.deque()
            for message, qos in session.queue:
                group = self.groups.get(message.share) if message.share else None
                if group is None:
                    kept.append((message, qos))
                else:
                    session.queued_bytes -= len(message.payload)
                    if self.store is not None:
                        self.store.unqueued(session, message)  # store: another member has it
                    self._route_shared(group, message, None, leaving=session)
            session.queue = kept

    def _share(
        self,
        session: Session,
        topic_filter: str,
        qos: int,
        options: mqtt.SubscriptionOptions,
        identifier: int,
    ) -> int:
        """SUBSCRIBE to ``$share/{group}/{filter}``; returns the SUBACK code. The policy judges
        ``{filter}`` alone: the share prefix neither widens nor narrows a grant."""
        group_name, sep, inner = topic_filter[len("$share/") :].partition("/")
        if not sep or not group_name or "+" in group_name or "#" in group_name:
            return 0x8F  # MQTT-4.8.2-1, -2: a share name, without wildcards, then a filter
        try:
            validate_filter(inner)
        except TopicError:
            return 0x8F
        if not session.grants.allows(Action.SUBSCRIBE, inner):
            identity = str(session.authenticated.identity)
            self.denied(identity, session.client_id, "subscribe", topic_filter)
            return 0x87
        group = self.groups.get(topic_filter)
        if group is None:
            group = self.groups[topic_filter] = SharedGroup(topic_filter, inner)
            self.shared_index.add(inner, group, 0)
        if session not in group.members:
            group.members.append(session)
        session.subscriptions[topic_filter] = qos
        state = session.shared[topic_filter] = SubscriptionState(options, identifier)
        if self.store is not None:
            self.store.subscribed(session, topic_filter, subscription_fields(qos, state))  # store
        return qos

    def _unshare(self, session: Session, topic_filter: str) -> None:
        session.shared.pop(topic_filter, None)
        group = self.groups.get(topic_filter)
        if group is None or session not in group.members:
            return
        group.members.remove(session)
        if not group.members:
            del self.groups[topic_filter]
            self.shared_index.remove(group.topic_filter, group)

    def _options5(
        self, session: Session, message: Message, publisher: Session | None
    ) -> tuple[int, Message]:
        """What an MQTT 5 subscriber's subscription options make of ``message`` (3.8.3.1): the
        QoS granted (-1: no subscription takes it, as No Local skips the publisher's own,
        MQTT-3.8.3-3), and the message as it gets it: the RETAIN flag kept by Retain As
        Published (MQTT-3.3.1-12, -13) and every matching Subscription Identifier
        (MQTT-3.3.4-3)."""
        granted, retain, ids = _matching_options(
            session, message.topic, message.retain, publisher is session
        )
        if granted >= 0 and (retain != message.retain or ids):
            message = dataclasses.replace(message, retain=retain, subscription_ids=ids)
        return granted, message

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
            and len(session.inflight) < session.inflight_max
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
        self.queued += 1
        if session.stored and self.store is not None:
            self.store.queued(session, message, qos)  # store

    def _send(
        self, session: Session, link: Link, message: Message, qos: int, *, queued: bool = False
    ) -> None:
        pid = session.packet_id()
        session.inflight[pid] = (message, qos, False)
        if session.stored and self.store is not None:
            self.store.sent(session, pid, message, qos, queued=queued)  # store
        if session.v5:
            if not self._publish5(session, link, message, qos, pid):
                # Expired, or more than the client's Maximum Packet Size: discarded as if
                # sent (MQTT-3.1.2-25).
                del session.inflight[pid]
                if self.store is not None:
                    self.store.completed(session, pid, message)  # store: never to be sent
                return
        else:
            link.send(
                mqtt.encode_publish(message.topic_bytes, message.payload, qos, message.retain, pid)
            )
        self.messages_out += 1

    def _publish5(self, session: Session, link: Link, message: Message, qos: int, pid: int) -> bool:
        """``link.publish5``; a message it does not send is a drop with its reason: expired on
        the way (3.3.2.3.3), or larger than the client's Maximum Packet Size (MQTT-3.1.2-25)."""
        expired = self.expired
        if link.publish5(message, qos, pid, False):
            return True
        self._not_published5(session, expired)
        return False

    def _not_published5(self, session: Session, expired: int) -> None:
        """A drop ``link.publish5`` refused, with its reason (``expired``: the count before)."""
        self.outbound_dropped += 1
        self._dropped(session, "expired" if self.expired != expired else "too-large-for-client")

    def _drain(self, session: Session) -> None:
        link = session.link
        queue = session.queue
        while (
            link is not None
            and queue
            and len(session.inflight) < session.inflight_max
            and link.backlog() <= self.limits.outbound_max_bytes
        ):
            message, qos = queue.popleft()
            session.queued_bytes -= len(message.payload)
            if message.expires_at is not None and message.expires_at <= self.now:
                self.expired += 1  # Message Expiry Interval passed while it waited (3.3.2.3.3)
                if self.store is not None:
                    self.store.unqueued(session, message)  # store
                continue
            # The receiver's grants are re-checked: it may be a resumed session.
            if session.grants.allows(Action.RECEIVE, message.topic):
                self._send(session, link, message, qos, queued=True)
            elif session.stored and self.store is not None:
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

    def acked(self, session: Session, kind: int, pid: int, code: int = 0) -> None:
        """PUBACK, PUBREC or PUBCOMP from the client for a message we sent (``code``: its MQTT 5
        reason code)."""
        entry = session.inflight.get(pid)
        if entry is None:
            return  # unknown or duplicate: nothing to do (MQTT allows late duplicates)
        message, qos, released = entry
        if kind == mqtt.PUBREC:
            if qos != 2:
                return
            if code >= 0x80:
                # 4.3.3: a PUBREC with a failure ends the exchange; no PUBREL follows.
                del session.inflight[pid]
                if self.store is not None:
                    self.store.completed(session, pid, message)  # store
                self.drained(session)
                return
            session.inflight[pid] = (message, qos, True)
            if self.store is not None:
                self.store.pubrec(session, pid)  # store: we owe PUBREL now
            if session.link is not None:
                # Through ack: with a store, PUBREL leaves once the PUBREC is on disk. Sent
                # before, a crash could bring the PUBLISH back (DUP) after the receiver had
                # released its packet id on our PUBREL: a second delivery of a QoS 2 message.
                self.ack(session.link, mqtt.pubrel(pid))
            return
        if (kind == mqtt.PUBACK and qos == 1) or (kind == mqtt.PUBCOMP and released):
            del session.inflight[pid]
            if session.stored and self.store is not None:
                self.store.completed(session, pid, message)  # store
            self.drained(session)

    # -- SUBSCRIBE / UNSUBSCRIBE ---------------------------------------------------------------

    def subscribe(self, session: Session, packet: mqtt.Subscribe) -> None:
        link = session.link
        v5 = session.v5
        session.matching.clear()
        # 3.1.1 has one failure code; MQTT 5 names why (table 3-8).
        invalid, denied = (0x8F, 0x87) if v5 else (mqtt.SUBACK_FAILURE, mqtt.SUBACK_FAILURE)
        codes: list[int] = []
        accepted: list[tuple[str, int, int, bool, int]] = []
        ids = packet.properties.subscription_identifiers
        identifier = ids[0] if ids else 0
        for index, (topic_filter, qos) in enumerate(packet.topics):
            if v5 and topic_filter.startswith("$share/"):
                # No retained messages for a shared subscription (3.3.1.3)
                codes.append(
                    self._share(session, topic_filter, qos, packet.options[index], identifier)
                )
                continue
            try:
                validate_filter(topic_filter)
            except TopicError:
                codes.append(invalid)
                continue
            if not session.grants.allows(Action.SUBSCRIBE, topic_filter):
                self.denied(
                    str(session.authenticated.identity),
                    session.client_id,
                    "subscribe",
                    topic_filter,
                )
                codes.append(denied)
                continue
            existed = topic_filter in session.subscriptions
            session.subscriptions[topic_filter] = qos
            self.index.add(topic_filter, session, qos)
            handling = 0
            state = None
            if v5:
                options = packet.options[index]
                state = session.options[topic_filter] = SubscriptionState(options, identifier)
                handling = options.retain_handling
            if self.store is not None:
                self.store.subscribed(session, topic_filter, subscription_fields(qos, state))
            accepted.append((topic_filter, qos, handling, existed, identifier))
            codes.append(qos)
        if link is not None:
            if v5:
                link.send(mqtt.suback5(packet.packet_id, codes))
            else:
                link.send(mqtt.suback(packet.packet_id, codes))
        self._send_retained(session, accepted)

    def _send_retained(
        self, session: Session, accepted: list[tuple[str, int, int, bool, int]]
    ) -> None:
        """Retained messages for these subscriptions only, after the SUBACK, within the grants;
        MQTT 5: Retain Handling 1 only for a new subscription, 2 never (MQTT-3.3.1-9, -10)."""
        link = session.link
        v5 = session.v5
        now = self.now
        for topic_filter, granted, handling, existed, ident in accepted:
            if handling == 2 or (handling == 1 and existed):
                continue
            for topic, message in list(self.retained.matching(topic_filter)):
                if _expired(message, now):
                    self.retained.delete(topic)  # 3.3.2.3.3: an expired retained message goes
                    continue
                if not session.grants.allows(Action.RECEIVE, topic):
                    continue
                qos = min(message.qos, granted)
                out = message
                if v5 and ident:
                    out = dataclasses.replace(message, subscription_ids=(ident,))
                if qos:
                    self.enqueue(session, out, qos, retain=True)
                    continue
                if link is not None:  # QoS 0 is not kept for offline sessions
                    self._send_qos0(
                        session,
                        link,
                        dataclasses.replace(out, retain=True) if v5 else out,
                        retain=True,
                    )

    def unsubscribe(self, session: Session, packet: mqtt.Unsubscribe) -> None:
        session.matching.clear()
        codes: list[int] = []
        for topic_filter in packet.topics:
            session.options.pop(topic_filter, None)
            if session.subscriptions.pop(topic_filter, None) is not None:
                if topic_filter in session.shared:
                    self._unshare(session, topic_filter)
                else:
                    self.index.remove(topic_filter, session)
                if self.store is not None:
                    self.store.unsubscribed(session, topic_filter)  # store
                codes.append(0x00)
            else:
                codes.append(0x11)  # No subscription existed (table 3-9)
        if session.link is not None:
            if session.v5:
                session.link.send(mqtt.unsuback5(packet.packet_id, codes))
            else:
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
        """Close ``client_id``'s connection (without its will). ``forget_session``: its
        credential was revoked (a service secret, an identity provider's service): its stored
        session goes too, and a will waiting for its delay is dropped, never published."""
        session = self.live.get(client_id)
        if session is not None:
            self.kick_session(session, reason)
        if forget_session:
            stored = self.sessions.get(client_id)
            if stored is not None:
                self.forget(stored, will=False)
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
            self.forget(session, will=False)
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
        self._drop_line(session.client_id, reason, str(session.authenticated.identity))

    def _drop_line(self, key: str, reason: str, identity: str | None = None) -> None:
        """The metric and the rate-limited audit line of a drop for ``key``: a client_id, or a
        shared subscription no member could take a message for (``$share/...``)."""
        self.metrics.inc("iotauth_broker_dropped_total", reason=reason)
        now = time.monotonic()
        last, count = self._drop_audit.get(key, (0.0, 0))
        count += 1
        if now - last < _DROP_AUDIT_EVERY:
            self._drop_audit[key] = (last, count)
            return
        if len(self._drop_audit) > 10_000:
            self._drop_audit.clear()
        self._drop_audit[key] = (now, 0)
        if identity is None:
            self.audit.emit("drop", subscription=key, reason=reason, count=count)
        else:
            self.audit.emit("drop", identity=identity, client_id=key, reason=reason, count=count)

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
        method: str | None = None,
    ) -> None:
        self.metrics.inc("iotauth_broker_refusals_total", reason=reason)
        self.audit.emit(
            "refuse",
            peer=peer,
            reason=reason,
            detail=detail,
            identity=identity,
            client_id=client_id,
            method=method,
            stage="mqtt",
        )
