"""A fleet whose issuing CA key lives in a PKCS#11 token (SoftHSM2): the broker, its renewal
service and the agent work exactly as with a key file; the broker's own server key stays a file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.server import BrokerThread
from device_agent import Agent, load_credentials
from provisioning.hsm import Pkcs11Signer
from provisioning.pki import PKI
from tests.conftest import Result, SoftHSM, assert_one_line_error, needs_softhsm, openssl_verify
from tests.device_agent.agent_helpers import wait_until
from tests.device_agent.conftest import Creds, connected

pytestmark = needs_softhsm


@pytest.fixture
def pki(pki_dir: Path, softhsm: SoftHSM) -> Iterator[PKI]:
    """Replaces the file-key PKI of tests/conftest.py for every test in this module."""
    ca = PKI.init(
        pki_dir,
        trust_domain="fleet.example",
        server_names=["broker.test"],
        issuing_key=softhsm.uri("issuing"),
    )
    yield ca
    ca.close()


def test_broker_accepts_token_issued_devices_and_renews_through_the_token(
    broker: BrokerThread, pki: PKI, creds: Creds, agents: Callable[..., Agent]
) -> None:
    assert isinstance(pki.issuing_key(), Pkcs11Signer)
    assert not (pki.path / "private" / "issuing.key").exists()
    assert (pki.path / "private" / "server.key").exists()
    # The renewal service issued its own certificate at start, with the token.
    renewal_cert = pki.path / "services" / "renewal" / "device.crt"
    assert openssl_verify(pki.path, renewal_cert).returncode == 0

    store = creds("dev-1")
    old = load_credentials(store)
    agent = agents(store, broker.port)
    assert connected(agent)
    agent.request_renewal()
    assert wait_until(lambda: agent.stats.renewals == 1, 20)
    new = load_credentials(store)
    assert new.serial != old.serial
    assert openssl_verify(pki.path, store / "device.crt").returncode == 0
    assert broker.broker.audit.events("connect", client_id="dev-1", credential=new.serial)
    # The superseded certificate is on a CRL the token signed, and the broker loaded it.
    assert wait_until(lambda: broker.broker.crl.number >= 2, 10)
    pki.verify_ledger()


def test_revoked_token_issued_device_is_refused(
    broker: BrokerThread, pki: PKI, creds: Creds, agents: Callable[..., Agent]
) -> None:
    """Negative twin: the CRL signed in the token is one the broker enforces."""
    store = creds("dev-2")
    pki.revoke("dev-2", reason="key-compromise")
    assert wait_until(lambda: broker.broker.crl.number >= 2, 10)
    agent = agents(store, broker.port)
    assert not wait_until(lambda: agent.connected, 2)
    assert not broker.broker.audit.events("connect", client_id="dev-2")


def test_broker_run_without_the_pin_is_one_line(
    cli: Callable[..., Result], softhsm: SoftHSM, pki: PKI
) -> None:
    """`broker run` holds the issuing CA for its renewal service: without the token's PIN it
    stops at start with the reason, instead of failing at the first renewal."""
    env = {k: v for k, v in softhsm.env.items() if k != "IOTAUTH_PKCS11_PIN"}
    result = cli("broker", "run", "--pki", str(pki.path), "--port", "0", env=env)
    assert_one_line_error(result, "set IOTAUTH_PKCS11_PIN", "'iotauth-ca'")
    # Without the renewal service the broker needs no CA key at all: the device certificates,
    # the CRL and its own server key are files.
    assert not (pki.path / "services").exists()
