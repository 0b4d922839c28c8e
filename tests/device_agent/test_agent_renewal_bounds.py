"""Renewal under abuse (issue 17, item 7a): one device cannot make the CA sign without bound.

Real broker, real paho clients, real CA. A validly certified device floods the renewal service;
it gets at most one certificate signed, the CRL and the ledger do not grow with the flood, the
flood is audited in a few lines, and another device's renewal is served in its turn, not behind
the flood. ``device revoke`` voids an open offer in the same change that revokes the device.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.renewal import RenewalService, RenewalSettings
from broker.server import BrokerThread
from device_agent import Agent, load_credentials
from device_agent.keygen import make_csr
from provisioning.offers import OfferState
from provisioning.pki import PKI
from tests.broker.broker_helpers import Peer
from tests.conftest import CLI, Result
from tests.device_agent.agent_helpers import RenewalPeer, wait_until
from tests.device_agent.conftest import Creds, connected

SPIFFE = "spiffe://fleet.example/device/{}"


def _ledger(pki: PKI) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (pki.path / "ledger.jsonl").read_text().splitlines()]


def _crl_serials(pki: PKI) -> set[str]:
    crl = x509.load_pem_x509_crl((pki.path / "crl.pem").read_bytes())
    return {format(entry.serial_number, "x") for entry in crl}


def _csr(device: str, key: ec.EllipticCurvePrivateKey | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    return make_csr(key, device_id=device, spiffe_id=SPIFFE.format(device)).decode()


def _service(broker: BrokerThread) -> RenewalService:
    service = broker.broker.renewal
    assert service is not None
    return service


FLOOD = 200


def test_a_flood_signs_one_certificate_and_another_device_is_served_in_its_turn(
    start_broker: Callable[..., BrokerThread],
    pki: PKI,
    creds: Creds,
    agents: Callable[..., Agent],
) -> None:
    """dev-1 sends 200 renewal requests at once (half for one key under new request ids, half
    for new keys); dev-2's agent renews meanwhile. One certificate is signed for dev-1, the CRL
    gains only dev-2's superseded certificate, the ledger gains four lines, and dev-2's request
    is decided right after dev-1's first, not after its whole flood."""
    broker = start_broker()
    service = _service(broker)
    old2 = load_credentials(creds("dev-2"))
    agent2 = agents(old2.path, broker.port)
    assert connected(agent2)
    peer = RenewalPeer(creds("dev-1"), broker.port, inflight=FLOOD)
    same_key = ec.generate_private_key(ec.SECP256R1())
    flood = [
        {
            "type": "csr",
            "request_id": f"flood-{i}",
            "csr": _csr("dev-1", same_key if i % 2 == 0 else None),
        }
        for i in range(FLOOD)
    ]
    lines_before, crl_before = len(_ledger(pki)), _crl_serials(pki)
    crl_number = pki.crl_info().number
    # Hold the PKI's write lock: the service stops inside dev-1's first signature, so the rest
    # of the flood and dev-2's request are all waiting when it resumes, and the order it then
    # serves them in is the scheduler's alone (no timing involved).
    with pki.registry.transaction():
        for doc in flood:
            peer.send(doc)
        assert wait_until(lambda: service.arrived["dev-1"] == FLOOD, 30), service.arrived
        agent2.request_renewal()
        assert wait_until(lambda: service.arrived["dev-2"] >= 1, 30)
    assert wait_until(lambda: agent2.stats.renewals == 1, 30), agent2.stats
    handled = lambda: sum(1 for d, _ in service.decided if d == "dev-1")  # noqa: E731
    assert wait_until(lambda: handled() + service.stats["dropped"] == FLOOD, 30)
    peer.close()

    order = [device for device, _ in service.decided]
    assert order.index("dev-2") <= 2, order[:10]  # dev-1's first, maybe one more, then dev-2
    new_lines = [(e["event"], e["data"].get("name")) for e in _ledger(pki)[lines_before:]]
    assert new_lines == [
        ("renewal-offer", "dev-1"),
        ("renewal-offer", "dev-2"),
        ("revoke", "dev-2"),  # the old certificate, superseded
        ("issue", "dev-2"),
    ]
    assert _crl_serials(pki) - crl_before == {old2.serial}
    assert pki.crl_info().number == crl_number + 1  # re-signed once, for dev-2's renewal
    certificates = {m["certificate"] for m in peer.answers if m["type"] == "certificate"}
    assert len(certificates) == 1  # every repeat of the one key got the one offer
    refusals = {m["reason"] for m in peer.answers if m["type"] == "refused"}
    assert refusals <= {"offer-open"}, refusals
    # Audited, but not once per request: one line per reason (and window), with the count.
    audit = broker.broker.audit.events("renewal-refused", client_id="dev-1")
    assert 1 <= len(audit) <= 2, audit
    assert {a["reason"] for a in audit} <= {"offer-open", "dropped"}
    assert sum(a["count"] for a in audit) <= FLOOD
    assert len(broker.broker.audit.events("renewal-offer", client_id="dev-1")) == 1
    pki.verify_ledger()


