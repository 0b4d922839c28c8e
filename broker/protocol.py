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
returns (today :class:`Authenticate`), and a few requests through :class:`Wire`. Those are
callbacks, not return values, because the core writes into *any* connection while it serves
another one (a delivery, a takeover, a revocation kick): the wire must be told there is
something to send or to close.

The same object is the :class:`broker.core.Link` the core writes to, so a session's deliveries,
acknowledgements and kicks all pass through the one place that knows the connection's protocol.

Ready for MQTT 5.0 (issue 12, step 2), without implementing it: the protocol level is kept per
connection (:attr:`ClientProtocol.version`); what was negotiated at CONNECT lives in
:class:`Negotiated` (Receive Maximum, Maximum Packet Size and Topic Alias Maximum go there); every
server-initiated close passes one reason token through :meth:`ClientProtocol.close`, the place
where 5.0 sends DISCONNECT with a reason code; the authentication is an event and an answer, so
a multi-step AUTH exchange is more events of the same kind, and re-authentication a LIVE-state
exchange that the table can name.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from broker import mqtt
from broker.auth import Authenticated
from broker.errors import BrokerError, Refused, TopicError
from broker.topics import validate_topic

if TYPE_CHECKING:
    from broker.core import BrokerCore, Session

__all__ = [
    "TRANSITIONS",
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
    LIVE = "live"  # CONNACK 0 sent, the session is attached to the core
    CLOSED = "closed"  # nothing comes in or goes out any more


TRANSITIONS: dict[State, frozenset[State]] = {
    State.HANDSHAKE: frozenset({State.WAIT_CONNECT, State.CLOSED}),
    State.WAIT_CONNECT: frozenset({State.AUTH, State.CLOSED}),
    State.AUTH: frozenset({State.LIVE, State.CLOSED}),
    State.LIVE: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}
"""The lifecycle, the one table: every state change goes through :meth:`ClientProtocol._go`."""


# Module-level names for the hot path: a global lookup costs a tenth of ``State.LIVE`` (an
# attribute of the Enum class) on Python 3.11, and the state is checked several times per packet.
_HANDSHAKE, _WAIT_CONNECT, _AUTH, _LIVE, _CLOSED = (
    State.HANDSHAKE,
    State.WAIT_CONNECT,
    State.AUTH,
    State.LIVE,
    State.CLOSED,
)


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


Event = Authenticate
"""What :meth:`ClientProtocol.receive_data` can return (MQTT 5 AUTH steps will join it)."""


@dataclass(slots=True)
class Negotiated:
    """What CONNECT settled for this connection (MQTT 5 adds its per-connection limits here)."""

    keepalive: int = 0
    keepalive_window: float = 0.0  # seconds without a packet before the connection is closed


class ClientProtocol:
    """One client connection's MQTT protocol; also the core's ``Link`` to that client."""

    __slots__ = (
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
        "version",
    )

    def __init__(self, core: BrokerCore, wire: Wire, peer: str, now: float) -> None:
        self.core = core
        self._wire = wire
        self.peer = peer
        self.state = _HANDSHAKE
        self.tls_version: str | None = None
        self.version = 0  # the CONNECT's protocol level once read
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
        if self._wire.buffered() > 2 * self.core.limits.outbound_max_bytes:
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
        return self._out_bytes + self._wire.buffered()

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
        self._now = now
        try:
            packets = self.reader.feed(data)
        except mqtt.ProtocolViolation as exc:
            # The packets before the broken one count: how TCP split the stream must not decide.
            event = self._handle(exc.packets)
            self.violation(exc.reason, exc.detail)
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
        self._now = now
        if self.state is not _LIVE or self.holds:
            return
        held, self._held = self._held, []
        for index, packet in enumerate(held):
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
        if state is _WAIT_CONNECT or state is _AUTH:
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

    def violation(self, reason: str, detail: str) -> None:
        """The peer broke the protocol or a limit: audited, closed, will published
        (an abnormal end, MQTT-3.1.2-8)."""
        if self.state is _CLOSED:
            return
        if self.state is _LIVE and self.session is not None:
            self.core.kick_record(self.session, reason, detail)
            self.close(will=True, reason=reason)
        else:
            self.core.refused(self.peer, reason, detail)
            self.close(will=False)

    # -- packets ---------------------------------------------------------------------------------

    def _handle(self, packets: list[mqtt.Packet]) -> Event | None:
        event: Event | None = None
        for packet in packets:
            state = self.state
            if state is _LIVE and not self.holds:
                self._dispatch(packet)
            elif state is _LIVE or state is _AUTH:
                # Held (backpressure) or not yet authenticated: kept in order, bounded by what
                # one socket read delivered, since the transport stops reading meanwhile.
                self._held.append(packet)
            elif state is _WAIT_CONNECT and isinstance(packet, mqtt.Connect):
                event = self._on_connect(packet)
            if self.state is _CLOSED:
                break
        return event

    def _dispatch(self, packet: mqtt.Packet) -> None:
        session = self.session
        assert session is not None  # noqa: S101 - LIVE implies a session
        if type(packet) is mqtt.Publish:
            qos, pid = packet.qos, packet.packet_id
            core = self.core
            if qos == 2 and pid in session.incoming_qos2:
                core.ack(self, mqtt.pubrec(pid))  # a re-sent QoS 2 PUBLISH is routed only once
                return
            mark = core.mark()
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

    # -- CONNECT ---------------------------------------------------------------------------------

    def _on_connect(self, connect: mqtt.Connect) -> Event | None:
        self.version = connect.protocol_level
        if connect.protocol_level not in (3, 4):
            self._refuse(
                "bad-connect",
                f"protocol level {connect.protocol_level} (3.1.1 only)",
                mqtt.CONNACK_UNACCEPTABLE_PROTOCOL,
            )
            return None
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
        """The authenticator (or the client_id binding) refused the CONNECT."""
        if self.state is not _AUTH:
            return  # the client went away meanwhile
        code = refusal.connack
        if code not in (
            mqtt.CONNACK_IDENTIFIER_REJECTED,
            mqtt.CONNACK_BAD_CREDENTIALS,
            mqtt.CONNACK_NOT_AUTHORIZED,
        ):
            code = mqtt.CONNACK_NOT_AUTHORIZED
        self._refuse(refusal.reason, refusal.detail, code, refusal.identity, client_id)

    def _refuse(
        self,
        reason: str,
        detail: str,
        code: int,
        identity: str | None = None,
        client_id: str | None = None,
    ) -> None:
        self.core.refused(self.peer, reason, detail, identity, client_id)
        self.send(mqtt.connack(False, code))
        self._go(_CLOSED)
        self._wire.end(flush=True)  # the CONNACK goes out, then the socket closes

    def authenticated(
        self, connect: mqtt.Connect, authenticated: Authenticated, now: float
    ) -> None:
        """The authenticator accepted: bind the client_id, attach the session, CONNACK."""
        if self.state is not _AUTH:
            return  # the client went away while we checked it
        self._now = now
        core = self.core
        try:
            core.check_connect(connect, authenticated)
        except Refused as refusal:
            self.refused(refusal, connect.client_id)
            return
        limits = core.limits
        requested = connect.keepalive
        keepalive = min(requested, limits.max_keepalive) if requested > 0 else limits.max_keepalive
        self.negotiated = Negotiated(keepalive, keepalive * limits.keepalive_factor)
        self.last_packet = now
        session, present = core.attach(self, connect, authenticated)
        self.session = session
        self._go(_LIVE)
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
