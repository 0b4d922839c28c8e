"""Who gets in: mutual TLS refusals (with audited reasons) and the client_id = identity binding."""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from broker.server import BrokerThread
from provisioning.pki import PKI
from tests.broker.broker_helpers import (
    BrokerFactory,
    Fleet,
    Peer,
    connect_packet,
    read_connack,
    tls_socket,
    wait_until,
)


def _refusals(broker: BrokerThread, reason: str) -> list[dict[str, Any]]:
    return broker.broker.audit.events("refuse", reason=reason)


def test_valid_device_connects_and_is_audited(
    broker: BrokerThread, peers: Callable[..., Peer]
) -> None:
    """The positive case every refusal below is the twin of."""
    peer = peers(broker.port, "dev-1").connect()
    assert peer.connected.is_set()
    (event,) = broker.broker.audit.events("connect", client_id="dev-1")
    assert event["identity"] == "spiffe://fleet.example/device/dev-1"
    assert event["method"] == "mtls"


def test_no_client_certificate_never_gets_connack(broker: BrokerThread, fleet: Fleet) -> None:
    """A TLS client without a certificate is refused in the handshake: no CONNACK."""
    sock = None
    try:
        sock = tls_socket(broker.port, None, root=fleet.pki_dir / "root.crt")
        sock.sendall(connect_packet("dev-1"))
        assert read_connack(sock) is None
    except (ssl.SSLError, OSError):
        pass  # TLS 1.2 fails in the handshake itself
    finally:
        if sock is not None:
            sock.close()
    assert wait_until(lambda: _refusals(broker, "no-certificate"))


def test_foreign_ca_is_refused(
    broker: BrokerThread, foreign_pki: PKI, tmp_path: Path, fleet: Fleet
) -> None:
    """Same trust-domain name, different CA: 'unknown-ca' in the handshake."""
    foreign_pki.issue("dev-1", out=tmp_path / "foreign-dev-1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(fleet.pki_dir / "root.crt")
    ctx.load_cert_chain(
        tmp_path / "foreign-dev-1" / "device.crt", tmp_path / "foreign-dev-1" / "device.key"
    )
    peer = Peer(broker.port, None, "dev-1", context=ctx).connect(expect_ok=False)
    assert peer.refused
    assert wait_until(lambda: _refusals(broker, "unknown-ca"))
    peer.close()


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"now": dt.datetime.now(dt.UTC) - dt.timedelta(days=30), "days": 1}, "expired"),
        ({"now": dt.datetime.now(dt.UTC) + dt.timedelta(days=30), "days": 60}, "not-yet-valid"),
        ({"extended_key_usage": [ExtendedKeyUsageOID.SERVER_AUTH]}, "wrong-purpose"),
    ],
    ids=["expired", "not-yet-valid", "serverAuth-only"],
)
def test_bad_certificates_are_refused_in_the_handshake(
    make_broker: BrokerFactory,
    fleet: Fleet,
    peers: Callable[..., Peer],
    kwargs: dict[str, Any],
    reason: str,
) -> None:
    """Expired, not yet valid and serverAuth-only certificates never reach CONNECT."""
    fleet.creds("dev-bad", **kwargs)
    broker = make_broker()
    peer = peers(broker.port, "dev-bad").connect(expect_ok=False)
    assert peer.refused
    assert wait_until(lambda: _refusals(broker, reason)), broker.broker.audit.events("refuse")


def test_revoked_certificate_is_refused(
    make_broker: BrokerFactory, fleet: Fleet, peers: Callable[..., Peer]
) -> None:
    """A certificate on the CRL at start-up fails the handshake with 'revoked'."""
    fleet.creds("dev-3")
    fleet.pki.revoke("dev-3", reason="key-compromise")
    broker = make_broker()
    assert peers(broker.port, "dev-3").connect(expect_ok=False).refused
    assert wait_until(lambda: _refusals(broker, "revoked"))
    assert peers(broker.port, "dev-1").connect().connected.is_set()


def test_ca_certificate_as_client_is_refused(
    broker: BrokerThread, fleet: Fleet, tmp_path: Path
) -> None:
    """The issuing CA's own certificate and key are not a client identity."""
    creds = tmp_path / "ca-as-client"
    creds.mkdir()
    shutil.copy(fleet.pki_dir / "issuing.crt", creds / "device.crt")
    shutil.copy(fleet.pki_dir / "private" / "issuing.key", creds / "device.key")
    shutil.copy(fleet.pki_dir / "root.crt", creds / "ca.crt")
    peer = Peer(broker.port, creds, "dev-1").connect(expect_ok=False)
    assert peer.refused
    events = broker.broker.audit.events("refuse")
    assert wait_until(lambda: broker.broker.audit.events("refuse"))
    reasons = {e["reason"] for e in broker.broker.audit.events("refuse")}
    assert reasons & {"wrong-purpose", "ca-certificate", "invalid-ca", "no-identity"}, events
    peer.close()


