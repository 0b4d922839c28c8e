"""The TLS listener: accept, cap, handshake with a deadline, classify failures, hand over streams.

amqtt's own listeners use ``asyncio.start_server(ssl=...)``: handshake failures vanish silently,
excess connections queue on a semaphore, and nothing bounds the time to CONNECT. This module
owns the socket instead (no amqtt import here):

- each accepted socket is counted; above ``max_connections`` it is closed at once (refused,
  never queued);
- the TLS handshake runs through ``loop.connect_accepted_socket`` with the context the
  revocation watcher currently holds, so a new CRL applies to the very next handshake;
- at most ``max_handshakes`` handshakes are in flight; at the cap the *oldest* is dropped, so a
  flood of half-open connections cannot lock a valid device out;
- a failed handshake is audited with a reason (no-certificate, unknown-ca, expired, revoked ...).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from broker.audit import AuditLog
from broker.metrics import Metrics
from broker.settings import Limits

__all__ = ["ConnectionInfo", "TLSListener", "classify_tls_error"]

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


def _close_socket(sock: socket.socket, _task: object) -> None:
    sock.close()  # idempotent: a transport that already owned the socket closed the same object


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    peer: str
    transport: asyncio.Transport
    tls: ssl.SSLObject | None
    # loop.time() by which CONNECT must have been read (accept time + connect_timeout).
    connect_deadline: float


Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter, ConnectionInfo], Awaitable[None]]


class TLSListener:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        context: Callable[[], ssl.SSLContext],
        serve: Serve,
        limits: Limits,
        audit: AuditLog,
        metrics: Metrics,
    ) -> None:
        self._host, self._port = host, port
        self._context = context
        self._serve = serve
        self._limits = limits
        self._audit = audit
        self._metrics = metrics
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        # Insertion-ordered, so the first entry is the oldest handshake in flight.
        self._handshaking: collections.OrderedDict[
            asyncio.Task[None], tuple[socket.socket, str]
        ] = collections.OrderedDict()
        self._established: set[asyncio.Task[None]] = set()
        self._transports: set[asyncio.Transport] = set()
        metrics.gauge("iotauth_broker_handshakes_in_progress", lambda: len(self._handshaking))

    @property
    def port(self) -> int:
        if self._sock is None:
            msg = "listener not started"
            raise RuntimeError(msg)
        return int(self._sock.getsockname()[1])

    @property
    def open_connections(self) -> int:
        return len(self._handshaking) + len(self._established)

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.create_server((self._host, self._port), family=family, backlog=1024)
        sock.setblocking(False)
        self._sock = sock
        self._accept_task = asyncio.create_task(self._accept_loop(), name="broker-accept")

    async def close(self) -> None:
        """Stop accepting, drop handshakes, abort established connections, wait for them."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        if self._sock is not None:
            self._sock.close()
        for task in list(self._handshaking):
            task.cancel()
        for transport in list(self._transports):
            transport.abort()
        pending = [*self._handshaking, *self._established]
        if pending:
            await asyncio.wait(pending, timeout=5)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None  # noqa: S101 - start() sets it
        while True:
            try:
                conn, addr = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            peer = f"{addr[0]}:{addr[1]}"
            if self.open_connections >= self._limits.max_connections:
                self._refused(peer, "connection-limit", "too many connections")
                conn.close()
                continue
            if len(self._handshaking) >= self._limits.max_handshakes:
                # Audit and close here, not in the task: a task cancelled before its first step
                # never runs its except clauses.
                oldest, (old_sock, old_peer) = next(iter(self._handshaking.items()))
                del self._handshaking[oldest]
                self._refused(old_peer, "handshake-evicted", "oldest handshake dropped at the cap")
                oldest.cancel()
                oldest.add_done_callback(functools.partial(_close_socket, old_sock))
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            deadline = loop.time() + self._limits.connect_timeout
            task = asyncio.create_task(self._handle(conn, peer, deadline))
            self._handshaking[task] = (conn, peer)

    def _refused(self, peer: str, reason: str, detail: str) -> None:
        self._metrics.inc("iotauth_broker_refusals_total", reason=reason)
        self._audit.emit("refuse", peer=peer, reason=reason, detail=detail, stage="tls")

    async def _handle(self, conn: socket.socket, peer: str, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None  # noqa: S101
        reader = asyncio.StreamReader(limit=2**16)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=self._context(),
                ssl_handshake_timeout=max(deadline - loop.time(), 0.001),
            )
        except asyncio.CancelledError:
            conn.close()
            raise
        except (OSError, EOFError, TimeoutError) as exc:
            reason, detail = classify_tls_error(exc)
            self._refused(peer, reason, detail)
            conn.close()
            return
        finally:
            self._handshaking.pop(task, None)
        self._established.add(task)
        self._transports.add(transport)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        info = ConnectionInfo(
            peer=peer,
            transport=transport,
            tls=transport.get_extra_info("ssl_object"),
            connect_deadline=deadline,
        )
        try:
            await self._serve(reader, writer, info)
        except Exception:  # a bug in one connection must not take the listener down
            log.exception("connection from %s failed", peer)
        finally:
            self._established.discard(task)
            self._transports.discard(transport)
            transport.abort()
