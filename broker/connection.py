"""One client connection's transport: socket bytes <-> TLS memory BIOs <-> the protocol object.

A thin adapter around the sans-IO parts: bytes from the socket go into an ``ssl.SSLObject``
(the listener's current context, so a new CRL applies to the next handshake), decrypted bytes
into :class:`broker.protocol.ClientProtocol`, which makes every protocol decision and hands the
core its packets. What the protocol queues for the peer is encrypted once per event-loop
iteration. The only other thing done here is running the (async) authenticator when the
protocol asks for it.

Why not ``asyncio`` streams with ``ssl=``: asyncio's SSL protocol keeps a 256 KiB read buffer per
connection (Python 3.11) and adds a layer of Python per record; streams add a task and several
awaits per packet. Doing TLS here with ``SSLObject`` is the same OpenSSL work with neither cost,
and it lets a failed handshake send its TLS alert before the socket closes.

The listener is known only through :class:`ListenerHooks`, so this module does not import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import TYPE_CHECKING, Protocol

from broker import mqtt
from broker.auth import Authenticated, Authenticator, AuthExchange, AuthStep, ConnectionFacts
from broker.errors import Refused
from broker.protocol import AuthContinue, Authenticate, ClientProtocol, Event, State

_HANDSHAKE, _CLOSED = State.HANDSHAKE, State.CLOSED  # hot path: see protocol.py

if TYPE_CHECKING:
    from broker.core import BrokerCore

__all__ = ["ListenerHooks", "MQTTConnection"]

log = logging.getLogger("iotauth.broker")

_READ_SIZE = 16 * 1024  # one TLS record at most


class ListenerHooks(Protocol):
    """What a connection tells its listener (``broker._listener.TLSListener``)."""

    def opened(self, conn: MQTTConnection) -> None: ...

    def handshake_done(self, conn: MQTTConnection) -> None: ...

    def handshake_failed(self, conn: MQTTConnection, exc: BaseException) -> None: ...

    def closed(self, conn: MQTTConnection) -> None: ...


class MQTTConnection(asyncio.Protocol):
    __slots__ = (
        "_auth_task",
        "_authenticator",
        "_connect",
        "_exchange",
        "_in",
        "_listener",
        "_loop",
        "_out",
        "_scheduled",
        "protocol",
        "tls",
        "transport",
    )

    def __init__(
        self,
        listener: ListenerHooks,
        core: BrokerCore,
        authenticator: Authenticator,
        context: ssl.SSLContext,
    ) -> None:
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.tls: ssl.SSLObject = context.wrap_bio(self._in, self._out, server_side=True)
        self.transport: asyncio.Transport | None = None
        self.protocol = ClientProtocol(core, self, "?", self._loop.time())
        self._scheduled = False
        self._auth_task: asyncio.Task[None] | None = None
        self._authenticator = authenticator
        self._connect: mqtt.Connect | None = None  # the CONNECT being authenticated
        self._exchange: AuthExchange | None = None  # MQTT 5 extended authentication

    @property
    def peer(self) -> str:
        return self.protocol.peer

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - a stream socket
        self.transport = transport
        self.protocol.buffer_size_from(transport.get_write_buffer_size)
        peer = transport.get_extra_info("peername")
        self.protocol.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._listener.opened(self)

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        if protocol.state is _CLOSED:
            return
        self._in.write(data)
        if protocol.state is _HANDSHAKE and not self._handshake():
            return
        now = self._loop.time()
        while True:
            try:
                chunk = self.tls.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError as exc:
                protocol.violation("tls-error", str(exc.reason or exc))
                return
            if not chunk:
                # SSLObject.read() returns b"" for close_notify (SSLWantReadError when there is
                # simply nothing more): the peer ended TLS and waits for our close_notify.
                protocol.connection_lost()
                return
            event = protocol.receive_data(chunk, now)
            if event is not None:
                self._start_authentication(event)
            if protocol.closed:
                return
        if protocol.pending:
            self._flush()
        elif self._out.pending:
            self._write_tls()  # OpenSSL's own answers, e.g. to a TLS 1.3 KeyUpdate

    def eof_received(self) -> bool:
        return False  # close: MQTT has no half-closed state

    def connection_lost(self, exc: Exception | None) -> None:
        if self.protocol.state is _HANDSHAKE:
            self._listener.handshake_failed(self, ConnectionResetError("closed by the client"))
        self.protocol.connection_lost()
        self._listener.closed(self)
        if self._auth_task is not None:
            self._auth_task.cancel()

    def pause_writing(self) -> None:
        pass  # the protocol reads the transport's buffer size; nothing to record

    def resume_writing(self) -> None:
        self.protocol.drained()

    # -- the Wire the protocol asks ------------------------------------------------------------

    def wake(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def buffered(self) -> int:
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def unhold_soon(self) -> None:
        self._loop.call_soon(self._unhold)

    def _unhold(self) -> None:
        self.protocol.unhold(self._loop.time())

    def end(self, *, flush: bool) -> None:
        if flush:
            self._encrypt(self.protocol.data_to_send())
        else:
            self.protocol.data_to_send()  # dropped: the connection ends now
        self._shutdown_tls()
        transport = self.transport
        if transport is None:
            return
        # close() sends what is buffered first (the CONNACK of a refusal, our close_notify); a
        # peer that does not read would keep it forever, so with a full buffer abort instead.
        if flush or not transport.get_write_buffer_size():
            transport.close()
        else:
            transport.abort()

    def drop(self) -> None:
        """Abort before any MQTT (the listener audited why)."""
        self.protocol.drop()

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
            self.protocol.handshake_failed()
            if self.transport is not None:
                self.transport.close()
            return False
        self._write_tls()  # Finished and session tickets
        self.protocol.handshake_done(self.tls.version())
        self._listener.handshake_done(self)
        return True

    def _shutdown_tls(self) -> None:
        # OpenSSL drops a session from its resumption cache when the SSL object is freed
        # without a shutdown having been sent; a TLS 1.2 client could then never resume.
        # Whether the session may be resumed is the authenticator's business (it re-checks
        # revocation and expiry for resumed sessions), not an accident of how we close.
        # Answering a peer's close_notify is the same call.
        if self.protocol.tls_version is None:
            return
        with contextlib.suppress(ssl.SSLError, ValueError):
            self.tls.unwrap()
        self._write_tls()

    def _write_tls(self) -> None:
        data = self._out.read()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _encrypt(self, data: bytes) -> bool:
        if not data:
            return True
        try:
            view = memoryview(data)
            while view:
                view = view[self.tls.write(view) :]
        except ssl.SSLError as exc:
            self.protocol.violation("tls-error", str(exc.reason or exc))
            return False
        self._write_tls()
        return True

    def _flush(self) -> None:
        self._scheduled = False
        protocol = self.protocol
        if protocol.state is _CLOSED:
            return
        data = protocol.data_to_send()
        if data and self._encrypt(data):
            protocol.sent()

    # -- authentication ------------------------------------------------------------------------

    def _start_authentication(self, event: Event) -> None:
        self._auth_task = self._loop.create_task(self._authenticate(event))

    def _facts(self, connect: mqtt.Connect) -> ConnectionFacts:
        return ConnectionFacts(
            client_id=connect.client_id,
            username=connect.username,
            password=(
                connect.password.decode("utf-8", "replace")
                if connect.password is not None
                else None
            ),
            peer=self.protocol.peer,
            tls=self.tls,
        )

    async def _authenticate(self, event: Event) -> None:
        protocol = self.protocol
        connect = event.connect if isinstance(event, Authenticate) else self._connect
        if connect is None:
            return  # an AUTH with no CONNECT behind it: the protocol object rules it out
        self._connect = connect
        try:
            step = await self._run(event, connect)
        except Refused as refusal:
            protocol.refused(refusal, connect.client_id)
            return
        except Exception as exc:  # an authenticator bug refuses one client, not the broker
            log.exception("authenticator failed for %s", protocol.peer)
            protocol.refused(Refused("auth-error", type(exc).__name__))
            return
        finally:
            self._auth_task = None
        now = self._loop.time()
        done = step.authenticated
        if done is None:
            protocol.challenge(step.data, now)
        elif isinstance(event, AuthContinue) and protocol.session is not None:
            protocol.reauthenticated(done, step.data)
        else:
            protocol.authenticated(connect, done, now, step.data)
        self._flush()

    async def _run(self, event: Event, connect: mqtt.Connect) -> AuthStep:
        """The authenticator's answer: one call for a plain CONNECT, one step of an exchange for
        MQTT 5 extended authentication (4.12)."""
        method = connect.properties.authentication_method
        if method is None:
            authenticated: Authenticated = await self._authenticator.authenticate(
                self._facts(connect)
            )
            return AuthStep(authenticated=authenticated)
        data = (
            connect.properties.authentication_data
            if isinstance(event, Authenticate)
            else event.data
        )
        if isinstance(event, Authenticate) or event.reauth:
            begin = getattr(self._authenticator, "begin", None)
            if begin is None:
                raise Refused("bad-auth-method", f"authentication method {method!r} is not offered")
            self._exchange = begin(method, self._facts(connect))
        exchange = self._exchange
        assert exchange is not None  # noqa: S101 - begun above or by the CONNECT
        return await exchange.step(data)