def test_a_completed_renewal_counts_against_the_device_rate(
    start_broker: Callable[..., BrokerThread],
    pki: PKI,
    creds: Creds,
    agents: Callable[..., Agent],
) -> None:
    """With one signature per day allowed, the first renewal completes and the second is refused
    as rate-limited, with nothing signed."""
    broker = start_broker(max_signatures=1)
    agent = agents(creds("dev-1"), broker.port)
    assert connected(agent)
    agent.request_renewal()
    assert wait_until(lambda: agent.stats.renewals == 1, 20)
    offers = len([e for e in _ledger(pki) if e["event"] == "renewal-offer"])
    agent.request_renewal()
    assert wait_until(lambda: agent.stats.renewal_refusals["rate-limited"] == 1, 20)
    assert agent.stats.renewals == 1
    assert len([e for e in _ledger(pki) if e["event"] == "renewal-offer"]) == offers
    assert agent.connected


@pytest.mark.parametrize(("fraction", "renewed"), [(0.5, False), (0.001, True)])
def test_a_minimum_life_fraction_refuses_an_early_renewal(
    start_broker: Callable[..., BrokerThread],
    pki: PKI,
    creds: Creds,
    agents: Callable[..., Agent],
    fraction: float,
    renewed: bool,
) -> None:
    """A one-day certificate is about 0.35 % into its life (backdated 5 minutes): a service
    that renews only past half of the life refuses it as too-early; past 0.1 % it renews."""
    broker = start_broker(min_life_fraction=fraction)
    agent = agents(creds("dev-1", days=1), broker.port)
    assert connected(agent)
    agent.request_renewal()
    if renewed:
        assert wait_until(lambda: agent.stats.renewals == 1, 20)
    else:
        assert wait_until(lambda: agent.stats.renewal_refusals["too-early"] == 1, 20)
        assert not any(e["event"] == "renewal-offer" for e in _ledger(pki))


@pytest.fixture(params=["in-broker", "beside-the-broker"])
def renewal_broker(
    request: pytest.FixtureRequest, start_broker: Callable[..., BrokerThread], pki: PKI
) -> Any:
    """The service inside the broker, or on its own next to it (as `iotauth broker renewal`);
    its sweep is an hour away, so only `device revoke` itself can void an offer in the test."""
    if request.param == "in-broker":
        yield start_broker(sweep_interval=3600)
        return
    broker = start_broker(renewal=False)
    service = RenewalService(
        pki.path, host="127.0.0.1", port=broker.port, settings=RenewalSettings(sweep_interval=3600)
    ).start()
    assert service.wait_subscribed()
    yield broker
    service.stop()


