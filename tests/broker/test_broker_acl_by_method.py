"""The ACL isolation of test_broker_acl.py, for every method: whatever proved the identity, the
same deny-by-default policy holds (issue 13: "the ACL tests parameterised by method").

One broker with a listener per method (``--listen 0:mtls --listen 0:jwt --listen 0:password
--listen 0:oidc``); real paho clients. Devices come in by ``mtls`` and ``jwt``, services by
``mtls``, ``password`` and ``oidc`` (an access token of a local identity provider whose JWKS is a
file). Each method must give exactly the default policy's grants: its own subtree for a device,
telemetry and commands for a service; another device's topics, ``#``, ``$SYS`` and the renewal
topics are refused (SUBACK 0x80, MQTT-3.9.3-2 / deny by default), a PUBLISH outside the grants
ends the connection and reaches nobody, and a will outside the grants refuses the CONNECT.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from broker.auth_oidc import OIDCSettings
from broker.server import BrokerThread
from broker.settings import BrokerSettings, ListenerSpec
from provisioning.keyfiles import load_private_key
from provisioning.tls import client_context
from provisioning.tokens import make_device_token
from tests.broker.broker_helpers import Fleet, Peer, wait_until

METHODS = ("mtls", "jwt", "password", "oidc")
ISSUER, AUDIENCE = "https://idp.test", "mqtt"
DEVICE_METHODS = ("mtls", "jwt")
SERVICE_METHODS = ("mtls", "password", "oidc")
QUIET = 0.3


class Broker:
    def __init__(self, fleet: Fleet, tmp_path: Path) -> None:
        self.fleet = fleet
        self.idp = ec.generate_private_key(ec.SECP256R1())
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(self.idp.public_key(), as_dict=True)
        jwks = tmp_path / "jwks.json"
        jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "ES256"}]}))
        self.secrets = {"dash": fleet.pki.set_service_secret("dash")[0]}
        self.thread = BrokerThread(
            BrokerSettings(
                fleet.pki_dir,
                listeners=tuple(ListenerSpec(0, frozenset({m})) for m in METHODS),
                oidc=OIDCSettings(issuer=ISSUER, audience=AUDIENCE, jwks=str(jwks)),
            )
        ).start()
        self.ports = dict(zip(METHODS, self.thread.broker.ports.values(), strict=True))
        self.made: list[Peer] = []

    def peer(self, method: str, name: str, *, will: tuple[str, bytes, bool] | None = None) -> Peer:
        """A client of ``name`` that proves itself by ``method`` (services: sink has a
        certificate, dash a secret, and either can hold an access token)."""
        if method == "mtls":
            service = name in ("sink", "dash")
            peer = Peer(
                self.ports[method], self.fleet.creds(name, service=service), name, will=will
            )
        else:
            ctx = client_context(trust=self.fleet.pki_dir / "root.crt")
            peer = Peer(self.ports[method], None, name, will=will, context=ctx)
            peer.client.username_pw_set(name, self._password(method, name))
        self.made.append(peer)
        return peer

    def _password(self, method: str, name: str) -> str:
        if method == "password":
            return self.secrets[name]
        if method == "oidc":
            now = int(time.time())
            claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": name, "iat": now, "exp": now + 300}
            return jwt.encode(claims, self.idp, algorithm="ES256", headers={"kid": "k1"})
        creds = self.fleet.creds(name)
        return make_device_token(
            key=load_private_key(creds / "device.key"),
            certificate=x509.load_pem_x509_certificate((creds / "device.crt").read_bytes()),
            device_id=name,
            audience="fleet.example",
        )

    def close(self) -> None:
        for peer in self.made:
            peer.close()
        self.thread.stop()


@pytest.fixture
def broker(fleet: Fleet, tmp_path: Path) -> Iterator[Broker]:
    b = Broker(fleet, tmp_path)
    yield b
    b.close()


def _service_name(method: str) -> str:
    return "sink" if method in ("mtls", "oidc") else "dash"


@pytest.mark.parametrize("method", DEVICE_METHODS)
def test_a_device_gets_its_own_subtree_only(broker: Broker, method: str) -> None:
    sink = broker.peer("mtls", "sink").connect()
    assert sink.subscribe("devices/+/telemetry/#", 1) == [1]
    other = broker.peer("mtls", "dev-2").connect()
    assert other.subscribe("devices/dev-2/#", 1) == [1]
    dev = broker.peer(method, "dev-1").connect()
    assert dev.subscribe("devices/dev-1/commands/#", 1) == [1]
    for wide in ("devices/dev-2/#", "devices/+/telemetry/#", "#", "$SYS/#"):
        assert dev.subscribe(wide, 1) == [0x80], wide
    dev.publish("devices/dev-1/telemetry/t", b"21.5", qos=1)
    assert wait_until(lambda: ("devices/dev-1/telemetry/t", b"21.5", False) in sink.messages)
    dev.client.publish("devices/dev-2/commands/unlock", b"FORGED", qos=1)
    assert wait_until(dev.disconnected.is_set)  # denied_publish = disconnect
    time.sleep(QUIET)
    assert all(payload != b"FORGED" for _, payload, _ in other.messages)


@pytest.mark.parametrize("method", SERVICE_METHODS)
def test_a_service_gets_the_service_grants_only(broker: Broker, method: str) -> None:
    dev = broker.peer("mtls", "dev-1").connect()
    assert dev.subscribe("devices/dev-1/#", 1) == [1]
    svc = broker.peer(method, _service_name(method)).connect()
    assert svc.subscribe("devices/+/telemetry/#", 1) == [1]
    for denied in ("devices/dev-1/certs/csr", "devices/+/certs/#", "#", "$SYS/#"):
        assert svc.subscribe(denied, 1) == [0x80], denied
    svc.publish("devices/dev-1/commands/reboot", b"now", qos=1)
    assert wait_until(lambda: ("devices/dev-1/commands/reboot", b"now", False) in dev.messages)
    dev.publish("devices/dev-1/telemetry/t", b"20", qos=1)
    assert wait_until(lambda: ("devices/dev-1/telemetry/t", b"20", False) in svc.messages)
    svc.client.publish("devices/dev-1/telemetry/t", b"FORGED", qos=1)  # a device's topic
    assert wait_until(svc.disconnected.is_set)
    time.sleep(QUIET)
    assert all(payload != b"FORGED" for _, payload, _ in dev.messages)


@pytest.mark.parametrize(
    ("method", "name"),
    [*((m, "dev-1") for m in DEVICE_METHODS), *((m, _service_name(m)) for m in SERVICE_METHODS)],
)
def test_a_will_outside_the_grants_refuses_the_connect(
    broker: Broker, method: str, name: str
) -> None:
    refused = broker.peer(method, name, will=("devices/dev-2/state", b"x", False))
    assert refused.connect(expect_ok=False).refused
    assert refused.connack is not None
    assert int(getattr(refused.connack, "value", refused.connack)) == 0x87  # 3.1.1 rc 5
    # The twin: a will inside its grants is accepted (a device's own state; a service's command).
    topic = "devices/dev-1/state" if name == "dev-1" else "devices/dev-1/commands/x"
    ok: Any = broker.peer(method, name, will=(topic, b"x", False))
    assert not ok.connect().refused


def test_every_refusal_is_audited_with_the_method_presented(broker: Broker) -> None:
    """Audit lines of refusals name the method, as connect lines do: a wrong secret, a provider
    token for another audience, a device token under another client id (refused at binding,
    after the method proved who it is), a certificate under another client id, and a password on
    the jwt listener (method-not-allowed)."""
    wrong = broker.peer("password", "dash")
    wrong.client.username_pw_set("dash", "not-the-secret")
    now = int(time.time())
    foreign = jwt.encode(
        {"iss": ISSUER, "aud": "elsewhere", "sub": "sink", "iat": now, "exp": now + 60},
        broker.idp, algorithm="ES256", headers={"kid": "k1"},
    )  # fmt: skip
    other_aud = broker.peer("oidc", "sink")
    other_aud.client.username_pw_set("sink", foreign)
    token = broker.peer("jwt", "dev-1")
    token_b = Peer(broker.ports["jwt"], None, "dev-2",
                   context=client_context(trust=broker.fleet.pki_dir / "root.crt"))  # fmt: skip
    token_b.client.username_pw_set("dev-2", broker._password("jwt", "dev-1"))
    broker.made.append(token_b)
    cert_b = Peer(broker.ports["mtls"], broker.fleet.creds("dev-1"), "dev-2")
    broker.made.append(cert_b)
    downgrade = Peer(broker.ports["jwt"], None, "dash",
                     context=client_context(trust=broker.fleet.pki_dir / "root.crt"))  # fmt: skip
    downgrade.client.username_pw_set("dash", broker.secrets["dash"])
    broker.made.append(downgrade)
    expected = {
        ("password-wrong", "password"),
        ("oidc-audience", "oidc"),
        ("client-id-mismatch", "jwt"),
        ("client-id-mismatch", "mtls"),
        ("method-not-allowed", "password"),
    }
    for peer in (wrong, other_aud, token_b, cert_b, downgrade):
        assert peer.connect(expect_ok=False).refused
    audit = broker.thread.broker.audit

    def seen() -> set[tuple[str, str]]:
        return {(r["reason"], r.get("method", "")) for r in audit.events("refuse")}

    assert wait_until(lambda: expected <= seen()), seen()
    assert not token.connect().refused  # the twin: the same token, its own client id