def test_tls_below_1_2_is_refused(broker: BrokerThread, fleet: Fleet) -> None:
    """TLS 1.2 is the minimum; a TLS 1.1-only client cannot connect (1.2 and 1.3 can)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(fleet.pki_dir / "root.crt")
    creds = fleet.creds("dev-1")
    ctx.load_cert_chain(creds / "device.crt", creds / "device.key")
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        sock = tls_socket(broker.port, creds, root=fleet.pki_dir / "root.crt", maximum=version)
        sock.sendall(connect_packet("dev-1"))
        assert read_connack(sock) == 0
        sock.close()
    try:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    raw = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
    try:
        with pytest.raises((ssl.SSLError, OSError)):
            ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    finally:
        raw.close()


# -- client_id binding --------------------------------------------------------------------------


def test_client_id_of_another_device_is_identifier_rejected(
    broker: BrokerThread, peers: Callable[..., Peer]
) -> None:
    """dev-2's certificate with client_id dev-1: CONNACK 2, audited as client-id-mismatch."""
    peer = peers(broker.port, "dev-2", "dev-1").connect(expect_ok=False)
    assert peer.refused
    assert peer.connack is not None
    assert "identifier" in str(peer.connack).lower()
    assert broker.broker.audit.events("refuse", reason="client-id-mismatch")


@pytest.mark.parametrize("client_id", ["dev-1/x", "dev-1+", "dev-1#", "", "DEV-1"])
def test_malformed_client_ids_are_refused(
    broker: BrokerThread, fleet: Fleet, client_id: str
) -> None:
    """client_id with '/', '+', '#', empty or upper case: refused before any session state."""
    sock = tls_socket(broker.port, fleet.creds("dev-1"), root=fleet.pki_dir / "root.crt")
    sock.sendall(connect_packet(client_id))
    assert read_connack(sock) in (2, None)
    sock.close()
    assert wait_until(lambda: broker.broker.audit.events("refuse"))
    assert broker.broker.connected() == []


def test_username_and_password_are_ignored_for_identity(
    broker: BrokerThread, peers: Callable[..., Peer]
) -> None:
    """A device claiming username 'admin' is still just dev-1 (and still gets in)."""
    admin = peers(broker.port, "dev-1", username="admin").connect()
    assert admin.subscribe("devices/dev-2/#") == [128]
    assert admin.subscribe("devices/dev-1/#") == [0]


def test_service_identity_connects_with_its_name(
    broker: BrokerThread, peers: Callable[..., Peer]
) -> None:
    """Services bind client_id to the service name; a device-style client_id is refused."""
    assert peers(broker.port, "sink", service=True).connect().connected.is_set()
    assert peers(broker.port, "sink", "dev-1", service=True).connect(expect_ok=False).refused


def test_refused_connect_does_not_wipe_the_victims_session(
    broker: BrokerThread, peers: Callable[..., Peer]
) -> None:
    """amqtt deletes the victim's session before auth; here the victim keeps its subscription."""
    victim = peers(broker.port, "dev-1").connect()
    assert victim.subscribe("devices/dev-1/commands/#") == [0]
    attacker = peers(broker.port, "dev-2", "dev-1").connect(expect_ok=False)
    assert attacker.refused
    sink = peers(broker.port, "sink", service=True).connect()
    sink.publish("devices/dev-1/commands/ping", b"still-there", qos=1)
    assert wait_until(lambda: victim.messages)
    assert victim.messages == [("devices/dev-1/commands/ping", b"still-there", False)]
    assert not victim.disconnected.is_set()


def test_persistent_session_cannot_be_borrowed(
    broker: BrokerThread, peers: Callable[..., Peer]
) -> None:
    """dev-2 cannot resume dev-1's persistent session or read what was queued for it (amqtt#389)."""
    dev1 = peers(broker.port, "dev-1", clean=False).connect()
    assert dev1.subscribe("devices/dev-1/commands/#", qos=1) == [1]
    dev1.close()
    sink = peers(broker.port, "sink", service=True).connect()
    sink.publish("devices/dev-1/commands/unlock", b"QUEUED-FOR-DEV1", qos=1)
    thief = peers(broker.port, "dev-2", "dev-1", clean=False).connect(expect_ok=False)
    assert thief.refused
    assert thief.messages == []
    # The real device resumes its session and gets the queued command (not flagged retained).
    back = peers(broker.port, "dev-1", clean=False).connect()
    assert back.session_present
    assert wait_until(lambda: back.messages)
    assert back.messages == [("devices/dev-1/commands/unlock", b"QUEUED-FOR-DEV1", False)]
