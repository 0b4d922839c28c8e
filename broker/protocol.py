"""The MQTT protocol of one client connection, sans-IO: bytes and time in, events and bytes out.

:class:`ClientProtocol` makes every protocol decision of a connection: what may arrive in which
state (the lifecycle below, one table), the CONNECT checks that come before the authenticator,
the keep-alive it grants, the acknowledgement of a client's QoS 1/2 PUBLISH and the QoS 2
de-duplication, PINGRESP, DISCONNECT, the deadlines (connect, keep-alive, stalled packet,
backpressure) and the slow-reader limit. It never reads a clock (every input carries ``now``),
never touches a socket, TLS or asyncio. ``broker.connection.MQTTConnection`` only moves bytes
between the socket, the TLS memory BIOs and this object, and runs the authenticator.

Inputs are method calls: :meth:`~ClientProtocol.handshake_done`,
:meth:`~ClientProtocol.receive_data` (decrypted bytes), :meth:`~ClientProtocol.authenticated`
or :meth:`~ClientProtocol.refused` (the authenticator's answer), :meth:`~ClientProtocol.tick`
(deadlines), :meth:`~ClientProtocol.connection_lost` (TCP closed or TLS close_notify). Outputs are
bytes (:meth:`~ClientProtocol.data_to_send`), the events :meth:`~ClientProtocol.receive_data`
returns (:class:`Authenticate`, :class:`AuthContinue`), and a few requests through
:class:`Wire`. Those are callbacks, not return values, because the core writes into *any*
connection while it serves another one (a delivery, a takeover, a revocation kick): the wire
must be told there is something to send or to close.

The same object is the :class:`broker.core.Link` the core writes to, so a session's deliveries,
acknowledgements and kicks all pass through the one place that knows the connection's protocol.

MQTT 5.0 beside 3.1.1: the CONNECT's protocol level is kept per connection (``version``,
``v5``) and a level-5 connection is served by its own dispatch (``_dispatch5``): reason codes
on every acknowledgement (a PUBLISH or SUBSCRIBE outside the grants is answered with 0x87, not
dropped or closed), Topic Aliases resolved before the policy is asked, our Receive Maximum,
and ``publish5``, the core's delivery to a 5.0 client (remaining Message Expiry, Subscription
Identifiers, our Topic Aliases, its Maximum Packet Size). What CONNECT settled lives in
:class:`Negotiated`. Every server-side close passes one reason token through
:meth:`ClientProtocol.close`, which sends a 5.0 client DISCONNECT with the code
:data:`DISCONNECT_REASONS` names. Extended authentication (4.12) is more events of the same kind
as the first: :class:`AuthContinue` after each client AUTH (``State.CHALLENGE`` while ours is
outstanding), answered by :meth:`ClientProtocol.challenge`, :meth:`~ClientProtocol.authenticated`
or :meth:`~ClientProtocol.reauthenticated`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from broker import mqtt
from broker.auth import Authenticated
from broker.errors import BrokerError, Refused, TopicError
from broker.topics import validate_topic

if TYPE_CHECKING:
    from broker.core import BrokerCore, Message, Session

__all__ = [
    "TRANSITIONS",
    "AuthContinue",
    "Authenticate",
    "ClientProtocol",
    "Event",
    "LifecycleError",
    "Negotiated",
    "State",
    "Wire",
]


class State(enum.Enum):
    """Where a connection is in its life."""

    HANDSHAKE = "handshake"  # TCP accepted, TLS handshake running
    WAIT_CONNECT = "wait-connect"  # TLS up, no CONNECT yet (only CONNECT may come)
    AUTH = "auth"  # CONNECT read, the authenticator is deciding; later packets wait
    CHALLENGE = "challenge"  # MQTT 5: AUTH 0x18 sent, the client's AUTH is awaited (4.12)
    LIVE = "live"  # CONNACK 0 sent, the session is attached to the core
    CLOSED = "closed"  # nothing comes in or goes out any more


TRANSITIONS: dict[State, frozenset[State]] = {
    State.HANDSHAKE: frozenset({State.WAIT_CONNECT, State.CLOSED}),
    State.WAIT_CONNECT: frozenset({State.AUTH, State.CLOSED}),
    State.AUTH: frozenset({State.LIVE, State.CHALLENGE, State.CLOSED}),
    State.CHALLENGE: frozenset({State.AUTH, State.CLOSED}),
    State.LIVE: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}
"""The lifecycle, the one table: every state change goes through :meth:`ClientProtocol._go`."""


# Module-level names for the hot path: a global lookup costs a tenth of ``State.LIVE`` (an
# attribute of the Enum class) on Python 3.11, and the state is checked several times per packet.
_HANDSHAKE, _WAIT_CONNECT, _AUTH, _CHALLENGE, _LIVE, _CLOSED = (
    State.HANDSHAKE,
    State.WAIT_CONNECT,
    State.AUTH,
    State.CHALLENGE,
    State.LIVE,
    State.CLOSED,
)


# Hot-path names (module globals, not attribute lookups per packet).
_Publish = mqtt.Publish
_encode_publish5 = mqtt.encode_publish5


class LifecycleError(BrokerError):
    """A state change the lifecycle table does not allow: a bug in the broker, never input."""


class Wire(Protocol):
    """What the protocol asks of its transport (``MQTTConnection`` implements it)."""

    def wake(self) -> None:
        """Bytes wait in ``data_to_send()``: fetch them before this event-loop turn ends."""

    def buffered(self) -> int:
        """Bytes handed to the socket and not yet sent."""

    def pause_reading(self) -> None:
        """Stop reading the peer (authentication running, or backpressure)."""

    def resume_reading(self) -> None:
        """Read the peer again."""

    def unhold_soon(self) -> None:
        """Call :meth:`ClientProtocol.unhold` soon (not now: the core is mid-acknowledgement)."""

    def end(self, *, flush: bool) -> None:
        """Close the connection: after ``data_to_send()`` is sent if ``flush`` (a refusal's
        CONNACK), else dropping it; with a TLS close_notify once the handshake is done."""


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Event: a CONNECT passed the protocol checks. Ask the ``Authenticator``, then answer
    :meth:`ClientProtocol.authenticated` or :meth:`ClientProtocol.refused`."""

    connect: mqtt.Connect