def test_device_revoke_voids_an_open_offer_at_once(
    renewal_broker: BrokerThread,
    pki: PKI,
    creds: Creds,
    cli: Callable[..., Result],
    tmp_path: Path,
) -> None:
    """The device holds an offered certificate it has not used yet. `iotauth device revoke`
    puts that certificate on the CRL in the same change as the device's own: when the command
    returns, the registry has it revoked and the offer is void, and it cannot connect."""
    store = creds("dev-1")
    old = load_credentials(store)
    peer = RenewalPeer(store, renewal_broker.port)
    key = ec.generate_private_key(ec.SECP256R1())
    peer.send({"type": "csr", "request_id": "pending", "csr": _csr("dev-1", key)})
    assert wait_until(lambda: any(m["type"] == "certificate" for m in peer.answers), 20)
    chain = next(m for m in peer.answers if m["type"] == "certificate")["certificate"]
    offered = format(x509.load_pem_x509_certificates(chain.encode())[0].serial_number, "x")
    peer.close()

    result = cli("device", "revoke", "dev-1", "--pki", str(pki.path), "--reason", "key-compromise")
    assert result.returncode == 0, result.stderr
    assert offered in result.stdout  # the offered certificate is named among the revoked

    # At once: no waiting for the service.
    rows = {r.serial: r for r in pki.registry.history("dev-1")}
    assert rows[old.serial].status == "revoked"
    assert rows[offered].status == "revoked"
    assert rows[offered].revocation_reason == "key-compromise"
    assert {old.serial, offered} <= _crl_serials(pki)
    offer = pki.offers.get("pending")
    assert offer is not None
    assert offer.state is OfferState.VOIDED
    revokes = [e["data"]["serial"] for e in _ledger(pki) if e["event"] == "revoke"]
    assert set(revokes) == {old.serial, offered}
    pki.verify_ledger()

    # The offered certificate with its key is refused by the broker (new CRL in force).
    assert wait_until(lambda: renewal_broker.broker.crl.number >= 2)
    candidate = tmp_path / "candidate"
    candidate.mkdir()
    (candidate / "device.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (candidate / "device.crt").write_text(chain)
    (candidate / "ca.crt").write_bytes((store / "ca.crt").read_bytes())
    attempt = Peer(renewal_broker.port, candidate, "dev-1").connect(expect_ok=False)
    attempt.close()
    assert attempt.refused
    assert not renewal_broker.broker.audit.events("connect", credential=offered)


def test_revoking_a_device_without_an_offer_leaves_other_offers_alone(
    broker: BrokerThread, pki: PKI, creds: Creds, cli: Callable[..., Result]
) -> None:
    """Negative twin: dev-2's revocation does not touch dev-1's open offer."""
    peer = RenewalPeer(creds("dev-1"), broker.port)
    creds("dev-2")
    peer.send({"type": "csr", "request_id": "keep", "csr": _csr("dev-1")})
    assert wait_until(lambda: any(m["type"] == "certificate" for m in peer.answers), 20)
    peer.close()
    assert cli("device", "revoke", "dev-2", "--pki", str(pki.path)).returncode == 0
    offer = pki.offers.get("keep")
    assert offer is not None
    assert offer.state is OfferState.OFFERED
    assert offer.new_serial not in _crl_serials(pki)


def test_broker_renewal_beside_a_broker_bounds_a_flood_and_audits_it_on_stdout(
    start_broker: Callable[..., BrokerThread], pki: PKI, creds: Creds
) -> None:
    """`iotauth broker renewal --per-day 1` as its own process: a device sending 30 requests for
    30 different keys gets one certificate; the rest is refused (or dropped) without signing, and
    the service's stdout carries one renewal-offer line and a few renewal-refused lines whose
    counts add up to what was refused."""
    broker = start_broker(renewal=False)
    store = creds("dev-1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTAUTH_")}
    service = subprocess.Popen(
        [
            *CLI,
            "broker",
            "renewal",
            "--pki",
            str(pki.path),
            "--broker",
            f"127.0.0.1:{broker.port}",
            "--per-day",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert service.stderr is not None
        banner = ""
        while "serving through" not in banner:
            banner = service.stderr.readline()
            assert banner or service.poll() is None, "broker renewal exited"
        peer = RenewalPeer(store, broker.port, inflight=30)
        infos = [
            peer.send({"type": "csr", "request_id": f"r{i}", "csr": _csr("dev-1")})
            for i in range(30)
        ]
        for info in infos:
            info.wait_for_publish(10)
        assert wait_until(lambda: any(m["type"] == "certificate" for m in peer.answers), 20)
        # Every request the service looked at was answered; the rest was dropped on arrival.
        assert wait_until(lambda: len(peer.answers) >= 2, 20)
        peer.close()
    finally:
        service.terminate()
        out, _ = service.communicate(timeout=20)
    assert service.returncode == 0
    audit = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [a["event"] for a in audit if a["event"] == "renewal-offer"] == ["renewal-offer"]
    refused = [a for a in audit if a["event"] == "renewal-refused"]
    assert 1 <= len(refused) <= 4, refused  # offer-open and dropped, each once (plus held back)
    assert {a["reason"] for a in refused} <= {"offer-open", "dropped"}
    assert sum(a["count"] for a in refused) <= 29
    offers = [e for e in _ledger(pki) if e["event"] == "renewal-offer"]
    assert [e["data"]["request_id"] for e in offers] == ["r0"]
    certificates = {m["certificate"] for m in peer.answers if m["type"] == "certificate"}
    assert len(certificates) == 1
