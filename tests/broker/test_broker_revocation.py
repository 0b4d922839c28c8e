"""Revocation reaches a running broker: new handshakes refused, live sessions closed within 1 s."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import ssl
from collections.abc import Callable
from typing import Any

import pytest

from broker.auth import ConnectionFacts, MutualTLSAuthenticator
from broker.errors import Refused
from broker.revocation import RevocationWatcher
from broker.server import BrokerThread
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
from tests.conftest import Result


def _connected_socket(port: int, fleet: Fleet, name: str, **kw: Any) -> ssl.SSLSocket:
    sock = tls_socket(port, fleet.creds(name), root=fleet.pki_dir / "root.crt", **kw)
    sock.sendall(connect_packet(name))
    assert read_connack(sock) == 0
    return sock


def test_revoke_from_another_process_kicks_within_one_second(
    broker: BrokerThread, fleet: Fleet, cli: Callable[..., Result]
) -> None:
    """`iotauth device revoke` in a subprocess: dev-1's socket closes within 1 s, dev-2 stays."""
    dev1 = _connected_socket(broker.port, fleet, "dev-1")
    dev2 = _connected_socket(broker.port, fleet, "dev-2")
    result: Result = cli(
        "device", "revoke", "dev-1", "--pki", str(fleet.pki_dir), "--reason", "key-compromise"
    )
    assert result.returncode == 0, result.stderr
    assert closed_by_peer(dev1, 1.0)  # the explicit "within one second"
    assert not closed_by_peer(dev2, 0.3)
    assert broker.broker.audit.events("kick", reason="revoked", client_id="dev-1")
    # Reconnecting is refused in the handshake; the other device can still come and go.
    with pytest.raises((ssl.SSLError, OSError, AssertionError)):
        _connected_socket(broker.port, fleet, "dev-1")
    assert wait_until(lambda: broker.broker.audit.events("refuse", reason="revoked"))
    _connected_socket(broker.port, fleet, "dev-2").close()
    dev1.close()
    dev2.close()


def test_a_revocation_kick_does_not_publish_the_will(
    broker: BrokerThread, fleet: Fleet, peers: Callable[..., Peer]
) -> None:
    """The negative twin of the will on takeover: a revoked identity speaks no more, so the
    kick that closes its session discards its will (a documented choice, docs/BROKER.md)."""
    sink = peers(broker.port, "sink", service=True).connect()
    assert sink.subscribe("devices/+/state") == [0]
    dev = peers(broker.port, "dev-1", will=("devices/dev-1/state", b"revoked-gone", True))
    dev.connect()
    fleet.pki.revoke("dev-1", reason="key-compromise")
    # read the CRL now (False if the 0.2 s background poll already did)
    broker.call(broker.broker.check_revocations())
    assert wait_until(dev.disconnected.is_set)
    assert broker.broker.audit.events("kick", reason="revoked", client_id="dev-1")
    dev2 = peers(broker.port, "dev-2").connect()
    dev2.publish("devices/dev-2/state", b"sentinel", qos=1)
    assert wait_until(lambda: sink.messages)
    assert sink.messages == [("devices/dev-2/state", b"sentinel", False)]


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
def test_tls_resumption_cannot_skip_revocation(
    broker: BrokerThread, fleet: Fleet, version: ssl.TLSVersion
) -> None:
    """A session saved before revocation does not get a revoked device back in."""
    ctx = client_ctx(fleet.creds("dev-1"), root=fleet.pki_dir / "root.crt", maximum=version)
    first = _connected_socket(broker.port, fleet, "dev-1", context=ctx)
    saved = first.session
    first.close()
    again = _connected_socket(broker.port, fleet, "dev-1", context=ctx, session=saved)
    # TLS 1.2 resumes through OpenSSL's session-ID cache (that is what must not outlive a
    # CRL change); TLS 1.3 has no tickets at all.
    assert again.session_reused is (version is ssl.TLSVersion.TLSv1_2)
    again.close()
    fleet.pki.revoke("dev-1", reason="key-compromise")
    # read the CRL now (False if the 0.2 s background poll already did)
    broker.call(broker.broker.check_revocations())
    try:
        sock = tls_socket(
            broker.port, None, root=fleet.pki_dir / "root.crt", context=ctx, session=saved
        )
        sock.sendall(connect_packet("dev-1"))
        assert read_connack(sock) is None
        sock.close()
    except (ssl.SSLError, OSError):
        pass
    assert wait_until(lambda: broker.broker.audit.events("refuse", reason="revoked"))


def test_authenticator_rechecks_revocation_for_resumed_sessions(fleet: Fleet) -> None:
    """Even if a TLS layer resumed a session, the serial is checked against the CRL in force."""
    der = fleet.pki.registry.active("dev-1")
    assert der is not None
    cert_pem = (fleet.creds("dev-1") / "device.crt").read_bytes()
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_pem_x509_certificate(cert_pem)

    class FakeTLS:
        def getpeercert(self, binary_form: bool = False) -> bytes:
            return cert.public_bytes(Encoding.DER)

    facts = ConnectionFacts("dev-1", None, None, "127.0.0.1:1", FakeTLS())  # type: ignore[arg-type]
    ok = MutualTLSAuthenticator(trust_domain="fleet.example", is_revoked=lambda s: False)
    assert asyncio.run(ok.authenticate(facts)).identity.name == "dev-1"
    revoked = MutualTLSAuthenticator(
        trust_domain="fleet.example", is_revoked=lambda s: s == cert.serial_number
    )
    with pytest.raises(Refused) as err:
        asyncio.run(revoked.authenticate(facts))
    assert err.value.reason == "revoked"
    foreign = MutualTLSAuthenticator(trust_domain="other.example", is_revoked=lambda s: False)
    with pytest.raises(Refused):
        asyncio.run(foreign.authenticate(facts))


def test_an_older_crl_cannot_unrevoke(broker: BrokerThread, fleet: Fleet) -> None:
    """Putting back a previous crl.pem (lower number) is ignored: the device stays out."""
    old = fleet.pki_dir / "crl.pem.old"
    shutil.copy(fleet.pki_dir / "crl.pem", old)
    before = broker.broker.crl.number
    fleet.pki.revoke("dev-1", reason="key-compromise")
    broker.call(broker.broker.check_revocations())  # or the 0.2 s poll read it first
    number = broker.broker.crl.number
    assert number > before
    os.replace(old, fleet.pki_dir / "crl.pem")
    assert not broker.call(broker.broker.check_revocations())
    assert broker.broker.crl.number == number
    with pytest.raises((ssl.SSLError, OSError, AssertionError)):
        _connected_socket(broker.port, fleet, "dev-1")


def test_stale_crl_warns_before_next_update(fleet: Fleet) -> None:
    """A warning inside crl_warn_hours of nextUpdate, an error after it, silence before."""

    async def check() -> tuple[str | None, str | None, str | None]:
        watcher = RevocationWatcher(fleet.pki_dir)
        next_update = watcher.state.next_update
        far = watcher.warn_if_stale(next_update - dt.timedelta(days=5))
        near = watcher.warn_if_stale(next_update - dt.timedelta(hours=3))
        watcher._last_stale_warning = None
        gone = watcher.warn_if_stale(next_update + dt.timedelta(minutes=1))
        return far, near, gone

    far, near, gone = asyncio.run(check())
    assert far is None
    assert near is not None
    assert "goes stale" in near
    assert gone is not None
    assert "refused" in gone
