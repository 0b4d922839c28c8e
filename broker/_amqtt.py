"""Everything that touches amqtt 0.12.1 internals, in one place (amqtt is pinned exactly).

Theory of operation. amqtt is used for what it does well: MQTT packet codecs, the per-connection
protocol handler, subscriptions, retained messages and the broadcast loop. Our
:class:`HardenedBroker` replaces the connection entry point and overrides the private methods
where amqtt 0.12.1 is unsafe for a fleet (research/amqtt.md). Each override names the behaviour
it replaces. The rules it enforces:

1. Identity before state. CONNECT is read, the :class:`~broker.auth.Authenticator` says who the
   peer is, client_id must equal that identity, and the will topic must pass the publish policy
   *before* the session table is touched (amqtt deletes or takes over sessions first).
2. One live connection per client_id. A second valid CONNECT closes the first one, waits for its
   teardown, then resumes or replaces the session (amqtt leaves a zombie or a deaf connection).
3. Every message obeys the policy: PUBLISH (denied ones are audited, never retained), SUBSCRIBE
   by containment, RECEIVE for live, retained *and* queued messages; retained messages are only
   sent for the session's own new subscription (amqtt sends them for every filter anybody holds).
4. Bounded: packet size, keep-alive and CONNECT deadline in :class:`GuardedReader`; inbound
   backpressure by not reading; per-session outbound and offline queues capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action as AmqttAction
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import ApplicationMessage, OutgoingApplicationMessage, Session

from broker._listener import ConnectionInfo
from broker.audit import AuditLog
from broker.auth import Authenticated, Authenticator, ConnectionFacts
from broker.errors import BrokerError, Refused, TopicError
from broker.metrics import Metrics
from broker.policy import Action, Grants, Policy
from broker.settings import BrokerSettings, Limits
from broker.topics import matches, validate_topic
from provisioning.errors import InvalidIdentityError
from provisioning.identity import validate_name

__all__ = ["GuardedReader", "HardenedBroker", "PacketTooLarge", "ProtocolViolation"]

log = logging.getLogger("iotauth.broker")

_AUTH = "iotauth.authenticated"  # Session.attributes key: the Authenticated of this session
_GRANTS = "iotauth.grants"  # Session.attributes key: the policy bound to that identity
_PUBLISH = 3  # MQTT control packet type
_ACTIONS = {
    AmqttAction.PUBLISH: Action.PUBLISH,
    AmqttAction.SUBSCRIBE: Action.SUBSCRIBE,
    AmqttAction.RECEIVE: Action.RECEIVE,
}


class ProtocolViolation(BrokerError):  # noqa: N818 - it names the event, like amqtt's errors
    """The peer broke a limit or the protocol; the connection is closed."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class PacketTooLarge(ProtocolViolation):
    pass


# -- the reader: framing-aware limits ------------------------------------------------------------


