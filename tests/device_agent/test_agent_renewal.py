"""Renewal over MQTT: end to end, interrupted by a disconnect, forged and foreign CSRs refused;
the device's checks of the answer and its key generation in a child process."""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.renewal import RenewalService, RenewalSettings
from broker.server import BrokerThread
from device_agent import Agent, Credentials, RenewalError, load_credentials
from device_agent.keygen import make_csr, make_key_and_csr
from device_agent.renewal import RenewalStore
from provisioning.certificates import build_leaf
from provisioning.identity import parse_spiffe_id
from provisioning.pki import PKI
from tests.device_agent.agent_helpers import RenewalPeer, wait_until
from tests.device_agent.conftest import Creds, connected


def _ledger(pki: PKI) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (pki.path / "ledger.jsonl").read_text().splitlines()]


def test_making_the_key_does_not_stall_the_agent_loop(
    broker: BrokerThread,
    creds: Creds,
    agents: Callable[..., Agent],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Key generation (a child process on a real device, slow on a Pi) runs off the agent's
    loop: while it takes its time the loop still runs timers (keep-alive, telemetry, commands).
    The delay is injected into the real RenewalStore.begin, which then runs unchanged."""
    real_begin = RenewalStore.begin
    started, release = threading.Event(), threading.Event()

    def slow_begin(self: RenewalStore, current: Credentials) -> Any:
        started.set()
        release.wait(10)
        return real_begin(self, current)

    monkeypatch.setattr(RenewalStore, "begin", slow_begin)
    agent = agents(creds("dev-1"), broker.port)
    assert connected(agent)
    agent.request_renewal()
    assert started.wait(5)
    ticked = threading.Event()
    agent.reactor.call_soon_threadsafe(lambda: agent.reactor.call_later(0.05, ticked.set))
    try:
        assert ticked.wait(3), "the agent's loop waited for the key generation"
    finally:
        release.set()
    assert wait_until(lambda: agent.stats.renewals == 1, 20)


def test_a_failed_key_generation_is_one_line_and_retried_slowly(
    broker: BrokerThread,
    creds: Creds,
    agents: Callable[..., Agent],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The key generator fails (injected into RenewalStore.begin): the agent logs the reason
    once, without a traceback, stays connected, and does not retry every second."""
    calls: list[int] = []

    def failing_begin(self: RenewalStore, current: Credentials) -> Any:
        calls.append(1)
        raise RenewalError("key generation failed: no entropy", device_id=current.device_id)

    monkeypatch.setattr(RenewalStore, "begin", failing_begin)
    caplog.set_level(logging.INFO, "iotauth")
    store = creds("dev-1")
    # Certificates are backdated 5 minutes: a 1e-5 fraction of the lifetime has already passed,
    # so the renewal is due at once and the timer path (not a forced request) retries.
    agent = agents(store, broker.port, renew_at=1e-5)
    assert connected(agent)
    assert wait_until(lambda: calls, 5)
    assert not wait_until(lambda: len(calls) > 1, 2.5)
    errors = [r for r in caplog.records if "cannot start renewal" in r.getMessage()]
    assert len(errors) == 1
    assert "no entropy" in errors[0].getMessage()
    assert errors[0].exc_info is None
    assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert agent.connected


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
    peer = RenewalPeer(store, broker.port)
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


def _refusal(peer: RenewalPeer, request_id: str) -> dict[str, Any]:
    assert wait_until(lambda: any(m.get("request_id") == request_id for m in peer.answers))
    answer = next(m for m in peer.answers if m.get("request_id") == request_id)
    assert answer["type"] == "refused", answer
    return answer


def test_forged_and_foreign_csrs_are_refused(broker: BrokerThread, pki: PKI, creds: Creds) -> None:
    """Bad signature, another device's name, the current key reused: refused, nothing issued."""
    store = creds("dev-1")
    creds("dev-2")
    before = pki.registry.count()
    peer = RenewalPeer(store, broker.port)
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
    peer = RenewalPeer(creds("dev-1"), broker.port)
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


# -- the device's checks of the answer (RenewalStore.accept / install, no broker) ---------------

NOW = dt.datetime.now(dt.UTC)
PEM = serialization.Encoding.PEM


def _pending(creds: Creds) -> tuple[RenewalStore, Credentials, ec.EllipticCurvePublicKey]:
    """dev-1 with a renewal begun (key and CSR made): the store and the new public key."""
    current = load_credentials(creds("dev-1"))
    renewal = RenewalStore(current.path)
    renewal.begin(current)
    key = serialization.load_pem_private_key(renewal.key_file.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return renewal, current, key.public_key()


def _chain(
    pki: PKI,
    public_key: ec.EllipticCurvePublicKey,
    *,
    name: str = "dev-1",
    now: dt.datetime = NOW,
    days: int = 30,
    eku: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
) -> bytes:
    """leaf + issuing CA as the service sends them, signed by ``pki``'s issuing CA."""
    leaf = build_leaf(
        parse_spiffe_id(f"spiffe://fleet.example/device/{name}"),
        public_key,
        issuer=pki.issuing,
        issuer_key=pki.issuing_key(),
        now=now,
        days=days,
        extended_key_usage=eku,
    )
    return leaf.public_bytes(PEM) + pki.issuing.public_bytes(PEM)


def test_accept_normalises_the_chain_and_install_commits_it(pki: PKI, creds: Creds) -> None:
    """CRLF, text around the blocks and a root sent along: the candidate is the canonical leaf +
    issuing CA, checked by OpenSSL; install commits it with the store's atomic commit."""
    renewal, current, public = _pending(creds)
    chain_before = (current.path / "chain.crt").read_bytes()
    chain = _chain(pki, public) + pki.root.public_bytes(PEM)
    noisy = b"subject=CN = dev-1\r\n" + chain.replace(b"\n", b"\r\n") + b"trailing text\r\n"
    candidate = renewal.accept(noisy, current)
    leaf = x509.load_pem_x509_certificates(chain)[0]
    assert candidate.serial == format(leaf.serial_number, "x") != current.serial
    assert renewal.cert_file.read_bytes() == chain[: -len(pki.root.public_bytes(PEM))]
    state = renewal.load()
    assert state is not None
    assert (state.phase, state.serial) == ("received", candidate.serial)
    renewal.install(current)
    installed = load_credentials(current.path)
    assert installed.serial == candidate.serial
    assert (current.path / "device.crt").read_bytes() == renewal.cert_file.read_bytes()
    assert (current.path / "chain.crt").read_bytes() == chain_before
    assert (current.path / "device.key").read_bytes() == renewal.key_file.read_bytes()
    state = renewal.load()
    assert state is not None
    assert state.phase == "installed"


def _other_key() -> ec.EllipticCurvePublicKey:
    return ec.generate_private_key(ec.SECP256R1()).public_key()


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        # A certificate for a key other than the one we made: OpenSSL's key check refuses it.
        (lambda pki, pub, _f: _chain(pki, _other_key()), "device.key does not belong to"),
        (lambda pki, pub, _f: _chain(pki, pub, name="dev-2"), "SAN URI is"),
        (lambda pki, pub, foreign: _chain(foreign, pub), "does not accept device.crt"),
        (
            lambda pki, pub, _f: _chain(pki, pub, eku=(ExtendedKeyUsageOID.SERVER_AUTH,)),
            "certificate purpose",  # "unsuitable" (OpenSSL 3) or "unsupported" (1.1)
        ),
        (lambda pki, pub, _f: _chain(pki, pub, now=NOW + dt.timedelta(days=2)), "not valid now"),
        (
            lambda pki, pub, _f: _chain(pki, pub, now=NOW - dt.timedelta(days=10), days=1),
            "not valid now",
        ),
        (lambda pki, pub, _f: _chain(pki, pub).split(b"-\n-")[0] + b"-\n", "lacks the issuing"),
        (lambda *_: b"no certificate here", "unreadable certificate: no PEM certificate"),
        (
            lambda *_: b"-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n" * 2,
            "unreadable certificate",
        ),
        (
            lambda *_: b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n" * 2,
            "the candidate is unusable",
        ),
    ],
    ids=[
        "other-key",
        "other-device",
        "foreign-ca",
        "server-auth-only",
        "not-yet-valid",
        "expired",
        "leaf-only",
        "no-pem",
        "bad-base64",
        "not-a-certificate",
    ],
)
def test_accept_refuses_what_is_not_our_next_certificate(
    pki: PKI,
    foreign_pki: PKI,
    creds: Creds,
    answer: Callable[[PKI, ec.EllipticCurvePublicKey, PKI], bytes],
    reason: str,
) -> None:
    """Refused with the reason; the phase stays ``requested`` and no candidate file is left."""
    renewal, current, public = _pending(creds)
    with pytest.raises(RenewalError, match="refused: ") as info:
        renewal.accept(answer(pki, public, foreign_pki), current)
    assert reason in info.value.reason, info.value.reason
    state = renewal.load()
    assert state is not None
    assert state.phase == "requested"
    assert not renewal.cert_file.exists()


