"""How a connection ends and what the transport sees.

Most of it is driven in memory: real TLS (client and broker on memory BIOs), the real core and
authenticator, and a transport that only records what the broker would send. That is for what
the kernel hides from end-to-end tests: loopback socket buffers swallow megabytes, so a client
that never reads cannot make the broker's own send buffer grow in a test of sensible length.
Here the transport says how much is waiting, and the decision is the broker's. The TLS shutdown
(close_notify) is tested with real sockets and a real subscriber.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker._listener import TLSListener
from broker.audit import AuditLog
from broker.auth import MutualTLSAuthenticator
from broker.connection import MQTTConnection
from broker.core import BrokerCore
from broker.metrics import Metrics
from broker.protocol import State
from broker.server import BrokerThread
from broker.settings import BrokerSettings, Limits
from provisioning.tls import server_context_for_pki
from tests.broker.broker_helpers import (
    Fleet,
    Peer,
    client_ctx,
    closed_by_peer,
    connect_packet,
    read_connack,
    tls_socket,
    wait_until,
)

PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"


class MemoryTransport(asyncio.Transport):
    """Writes go straight into the client's incoming BIO; ``buffered`` is what it claims to hold."""

    def __init__(self, client_in: ssl.MemoryBIO) -> None:
        super().__init__()
        self.client_in = client_in
        self.buffered = 0
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.client_in.write(bytes(data))

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def abort(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class Harness:
    def __init__(self, pki_dir: Path, creds: Path, limits: Limits) -> None:
        settings = BrokerSettings(pki_dir, limits=limits)
        self.audit = AuditLog(lambda _line: None)
        metrics = Metrics()
        self.core = BrokerCore(settings, audit=self.audit, metrics=metrics)
        auth = MutualTLSAuthenticator(trust_domain="fleet.example", is_revoked=lambda _s: False)
        server = server_context_for_pki(pki_dir)
        listener = TLSListener(
            host="127.0.0.1",
            port=0,
            context=lambda: server,
            core=self.core,
            authenticator=auth,
            limits=limits,
            audit=self.audit,
            metrics=metrics,
        )
        self.conn = MQTTConnection(listener, self.core, auth, server)
        client_in, self.client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client_ctx(creds, root=pki_dir / "root.crt").wrap_bio(
            client_in, self.client_out, server_hostname="127.0.0.1"
        )
        self.transport = MemoryTransport(client_in)
        self.conn.connection_made(self.transport)

    def pump(self) -> None:
        data = self.client_out.read()
        if data:
            self.conn.data_received(data)

    async def connect(self, client_id: str) -> None:
        while True:
            try:
                self.client.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.pump()
        self.client.write(connect_packet(client_id))
        self.pump()
        for _ in range(100):  # the authenticator runs as a task
            if self.conn.protocol.state is State.LIVE:
                break
            await asyncio.sleep(0.01)
        assert self.conn.protocol.state is State.LIVE
        assert self.read(4)[:2] == b"\x20\x02"  # CONNACK

    def send(self, data: bytes) -> None:
        self.client.write(data)
        self.pump()

    def read(self, n: int) -> bytes:
        try:
            return self.client.read(n)
        except ssl.SSLWantReadError:
            return b""


def test_a_client_that_sends_and_never_reads_is_closed_at_twice_the_outbound_limit(
    fleet: Fleet,
) -> None:
    """Deliveries stop at outbound_max_bytes, but answers to the peer's own packets (PUBACK,
    PINGRESP) would grow without bound for a client that never reads: closed, and audited."""
    limits = Limits(outbound_max_bytes=64 * 1024)

    async def scenario() -> None:
        h = Harness(fleet.pki_dir, fleet.creds("dev-1"), limits)
        await h.connect("dev-1")
        h.transport.buffered = 2 * limits.outbound_max_bytes  # at the line: still served
        h.send(PINGREQ)
        assert h.read(2) == PINGRESP
        assert h.conn.protocol.state is State.LIVE
        h.transport.buffered = 2 * limits.outbound_max_bytes + 1  # past it
        h.send(PINGREQ)
        assert h.conn.protocol.state is State.CLOSED
        assert h.transport.closed
        kicks = h.audit.events("kick", client_id="dev-1")
        assert [k["reason"] for k in kicks] == ["slow-reader"]
        assert "dev-1" not in h.core.live

    asyncio.run(scenario())


_VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


@pytest.mark.parametrize("version", _VERSIONS, ids=["tls1.2", "tls1.3"])
def test_a_tls_close_notify_is_answered_and_ends_the_session_with_its_will(
    broker: BrokerThread, fleet: Fleet, peers: Callable[..., Peer], version: ssl.TLSVersion
) -> None:
    """A client that only ends TLS (close_notify, as ``SSLSocket.unwrap()`` and asyncio's TLS
    transport do) and waits for the answer gets the broker's close_notify (RFC 8446 6.1, RFC
    5246 7.2.1), and its session ends like a lost connection: no DISCONNECT was sent, so the
    will is published (MQTT-3.1.2-8)."""
    sink = peers(broker.port, "sink", service=True).connect()
    assert sink.subscribe("devices/+/state") == [0]
    ctx = client_ctx(fleet.creds("dev-1"), root=fleet.pki_dir / "root.crt", maximum=version)
    sock = tls_socket(broker.port, None, root=fleet.pki_dir / "root.crt", context=ctx)
    assert sock.version() == ("TLSv1.2" if version is ssl.TLSVersion.TLSv1_2 else "TLSv1.3")
    sock.sendall(connect_packet("dev-1", will=("devices/dev-1/state", b"tls-closed")))
    assert read_connack(sock) == 0
    plain = sock.unwrap()  # sends close_notify, then blocks (5 s timeout) for the broker's
    try:
        assert wait_until(lambda: sink.messages)
        assert sink.messages == [("devices/dev-1/state", b"tls-closed", False)]
        assert "dev-1" not in broker.broker.connected()
        assert closed_by_peer(plain, 5)
    finally:
        plain.close()


def test_a_close_notify_after_disconnect_publishes_no_will(
    broker: BrokerThread, fleet: Fleet, peers: Callable[..., Peer]
) -> None:
    """The negative twin: DISCONNECT first (MQTT-3.14.4-3 discards the will), then close_notify."""
    sink = peers(broker.port, "sink", service=True).connect()
    assert sink.subscribe("devices/+/state") == [0]
    sock = tls_socket(broker.port, fleet.creds("dev-1"), root=fleet.pki_dir / "root.crt")
    sock.sendall(connect_packet("dev-1", will=("devices/dev-1/state", b"tls-closed")))
    assert read_connack(sock) == 0
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    try:
        sock.unwrap().close()
    except (OSError, ssl.SSLError):
        sock.close()  # the broker may have closed first: either way the will must not come
    dev2 = peers(broker.port, "dev-2").connect()
    dev2.publish("devices/dev-2/state", b"sentinel", qos=1)
    assert wait_until(lambda: sink.messages)
    assert sink.messages == [("devices/dev-2/state", b"sentinel", False)]