class GuardedReader(ReaderAdapter):  # type: ignore[misc]  # amqtt is untyped for mypy
    """A ReaderAdapter that follows MQTT framing as bytes pass through it.

    amqtt reads a packet as: 1 type byte, the remaining-length bytes one at a time, then the body.
    Tracking that here (without parsing anything else) lets us refuse an oversize packet as soon
    as its length is known, apply keep-alive only while waiting for the *next* packet, give a
    started packet ``packet_timeout`` per read, and stop reading while the broker is behind.
    amqtt 0.12.1 has none of this: ``handle_read_timeout`` is a no-op and lengths are unchecked.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        *,
        limits: Limits,
        deadline: float,
        on_violation: Callable[[ProtocolViolation], None],
    ) -> None:
        self._reader = reader
        self._limits = limits
        self._on_violation = on_violation
        self._idle_deadline: float | None = deadline  # until CONNECT: the connect deadline
        self._idle_window: float | None = None
        self.backlog: Callable[[], bool] | None = None
        # Framing state: "start" (next byte is a packet type), "length", "body".
        self._state = "start"
        self._length = 0
        self._multiplier = 1
        self._header = 0
        self._remaining = 0
        self._type = 0
        self._topic: bytearray | None = None

    def set_keepalive(self, window: float) -> None:
        """After CONNECT: no packet for ``window`` seconds closes the connection."""
        self._idle_window = window
        self._idle_deadline = asyncio.get_running_loop().time() + window

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    def _violation(self, exc: ProtocolViolation) -> ProtocolViolation:
        self._on_violation(exc)
        return exc

    async def read(self, n: int = -1) -> bytes:
        loop = asyncio.get_running_loop()
        if self._state == "start":
            while self.backlog is not None and self.backlog():
                await asyncio.sleep(0.005)  # not reading is the backpressure TCP understands
            timeout = None if self._idle_deadline is None else self._idle_deadline - loop.time()
            if timeout is not None and timeout <= 0:
                raise self._violation(ProtocolViolation("keepalive", "no packet in time"))
        else:
            timeout = self._limits.packet_timeout
        try:
            if n < 0:
                data = await asyncio.wait_for(self._reader.read(), timeout)
            else:
                data = await asyncio.wait_for(self._reader.readexactly(n), timeout)
        except TimeoutError:
            if self._state == "start":
                raise self._violation(ProtocolViolation("keepalive", "no packet in time")) from None
            raise self._violation(ProtocolViolation("packet-timeout", "packet stalled")) from None
        self._track(data)
        return data

    def _track(self, data: bytes) -> None:
        i = 0
        while i < len(data):
            if self._state == "start":
                self._state, self._length, self._multiplier, self._header = "length", 0, 1, 1
                self._type = data[i] >> 4
                self._topic = bytearray() if self._type == _PUBLISH else None
                i += 1
            elif self._state == "length":
                byte = data[i]
                i += 1
                self._header += 1
                self._length += (byte & 0x7F) * self._multiplier
                self._multiplier *= 128
                if byte & 0x80:
                    if self._header > 4:
                        raise self._violation(ProtocolViolation("malformed", "bad length"))
                    continue
                total = self._header + self._length
                if total > self._limits.max_packet_bytes:
                    raise self._violation(
                        PacketTooLarge(
                            "packet-too-large",
                            f"{total} bytes > {self._limits.max_packet_bytes}",
                        )
                    )
                self._remaining = self._length
                self._state = "body" if self._length else "start"
            else:
                take = min(self._remaining, len(data) - i)
                if self._topic is not None:
                    self._check_topic(data[i : i + take])
                self._remaining -= take
                i += take
                if self._remaining == 0:
                    self._state = "start"
            if self._state == "start" and self._idle_window is not None:
                self._idle_deadline = asyncio.get_running_loop().time() + self._idle_window

    def _check_topic(self, chunk: bytes) -> None:
        """Validate a PUBLISH topic name as it streams past.

        amqtt 0.12.1 raises MQTTError for a wildcard topic in the middle of decoding PUBLISH and
        its reader loop then carries on ("Message discarded") with the payload still unread: the
        stream is desynchronised and the session hangs. Refusing here closes the connection.
        """
        assert self._topic is not None  # noqa: S101 - only called while collecting
        self._topic += chunk
        if len(self._topic) < 2:
            return
        size = int.from_bytes(self._topic[:2], "big")
        if len(self._topic) < 2 + size:
            return
        raw = bytes(self._topic[2 : 2 + size])
        self._topic = None
        try:
            topic = validate_topic(raw.decode("utf-8"))
            if topic.startswith("$"):
                raise TopicError(topic, "clients cannot publish to '$' topics")
        except (UnicodeDecodeError, TopicError) as exc:
            reason = exc.reason if isinstance(exc, TopicError) else "not UTF-8"
            raise self._violation(ProtocolViolation("invalid-publish-topic", reason)) from None


# -- the handler: outbound cap -------------------------------------------------------------------


class HardenedHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt 0.12.1 starts one task per message per subscriber with no bound; a subscriber that
    stops reading grows the broker without limit. Here each session has a message and byte
    budget for writes in flight; beyond it new messages for that session are dropped."""

    limits: Limits = Limits()
    on_drop: Callable[[], None] = staticmethod(lambda: None)
    on_sent: Callable[[], None] = staticmethod(lambda: None)
    _out_messages = 0
    _out_bytes = 0

    async def mqtt_publish(
        self,
        topic: str,
        data: bytes | bytearray,
        qos: int | None,
        retain: bool,
        ack_timeout: int | None = None,
    ) -> OutgoingApplicationMessage:
        size = len(data)
        if (
            self._out_messages >= self.limits.outbound_max_messages
            or self._out_bytes + size > self.limits.outbound_max_bytes
        ):
            self.on_drop()
            return OutgoingApplicationMessage(None, topic, qos, data, retain)
        self._out_messages += 1
        self._out_bytes += size
        try:
            message: OutgoingApplicationMessage = await super().mqtt_publish(
                topic, data, qos, retain, ack_timeout
            )
            self.on_sent()
            return message
        finally:
            self._out_messages -= 1
            self._out_bytes -= size