def test_accept_refuses_the_certificate_we_already_have(creds: Creds) -> None:
    """The service answering with our current certificate (for the key we then hold) is refused."""
    renewal, current, _ = _pending(creds)
    renewal.key_file.write_bytes((current.path / "device.key").read_bytes())
    with pytest.raises(RenewalError, match="the certificate is the one we have"):
        renewal.accept((current.path / "device.crt").read_bytes(), current)
    assert not renewal.cert_file.exists()


# -- key generation in a child process (device_agent.keygen) ------------------------------------

SPIFFE = "spiffe://fleet.example/device/dev-1"


@pytest.fixture
def without_cryptography(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """As in an agent process: cryptography not loaded, so keygen starts a child. Records the
    argv of every subprocess.run (restored afterwards; no broker thread runs in these tests)."""
    monkeypatch.delitem(sys.modules, "cryptography")
    calls: list[list[str]] = []
    run = subprocess.run

    def spy(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        calls.append(list(argv))
        assert kw["stdout"] is subprocess.DEVNULL
        return run(argv, **kw)

    monkeypatch.setattr(subprocess, "run", spy)
    return calls


def test_keygen_child_writes_the_key_itself(
    tmp_path: Path, without_cryptography: list[list[str]]
) -> None:
    """The child writes key (0600) and CSR; only paths and names cross to it, never the key."""
    key_file, csr_file = tmp_path / "device.key", tmp_path / "csr.pem"
    make_key_and_csr(key_file, csr_file, device_id="dev-1", spiffe_id=SPIFFE)
    [argv] = without_cryptography
    assert argv[-4:] == [str(key_file), str(csr_file), "dev-1", SPIFFE]
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert not list(tmp_path.glob(".*.tmp"))
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    csr = x509.load_pem_x509_csr(csr_file.read_bytes())
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()
    assert csr.subject.rfc4514_string() == "CN=dev-1"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE]


def test_keygen_child_failure_is_a_one_line_reason(
    tmp_path: Path, without_cryptography: list[list[str]]
) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(RenewalError) as info:
        make_key_and_csr(missing / "k", missing / "c", device_id="dev-1", spiffe_id=SPIFFE)
    assert info.value.reason.startswith("key generation failed (exit status 1): error: ")
    assert "No such file or directory" in info.value.reason
    assert "\n" not in info.value.reason
    with pytest.raises(RenewalError, match="did not finish within"):
        make_key_and_csr(tmp_path / "k", tmp_path / "c", device_id="d", spiffe_id=SPIFFE, timeout=0)
    assert len(without_cryptography) == 2


def test_begin_in_a_process_with_cryptography_stays_in_process(
    creds: Creds, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fleet simulator's case: cryptography already loaded, so no child per device."""

    def no_child(*_: object, **__: object) -> None:
        raise AssertionError("no child process expected")

    monkeypatch.setattr(subprocess, "run", no_child)
    current = load_credentials(creds("dev-1"))
    state, csr = RenewalStore(current.path).begin(current)
    assert state.phase == "requested"
    assert x509.load_pem_x509_csr(csr).is_signature_valid
