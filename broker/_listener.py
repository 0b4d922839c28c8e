"""The TLS listener: accept, cap, deadlines, classify handshake failures.

amqtt's own listeners use ``asyncio.start_server(ssl=...)``: handshake failures vanish silently,
excess connections queue on a semaphore, and nothing bounds the time to CONNECT. Here:

- each accepted socket is counted; above ``max_connections`` it is closed at once (refused,
  never queued);
- every connection (``broker.connection.MQTTConnection``) does its TLS handshake with the
  context the revocation watcher currently holds, so a new CRL applies to the very next one;
- at most ``max_handshakes`` handshakes are in flight; at the cap the *oldest* is dropped, so a
  flood of half-open connections cannot lock a valid device out;
- a failed handshake is audited with a reason (no-certificate, unknown-ca, expired, revoked ...);
- one sweep, a few times a second, hands the time to every connection's protocol object
  (``broker.protocol.ClientProtocol.tick``), which applies the connect deadline, keep-alive, the
  stalled packet and backpressure timeouts from the timestamps it keeps. A timer per
  connection re-armed on every packet would cost more than the packet.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
from collections.abc import Callable

from broker.audit import AuditLog
from broker.auth import Authenticator
from broker.connection import MQTTConnection
from broker.core import BrokerCore
from broker.metrics import Metrics
from broker.settings import Limits

__all__ = ["TLSListener", "classify_tls_error"]

log = logging.getLogger("iotauth.broker.listener")

# OpenSSL X509_V_ERR_* codes -> audit reasons (include/openssl/x509_vfy.h).
_VERIFY_REASONS = {
    2: "unknown-ca",  # unable to get issuer certificate
    3: "crl-missing",
    9: "not-yet-valid",
    10: "expired",
    11: "crl-not-yet-valid",
    12: "crl-expired",
    18: "unknown-ca",  # self-signed leaf
    19: "unknown-ca",  # self-signed certificate in chain
    20: "unknown-ca",  # unable to get local issuer certificate
    21: "unknown-ca",
    23: "revoked",
    24: "invalid-ca",
    26: "wrong-purpose",
}
_SSL_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no-certificate",
    "UNSUPPORTED_PROTOCOL": "tls-version",
    "WRONG_VERSION_NUMBER": "not-tls",
    "HTTP_REQUEST": "not-tls",
    "NO_SHARED_CIPHER": "no-shared-cipher",
}


def classify_tls_error(exc: BaseException) -> tuple[str, str]:
    """(reason, detail) for a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        return _VERIFY_REASONS.get(code, "verify-failed"), str(exc.verify_message)
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or type(exc).__name__
        return _SSL_REASONS.get(reason, "tls-error"), str(reason)
    if isinstance(exc, TimeoutError) or "handshake is taking longer" in str(exc):
        return "handshake-timeout", "no TLS handshake within the connect deadline"
    if isinstance(exc, ConnectionError | EOFError | asyncio.IncompleteReadError):
        return "client-closed", "the client closed the connection during the handshake"
    return "tls-error", f"{type(exc).__name__}: {exc}"


_SWEEP_SECONDS = 0.25


class TLSListener:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        context: Callable[[], ssl.SSLContext],
        core: BrokerCore,
        authenticator: Authenticator,
        limits: Limits,
        audit: AuditLog,
        metrics: Metrics,
    ) -> None:
        self._host, self._port = host, port
        self._context = context
        self._core = core
        self._authenticator = authenticator
        self._limits = limits
        self._audit = audit
        self._metrics = metrics
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._connections: set[MQTTConnection] = set()
        # Insertion-ordered, so the first entry is the oldest handshake in flight.
        self._handshaking: collections.OrderedDict[MQTTConnection, None] = collections.OrderedDict()
        metrics.gauge("iotauth_broker_handshakes_in_progress", lambda: len(self._handshaking))

    @property
    def port(self) -> int:
        if self._server is None:
            msg = "listener not started"
            raise RuntimeError(msg)
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._new_connection, self._host, self._port, backlog=1024, reuse_address=True
        )
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="broker-sweep")

    async def close(self) -> None:
        """Stop accepting, abort every connection (no wills), wait for the sockets to close."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            self._server.close()
        self._core.close_all()
        for conn in list(self._connections):
            conn.protocol.close(will=False)
        for _ in range(50):  # connection_lost runs on the next loop iterations
            if not self._connections:
                break
            await asyncio.sleep(0.01)

    def _new_connection(self) -> MQTTConnection:
        return MQTTConnection(self, self._core, self._authenticator, self._context())

    # -- called by MQTTConnection --------------------------------------------------------------

    def opened(self, conn: MQTTConnection) -> None:
        if len(self._connections) >= self._limits.max_connections:
            self._refused(conn.peer, "connection-limit", "too many connections")
            conn.drop()
            return
        if len(self._handshaking) >= self._limits.max_handshakes:
            oldest = next(iter(self._handshaking))
            del self._handshaking[oldest]
            self._refused(oldest.peer, "handshake-evicted", "oldest handshake dropped at the cap")
            oldest.drop()
        self._connections.add(conn)
        self._handshaking[conn] = None

    def handshake_done(self, conn: MQTTConnection) -> None:
        self._handshaking.pop(conn, None)

    def handshake_failed(self, conn: MQTTConnection, exc: BaseException) -> None:
        if self._handshaking.pop(conn, None) is None and conn not in self._connections:
            return
        reason, detail = classify_tls_error(exc)
        self._refused(conn.peer, reason, detail)

    def closed(self, conn: MQTTConnection) -> None:
        self._connections.discard(conn)
        self._handshaking.pop(conn, None)

    # -- deadlines -----------------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_SWEEP_SECONDS)
            try:
                self._sweep(loop.time())
            except Exception:  # a bug here must not stop deadlines for everyone
                log.exception("deadline sweep failed")

    def _sweep(self, now: float) -> None:
        # The rules are the protocol's (broker.protocol.ClientProtocol.tick); this only visits.
        for conn in list(self._handshaking):
            if conn.protocol.handshake_expired(now):
                self._handshaking.pop(conn, None)
                self._refused(
                    conn.peer, "handshake-timeout", "no TLS handshake within the connect deadline"
                )
                conn.drop()
        for conn in list(self._connections):
            conn.protocol.tick(now)
        self._core.tick(now)  # the core's own timers (MQTT 5 delayed wills)

    def _refused(self, peer: str, reason: str, detail: str) -> None:
        self._metrics.inc("iotauth_broker_refusals_total", reason=reason)
        self._audit.emit("refuse", peer=peer, reason=reason, detail=detail, stage="tls")
