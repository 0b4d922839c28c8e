"""One client connection: TLS over memory BIOs, MQTT framing, and the CONNECT handshake.

A thin transport around the sans-IO parts: bytes from the socket go into an ``ssl.SSLObject``
(the listener's current context, so a new CRL applies to the next handshake), decrypted bytes
into :class:`broker.mqtt.PacketReader`, packets into :class:`broker.core.BrokerCore`. Replies and
deliveries are collected and encrypted once per event-loop iteration.

Why not ``asyncio`` streams with ``ssl=``: asyncio's SSL protocol keeps a 256 KiB read buffer per
connection (Python 3.11) and adds a layer of Python per record; streams add a task and several
awaits per packet. Doing TLS here with ``SSLObject`` is the same OpenSSL work with neither cost,
and it lets a failed handshake send its TLS alert before the socket closes.

Timing (connect deadline, keep-alive, stalled packets) is checked by the listener's sweep from
the timestamps kept here, instead of a timer per connection re-armed on every packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import TYPE_CHECKING

from broker import mqtt
from broker.auth import Authenticated, Authenticator, ConnectionFacts
from broker.errors import Refused, TopicError
from broker.topics import validate_topic

if TYPE_CHECKING:
    from broker._listener import TLSListener
    from broker.core import BrokerCore, Session

__all__ = ["MQTTConnection"]

log = logging.getLogger("iotauth.broker")

HANDSHAKE, WAIT_CONNECT, AUTH, LIVE, CLOSED = range(5)
_READ_SIZE = 16 * 1024  # one TLS record at most


class MQTTConnection(asyncio.Protocol):
    __slots__ = (
        "_auth_task",
        "_authenticator",
        "_held",
        "_in",
        "_listener",
        "_loop",
        "_out",
        "_pending",
        "_pending_bytes",
        "_scheduled",
        "clean_disconnect",
        "core",
        "deadline",
        "held_since",
        "holds",
        "keepalive_window",
        "kick_reason",
        "last_packet",
        "partial_since",
        "peer",
        "reader",
        "session",
        "state",
        "tls",
        "tls_version",
        "transport",
    )

    def __init__(
        self,
        listener: TLSListener,
        core: BrokerCore,
        authenticator: Authenticator,
        context: ssl.SSLContext,
    ) -> None:
        self._listener = listener
        self.core = core
        self._loop = asyncio.get_running_loop()
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.tls: ssl.SSLObject = context.wrap_bio(self._in, self._out, server_side=True)
        self.tls_version: str | None = None
        self.reader = mqtt.PacketReader(core.limits.max_packet_bytes)
        self.state = HANDSHAKE
        self.peer = "?"
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.deadline = self._loop.time() + core.limits.connect_timeout
        self.keepalive_window = 0.0
        self.last_packet = 0.0
        self.partial_since = 0.0
        self.kick_reason: str | None = None
        self.clean_disconnect = False
        self.holds: set[Session] = set()
        self.held_since = 0.0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._scheduled = False
        self._held: list[mqtt.Packet] = []
        self._auth_task: asyncio.Task[None] | None = None
        self._authenticator = authenticator

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - a stream socket
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._listener.opened(self)

    def data_received(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        self._in.write(data)
        if self.state == HANDSHAKE and not self._handshake():
            return
        while True:
            try:
                chunk = self.tls.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._lost_by_peer()
                return
            except ssl.SSLError as exc:
                self.violation("tls-error", str(exc.reason or exc))
                return
            if not chunk:
                # SSLObject.read() returns b"" for close_notify (SSLWantReadError when there is
                # simply nothing more): the peer ended TLS and waits for our close_notify.
                self._tls_closed_by_peer()
                return
            if not self._feed(chunk):
                break
        if self.state == CLOSED:
            return
        if self._pending:
            self._flush()
        elif self._out.pending:
            self._write_tls()  # OpenSSL's own answers, e.g. to a TLS 1.3 KeyUpdate

    def eof_received(self) -> bool:
        return False  # close: MQTT has no half-closed state

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost_by_peer()
        self._listener.closed(self)
        if self._auth_task is not None:
            self._auth_task.cancel()

    def pause_writing(self) -> None:
        pass  # backlog() reads the transport's buffer size; nothing to record

    def resume_writing(self) -> None:
        if self.session is not None and self.state == LIVE:
            self.core.drained(self.session)

    # -- the Link the core writes to -----------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def backlog(self) -> int:
        transport = self.transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return self._pending_bytes + buffered

    def hold(self, receiver: Session) -> None:
        if not self.holds and self.transport is not None:
            self.held_since = self._loop.time()
            self.transport.pause_reading()
        self.holds.add(receiver)

    def release(self, receiver: Session) -> None:
        self.holds.discard(receiver)
        if not self.holds and self.state == LIVE:
            # Not now: the core is in the middle of the receiver's acknowledgement.
            self._loop.call_soon(self._unhold)

    def _unhold(self) -> None:
        if self.state != LIVE or self.holds:
            return
        held, self._held = self._held, []
        for index, packet in enumerate(held):
            self._dispatch(packet)
            if self.state != LIVE:
                return
            if self.holds:  # held again: keep the rest, in order
                self._held = held[index + 1 :] + self._held
                self._flush()
                return
        # Keep-alive counts from here: the peer's packets waited in the socket, unread.
        self.last_packet = self._loop.time()
        if self.transport is not None:
            self.transport.resume_reading()
        self._flush()

    def close(self, *, will: bool, reason: str | None = None) -> None:
        """Abort now. The session is detached here, with the will if ``will``."""
        if self.state == CLOSED:
            return
        for receiver in self.holds:
            receiver.waiters.discard(self)
        self.holds.clear()
        if reason is not None:
            self.kick_reason = reason
        was_live = self.state == LIVE
        self.state = CLOSED
        self._pending.clear()
        self._shutdown_tls()
        transport = self.transport
        if transport is not None:
            # Our close_notify is on its way unless the socket buffer was already full; then
            # abort, since close() would wait for a peer that may never read.
            if transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()
        if was_live and self.session is not None:
            session = self.session
            self.core.detach(session, self, will=will)
            self.core.audit.emit(
                "disconnect",
                identity=str(session.authenticated.identity),
                client_id=session.client_id,
                peer=self.peer,
                reason=self.kick_reason,
            )

    def drop(self) -> None:
        """Abort before CONNECT, already audited by the caller."""
        self.state = CLOSED
        if self.transport is not None:
            self.transport.abort()

    def violation(self, reason: str, detail: str) -> None:
        """The peer broke the protocol or a limit: audited, closed, will published
        (an abnormal end, MQTT-3.1.2-8)."""
        if self.state == CLOSED:
            return
        if self.state == LIVE and self.session is not None:
            self.core.kick_record(self.session, reason, detail)
            self.close(will=True, reason=reason)
        else:
            self.core.refused(self.peer, reason, detail)
            self.close(will=False)

    # -- TLS -----------------------------------------------------------------------------------

    def _handshake(self) -> bool:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._write_tls()
            return False
        except (ssl.SSLError, ssl.CertificateError, ValueError) as exc:
            self._write_tls()  # the alert: the client learns why (unknown ca, revoked ...)
            self._listener.handshake_failed(self, exc)
            self.state = CLOSED
            if self.transport is not None:
                self.transport.close()
            return False
        self._write_tls()  # Finished and session tickets
        self.state = WAIT_CONNECT
        self.tls_version = self.tls.version()
        self._listener.handshake_done(self)
        return True

    def _shutdown_tls(self) -> None:
        # OpenSSL drops a session from its resumption cache when the SSL object is freed
        # without a shutdown having been sent; a TLS 1.2 client could then never resume.
        # Whether the session may be resumed is the authenticator's business (it re-checks
        # revocation and expiry for resumed sessions), not an accident of how we close.
        if self.tls_version is None:
            return
        with contextlib.suppress(ssl.SSLError, ValueError):
            self.tls.unwrap()
        self._write_tls()

    def _write_tls(self) -> None:
        data = self._out.read()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _flush(self) -> None:
        self._scheduled = False
        pending = self._pending
        if not pending or self.state == CLOSED:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self._pending_bytes = 0
        try:
            view = memoryview(data)
            while view:
                view = view[self.tls.write(view) :]
        except ssl.SSLError as exc:
            self.violation("tls-error", str(exc.reason or exc))
            return
        self._write_tls()
        transport = self.transport
        if (
            transport is not None
            and transport.get_write_buffer_size() > 2 * self.core.limits.outbound_max_bytes
        ):
            # Deliveries stop at outbound_max_bytes; only our answers to the peer's own packets
            # (PUBACK, PINGRESP ...) grow it further: a peer that sends and never reads.
            self.violation("slow-reader", "the client does not read what the broker sends")

    def _tls_closed_by_peer(self) -> None:
        """close_notify: answered with ours (in ``_shutdown_tls``), then the same as a lost
        connection: the will is published unless a DISCONNECT came first."""
        if self.state == LIVE:
            self.close(will=not self.clean_disconnect)
            return
        self.state = CLOSED
        self._shutdown_tls()
        if self.transport is not None:
            self.transport.close()

    def _lost_by_peer(self) -> None:
        if self.state == HANDSHAKE:
            self._listener.handshake_failed(self, ConnectionResetError("closed by the client"))
            self.state = CLOSED
        elif self.state in (WAIT_CONNECT, AUTH):
            self.state = CLOSED
            self._shutdown_tls()
        elif self.state == LIVE:
            self.close(will=not self.clean_disconnect)

    # -- MQTT ----------------------------------------------------------------------------------

    def _feed(self, chunk: bytes) -> bool:
        try:
            packets = self.reader.feed(chunk)
        except mqtt.ProtocolViolation as exc:
            self._handle(exc.packets)
            self.violation(exc.reason, exc.detail)
            return False
        now = self._loop.time()
        if packets:
            self.last_packet = now
        if self.reader.partial:
            if not self.partial_since:
                self.partial_since = now
        else:
            self.partial_since = 0.0
        return self._handle(packets)

    def _handle(self, packets: list[mqtt.Packet]) -> bool:
        for packet in packets:
            if self.state == LIVE and not self.holds:
                self._dispatch(packet)
            elif self.state in (LIVE, AUTH):
                # Held (backpressure) or not yet authenticated: kept in order, bounded by what
                # one socket read delivered, since the transport stops reading meanwhile.
                self._held.append(packet)
            elif self.state == WAIT_CONNECT and isinstance(packet, mqtt.Connect):
                self._on_connect(packet)
            if self.state == CLOSED:
                return False
        return True

    def _dispatch(self, packet: mqtt.Packet) -> None:
        session = self.session
        assert session is not None  # noqa: S101 - LIVE implies a session
        if type(packet) is mqtt.Publish:
            qos, pid = packet.qos, packet.packet_id
            if qos == 2 and pid in session.incoming_qos2:
                self.send(mqtt.pubrec(pid))  # a re-sent QoS 2 PUBLISH is routed only once
                return
            reason = self.core.publish(session, packet)
            if reason is not None:
                detail = (
                    "clients cannot publish to '$' topics"
                    if reason == "invalid-publish-topic"
                    else f"publish to {packet.topic!r} denied"
                )
                self.violation(reason, detail)
            elif qos == 1:
                self.send(mqtt.puback(pid))
            elif qos == 2:
                session.incoming_qos2.add(pid)
                self.send(mqtt.pubrec(pid))
        elif type(packet) is tuple:
            kind, pid = packet
            if kind == mqtt.PUBREL:
                session.incoming_qos2.discard(pid)
                self.send(mqtt.pubcomp(pid))
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

    def _on_connect(self, connect: mqtt.Connect) -> None:
        if connect.protocol_level not in (3, 4):
            self.core.refused(
                self.peer, "bad-connect", f"protocol level {connect.protocol_level} (3.1.1 only)"
            )
            self.send(mqtt.connack(False, mqtt.CONNACK_UNACCEPTABLE_PROTOCOL))
            self._finish_refusal()
            return
        if connect.will_topic is not None:
            try:
                validate_topic(connect.will_topic)
            except TopicError as exc:
                # Malformed (MQTT-4.7.3-1, MQTT-4.7.1-1): closed without CONNACK (MQTT-3.1.4-1).
                self.violation("malformed", f"will: {exc}")
                return
        self.state = AUTH
        assert self.transport is not None  # noqa: S101
        self.transport.pause_reading()
        self._auth_task = self._loop.create_task(self._authenticate(connect))

    def _finish_refusal(self) -> None:
        self._flush()
        self.state = CLOSED
        if self.transport is not None:
            self.transport.close()  # flushes the CONNACK, then closes

    async def _authenticate(self, connect: mqtt.Connect) -> None:
        core = self.core
        facts = ConnectionFacts(
            client_id=connect.client_id,
            username=connect.username,
            password=(
                connect.password.decode("utf-8", "replace")
                if connect.password is not None
                else None
            ),
            peer=self.peer,
            tls=self.tls,
        )
        try:
            authenticated: Authenticated = await self._authenticator.authenticate(facts)
            core.check_connect(connect, authenticated)
        except Refused as refusal:
            if self.state != AUTH:
                return
            core.refused(
                self.peer, refusal.reason, refusal.detail, refusal.identity, connect.client_id
            )
            code = refusal.connack
            if code not in (mqtt.CONNACK_IDENTIFIER_REJECTED, mqtt.CONNACK_NOT_AUTHORIZED):
                code = mqtt.CONNACK_NOT_AUTHORIZED
            self.send(mqtt.connack(False, code))
            self._finish_refusal()
            return
        except Exception as exc:  # an authenticator bug refuses one client, not the broker
            log.exception("authenticator failed for %s", self.peer)
            if self.state == AUTH:
                core.refused(self.peer, "auth-error", type(exc).__name__)
                self.send(mqtt.connack(False, mqtt.CONNACK_NOT_AUTHORIZED))
                self._finish_refusal()
            return
        if self.state != AUTH:
            return  # the client went away while we checked it
        self._auth_task = None
        limits = core.limits
        requested = connect.keepalive
        keepalive = min(requested, limits.max_keepalive) if requested > 0 else limits.max_keepalive
        self.keepalive_window = keepalive * limits.keepalive_factor
        self.last_packet = self._loop.time()
        session, present = core.attach(self, connect, authenticated)
        self.session = session
        self.state = LIVE
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
        self._unhold()  # the packets that arrived behind CONNECT, then reading resumes
