"""The agent against our broker and against mosquitto: state, telemetry, commands, will."""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

from broker.server import BrokerThread
from device_agent import Agent
from provisioning.certificates import build_server_cert, generate_key
from provisioning.keyfiles import private_key_pem
from provisioning.pki import PKI
from tests.conftest import needs_mosquitto
from tests.device_agent.agent_helpers import Sink, wait_until
from tests.device_agent.conftest import Creds, connected


def _flow(agent: Agent, sink: Sink, device: str) -> None:
    assert connected(agent)
    assert wait_until(lambda: b'{"state":"online"}' in sink.on(f"devices/{device}/state"))
    agent.enqueue({"temp": 21.5})
    assert wait_until(lambda: sink.json_on(f"devices/{device}/telemetry"))
    doc = sink.json_on(f"devices/{device}/telemetry")[0]
    assert doc["data"] == {"temp": 21.5}
    assert doc["id"]
    sink.command(device, "ping", {"request_id": "r1", "args": {"x": 1}})
    assert wait_until(lambda: sink.json_on(f"devices/{device}/replies/ping"))
    reply = sink.json_on(f"devices/{device}/replies/ping")[0]
    assert reply == {
        "request_id": "r1",
        "command": "ping",
        "ok": True,
        "result": {"pong": True, "args": {"x": 1}},
    }
    sink.command(device, "self-destruct", {"request_id": "r2"})
    assert wait_until(lambda: sink.json_on(f"devices/{device}/replies/self-destruct"))
    err = sink.json_on(f"devices/{device}/replies/self-destruct")[0]
    assert err["ok"] is False
    assert "unknown command 'self-destruct'" in err["error"]
    sink.command(device, "ping", b"\xff not json")
    assert wait_until(lambda: len(sink.json_on(f"devices/{device}/replies/ping")) == 2)
    assert agent.connected, "a bad command must never take the agent down"


def test_agent_against_our_broker(
    broker: BrokerThread, creds: Creds, sinks: Callable[..., Sink], agents: Callable[..., Agent]
) -> None:
    """Connects with its certificate, publishes state and telemetry, answers commands."""
    sink = sinks(broker.port)
    agent = agents(creds("dev-1"), broker.port)
    _flow(agent, sink, "dev-1")
    assert "dev-1" in broker.broker.connected()
    done = threading.Event()
    agent.stop(done.set)
    assert done.wait(5)
    assert wait_until(lambda: sink.on("devices/dev-1/state")[-1:] == [b'{"state":"offline"}'])


def test_network_cut_publishes_the_offline_will(
    broker: BrokerThread, creds: Creds, sinks: Callable[..., Sink], agents: Callable[..., Agent]
) -> None:
    """A connection lost without DISCONNECT: the broker publishes the will; the agent returns."""
    sink = sinks(broker.port)
    agent = agents(creds("dev-1"), broker.port)
    assert connected(agent)
    agent.drop_connection()
    assert wait_until(lambda: b'{"state":"offline"}' in sink.on("devices/dev-1/state"))
    assert wait_until(lambda: agent.stats.connects == 2)
    assert wait_until(lambda: sink.on("devices/dev-1/state")[-1:] == [b'{"state":"online"}'])


@needs_mosquitto
def test_agent_against_mosquitto(
    mosquitto: object, creds: Creds, sinks: Callable[..., Sink], agents: Callable[..., Agent]
) -> None:
    """The same agent works with mosquitto (require_certificate, identity = CN, ACL pattern)."""
    port = mosquitto.port  # type: ignore[attr-defined]
    sink = sinks(port)
    agent = agents(creds("dev-1"), port)
    _flow(agent, sink, "dev-1")


def _tls_server(cert: Path, key: Path) -> tuple[int, Callable[[], None]]:
    """A TLS server that completes handshakes and nothing else."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()
    return int(server.getsockname()[1]), lambda: (stop.set(), server.close())


def test_broker_from_another_ca_is_refused(
    foreign_pki: PKI, creds: Creds, agents: Callable[..., Agent]
) -> None:
    """A broker whose certificate does not chain to ca.crt: the agent will not talk to it."""
    port, stop = _tls_server(
        foreign_pki.path / "server.crt", foreign_pki.path / "private/server.key"
    )
    try:
        agent = agents(creds("dev-1"), port)
        assert wait_until(lambda: agent.stats.last_failure is not None)
        failure = agent.stats.last_failure
        assert failure is not None
        assert failure.reason == "untrusted-broker"
        assert failure.permanent
        assert agent.stats.connects == 0
        assert agent.stats.attempts == 1  # slow retry: not hammering
    finally:
        stop()


def test_broker_with_the_wrong_host_name_is_refused(
    pki: PKI, creds: Creds, agents: Callable[..., Agent], tmp_path: Path
) -> None:
    """Right CA, wrong name (not 127.0.0.1): refused on the host name check."""
    key = generate_key()
    cert = build_server_cert(
        key.public_key(),
        names=["other.example"],
        issuer=pki.issuing,
        issuer_key=pki.issuing_key(),
        now=dt.datetime.now(dt.UTC),
    )
    from cryptography.hazmat.primitives import serialization

    (tmp_path / "srv.crt").write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + pki.issuing.public_bytes(serialization.Encoding.PEM)
    )
    (tmp_path / "srv.key").write_bytes(private_key_pem(key))
    port, stop = _tls_server(tmp_path / "srv.crt", tmp_path / "srv.key")
    try:
        agent = agents(creds("dev-1"), port)
        assert wait_until(lambda: agent.stats.last_failure is not None)
        failure = agent.stats.last_failure
        assert failure is not None
        assert failure.reason == "wrong-broker-name", failure
        assert agent.stats.connects == 0
    finally:
        stop()


def test_unknown_telemetry_payload_types_are_serialised(
    broker: BrokerThread, creds: Creds, sinks: Callable[..., Sink], agents: Callable[..., Agent]
) -> None:
    """Telemetry with odd values still goes out as JSON (str() fallback)."""
    sink = sinks(broker.port)
    agent = agents(creds("dev-1"), broker.port)
    assert connected(agent)
    agent.enqueue({"path": Path("/x")})
    assert wait_until(lambda: sink.on("devices/dev-1/telemetry"))
    assert json.loads(sink.on("devices/dev-1/telemetry")[0])["data"] == {"path": "/x"}
