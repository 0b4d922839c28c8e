"""The oidc method: a service's access token from an identity provider, against the real broker.

The identity provider is played by a real HTTPS server on 127.0.0.1 (its own test CA, not the
fleet's) serving a JWKS that the test rotates; tokens are signed with its RS256 and ES256 keys by
PyJWT. The clients are real paho clients over server-authenticated TLS. Every way an access token
is known to go wrong has its own refusal and audit reason.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import http.server
import ipaddress
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from broker.auth_oidc import OIDCSettings
from broker.errors import ConfigError
from broker.server import BrokerThread
from broker.settings import BrokerSettings, ListenerSpec
from iotauth.scram_client import ClientError, ScramMQTTClient
from provisioning.identity import IdentityKind
from provisioning.tls import client_context
from tests.broker.broker_helpers import AuditedBroker, Fleet, Peer, wait_until
from tests.conftest import Result, assert_one_line_error

MTLS = ListenerSpec(0, frozenset({"mtls"}))
OIDC = ListenerSpec(0, frozenset({"oidc"}))
SCRAM_PASSWORD = ListenerSpec(0, frozenset({"scram", "password"}))
ISSUER, AUDIENCE = "https://idp.example.test/realms/factory", "iotauth-broker"
BAD_CREDENTIALS, NOT_AUTHORIZED = 0x86, 0x87  # paho's names for 3.1.1 CONNACK 4 and 5


def _ca_and_server_cert(tmp: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1 (the identity provider's)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test IdP CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = tmp / "idp-ca.crt", tmp / "idp.crt", tmp / "idp.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


class IdentityProvider:
    """Signing keys, a JWKS over HTTPS that can be rotated, and the fetches it served."""

    def __init__(self, tmp: Path) -> None:
        self.keys: dict[str, Any] = {
            "rsa-1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec-1": ec.generate_private_key(ec.SECP256R1()),
            "rsa-2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        }
        self.published = {"rsa-1", "ec-1"}
        self.fetches = 0
        self.ca, cert, key = _ca_and_server_cert(tmp)
        provider = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                provider.fetches += 1
                body = json.dumps(provider.jwks()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid in sorted(self.published):
            key = self.keys[kid].public_key()
            algo = (
                jwt.algorithms.RSAAlgorithm if kid.startswith("rsa") else jwt.algorithms.ECAlgorithm
            )
            jwk = algo.to_jwk(key, as_dict=True)
            jwk.update(kid=kid, use="sig", alg="RS256" if kid.startswith("rsa") else "ES256")
            out.append(jwk)
        return {"keys": out}

    def token(self, sub: str, *, kid: str = "rsa-1", **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 600,
                "jti": f"t-{now}-{sub}"}  # fmt: skip
        body.update(claims)
        alg = "RS256" if kid.startswith("rsa") else "ES256"
        return jwt.encode(body, self.keys[kid], algorithm=alg, headers={"kid": kid})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[IdentityProvider]:
    provider = IdentityProvider(tmp_path)
    yield provider
    provider.close()


class Broker(AuditedBroker):
    def __init__(self, fleet: Fleet, oidc: OIDCSettings, *more: ListenerSpec) -> None:
        super().__init__(BrokerSettings(fleet.pki_dir, listeners=(MTLS, OIDC, *more), oidc=oidc))
        self.mtls_port, self.oidc_port = self.ports[:2]


def _settings(idp: IdentityProvider, **kw: Any) -> OIDCSettings:
    return OIDCSettings(
        issuer=ISSUER, audience=AUDIENCE, jwks=idp.url, cafile=idp.ca, refresh_cooldown=0, **kw
    )


@pytest.fixture
def broker(fleet: Fleet, idp: IdentityProvider) -> Iterator[Broker]:
    fleet.pki.set_service_secret("dash")  # registered without a certificate
    fleet.creds("grafana", service=True)  # registered with one
    fleet.creds("dev-1")
    b = Broker(fleet, _settings(idp))
    yield b
    b.thread.stop()


@pytest.fixture
def token_peer(fleet: Fleet) -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(port: int, token: str, client_id: str) -> Peer:
        peer = Peer(port, None, client_id, context=client_context(trust=fleet.pki_dir / "root.crt"))
        peer.client.username_pw_set(client_id, token)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


def test_an_access_token_gets_exactly_the_service_grants(
    broker: Broker,
    idp: IdentityProvider,
    token_peer: Callable[..., Peer],
    peers: Callable[..., Peer],
) -> None:
    dev = peers(broker.mtls_port, "dev-1").connect()
    svc = token_peer(broker.oidc_port, idp.token("dash"), "dash").connect()
    assert svc.subscribe("devices/+/telemetry/#", qos=1) == [1]
    assert svc.subscribe("devices/dev-1/certs/csr", qos=1) == [0x80]  # MQTT-3.9.3-2: deny
    assert svc.subscribe("#", qos=1) == [0x80]
    assert dev.subscribe("devices/dev-1/commands/#", qos=1) == [1]
    svc.publish("devices/dev-1/commands/x", b"go", qos=1)
    assert wait_until(lambda: ("devices/dev-1/commands/x", b"go", False) in dev.messages)
    # ES256 and a service registered with a certificate work too.
    other = token_peer(broker.oidc_port, idp.token("grafana", kid="ec-1"), "grafana").connect()
    assert other.connected.is_set()
    connects = [r for r in broker.audit if r["event"] == "connect" and r.get("method") == "oidc"]
    assert {r["identity"].rsplit("/", 1)[1] for r in connects} == {"dash", "grafana"}
    metrics = broker.thread.broker.metrics
    assert metrics.value("iotauth_broker_authentications_total", method="oidc") == 2
    svc.client.publish("devices/dev-1/telemetry/fake", b"x", qos=1)  # outside its grants
    assert wait_until(svc.disconnected.is_set)


def test_an_unknown_kid_refreshes_the_jwks_and_a_removed_key_is_refused(
    broker: Broker, idp: IdentityProvider, token_peer: Callable[..., Peer]
) -> None:
    assert token_peer(broker.oidc_port, idp.token("dash"), "dash").connect().connected.is_set()
    fetched = idp.fetches
    # The provider rotates: rsa-2 in, rsa-1 out. A token with the new kid makes one fetch.
    idp.published = {"rsa-2", "ec-1"}
    new = token_peer(broker.oidc_port, idp.token("dash", kid="rsa-2"), "dash").connect()
    assert new.connected.is_set()
    assert idp.fetches == fetched + 1
    old = token_peer(broker.oidc_port, idp.token("dash", kid="rsa-1"), "dash")
    assert old.connect(expect_ok=False).refused
    assert wait_until(lambda: "oidc-unknown-key" in broker.refusals())


def test_service_revoke_ends_the_token_sessions_of_that_service_within_one_second(
    broker: Broker, fleet: Fleet, idp: IdentityProvider, token_peer: Callable[..., Peer]
) -> None:
    dash = token_peer(broker.oidc_port, idp.token("dash"), "dash").connect()
    grafana = token_peer(broker.oidc_port, idp.token("grafana"), "grafana").connect()
    fleet.pki.revoke("grafana", kind=IdentityKind.SERVICE)  # it has a certificate
    assert wait_until(grafana.disconnected.is_set, 1.0)
    assert not wait_until(dash.disconnected.is_set, 0.3)  # the negative twin stays
    fleet.pki.revoke("dash", kind=IdentityKind.SERVICE)  # it has a secret only
    assert wait_until(dash.disconnected.is_set, 1.0)
    again = token_peer(broker.oidc_port, idp.token("dash"), "dash").connect(expect_ok=False)
    assert again.refused
    kicks = [r for r in broker.audit if r["event"] == "kick" and r["reason"] == "revoked"]
    assert {r["client_id"] for r in kicks} == {"dash", "grafana"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(signature)}"


@pytest.mark.parametrize(
    ("case", "reason", "connack"),
    [
        ("expired", "oidc-expired", BAD_CREDENTIALS),
        ("wrong-iss", "oidc-issuer", BAD_CREDENTIALS),
        ("wrong-aud", "oidc-audience", BAD_CREDENTIALS),
        ("alg-none", "oidc-algorithm", BAD_CREDENTIALS),
        ("hs256-with-public-key", "oidc-algorithm", BAD_CREDENTIALS),
        ("other-key", "oidc-signature", BAD_CREDENTIALS),
        ("unregistered", "oidc-unknown-service", NOT_AUTHORIZED),
        ("a-device", "oidc-unknown-service", NOT_AUTHORIZED),
        ("revoked", "oidc-unknown-service", NOT_AUTHORIZED),
    ],
)
def test_bad_access_tokens_are_refused(
    broker: Broker,
    fleet: Fleet,
    idp: IdentityProvider,
    token_peer: Callable[..., Peer],
    case: str,
    reason: str,
    connack: int,
) -> None:
    now = int(time.time())
    client_id = "dash"
    if case == "expired":
        token = idp.token("dash", iat=now - 7200, exp=now - 3600)
    elif case == "wrong-iss":
        token = idp.token("dash", iss="https://evil.example.test")
    elif case == "wrong-aud":
        token = idp.token("dash", aud="another-api")
    elif case == "alg-none":
        token = _forge({"alg": "none", "kid": "rsa-1"}, jwt.decode(idp.token("dash"),
                       options={"verify_signature": False}))  # fmt: skip
    elif case == "hs256-with-public-key":
        public = (
            idp.keys["rsa-1"]
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        good = idp.token("dash")
        head, body, _ = good.split(".")
        header = {"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}
        signing_input = f"{_b64(json.dumps(header).encode())}.{body}"
        mac = hmac.digest(public, signing_input.encode(), hashlib.sha256)
        token = f"{signing_input}.{_b64(mac)}"
        del head
    elif case == "other-key":  # signed by rsa-2 but claims to be rsa-1
        good = idp.token("dash", kid="rsa-2")
        head, body, sig = good.split(".")
        token = f"{_b64(json.dumps({'alg': 'RS256', 'kid': 'rsa-1'}).encode())}.{body}.{sig}"
    elif case == "unregistered":
        token, client_id = idp.token("nobody"), "nobody"
    elif case == "a-device":
        token, client_id = idp.token("dev-1"), "dev-1"
    else:
        fleet.pki.revoke("dash", kind=IdentityKind.SERVICE)
        token = idp.token("dash")
    peer = token_peer(broker.oidc_port, token, client_id).connect(expect_ok=False)
    assert peer.refused
    assert wait_until(lambda: reason in broker.refusals()), broker.refusals()
    assert int(peer.connack.value) == connack
    # The negative twin: the provider's good token for a registered service still works.
    ok = token_peer(broker.oidc_port, idp.token("grafana"), "grafana").connect()
    assert ok.connected.is_set()


def test_an_unreachable_jwks_fails_closed(
    fleet: Fleet, idp: IdentityProvider, token_peer: Callable[..., Peer]
) -> None:
    fleet.pki.set_service_secret("dash")
    token = idp.token("dash")
    idp.close()  # nothing listens there any more
    broker = Broker(fleet, _settings(idp, timeout=2))
    try:
        peer = token_peer(broker.oidc_port, token, "dash").connect(expect_ok=False)
        assert peer.refused
        assert int(peer.connack.value) == NOT_AUTHORIZED
        assert wait_until(lambda: "oidc-jwks-unreachable" in broker.refusals())
        detail = next(r["detail"] for r in broker.audit if r.get("reason") ==
                      "oidc-jwks-unreachable")  # fmt: skip
        assert "fail closed" in detail
    finally:
        broker.thread.stop()


def test_a_jwks_file_and_configuration_errors(
    fleet: Fleet, idp: IdentityProvider, tmp_path: Path, token_peer: Callable[..., Peer]
) -> None:
    fleet.pki.set_service_secret("dash")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(idp.jwks()))
    broker = Broker(fleet, OIDCSettings(issuer=ISSUER, audience=AUDIENCE, jwks=str(jwks)))
    try:
        assert token_peer(broker.oidc_port, idp.token("dash"), "dash").connect().connected.is_set()
    finally:
        broker.thread.stop()
    with pytest.raises(ConfigError, match="https"):
        OIDCSettings(issuer=ISSUER, audience=AUDIENCE, jwks="http://127.0.0.1/jwks")
    with pytest.raises(ConfigError, match="--oidc-audience"):
        OIDCSettings(issuer=ISSUER, audience="", jwks=str(jwks))
    with pytest.raises(ConfigError, match="oidc-issuer"):
        BrokerThread(BrokerSettings(fleet.pki_dir, listeners=(OIDC,))).start()
    jwks.write_text("{not json")
    with pytest.raises(ConfigError, match="not a usable JWKS"):
        BrokerThread(
            BrokerSettings(
                fleet.pki_dir,
                listeners=(OIDC,),
                oidc=OIDCSettings(issuer=ISSUER, audience=AUDIENCE, jwks=str(jwks)),
            )
        ).start()


# -- a service registered by name alone (iotauth service register) ------------------------------


def test_a_service_registered_by_name_alone_comes_in_with_a_token_only(
    fleet: Fleet,
    idp: IdentityProvider,
    cli: Callable[..., Result],
    token_peer: Callable[..., Peer],
    peers: Callable[..., Peer],
) -> None:
    """``service register`` gives a service its name and the service ACL, and no credential of
    ours: an access token naming it gets exactly the service grants; the secret methods have
    nothing to check it against; ``service revoke`` ends its live session within a second."""
    pki = str(fleet.pki_dir)
    cli("service", "register", "node-red", "--pki", pki, check=True)
    again = cli("service", "register", "node-red", "--pki", pki)
    assert again.returncode != 0
    assert_one_line_error(again, "already registered")
    fleet.creds("dev-1")
    broker = Broker(fleet, _settings(idp), SCRAM_PASSWORD)
    try:
        mtls_port, oidc_port, secret_port = broker.ports
        dev = peers(mtls_port, "dev-1").connect()
        svc = token_peer(oidc_port, idp.token("node-red"), "node-red").connect()
        assert svc.subscribe("devices/+/telemetry/#", qos=1) == [1]
        assert svc.subscribe("devices/dev-1/certs/csr", qos=1) == [0x80]  # MQTT-3.9.3-2: deny
        assert svc.subscribe("#", qos=1) == [0x80]
        assert dev.subscribe("devices/dev-1/commands/#", qos=1) == [1]
        svc.publish("devices/dev-1/commands/x", b"go", qos=1)
        assert wait_until(lambda: ("devices/dev-1/commands/x", b"go", False) in dev.messages)
        # Negative twins: a name nobody registered is refused; so are the secret methods, which
        # have no verifier for a service registered by name (it has no secret to present).
        nobody = token_peer(oidc_port, idp.token("node-blue"), "node-blue")
        assert nobody.connect(expect_ok=False).refused
        assert wait_until(lambda: "oidc-unknown-service" in broker.refusals())
        guess = token_peer(secret_port, "a-guessed-secret", "node-red")
        assert guess.connect(expect_ok=False).refused
        assert wait_until(lambda: "password-unknown" in broker.refusals()), broker.refusals()
        ctx = client_context(trust=fleet.pki_dir / "root.crt")
        scram = ScramMQTTClient(
            "127.0.0.1", secret_port, context=ctx, user="node-red", secret="a-guessed-secret"
        )
        try:
            with pytest.raises(ClientError, match="scram-failed"):
                scram.connect()
        finally:
            scram.close()
        # Revocation ends the live token session within a second; a new token is refused.
        cli("service", "revoke", "node-red", "--pki", pki, check=True)
        assert wait_until(svc.disconnected.is_set, 1.0)
        kicks = [r for r in broker.audit if r["event"] == "kick" and r["reason"] == "revoked"]
        assert [r["client_id"] for r in kicks] == ["node-red"]
        late = token_peer(oidc_port, idp.token("node-red"), "node-red")
        assert late.connect(expect_ok=False).refused
        assert int(late.connack.value) == NOT_AUTHORIZED
        assert dev.connected.is_set()  # the device's session was not touched
    finally:
        broker.thread.stop()


def test_broker_explain_lists_oidc_for_a_service_registered_by_name(
    fleet: Fleet, cli: Callable[..., Result]
) -> None:
    pki = str(fleet.pki_dir)
    listen = ("--listen", "8883:mtls", "--listen", "8884:oidc,scram,password")
    ask = ("broker", "explain", "--pki", pki, "--service", "--subscribe", "devices/+/telemetry/#",
           *listen, "--json")  # fmt: skip
    cli("service", "register", "node-red", "--pki", pki, check=True)
    doc = json.loads(cli(*ask, "--identity", "node-red", check=True).stdout)
    assert doc["methods"] == {"8883": [], "8884": ["oidc"]}  # no certificate, no secret
    assert "registered by name only" in doc["warnings"][0]
    # The twins: an unregistered name holds nothing; a revoked registration holds nothing.
    nobody = json.loads(cli(*ask, "--identity", "node-blue", check=True).stdout)
    assert nobody["methods"] == {"8883": [], "8884": []}
    cli("service", "revoke", "node-red", "--pki", pki, check=True)
    revoked = json.loads(cli(*ask, "--identity", "node-red", check=True).stdout)
    assert revoked["methods"] == {"8883": [], "8884": []}