@dataclass(frozen=True, slots=True)
class AuthContinue:
    """Event (MQTT 5, 4.12): the client's next Authentication Data in an extended
    authentication; ``reauth``: a LIVE client asked to re-authenticate (AUTH 0x19), so a new
    exchange for ``method`` begins. Run the exchange's step, then answer
    :meth:`ClientProtocol.challenge`, :meth:`ClientProtocol.authenticated` (or
    :meth:`ClientProtocol.reauthenticated`) or :meth:`ClientProtocol.refused`."""

    method: str
    data: bytes | None
    reauth: bool = False


Event = Authenticate | AuthContinue
"""What :meth:`ClientProtocol.receive_data` can return."""


@dataclass(slots=True)
class Negotiated:
    """What CONNECT settled for this connection."""

    keepalive: int = 0
    keepalive_window: float = 0.0  # seconds without a packet before the connection is closed
    # MQTT 5. The client's limits on what we send: Maximum Packet Size (3.1.2.11.4) and Topic
    # Alias Maximum (3.1.2.11.5); ours on what it sends: Topic Alias Maximum, Receive Maximum.
    max_packet_out: int = 268_435_460  # the largest packet MQTT can frame
    alias_max_out: int = 0
    alias_max_in: int = 0
    receive_max_in: int = 0
    # Request Problem Information (3.1.2.11.7): reason strings and user properties beyond
    # CONNACK and DISCONNECT only when 1 (MQTT-3.1.2-29).
    problem_info: bool = True


# MQTT 5: the DISCONNECT reason code a server-side close sends, by its audit token. Absent: no
# DISCONNECT (the peer cannot take it: a slow reader; or nothing MQTT happened yet).
DISCONNECT_REASONS: dict[str, int] = {
    "takeover": mqtt.Reason.SESSION_TAKEN_OVER,  # 0x8E, MQTT-3.1.4-3
    "keepalive": mqtt.Reason.KEEP_ALIVE_TIMEOUT,  # 0x8D, MQTT-3.1.2-22
    "packet-timeout": mqtt.Reason.KEEP_ALIVE_TIMEOUT,  # a packet stalled past its deadline
    # The credential that authorized the session no longer does: a device should renew, so the
    # code names authorization (0x87), not an operator's act (0x98, kept for `broker kick`).
    "revoked": mqtt.Reason.NOT_AUTHORIZED,
    "secret-revoked": mqtt.Reason.NOT_AUTHORIZED,  # a service secret rotated or revoked
    "expired": mqtt.Reason.NOT_AUTHORIZED,
    "operator": mqtt.Reason.ADMINISTRATIVE_ACTION,  # 0x98
    "shutdown": mqtt.Reason.SERVER_SHUTTING_DOWN,  # 0x8B
    "malformed": mqtt.Reason.MALFORMED_PACKET,  # 0x81
    "protocol-error": mqtt.Reason.PROTOCOL_ERROR,  # 0x82
    "bad-connect": mqtt.Reason.PROTOCOL_ERROR,
    "invalid-publish-topic": mqtt.Reason.TOPIC_NAME_INVALID,  # 0x90
    "packet-too-large": mqtt.Reason.PACKET_TOO_LARGE,  # 0x95
    "quota": mqtt.Reason.QUOTA_EXCEEDED,  # 0x97
    "receive-maximum": mqtt.Reason.RECEIVE_MAXIMUM_EXCEEDED,  # 0x93
    "topic-alias-invalid": mqtt.Reason.TOPIC_ALIAS_INVALID,  # 0x94
    "reauth-failed": mqtt.Reason.NOT_AUTHORIZED,
}

# MQTT 5 CONNACK code for a refusal: the 3.1.1 return code an authenticator gives
# (``Refused.connack``) mapped to its 5.0 reason (table 3-1), and a few refusals by token.
CONNACK_REASONS: dict[int, int] = {
    mqtt.CONNACK_IDENTIFIER_REJECTED: mqtt.Reason.CLIENT_IDENTIFIER_NOT_VALID,  # 2 -> 0x85
    mqtt.CONNACK_BAD_CREDENTIALS: mqtt.Reason.BAD_USER_NAME_OR_PASSWORD,  # 4 -> 0x86
    mqtt.CONNACK_NOT_AUTHORIZED: mqtt.Reason.NOT_AUTHORIZED,  # 5 -> 0x87
}
REFUSAL_REASONS: dict[str, int] = {
    "method-not-allowed": mqtt.Reason.BAD_AUTHENTICATION_METHOD,  # 0x8C
    "bad-auth-method": mqtt.Reason.BAD_AUTHENTICATION_METHOD,
}