# -- the broker ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Live:
    """One connection that completed CONNECT."""

    client_id: str
    authenticated: Authenticated
    info: ConnectionInfo
    session: Session
    done: asyncio.Event = field(default_factory=asyncio.Event)
    kick_reason: str | None = None


class HardenedBroker(Broker):  # type: ignore[misc]
    """amqtt's Broker with our connection path and the overrides listed in the module docstring."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        authenticator: Authenticator,
        audit: AuditLog,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.policy: Policy = settings.policy
        self.authenticator = authenticator
        self.audit = audit
        self.metrics = metrics
        self._live: dict[str, _Live] = {}
        self._id_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        config: dict[str, Any] = {
            # amqtt 0.12.1 skips a listener without 'bind' (broker.py:280), and an external
            # listener is one whose sockets we own; the value is never used.
            "listeners": {"default": {"type": "external", "bind": "external"}},
            # An explicit empty map: omitting it loads AnonymousAuthPlugin(allow_anonymous=True).
            "plugins": {},
            "session_expiry_interval": settings.session_expiry,
        }
        # A per-instance namespace: amqtt keeps plugin managers in a module-level dict by name.
        super().__init__(config, plugin_namespace=f"iotauth.broker.{id(self)}")
        metrics.gauge("iotauth_broker_connections", lambda: len(self._live))

    # -- our connection entry point (replaces _client_connected / _initialize_client_session /
    #    _handle_client_session, which change the session table before authenticating) ---------

    async def serve_connection(  # noqa: PLR0915 - the connection's whole life, in order
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: ConnectionInfo
    ) -> None:
        connected: list[_Live] = []

        def on_violation(exc: ProtocolViolation) -> None:
            # Before CONNECT the refusal is audited by the except clauses below.
            if connected:
                self._kick_record(connected[0], exc.reason, exc.detail)
            info.transport.abort()

        guarded = GuardedReader(
            reader,
            limits=self.settings.limits,
            deadline=info.connect_deadline,
            on_violation=on_violation,
        )
        adapter = StreamWriterAdapter(writer)
        loop = asyncio.get_running_loop()
        try:
            handler, incoming = await asyncio.wait_for(
                HardenedHandler.init_from_connect(guarded, adapter, self.plugins_manager),
                timeout=max(info.connect_deadline - loop.time(), 0),
            )
        except (TimeoutError, ProtocolViolation) as exc:
            reason = exc.reason if isinstance(exc, ProtocolViolation) else "connect-timeout"
            self._refusal(
                info,
                reason,
                "no valid CONNECT in time" if reason == "connect-timeout" else str(exc),
            )
            info.transport.abort()
            return
        except (AMQTTError, MQTTError, NoDataError, ValueError) as exc:
            # init_from_connect has already sent a CONNACK for bad protocol versions.
            self._refusal(info, "bad-connect", str(exc) or type(exc).__name__)
            info.transport.abort()
            return

        client_id = incoming.client_id or ""
        try:
            authenticated = await self._authenticate_connect(incoming, info)
        except Refused as refusal:
            self._refusal(info, refusal.reason, refusal.detail, refusal.identity, client_id)
            await self._send_refusal(adapter, info, refusal.connack)
            return

        grants = self.policy.for_identity(authenticated.identity)
        limits = self.settings.limits
        requested = incoming.keep_alive
        keepalive = min(requested, limits.max_keepalive) if requested > 0 else limits.max_keepalive
        guarded.set_keepalive(keepalive * limits.keepalive_factor)
        # amqtt's own keep-alive timer only calls a no-op; the GuardedReader enforces it.
        incoming.keep_alive = 0

        async with self._id_lock(client_id):
            await self._take_over(client_id)
            session = await self._resume_or_create(incoming, authenticated)
            session.attributes[_AUTH] = authenticated
            session.attributes[_GRANTS] = grants
            session.transitions.connect()
            handler.limits = limits
            handler.on_drop = self._on_outbound_drop
            handler.on_sent = self._on_sent
            handler.attach(session, guarded, adapter)
            self._sessions[client_id] = (session, handler)
            live = _Live(client_id, authenticated, info, session)
            self._live[client_id] = live
            connected.append(live)
        guarded.backlog = self._inbound_backlog(session)
        try:
            await handler.mqtt_connack_authorize(True)
            self.metrics.inc("iotauth_broker_connects_total")
            self.audit.emit(
                "connect",
                identity=str(authenticated.identity),
                client_id=client_id,
                peer=info.peer,
                credential=authenticated.credential,
                method=authenticated.method,
                clean_session=bool(incoming.clean_session),
                session_present=bool(session.parent),
                keepalive=keepalive,
                tls=info.tls.version() if info.tls else None,
            )
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_CONNECTED, client_id=client_id, client_session=session
            )
            await handler.start()
            await self._publish_session_retained_messages(session)
            # amqtt 0.12.1 now sends retained messages for *every* filter any client holds
            # (broker.py:601). Retained messages belong to SUBSCRIBE only; nothing is sent here.
            await self._client_message_loop(session, handler)
        finally:
            if self._sessions.get(client_id, (None, None))[1] is handler and (
                session.transitions.state == "connected"
            ):
                session.transitions.disconnect()  # the loop ended without amqtt's disconnect path
            if self._live.get(client_id) is live:
                del self._live[client_id]
            live.done.set()
            info.transport.abort()
            self.audit.emit(
                "disconnect",
                identity=str(authenticated.identity),
                client_id=client_id,
                peer=info.peer,
                reason=live.kick_reason,
            )

    async def _authenticate_connect(self, incoming: Session, info: ConnectionInfo) -> Authenticated:
        client_id = incoming.client_id or ""
        facts = ConnectionFacts(
            client_id=client_id,
            username=incoming.username,
            password=incoming.password,
            peer=info.peer,
            tls=info.tls,
        )
        authenticated = await self.authenticator.authenticate(facts)
        identity = authenticated.identity
        try:
            validate_name(client_id, what="client_id")
        except InvalidIdentityError as exc:
            raise Refused(
                "client-id-invalid", exc.reason, connack=IDENTIFIER_REJECTED, identity=str(identity)
            ) from None
        if client_id != identity.name:
            raise Refused(
                "client-id-mismatch",
                f"client_id {client_id!r} is not {identity.name!r}",
                connack=IDENTIFIER_REJECTED,
                identity=str(identity),
            )
        if incoming.will_flag:
            topic = incoming.will_topic or ""
            try:
                validate_topic(topic)
            except TopicError as exc:
                raise Refused("will-invalid", exc.reason, identity=str(identity)) from None
            decision = self.policy.decide(identity, Action.PUBLISH, topic)
            if topic.startswith("$") or not decision.allowed:
                self._denied(
                    identity_str=str(identity), client_id=client_id, action="will", topic=topic
                )
                raise Refused(
                    "will-denied", f"will topic {topic!r} is not allowed", identity=str(identity)
                )
        return authenticated

    async def _send_refusal(self, adapter: WriterAdapter, info: ConnectionInfo, code: int) -> None:
        connack = ConnackPacket.build(
            0, code if code in (IDENTIFIER_REJECTED, NOT_AUTHORIZED) else NOT_AUTHORIZED
        )
        with contextlib.suppress(OSError, TimeoutError, AMQTTError):
            await asyncio.wait_for(connack.to_stream(adapter), timeout=1)
        info.transport.close()  # flushes the CONNACK, then closes

    @contextlib.asynccontextmanager
    async def _id_lock(self, client_id: str) -> AsyncIterator[None]:
        lock, users = self._id_locks.get(client_id, (asyncio.Lock(), 0))
        self._id_locks[client_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._id_locks[client_id]
            if users <= 1:
                del self._id_locks[client_id]
            else:
                self._id_locks[client_id] = (lock, users - 1)

    async def _take_over(self, client_id: str) -> None:
        """MQTT-3.1.4-2: close the existing connection of this client_id and wait for its end.

        amqtt 0.12.1 either leaves the old connection running (clean session) or lets the old
        handler's disconnect path mark the *shared* session disconnected under the new one.
        Waiting for the old connection to finish its teardown first avoids both.
        """
        old = self._live.get(client_id)
        if old is None:
            return
        await self._close_live(old, "takeover")

    async def _close_live(self, live: _Live, reason: str) -> None:
        live.kick_reason = reason
        live.session.will_flag = False  # a kick is not the device failing: no will
        live.info.transport.abort()
        try:
            await asyncio.wait_for(live.done.wait(), timeout=5)
        except TimeoutError:
            log.warning("connection %s did not finish after abort", live.client_id)

    async def _resume_or_create(self, incoming: Session, authenticated: Authenticated) -> Session:
        client_id = incoming.client_id
        existing = self._sessions.get(client_id)
        if existing is not None:
            previous: Authenticated | None = existing[0].attributes.get(_AUTH)
            if incoming.clean_session or (
                previous is None or previous.identity != authenticated.identity
            ):
                await self._delete_session(client_id)
                existing = None
        if existing is None:
            incoming.parent = 0
            return incoming
        session: Session = existing[0]
        # amqtt 0.12.1 copies will/keep-alive/credentials into a resumed session but not the TLS
        # object or the address (amqtt#389): the session would keep the previous peer's.
        for name in (
            "will_flag",
            "will_message",
            "will_topic",
            "will_qos",
            "will_retain",
            "keep_alive",
            "username",
            "password",
            "ssl_object",
            "remote_address",
            "remote_port",
        ):
            setattr(session, name, getattr(incoming, name))
        session.parent = 1
        return session

    def _inbound_backlog(self, session: Session) -> Callable[[], bool]:
        cap = self.settings.limits.inbound_max_messages
        queue = self._broadcast_queue

        def behind() -> bool:
            return bool(session.delivered_message_queue.qsize() >= cap or queue.qsize() >= cap)

        return behind

    def _on_outbound_drop(self) -> None:
        self.metrics.inc("iotauth_broker_outbound_dropped_total")

    def _on_sent(self) -> None:
        self.metrics.inc("iotauth_broker_messages_out_total")

    def _refusal(
        self,
        info: ConnectionInfo,
        reason: str,
        detail: str,
        identity: str | None = None,
        client_id: str | None = None,
    ) -> None:
        self.metrics.inc("iotauth_broker_refusals_total", reason=reason)
        self.audit.emit(
            "refuse",
            peer=info.peer,
            reason=reason,
            detail=detail,
            identity=identity,
            client_id=client_id,
            stage="mqtt",
        )

    def _denied(self, *, identity_str: str, client_id: str, action: str, topic: str) -> None:
        self.metrics.inc("iotauth_broker_acl_denials_total", action=action)
        self.audit.emit(
            "deny", identity=identity_str, client_id=client_id, action=action, topic=topic
        )

    # -- kicking ---------------------------------------------------------------------------------

    async def kick(self, client_id: str, reason: str, *, forget_session: bool = False) -> bool:
        """Close the live connection of ``client_id`` (no will is sent); True if there was one."""
        live = self._live.get(client_id)
        if live is not None:
            self._kick_record(live, reason)
            await self._close_live(live, reason)
        if forget_session and client_id in self._sessions:
            await self._cleanup_session(client_id)
        return live is not None

    async def kick_revoked(self, revoked: frozenset[int]) -> int:
        """Close every session whose certificate serial is in ``revoked``; forget its state."""
        victims = [
            live.client_id
            for live in list(self._live.values())
            if int(live.authenticated.credential, 16) in revoked
            and live.authenticated.method == "mtls"
        ]
        await asyncio.gather(*(self.kick(c, "revoked", forget_session=True) for c in victims))
        # Offline persistent sessions of revoked credentials hold queued messages: drop them too.
        for client_id, (session, _) in list(self._sessions.items()):
            auth: Authenticated | None = session.attributes.get(_AUTH)
            if auth is not None and auth.method == "mtls" and int(auth.credential, 16) in revoked:
                await self._cleanup_session(client_id)
        return len(victims)

    async def kick_expired(self, now_ts: float) -> None:
        for live in list(self._live.values()):
            not_after = live.authenticated.not_after
            if not_after is not None and not_after.timestamp() <= now_ts:
                await self.kick(live.client_id, "expired")

    async def abort_all(self) -> None:
        """Before amqtt's shutdown: its handler.stop() drains writers, which can hang on a peer
        that does not read."""
        for live in list(self._live.values()):
            live.session.will_flag = False
            live.info.transport.abort()
        if self._live:
            await asyncio.wait(
                [asyncio.create_task(live.done.wait()) for live in self._live.values()], timeout=5
            )

    # -- amqtt overrides -------------------------------------------------------------------------

    def _matches(self, topic: str, a_filter: str) -> bool:
        # One definition of MQTT matching for routing and for the ACL (broker.topics).
        return matches(a_filter, topic)

    async def _topic_filtering(self, session: Session, topic: str, action: AmqttAction) -> bool:
        # Replaces the plugin fan-out: without plugins amqtt 0.12.1 allows everything, and a
        # plugin returning None counts as deny anyway. Deny when no identity is bound.
        grants: Grants | None = session.attributes.get(_GRANTS)
        ours = _ACTIONS[action]
        if grants is not None and grants.allows(ours, topic):
            return True
        if ours is Action.SUBSCRIBE:
            auth: Authenticated | None = session.attributes.get(_AUTH)
            self._denied(
                identity_str=str(auth.identity) if auth else "?",
                client_id=session.client_id or "",
                action="subscribe",
                topic=topic,
            )
        else:
            self.metrics.inc("iotauth_broker_acl_denials_total", action=ours.value)
        return False

    async def _handle_message_delivery(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        wait_deliver: asyncio.Future[Any],
    ) -> bool:
        # amqtt 0.12.1 returns False for a '$', wildcard or empty topic, which ends the message
        # loop but leaves the socket open: a half-dead session (broker.py:762-776). We close it.
        app_message: ApplicationMessage | None = wait_deliver.result()
        if app_message is None:
            return True
        topic = app_message.topic
        auth: Authenticated = client_session.attributes[_AUTH]
        client_id = client_session.client_id or ""
        try:
            validate_topic(topic)
            if topic.startswith("$"):
                raise TopicError(topic, "clients cannot publish to '$' topics")
        except TopicError as exc:
            self._denied(
                identity_str=str(auth.identity), client_id=client_id, action="publish", topic=topic
            )
            await self._violation(client_id, "invalid-publish-topic", exc.reason)
            return True
        grants: Grants = client_session.attributes[_GRANTS]
        if not grants.allows(Action.PUBLISH, topic):
            self._denied(
                identity_str=str(auth.identity), client_id=client_id, action="publish", topic=topic
            )
            if self.settings.denied_publish == "disconnect":
                await self._violation(client_id, "publish-denied", f"publish to {topic!r} denied")
            return True
        self.metrics.inc("iotauth_broker_messages_in_total")
        await self._broadcast_message(client_session, topic, app_message.data)
        if app_message.publish_packet is not None and app_message.publish_packet.retain_flag:
            await self.retain_message(client_session, topic, app_message.data, app_message.qos)
        return True

    def _kick_record(self, live: _Live, reason: str, detail: str | None = None) -> None:
        live.kick_reason = reason
        self.metrics.inc("iotauth_broker_kicks_total", reason=reason)
        self.audit.emit(
            "kick",
            identity=str(live.authenticated.identity),
            client_id=live.client_id,
            peer=live.info.peer,
            reason=reason,
            detail=detail,
            credential=live.authenticated.credential,
        )

    async def _violation(self, client_id: str, reason: str, detail: str) -> None:
        live = self._live.get(client_id)
        if live is None:
            return
        self._kick_record(live, reason, detail)
        # Not _close_live: we are running inside this connection's own message loop, which must
        # return to see the disconnect. Abort and let amqtt's disconnect path run (will included:
        # a protocol violation is an abnormal end, MQTT-3.1.2-8).
        live.info.transport.abort()

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # amqtt 0.12.1 sends retained messages with no RECEIVE check (broker.py:1134) and is
        # also called at CONNECT for filters other clients hold. Only the session's own,
        # accepted filter, and only topics the policy lets it receive.
        topic_filter, qos = subscription
        holders = self._subscriptions.get(topic_filter, [])
        if not any(s.client_id == session.client_id for s, _ in holders):
            return
        handler = self._get_handler(session)
        grants: Grants | None = session.attributes.get(_GRANTS)
        if handler is None or grants is None:
            return
        tasks = [
            asyncio.ensure_future(
                handler.mqtt_publish(
                    retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                )
            )
            for topic, retained in list(self._retained_messages.items())
            if matches(topic_filter, topic) and grants.allows(Action.RECEIVE, topic)
        ]
        if tasks:
            await asyncio.wait(tasks)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        # Messages queued while a persistent session was offline. amqtt 0.12.1 sends them with
        # retain=1 and without re-checking the policy; the receiver's grants may have changed.
        handler = self._get_handler(session)
        grants: Grants | None = session.attributes.get(_GRANTS)
        if handler is None or grants is None:
            return
        tasks = []
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            if grants.allows(Action.RECEIVE, queued.topic):
                tasks.append(
                    asyncio.ensure_future(
                        handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False)
                    )
                )
        if tasks:
            await asyncio.wait(tasks)

    async def _retain_broadcast_message(
        self, broadcast: dict[str, Any], qos: int, target_session: Session
    ) -> None:
        # amqtt 0.12.1 queues for offline sessions without a bound.
        if target_session.retained_messages.qsize() >= self.settings.limits.offline_queue_max:
            self.metrics.inc("iotauth_broker_offline_dropped_total")
            return
        await super()._retain_broadcast_message(broadcast, qos, target_session)
