"""Renewal over MQTT: end to end, interrupted by a disconnect, forged and foreign CSRs refused."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from broker.renewal import RenewalService, RenewalSettings
from broker.server import BrokerThread
from device_agent import Agent, load_credentials
from device_agent.renewal import make_csr
from provisioning.pki import PKI
from provisioning.tls import client_context_for_credentials
from tests.device_agent.agent_helpers import wait_until
from tests.device_agent.conftest import Creds, connected


def _ledger(pki: PKI) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (pki.path / "ledger.jsonl").read_text().splitlines()]


def test_renewal_end_to_end(
    broker: BrokerThread, pki: PKI, creds: Creds, agents: Callable[..., Agent]
) -> None:
    """New key on the device, CSR, certificate, switch, atomic store, registry and ledger."""
    store = creds("dev-1")
    old = load_credentials(store)
    old_key = (store / "device.key").read_bytes()
    agent = agents(store, broker.port)
    assert connected(agent)
    agent.request_renewal()
    assert wait_until(lambda: agent.stats.renewals == 1, 15)
    new = load_credentials(store)
    assert new.serial != old.serial
    assert (store / "device.key").read_bytes() != old_key
    assert oct((store / "device.key").stat().st_mode & 0o777) == "0o600"
    assert not (store / ".renewal").exists()
    assert agent.connected
    assert agent.credentials.serial == new.serial
    # The broker saw the device connect with the new certificate.
    assert broker.broker.audit.events("connect", client_id="dev-1", credential=new.serial)
    # Registry: new one active (key made on the device), old one revoked as superseded.
    rows = {r.serial: r for r in pki.registry.history("dev-1")}
    assert rows[new.serial].status == "active"
    assert rows[new.serial].key_origin == "csr"
    assert rows[old.serial].status == "revoked"
    assert rows[old.serial].revocation_reason == "superseded"
    # Ledger: the offer, the issue (with the renewal details) and the revocation; chain verifies.
    events = [(e["event"], e["data"].get("serial")) for e in _ledger(pki)]
    assert ("renewal-offer", new.serial) in events
    assert ("issue", new.serial) in events
    assert ("revoke", old.serial) in events
    issue = next(
        e for e in _ledger(pki) if e["event"] == "issue" and e["data"]["serial"] == new.serial
    )
    assert issue["data"]["replaces"] == old.serial
    assert issue["data"]["via"] == "broker-connect"
    pki.verify_ledger()
    # The old certificate no longer connects.
    assert wait_until(lambda: broker.broker.crl.number >= 2)


def test_renewal_at_two_thirds_of_the_lifetime(
    broker: BrokerThread, creds: Creds, agents: Callable[..., Agent]
) -> None:
    """With renew_at below the elapsed fraction, the agent renews on its own after connecting."""
    store = creds("dev-1", days=1)
    agent = agents(store, broker.port, renew_at=0.0001)
    assert wait_until(lambda: agent.stats.renewals == 1, 15)


def test_renewal_interrupted_by_a_disconnect(
    start_broker: Callable[..., BrokerThread],
    pki: PKI,
    creds: Creds,
    agents: Callable[..., Agent],
) -> None:
    """The CSR goes unanswered, the connection drops; after reconnecting the same request
    completes with a service running beside the broker (confirmed by the device's report)."""
    broker = start_broker(renewal=False)
    store = creds("dev-1")
    old = load_credentials(store)
    agent = agents(store, broker.port, renewal_timeout=0.5)
    assert connected(agent)
    agent.request_renewal()
    assert wait_until((store / ".renewal" / "state.json").exists)
    request_id = json.loads((store / ".renewal" / "state.json").read_text())["request_id"]
    agent.drop_connection()
    assert wait_until(lambda: agent.stats.connects == 2)
    service = RenewalService(
        pki.path, host="127.0.0.1", port=broker.port, settings=RenewalSettings()
    ).start()
    try:
        assert service.wait_subscribed()
        assert wait_until(lambda: agent.stats.renewals == 1, 20)
    finally:
        service.stop()
    assert load_credentials(store).serial != old.serial
    issue = [e for e in _ledger(pki) if e["event"] == "issue" and e["data"].get("renewal")]
    assert [e["data"]["renewal"] for e in issue] == [request_id]  # the same request, once
    assert issue[0]["data"]["via"] == "device-report"


def test_unconfirmed_offer_is_voided_and_the_device_keeps_working(
    start_broker: Callable[..., BrokerThread], pki: PKI, creds: Creds, agents: Callable[..., Agent]
) -> None:
    """An offer never used within offer_ttl is recorded as revoked; the old certificate lives."""
    broker = start_broker(offer_ttl=0.5)
    store = creds("dev-1")
    old = load_credentials(store)
    # A client that asks for a certificate and never switches to it.
    peer = _Peer(store, broker.port)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(key, device_id="dev-1", spiffe_id=old.identity.spiffe_id)
    peer.send({"type": "csr", "request_id": "abc", "csr": csr.decode()})
    assert wait_until(lambda: any(m["type"] == "certificate" for m in peer.answers))
    assert wait_until(lambda: any(m["type"] == "refused" for m in peer.answers), 10)
    refused = next(m for m in peer.answers if m["type"] == "refused")
    assert refused["reason"] == "offer-void"
    peer.close()
    rows = pki.registry.history("dev-1")
    assert {r.status for r in rows if r.serial != old.serial} == {"revoked"}
    assert pki.registry.active("dev-1").serial == old.serial  # type: ignore[union-attr]
    agent = agents(store, broker.port)
    assert connected(agent)


class _Peer:
    """A raw device client speaking the renewal protocol by hand."""

    def __init__(self, store: Path, port: int) -> None:
        ident = json.loads((store / "identity.json").read_text())
        self.device = ident["device_id"]
        self.answers: list[dict[str, Any]] = []
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device)
        self.client.tls_set_context(client_context_for_credentials(store))
        self.client.on_connect = lambda c, *_: c.subscribe(f"devices/{self.device}/certs/issued", 1)
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = lambda _c, _u, m: self.answers.append(json.loads(m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)

    def send(self, doc: dict[str, Any] | bytes) -> None:
        payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self.client.publish(f"devices/{self.device}/certs/csr", payload, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _refusal(peer: _Peer, request_id: str) -> dict[str, Any]:
    assert wait_until(lambda: any(m.get("request_id") == request_id for m in peer.answers))
    answer = next(m for m in peer.answers if m.get("request_id") == request_id)
    assert answer["type"] == "refused", answer
    return answer


def test_forged_and_foreign_csrs_are_refused(broker: BrokerThread, pki: PKI, creds: Creds) -> None:
    """Bad signature, another device's name, the current key reused: refused, nothing issued."""
    store = creds("dev-1")
    creds("dev-2")
    before = pki.registry.count()
    peer = _Peer(store, broker.port)
    spiffe = "spiffe://fleet.example/device/dev-1"
    key = ec.generate_private_key(ec.SECP256R1())
    good = x509.load_pem_x509_csr(make_csr(key, device_id="dev-1", spiffe_id=spiffe))
    # Forged: the CSR carries one key but is signed by another (the requester lacks the key).
    other = ec.generate_private_key(ec.SECP256R1())
    forged = x509.load_pem_x509_csr(make_csr(other, device_id="dev-1", spiffe_id=spiffe))
    der = bytearray(forged.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF  # break the signature
    forged_pem = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + __import__("base64").encodebytes(bytes(der))
        + b"-----END CERTIFICATE REQUEST-----\n"
    )
    peer.send({"type": "csr", "request_id": "forged", "csr": forged_pem.decode()})
    assert _refusal(peer, "forged")["reason"] == "bad-csr"
    # Another device's identity in the CSR.
    csr2 = make_csr(key, device_id="dev-2", spiffe_id="spiffe://fleet.example/device/dev-2")
    peer.send({"type": "csr", "request_id": "foreign", "csr": csr2.decode()})
    assert _refusal(peer, "foreign")["reason"] == "identity-mismatch"
    # The current key again.
    current = serialization.load_pem_private_key((store / "device.key").read_bytes(), None)
    assert isinstance(current, ec.EllipticCurvePrivateKey)
    reuse = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")]))
        .sign(current, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    peer.send({"type": "csr", "request_id": "reuse", "csr": reuse.decode()})
    assert _refusal(peer, "reuse")["reason"] == "key-reuse"
    peer.send(b"not json")
    assert wait_until(lambda: any(m.get("reason") == "bad-request" for m in peer.answers))
    peer.close()
    assert good.is_signature_valid
    assert pki.registry.count() == before  # nothing issued, nothing recorded
    assert not any(e["event"] == "renewal-offer" for e in _ledger(pki))


def test_a_device_cannot_publish_another_devices_csr(
    broker: BrokerThread, pki: PKI, creds: Creds
) -> None:
    """dev-1 writing to devices/dev-2/certs/csr is denied by the broker's ACL."""
    peer = _Peer(creds("dev-1"), broker.port)
    creds("dev-2")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(key, device_id="dev-2", spiffe_id="spiffe://fleet.example/device/dev-2")
    peer.client.publish(
        "devices/dev-2/certs/csr",
        json.dumps({"type": "csr", "request_id": "x", "csr": csr.decode()}).encode(),
        qos=1,
    )
    assert wait_until(lambda: broker.broker.audit.events("deny", client_id="dev-1"))
    peer.close()
    assert not any(e["event"] == "renewal-offer" for e in _ledger(pki))