class ClientProtocol:
    """One client connection's MQTT protocol; also the core's ``Link`` to that client."""

    __slots__ = (
        "_aliases_in",
        "_aliases_out",
        "_auth_method",
        "_buffered",
        "_close_code",
        "_event",
        "_held",
        "_now",
        "_out",
        "_out_bytes",
        "_wire",
        "_woken",
        "clean_disconnect",
        "core",
        "deadline",
        "held_since",
        "holds",
        "kick_reason",
        "last_packet",
        "negotiated",
        "partial_since",
        "peer",
        "reader",
        "session",
        "state",
        "tls_version",
        "v5",
        "version",
    )

    def __init__(self, core: BrokerCore, wire: Wire, peer: str, now: float) -> None:
        self.core = core
        self._wire = wire
        # Wire.buffered, or the transport's own function once the wire hands it over
        # (buffer_size_from): asked per delivery, so one Python call less counts.
        self._buffered: Callable[[], int] = wire.buffered
        self.peer = peer
        self.state = _HANDSHAKE
        self.tls_version: str | None = None
        self.version = 0  # the CONNECT's protocol level once read
        self.v5 = False  # level 5: every packet after CONNECT is read and written as MQTT 5.0
        self._aliases_in: dict[int, str] = {}  # Topic Alias -> topic, set by the client
        self._aliases_out: dict[str, int] = {}  # topic -> Topic Alias, set by us
        self._close_code: int | None = None  # MQTT 5: the code of a violation being closed
        self._auth_method: str | None = None  # MQTT 5: the CONNECT's Authentication Method
        self._event: Event | None = None  # an event a LIVE packet raised (re-authentication)
        self.reader = mqtt.PacketReader(core.limits.max_packet_bytes)
        self.session: Session | None = None
        self.negotiated = Negotiated()
        self.deadline = now + core.limits.connect_timeout  # accept -> TLS -> CONNECT
        self.last_packet = 0.0
        self.partial_since = 0.0
        self.kick_reason: str | None = None
        self.clean_disconnect = False
        self.holds: set[Session] = set()
        self.held_since = 0.0
        self._now = now  # the time of the latest input, for what the core asks in between
        self._held: list[mqtt.Packet] = []
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._woken = False

    def _go(self, state: State) -> None:
        if state not in TRANSITIONS[self.state]:
            msg = f"connection {self.peer}: {self.state.value} -> {state.value} is not allowed"
            raise LifecycleError(msg)
        self.state = state

    def buffer_size_from(self, size: Callable[[], int]) -> None:
        """Ask ``size`` instead of :meth:`Wire.buffered` from now on (the same answer, e.g. the
        transport's ``get_write_buffer_size``, without the wire's call in between)."""
        self._buffered = size

    # -- output ----------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is _CLOSED

    @property
    def pending(self) -> bool:
        """Bytes wait in :meth:`data_to_send`."""
        return bool(self._out)

    def data_to_send(self) -> bytes:
        """What is queued for the peer, in order; empties the queue."""
        self._woken = False
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_bytes = 0
        return data

    def sent(self) -> None:
        """The transport took ``data_to_send()``; its own buffer may have grown."""
        if self._buffered() > 2 * self.core.limits.outbound_max_bytes:
            # Deliveries stop at outbound_max_bytes; only our answers to the peer's own packets
            # (PUBACK, PINGRESP ...) grow it further: a peer that sends and never reads.
            self.violation("slow-reader", "the client does not read what the broker sends")

    # -- the Link the core writes to -------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.state is _CLOSED:
            return
        self._out.append(data)
        self._out_bytes += len(data)
        if not self._woken:
            self._woken = True
            self._wire.wake()

    def backlog(self) -> int:
        return self._out_bytes + self._buffered()

    def hold(self, receiver: Session) -> None:
        if not self.holds:
            self.held_since = self._now
            self._wire.pause_reading()
        self.holds.add(receiver)

    def release(self, receiver: Session) -> None:
        self.holds.discard(receiver)
        if not self.holds and self.state is _LIVE:
            self._wire.unhold_soon()

    def close(self, *, will: bool, reason: str | None = None) -> None:
        """End the connection now; its session is detached, with the will if ``will``.
        ``reason`` is audited (MQTT 5: the DISCONNECT reason code is chosen from it here)."""
        if self.state is _CLOSED:
            return
        for receiver in self.holds:
            receiver.waiters.discard(self)
        self.holds.clear()
        if reason is not None:
            self.kick_reason = reason
        was_live = self.state is _LIVE
        self._go(_CLOSED)
        self._out.clear()
        self._out_bytes = 0
        code = self._close_code
        if code is None and reason is not None:
            code = DISCONNECT_REASONS.get(reason)
        if code is not None and was_live and self.v5 and not self._buffered():
            # MQTT 5 says why (MQTT-3.14.2-1); only to a peer that reads, so a close is never
            # held up by it.
            if code not in mqtt.REASON_CODES[mqtt.DISCONNECT]:
                code = mqtt.Reason.UNSPECIFIED_ERROR
            props = self._reason_props(self.kick_reason or "", always=True)
            self._out.append(mqtt.disconnect5(code, props))
            self._wire.end(flush=True)
        else:
            self._wire.end(flush=False)
        session = self.session
        if was_live and session is not None:
            core = self.core
            core.detach(session, self, will=will)
            core.audit.emit(
                "disconnect",
                identity=str(session.authenticated.identity),
                client_id=session.client_id,
                peer=self.peer,
                reason=self.kick_reason,
            )

    # -- inputs from the transport ---------------------------------------------------------------

    def handshake_done(self, tls_version: str | None) -> None:
        self._go(_WAIT_CONNECT)
        self.tls_version = tls_version

    def handshake_failed(self) -> None:
        """The TLS handshake failed (the transport audits why and sends the alert)."""
        self._go(_CLOSED)

    def handshake_expired(self, now: float) -> bool:
        return self.state is _HANDSHAKE and now >= self.deadline

    def drop(self) -> None:
        """Closed by the listener before any MQTT (connection cap, oldest handshake)."""
        if self.state is not _CLOSED:
            self._go(_CLOSED)
            self._wire.end(flush=False)

    def connection_lost(self) -> None:
        """The peer went away: TCP closed, or TLS close_notify (answered by ``Wire.end``). Like
        any end without DISCONNECT, the will is published (MQTT-3.1.2-8)."""
        if self.state is _LIVE:
            self.close(will=not self.clean_disconnect)
        elif self.state is not _CLOSED:
            self._go(_CLOSED)
            self._wire.end(flush=False)

    def receive_data(self, data: bytes, now: float) -> Event | None:
        """Decrypted bytes from the peer; returns :class:`Authenticate` when they complete a
        valid CONNECT."""
        self._now = self.core.now = now
        try:
            packets = self.reader.feed(data)
        except mqtt.ProtocolViolation as exc:
            # The packets before the broken one count: how TCP split the stream must not decide.
            event = self._handle(exc.packets)
            self.violation(exc.reason, exc.detail, exc.code)
            return event
        if packets:
            self.last_packet = now
        if self.reader.partial:
            if not self.partial_since:
                self.partial_since = now
        else:
            self.partial_since = 0.0
        return self._handle(packets)

    def drained(self) -> None:
        """The socket buffer emptied below its low-water mark: room for the session's queue."""
        if self.session is not None and self.state is _LIVE:
            self.core.drained(self.session)

    def unhold(self, now: float) -> None:
        """Nothing holds this publisher any more: the packets that waited, then read again."""
        self._now = self.core.now = now
        if self.state is not _LIVE or self.holds:
            return
        held, self._held = self._held, []
        for index, packet in enumerate(held):
            if self.v5:
                self._dispatch5(packet)
            else:
                self._dispatch(packet)
            if self.state is not _LIVE:
                return
            if self.holds:  # held again: keep the rest, in order
                self._held = held[index + 1 :] + self._held
                return
        # Keep-alive counts from here: the peer's packets waited in the socket, unread.
        self.last_packet = now
        self._wire.resume_reading()

    def tick(self, now: float) -> None:
        """Apply the deadlines (the listener calls this a few times a second)."""
        self._now = now
        state = self.state
        if state is _WAIT_CONNECT or state is _AUTH or state is _CHALLENGE:
            if now >= self.deadline:
                self.violation("connect-timeout", "no valid CONNECT in time")
        elif state is _LIVE:
            if self.holds:
                # Not read on purpose (backpressure): keep-alive cannot be judged.
                if now - self.held_since > self.core.limits.backpressure_timeout:
                    self.core.give_up(self)
            elif now - self.last_packet > self.negotiated.keepalive_window:
                self.violation("keepalive", "no packet in time")
            elif self.partial_since and now - self.partial_since > self.core.limits.packet_timeout:
                self.violation("packet-timeout", "packet stalled")

    def violation(self, reason: str, detail: str, code: int | None = None) -> None:
        """The peer broke the protocol or a limit: audited, closed, will published
        (an abnormal end, MQTT-3.1.2-8). An MQTT 5 peer is told ``code`` (or the reason's):
        in a DISCONNECT once live, in a CONNACK while its CONNECT is read (MQTT-3.2.2-7)."""
        if self.state is _CLOSED:
            return
        if self.state is _LIVE and self.session is not None:
            self.core.kick_record(self.session, reason, detail)
            self._close_code = code
            self.close(will=True, reason=reason)
        elif (self.state is _WAIT_CONNECT or self.state is _CHALLENGE) and self.reader.level == 5:
            connack = code if code is not None else DISCONNECT_REASONS.get(reason)
            if connack not in mqtt.REASON_CODES[mqtt.CONNACK]:
                connack = mqtt.Reason.UNSPECIFIED_ERROR
            self.v5 = True
            self._refuse(reason, detail, connack)
        else:
            self.core.refused(self.peer, reason, detail)
            self.close(will=False)

    def _reason_props(self, reason: str, *, always: bool = False) -> mqtt.Properties:
        """A Reason String, where Request Problem Information allows it (MQTT-3.1.2-29):
        always on CONNACK and DISCONNECT, elsewhere only if the client asked (the default)."""
        if always or self.negotiated.problem_info:
            return mqtt.Properties(reason_string=reason)
        return mqtt.NO_PROPERTIES

    # -- packets ---------------------------------------------------------------------------------

    def _handle(self, packets: list[mqtt.Packet]) -> Event | None:
        event: Event | None = None
        for packet in packets:
            state = self.state
            if state is _LIVE and not self.holds:
                if not self.v5:
                    self._dispatch(packet)
                elif type(packet) is _Publish:
                    self._publish5(packet)  # level 5's hot path, not through _dispatch5
                else:
                    self._dispatch5(packet)
            elif state is _LIVE or state is _AUTH:
                # Held (backpressure) or not yet authenticated: kept in order, bounded by what
                # one socket read delivered, since the transport stops reading meanwhile.
                self._held.append(packet)
            elif state is _WAIT_CONNECT and isinstance(packet, mqtt.Connect):
                event = self._on_connect(packet)
            elif state is _CHALLENGE:
                event = self._on_auth(packet)
            if self._event is not None:
                event, self._event = self._event, None
            if self.state is _CLOSED:
                break
        return event

    def _on_auth(self, packet: mqtt.Packet) -> Event | None:
        """The client's answer to our AUTH 0x18 (4.12): its AUTH 0x18 with the same method, or
        DISCONNECT; anything else before CONNACK is a Protocol Error (MQTT-4.12.0-4)."""
        if isinstance(packet, mqtt.Disconnect):
            self.close(will=False)
            return None
        method = self._auth_method
        if (
            method is None
            or not isinstance(packet, mqtt.Auth)
            or packet.reason_code != mqtt.Reason.CONTINUE_AUTHENTICATION
            or packet.properties.authentication_method != self._auth_method
        ):
            # MQTT-4.12.0-5: the method cannot change within an exchange
            self.violation(
                "protocol-error", "not an AUTH of this exchange", mqtt.Reason.PROTOCOL_ERROR
            )
            return None
        self._go(_AUTH)
        self._wire.pause_reading()
        return AuthContinue(method, packet.properties.authentication_data)

    def _dispatch(self, packet: mqtt.Packet) -> None:
        session = self.session
        assert session is not None  # noqa: S101 - LIVE implies a session
        if type(packet) is mqtt.Publish:
            qos, pid = packet.qos, packet.packet_id
            core = self.core
            if qos == 2 and pid in session.incoming_qos2:
                core.ack(self, mqtt.pubrec(pid))  # a re-sent QoS 2 PUBLISH is routed only once
                return
            mark = core.mark() if qos else 0  # QoS 0 is not acknowledged: nothing to wait for
            reason = core.publish(session, packet)
            if reason is not None:
                detail = (
                    "clients cannot publish to '$' topics"
                    if reason == "invalid-publish-topic"
                    else f"cannot store {packet.topic!r} now (disk full?): not acknowledged"
                    if reason == "storage-failed"
                    else f"publish to {packet.topic!r} denied"
                )
                self.violation(reason, detail)
            # Acknowledgements go through core.ack: with persistence on, it holds them until
            # what they promise is on disk (issue 15).
            elif qos == 1:
                core.ack(self, mqtt.puback(pid), mark)
            elif qos == 2:
                core.qos2_waiting(session, pid, waiting=True)  # MQTT-4.3.3-2: until PUBREL
                core.ack(self, mqtt.pubrec(pid), mark)
        elif type(packet) is tuple:
            kind, pid = packet
            if kind == mqtt.PUBREL:
                mark = self.core.mark()
                self.core.qos2_waiting(session, pid, waiting=False)
                self.core.ack(self, mqtt.pubcomp(pid), mark)
            elif kind == mqtt.PINGREQ:
                self.send(mqtt.pingresp())
            elif kind == mqtt.DISCONNECT:
                self.clean_disconnect = True  # MQTT-3.14.4-3: the will is discarded
                self.close(will=False)
            else:
                self.core.acked(session, kind, pid)
        elif type(packet) is mqtt.Subscribe:
            self.core.subscribe(session, packet)
        elif type(packet) is mqtt.Unsubscribe:
            self.core.unsubscribe(session, packet)

    # -- MQTT 5 packets ------------------------------------------------------------------------

    def _dispatch5(self, packet: mqtt.Packet) -> None:
        session = self.session
        assert session is not None  # noqa: S101 - LIVE implies a session
        if type(packet) is mqtt.Publish:
            self._publish5(packet)
        elif type(packet) is mqtt.Ack:
            pid = packet.packet_id
            if packet.kind == mqtt.PUBREL:
                core = self.core
                mark = core.mark()
                if pid in session.incoming_qos2:
                    core.qos2_waiting(session, pid, waiting=False)
                    core.ack(self, mqtt.ack5(mqtt.PUBCOMP, pid), mark)
                else:  # 3.7.2.1: a PUBREL for nothing we hold
                    code = mqtt.Reason.PACKET_IDENTIFIER_NOT_FOUND
                    core.ack(self, mqtt.ack5(mqtt.PUBCOMP, pid, code), mark)
            else:
                self.core.acked(session, packet.kind, pid, packet.reason_code)
        elif type(packet) is tuple:
            self.send(mqtt.pingresp())  # the only level-5 packet read as a tuple is PINGREQ
        elif type(packet) is mqtt.Subscribe:
            self.core.subscribe(session, packet)
        elif type(packet) is mqtt.Unsubscribe:
            self.core.unsubscribe(session, packet)
        elif type(packet) is mqtt.Disconnect:
            self._disconnect5(session, packet)
        elif type(packet) is mqtt.Auth:
            self._reauth(packet)

    def _reauth(self, packet: mqtt.Auth) -> None:
        method = packet.properties.authentication_method
        if method is None or method != self._auth_method:
            # MQTT-4.12.1-1: re-authentication uses the CONNECT's method, and only a connection
            # that authenticated with one can use it
            self.violation("protocol-error", "AUTH outside an exchange", mqtt.Reason.PROTOCOL_ERROR)
            return
        reauth = packet.reason_code == mqtt.Reason.RE_AUTHENTICATE  # else 0x18, a next round
        self._event = AuthContinue(method, packet.properties.authentication_data, reauth)

    def _publish5(self, packet: mqtt.Publish) -> None:
        session = self.session
        assert session is not None  # noqa: S101 - LIVE implies a session
        topic = packet.topic
        alias = packet.properties.topic_alias
        if alias is not None:
            # An alias this connection has set, sent alone: its topic (the common case of a
            # client using aliases, looked up here without the call); anything else, including
            # every violation, is _topic_alias's.
            known = None if topic else self._aliases_in.get(alias)
            if known is None:
                known = self._topic_alias(topic, alias)
                if known is None:
                    return
            topic = known
        qos, pid = packet.qos, packet.packet_id
        core = self.core
        if qos == 2:
            if pid in session.incoming_qos2:
                core.ack(self, mqtt.ack5(mqtt.PUBREC, pid))  # a re-sent QoS 2 PUBLISH: routed once
                return
            if len(session.incoming_qos2) >= self.negotiated.receive_max_in:
                # MQTT-3.3.4-7 is the client's duty; 3.3.4 says how we answer
                self.violation(
                    "receive-maximum",
                    f"more than {self.negotiated.receive_max_in} QoS 2 messages unacknowledged",
                    mqtt.Reason.RECEIVE_MAXIMUM_EXCEEDED,
                )
                return
        mark = core.mark() if qos else 0  # QoS 0 is not acknowledged: nothing to wait for
        code = core.publish5(session, packet, topic, self._now)
        if not qos:
            return
        # As in 3.1.1, acknowledgements go through core.ack: with persistence on, it holds them
        # until what they promise is on disk (issue 15), in order (MQTT-4.6.0-2, -3).
        kind = mqtt.PUBACK if qos == 1 else mqtt.PUBREC
        if not code:
            if qos == 2:
                core.qos2_waiting(session, pid, waiting=True)  # MQTT-4.3.3-2: until PUBREL
            core.ack(self, mqtt.ack5(kind, pid), mark)
        else:  # 0x87: denied; 0x97: it cannot be stored now (the disk refuses), or queues full
            why = (
                "denied"
                if code == mqtt.Reason.NOT_AUTHORIZED
                else "storage-failed"
                if core.store is not None and core.store.failed is not None
                else "queues-full"
            )
            core.ack(self, mqtt.ack5(kind, pid, code, self._reason_props(why)), mark)

    def _topic_alias(self, topic: str, alias: int) -> str | None:
        """The topic a client's Topic Alias stands for (3.3.2.3.4); None: the connection was
        closed for it. The topic is then judged by the policy as if it had been sent."""
        if alias == 0 or alias > self.negotiated.alias_max_in:
            # MQTT-3.3.2-8, -9: 0 or above our Topic Alias Maximum
            self.violation(
                "topic-alias-invalid", f"topic alias {alias}", mqtt.Reason.TOPIC_ALIAS_INVALID
            )
            return None
        if topic:
            self._aliases_in[alias] = topic
            return topic
        known = self._aliases_in.get(alias)
        if known is None:
            # 3.3.4: an alias that no PUBLISH of this connection has set
            self.violation(
                "protocol-error", f"topic alias {alias} was never set", mqtt.Reason.PROTOCOL_ERROR
            )
        return known

    def _disconnect5(self, session: Session, packet: mqtt.Disconnect) -> None:
        expiry = packet.properties.session_expiry_interval
        if expiry is not None:
            if session.expiry == 0 and expiry != 0:
                # 3.14.2.2.2: a session that was to end cannot be kept from DISCONNECT on
                self.violation(
                    "protocol-error",
                    "Session Expiry Interval set at DISCONNECT after 0 at CONNECT",
                    mqtt.Reason.PROTOCOL_ERROR,
                )
                return
            self.core.set_expiry(session, expiry)
        code = packet.reason_code
        # MQTT-3.14.4-3: 0x00 discards the will; 0x04 (and any error) publishes it (3.14.2.1).
        self.clean_disconnect = code == mqtt.Reason.NORMAL_DISCONNECTION
        self.close(will=not self.clean_disconnect)

    def publish5(self, message: Message, qos: int, packet_id: int, dup: bool) -> bool:
        """The core's delivery to this MQTT 5 client: the remaining Message Expiry Interval
        (MQTT-3.3.2-6), its Subscription Identifiers, a Topic Alias within the client's maximum,
        and never more than the client's Maximum Packet Size (MQTT-3.1.2-25: such a message is
        discarded for this client)."""
        if self.state is _CLOSED:
            return True
        negotiated = self.negotiated
        if (
            message.expires_at is None
            and not message.subscription_ids
            and not negotiated.alias_max_out
        ):
            # the common case: the publisher's properties as they are, encoded once
            data = _encode_publish5(
                message.topic_bytes,
                message.payload,
                qos,
                message.retain,
                packet_id,
                dup,
                message.properties_wire,
            )
            size = len(data)
            if size > negotiated.max_packet_out:
                return False
            # send(), written out: this runs per delivery, and the state was checked above
            self._out.append(data)
            self._out_bytes += size
            if not self._woken:
                self._woken = True
                self._wire.wake()
            return True
        return self._publish5_own(message, qos, packet_id, dup)

    def _publish5_own(self, message: Message, qos: int, packet_id: int, dup: bool) -> bool:
        """:meth:`publish5` with what is this receiver's own: expiry left, identifiers, alias."""
        wire = message.properties_wire
        expires = message.expires_at
        topic = message.topic_bytes
        negotiated = self.negotiated
        alias = 0
        if negotiated.alias_max_out:
            alias = self._aliases_out.get(message.topic, 0)
            if alias:
                topic = b""
            elif len(self._aliases_out) < negotiated.alias_max_out:
                alias = -(len(self._aliases_out) + 1)  # new: sent with its topic
        if expires is not None or message.subscription_ids or alias:
            props = message.properties
            changes: dict[str, object] = {}
            if expires is not None:
                remaining = expires - self.core.now
                if remaining <= 0 and not dup:
                    self.core.expired += 1
                    return False
                changes["message_expiry_interval"] = max(0, -int(-remaining // 1))
            if message.subscription_ids:
                changes["subscription_identifiers"] = message.subscription_ids
            if alias:
                changes["topic_alias"] = abs(alias)
            wire = mqtt.encode_properties(dataclasses.replace(props, **changes), mqtt.PUBLISH)  # type: ignore[arg-type]
        data = mqtt.encode_publish5(
            topic, message.payload, qos, message.retain, packet_id, dup, wire
        )
        if len(data) > negotiated.max_packet_out:
            return False
        if alias < 0:
            self._aliases_out[message.topic] = -alias
        self.send(data)
        return True

    # -- CONNECT ---------------------------------------------------------------------------------

    def _on_connect(self, connect: mqtt.Connect) -> Event | None:
        self.version = connect.protocol_level
        if connect.protocol_level not in (3, 4, 5):
            self._refuse(
                "bad-connect",
                f"protocol level {connect.protocol_level} (3.1.1 and 5.0 only)",
                mqtt.CONNACK_UNACCEPTABLE_PROTOCOL,
            )
            return None
        if connect.protocol_level == 5:
            self.v5 = True
            props = connect.properties
            self.negotiated.problem_info = props.request_problem_information != 0
            # 4.12: extended authentication; the transport asks the authenticator whether it
            # offers this method (0x8C if not) and runs the exchange.
            self._auth_method = props.authentication_method
        if connect.will_topic is not None:
            try:
                validate_topic(connect.will_topic)
            except TopicError as exc:
                # Malformed (MQTT-4.7.3-1, MQTT-4.7.1-1): closed without CONNACK (MQTT-3.1.4-1).
                self.violation("malformed", f"will: {exc}")
                return None
        self._go(_AUTH)
        self._wire.pause_reading()
        return Authenticate(connect)

    def refused(self, refusal: Refused, client_id: str | None = None) -> None:
        """The authenticator (or the client_id binding) refused the CONNECT, or a LIVE
        client's re-authentication (then DISCONNECT, 4.12.1)."""
        if self.state is _LIVE:
            code = REFUSAL_REASONS.get(refusal.reason, mqtt.Reason.NOT_AUTHORIZED)
            self.violation(refusal.reason, refusal.detail, code)
            return
        if self.state is not _AUTH:
            return  # the client went away meanwhile
        code = refusal.connack
        if code not in CONNACK_REASONS:
            code = mqtt.CONNACK_NOT_AUTHORIZED
        if self.v5:
            code = REFUSAL_REASONS.get(refusal.reason, CONNACK_REASONS[code])
        self._refuse(
            refusal.reason, refusal.detail, code, refusal.identity, client_id, refusal.method
        )

    def _refuse(
        self,
        reason: str,
        detail: str,
        code: int,
        identity: str | None = None,
        client_id: str | None = None,
        method: str | None = None,
    ) -> None:
        self.core.refused(self.peer, reason, detail, identity, client_id, method)
        if self.v5:
            # The reason token, not the detail: a refused peer learns why, not our internals.
            self.send(mqtt.connack5(False, code, self._reason_props(reason, always=True)))
        else:
            self.send(mqtt.connack(False, code))
        self._go(_CLOSED)
        self._wire.end(flush=True)  # the CONNACK goes out, then the socket closes

    def challenge(self, data: bytes | None, now: float) -> None:
        """MQTT 5 extended authentication: the exchange needs another round. AUTH 0x18 with
        ``data`` goes to the client, whose AUTH is then read (:class:`AuthContinue`)."""
        self._now = now
        method = self._auth_method
        assert method is not None  # noqa: S101 - only an exchange challenges
        props = mqtt.Properties(authentication_method=method, authentication_data=data)
        if self.state is _AUTH:
            self._go(_CHALLENGE)
            self.send(mqtt.auth5(mqtt.Reason.CONTINUE_AUTHENTICATION, props))
            self._wire.resume_reading()
        elif self.state is _LIVE:  # re-authentication: the connection carries on meanwhile
            self.send(mqtt.auth5(mqtt.Reason.CONTINUE_AUTHENTICATION, props))

    def reauthenticated(self, authenticated: Authenticated, data: bytes | None) -> None:
        """A LIVE client's re-authentication (4.12.1) succeeded: AUTH 0x00. It must prove the
        same identity; another one is not a way to change who a session is (DISCONNECT 0x87)."""
        session = self.session
        if self.state is not _LIVE or session is None:
            return
        if authenticated.identity != session.authenticated.identity:
            self.violation(
                "reauth-failed",
                f"re-authenticated as {authenticated.identity}",
                mqtt.Reason.NOT_AUTHORIZED,
            )
            return
        method = self._auth_method
        props = mqtt.Properties(authentication_method=method, authentication_data=data)
        self.send(mqtt.auth5(mqtt.Reason.SUCCESS, props))

    def authenticated(
        self,
        connect: mqtt.Connect,
        authenticated: Authenticated,
        now: float,
        data: bytes | None = None,
    ) -> None:
        """The authenticator accepted: bind the client_id, attach the session, CONNACK (with an
        extended authentication's method and final ``data``, 3.2.2.3.17-18)."""
        if self.state is not _AUTH:
            return  # the client went away while we checked it
        self._now = now
        core = self.core
        assigned: str | None = None
        if self.v5 and not connect.client_id:
            # MQTT-3.1.3-6, -7: a zero-length client id is given one, named in CONNACK
            # (3.2.2.3.7). Ours is the identity's name: the one client id this identity may use
            # (core.check_connect), so every rule keyed on client ids holds unchanged, and it
            # is unique because one client id has one live connection (a second takes over).
            # 3.1.1 keeps refusing it (0x02, MQTT-3.1.3-9 of 3.1.1).
            assigned = authenticated.identity.name
            connect = dataclasses.replace(connect, client_id=assigned)
        try:
            core.check_connect(connect, authenticated)
        except Refused as refusal:
            refusal.method = refusal.method or authenticated.method
            self.refused(refusal, connect.client_id)
            return
        limits = core.limits
        requested = connect.keepalive
        keepalive = min(requested, limits.max_keepalive) if requested > 0 else limits.max_keepalive
        negotiated = self.negotiated
        negotiated.keepalive = keepalive
        negotiated.keepalive_window = keepalive * limits.keepalive_factor
        self.last_packet = now
        session, present = core.attach(self, connect, authenticated)
        self.session = session
        self._go(_LIVE)
        if self.v5:
            props = self._connack_properties(connect, session)
            if assigned is not None:
                props = dataclasses.replace(props, assigned_client_identifier=assigned)
            if self._auth_method is not None:
                props = dataclasses.replace(
                    props, authentication_method=self._auth_method, authentication_data=data
                )
            self.send(mqtt.connack5(present, 0, props))
        else:
            self.send(mqtt.connack(present, mqtt.CONNACK_ACCEPTED))
        core.metrics.inc("iotauth_broker_connects_total")
        core.audit.emit(
            "connect",
            identity=str(authenticated.identity),
            client_id=connect.client_id,
            peer=self.peer,
            credential=authenticated.credential,
            method=authenticated.method,
            clean_session=connect.clean_session,
            session_present=present,
            keepalive=keepalive,
            tls=self.tls_version,
        )
        core.resume(session)
        self.unhold(now)  # the packets that arrived behind CONNECT, then reading resumes

    def _connack_properties(self, connect: mqtt.Connect, session: Session) -> mqtt.Properties:
        """What this server allows (3.2.2.3), and where it changed what the client asked."""
        limits = self.core.limits
        props = connect.properties
        negotiated = self.negotiated
        negotiated.max_packet_out = props.maximum_packet_size or negotiated.max_packet_out
        negotiated.alias_max_out = props.topic_alias_maximum or 0
        negotiated.alias_max_in = limits.topic_alias_maximum
        negotiated.receive_max_in = limits.receive_maximum
        requested = props.session_expiry_interval or 0
        granted = session.expiry
        granted_wire = 0xFFFFFFFF if granted is None else int(granted)
        return mqtt.Properties(
            # 3.2.2.3.2: only when it is not what the client asked for
            session_expiry_interval=None if granted_wire == requested else granted_wire,
            # MQTT-3.2.2-21: a keep-alive other than the client's is announced
            server_keep_alive=(
                negotiated.keepalive if negotiated.keepalive != connect.keepalive else None
            ),
            receive_maximum=limits.receive_maximum,
            # Maximum QoS is absent: 2 is the default, and sending 2 is a Protocol Error
            # (3.2.2.3.4); the same for Retain Available's 1, sent for clarity as it may be.
            retain_available=1,
            maximum_packet_size=limits.max_packet_bytes,
            topic_alias_maximum=limits.topic_alias_maximum or None,
            wildcard_subscription_available=1,
            subscription_identifier_available=1,
            shared_subscription_available=1,
        )
