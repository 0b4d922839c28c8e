"""The jwt method: a device token signed by the device's own key, against the real broker.

The broker runs two listeners, as ``iotauth broker run --listen 0:mtls --listen 0:jwt`` would; the
token clients are real paho clients over server-authenticated TLS (they verify the broker, present
no certificate, and send the token as the MQTT password). Every way a token is known to go wrong
has its own refusal, with the audit reason that names it.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.auth import ConnectionFacts
from broker.auth_jwt import DeviceTokenAuthenticator, ReplayCache
from broker.errors import ConfigError
from broker.server import BrokerThread
from broker.settings import BrokerSettings, ListenerSpec
from provisioning.identity import IdentityKind
from provisioning.keyfiles import load_private_key
from provisioning.pki import PKI
from provisioning.tls import client_context
from provisioning.tokens import make_device_token
from tests.broker.broker_helpers import AuditedBroker, Fleet, Peer, stderr_line, wait_until
from tests.conftest import CLI, Result, assert_one_line_error

LISTEN_BOTH = ("--listen", "0:mtls", "--listen", "0:jwt")
MTLS, JWT = ListenerSpec(0, frozenset({"mtls"})), ListenerSpec(0, frozenset({"jwt"}))


class Broker(AuditedBroker):
    """A broker with an mTLS and a jwt listener, and its audit lines."""

    def __init__(self, fleet: Fleet, **settings: Any) -> None:
        super().__init__(BrokerSettings(fleet.pki_dir, listeners=(MTLS, JWT), **settings))
        self.mtls_port, self.jwt_port = self.ports


@pytest.fixture
def broker(fleet: Fleet) -> Iterator[Broker]:
    b = Broker(fleet)
    yield b
    b.thread.stop()


def _token(fleet: Fleet, name: str, **kw: Any) -> str:
    creds = fleet.creds(name)
    cert = x509.load_pem_x509_certificate((creds / "device.crt").read_bytes())
    key = load_private_key(creds / "device.key")
    return make_device_token(
        key=key, certificate=cert, device_id=name, audience="fleet.example", **kw
    )


def _parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    head, body, _ = token.split(".")
    return json.loads(_unb64(head)), json.loads(_unb64(body))


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A token assembled by hand, the way an attacker would."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(signature)}"


@pytest.fixture
def token_peer(fleet: Fleet) -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(port: int, token: str, client_id: str) -> Peer:
        # Server-authenticated TLS: the client checks the broker; it has no certificate to show.
        ctx = client_context(trust=fleet.creds("dev-1") / "ca.crt")
        peer = Peer(port, None, client_id, context=ctx)
        peer.client.username_pw_set("unused", token)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


def test_a_device_token_connects_and_is_held_to_the_device_acl(
    broker: Broker, fleet: Fleet, token_peer: Callable[..., Peer], peers: Callable[..., Peer]
) -> None:
    sink = peers(broker.mtls_port, "sink", service=True).connect()
    assert sink.subscribe("devices/+/telemetry/#", qos=1) == [1]
    dev = token_peer(broker.jwt_port, _token(fleet, "dev-1"), "dev-1").connect()
    assert dev.subscribe("devices/dev-1/commands/#", qos=1) == [1]
    # MQTT-3.9.3-2 / deny by default: another device's subtree is refused (0x80), as with mTLS.
    assert dev.subscribe("devices/dev-2/#", qos=1) == [0x80]
    dev.publish("devices/dev-1/telemetry/t", b"21.5", qos=1)
    assert wait_until(lambda: ("devices/dev-1/telemetry/t", b"21.5", False) in sink.messages)
    connects = [r for r in broker.audit if r["event"] == "connect" and r.get("identity")]
    assert any(r.get("method") == "jwt" and "dev-1" in r["identity"] for r in connects)
    # A publish outside its grants ends the session (denied_publish = disconnect), as for mTLS.
    dev.client.publish("devices/dev-2/commands/x", b"no", qos=1)
    assert wait_until(dev.disconnected.is_set)


def test_a_token_session_is_kicked_when_the_device_is_revoked(
    broker: Broker, fleet: Fleet, token_peer: Callable[..., Peer]
) -> None:
    dev = token_peer(broker.jwt_port, _token(fleet, "dev-1"), "dev-1").connect()
    fleet.pki.revoke("dev-1", reason="key-compromise")
    assert wait_until(dev.disconnected.is_set, 5)
    again = token_peer(broker.jwt_port, _token(fleet, "dev-1"), "dev-1").connect(expect_ok=False)
    assert again.refused
    assert "revoked" in broker.refusals()


def test_the_device_token_is_refused_on_the_mtls_only_listener(
    broker: Broker, fleet: Fleet, token_peer: Callable[..., Peer]
) -> None:
    # Downgrade twin: the mTLS listener demands a certificate in the handshake; a token client
    # without one never reaches MQTT.
    dev = token_peer(broker.mtls_port, _token(fleet, "dev-1"), "dev-1").connect(expect_ok=False)
    assert dev.refused


# paho reports a 3.1.1 CONNACK return code as the MQTT 5 reason of the same meaning.
PAHO_CONNACK = {2: 0x85, 4: 0x86, 5: 0x87}


def _refused_with(
    broker: Broker,
    token_peer: Callable[..., Peer],
    token: str,
    client_id: str,
    reason: str,
    connack: int = 4,
) -> None:
    """Refused with this audit reason and this MQTT 3.1.1 CONNACK return code (4: a credential
    that does not verify; 5: not authorized; 2: identifier rejected)."""
    peer = token_peer(broker.jwt_port, token, client_id).connect(expect_ok=False)
    assert peer.refused
    assert wait_until(lambda: reason in broker.refusals()), broker.refusals()
    assert peer.connack is not None
    assert int(peer.connack.value) == PAHO_CONNACK[connack]


NOW = dt.datetime.now(dt.UTC)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "token-expired"),
        ("not-yet-valid", "token-not-yet-valid"),
        ("wrong-aud", "token-audience"),
        ("too-long", "token-lifetime"),
        ("no-jti", "token-claims"),
        ("other-sub", "token-subject"),
    ],
)
def test_bad_claims_are_refused(
    broker: Broker,
    fleet: Fleet,
    token_peer: Callable[..., Peer],
    case: str,
    reason: str,
) -> None:
    creds = fleet.creds("dev-1")
    key = load_private_key(creds / "device.key")
    header, claims = _parts(_token(fleet, "dev-1"))
    now = int(NOW.timestamp())
    changes: dict[str, dict[str, Any]] = {
        "expired": {"iat": now - 7200, "exp": now - 3600},
        "not-yet-valid": {"iat": now + 3600, "exp": now + 4000},
        "wrong-aud": {"aud": "other.example"},
        "too-long": {"iat": now, "exp": now + 7200},  # over the broker's 1 h cap
        "no-jti": {"jti": None},
        "other-sub": {"sub": "dev-2"},
    }
    claims.update(changes[case])
    claims = {k: v for k, v in claims.items() if v is not None}
    token = jwt.encode(claims, key, algorithm="ES256", headers={"x5c": header["x5c"]})
    _refused_with(broker, token_peer, token, "dev-1" if case != "other-sub" else "dev-2", reason)


def test_alg_none_is_refused(broker: Broker, fleet: Fleet, token_peer: Callable[..., Peer]) -> None:
    header, claims = _parts(_token(fleet, "dev-1"))
    token = _forge({**header, "alg": "none"}, claims)
    _refused_with(broker, token_peer, token, "dev-1", "token-algorithm")


def test_hs256_keyed_with_the_public_key_is_refused(
    broker: Broker, fleet: Fleet, token_peer: Callable[..., Peer]
) -> None:
    # The classic algorithm confusion: HMAC "signed" with the public key the verifier holds.
    header, claims = _parts(_token(fleet, "dev-1"))
    cert = x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0]))
    public = cert.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    forged_header = {**header, "alg": "HS256"}
    unsigned = _forge(forged_header, claims).rsplit(".", 1)[0]
    mac = hmac.new(public, unsigned.encode(), hashlib.sha256).digest()
    _refused_with(broker, token_peer, f"{unsigned}.{_b64(mac)}", "dev-1", "token-algorithm")


def test_a_token_signed_by_another_devices_key_is_refused(
    broker: Broker, fleet: Fleet, token_peer: Callable[..., Peer]
) -> None:
    header, claims = _parts(_token(fleet, "dev-1"))
    other_key = load_private_key(fleet.creds("dev-2") / "device.key")
    token = jwt.encode(claims, other_key, algorithm="ES256", headers={"x5c": header["x5c"]})
    _refused_with(broker, token_peer, token, "dev-1", "token-signature")


def test_a_token_for_device_a_with_client_id_b_is_refused(
    broker: Broker, fleet: Fleet, token_peer: Callable[..., Peer]
) -> None:
    _refused_with(
        broker, token_peer, _token(fleet, "dev-1"), "dev-2", "client-id-mismatch", connack=2
    )


def test_a_replayed_token_is_refused(
    broker: Broker, fleet: Fleet, token_peer: Callable[..., Peer]
) -> None:
    token = _token(fleet, "dev-1")
    first = token_peer(broker.jwt_port, token, "dev-1").connect()
    first.close()
    _refused_with(broker, token_peer, token, "dev-1", "token-replayed")


def test_a_token_with_a_foreign_certificate_is_refused(
    broker: Broker, fleet: Fleet, token_peer: Callable[..., Peer], foreign_pki: PKI, tmp_path: Path
) -> None:
    # Same trust domain name, another CA: its certificate is not this fleet's.
    foreign_pki.issue("dev-1", out=tmp_path / "foreign-dev-1")
    creds = tmp_path / "foreign-dev-1"
    cert = x509.load_pem_x509_certificate((creds / "device.crt").read_bytes())
    token = make_device_token(
        key=load_private_key(creds / "device.key"),
        certificate=cert,
        device_id="dev-1",
        audience="fleet.example",
    )
    _refused_with(broker, token_peer, token, "dev-1", "token-untrusted-certificate")


def test_a_service_cannot_use_a_device_token(
    broker: Broker, fleet: Fleet, token_peer: Callable[..., Peer]
) -> None:
    creds = fleet.creds("sink", service=True)
    cert = x509.load_pem_x509_certificate((creds / "device.crt").read_bytes())
    token = make_device_token(
        key=load_private_key(creds / "device.key"),
        certificate=cert,
        device_id="sink",
        audience="fleet.example",
    )
    _refused_with(broker, token_peer, token, "sink", "token-not-device", connack=5)


def test_a_password_is_not_a_method_of_the_jwt_listener(
    broker: Broker, token_peer: Callable[..., Peer]
) -> None:
    _refused_with(broker, token_peer, "hunter2", "dev-1", "method-not-allowed", connack=5)


def test_a_certificate_on_a_jwt_only_listener_proves_nothing(
    broker: Broker, peers: Callable[..., Peer]
) -> None:
    # The jwt-only listener does not request a certificate, so a client that has one and sends
    # no token is refused: mutual TLS is not a method of that listener.
    peer = peers(broker.jwt_port, "dev-1").connect(expect_ok=False)
    assert peer.refused
    assert wait_until(lambda: "method-not-allowed" in broker.refusals())


# -- the authenticator alone: the session's end and the replay cache ----------------------------


def test_the_session_ends_when_the_token_expires(fleet: Fleet) -> None:
    issuer = x509.load_pem_x509_certificate((fleet.pki_dir / "issuing.crt").read_bytes())
    auth = DeviceTokenAuthenticator(
        trust_domain="fleet.example", issuers=lambda: [issuer], is_revoked=lambda _: False
    )
    token = _token(fleet, "dev-1", ttl=600)
    facts = ConnectionFacts("dev-1", "u", token, "127.0.0.1:1", None)
    import asyncio

    result = asyncio.run(auth.authenticate(facts))
    assert result.method == "jwt"
    assert result.not_after is not None
    assert result.not_after.timestamp() == _parts(token)[1]["exp"]


def test_the_replay_cache_forgets_only_expired_tokens_and_never_overflows() -> None:
    cache = ReplayCache(capacity=2)
    assert cache.add("d", "a", expires=10, now=0)
    assert not cache.add("d", "a", expires=10, now=5)  # replay within the lifetime
    assert cache.add("d", "b", expires=20, now=5)
    assert not cache.add("d", "c", expires=20, now=5)  # full: refuse rather than forget
    assert cache.add("d", "c", expires=30, now=11)  # "a" expired and made room
    assert not cache.add("d", "b", expires=20, now=11)


def test_listener_specs_parse_and_refuse_what_cannot_work() -> None:
    assert ListenerSpec.parse("8884:jwt,mtls").methods == {"jwt", "mtls"}
    assert ListenerSpec.parse("8884:jwt,mtls").client_certificates == "optional"
    assert ListenerSpec.parse("8883:mtls").client_certificates == "required"
    assert ListenerSpec.parse("8884:jwt").client_certificates == "none"
    for bad, words in [
        ("8884", "expected PORT:METHOD"),
        ("x:mtls", "expected PORT:METHOD"),
        ("8884:", "names no method"),
        ("8884:kerberos", "unknown method kerberos"),
        ("70000:mtls", "out of range"),
    ]:
        with pytest.raises(ConfigError, match=words):
            ListenerSpec.parse(bad)


# -- the CLI: device token, broker run --listen ---------------------------------------------------


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., Result]:
    def run(*args: str) -> Result:
        proc = subprocess.run(
            [*CLI, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run


def test_device_token_prints_a_token_the_broker_accepts(
    fleet: Fleet, run_cli: Callable[..., Result], token_peer: Callable[..., Peer], tmp_path: Path
) -> None:
    creds = fleet.creds("dev-1")
    result = run_cli("device", "token", "dev-1", "--creds", str(creds), "--ttl", "600", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["claims"]["sub"] == "dev-1"
    assert doc["claims"]["aud"] == "fleet.example"
    assert doc["claims"]["exp"] - doc["claims"]["iat"] == 600
    # The real broker process, started as a user would, with a jwt listener beside mTLS.
    proc = subprocess.Popen(
        [*CLI, "broker", "run", "--pki", str(fleet.pki_dir), "--no-renewal", *LISTEN_BOTH],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stderr is not None
        banner = proc.stderr.readline()
        ports = re.findall(r"127\.0\.0\.1:(\d+) \((\w+)\)", banner)
        assert [m for _, m in ports] == ["mtls", "jwt"], banner
        plain = run_cli("device", "token", "dev-1", "--creds", str(creds)).stdout.strip()
        token_peer(int(ports[1][0]), plain, "dev-1").connect()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--ttl", "0"], "between 1 and 86400"),
        (["--ttl", "90000"], "between 1 and 86400"),
        (["--name", "dev-2"], "not dev-2"),
        (["--service"], "only devices sign"),
        (["--missing"], "does not exist"),
    ],
)
def test_device_token_errors_are_one_line(
    fleet: Fleet, run_cli: Callable[..., Result], tmp_path: Path, args: list[str], words: str
) -> None:
    creds = fleet.creds("dev-1")
    name = "dev-1"
    if args == ["--name", "dev-2"]:
        name, args = "dev-2", []
    elif args == ["--service"]:
        creds, name, args = fleet.creds("sink", service=True), "sink", []
    elif args == ["--missing"]:
        creds, args = tmp_path / "nowhere", []
    result = run_cli("device", "token", name, "--creds", str(creds), *args)
    assert_one_line_error(result, words)


@pytest.mark.parametrize(
    ("listen", "words"),
    [("8884:kerberos", "unknown method kerberos"), ("nonsense", "expected PORT:METHOD")],
)
def test_broker_run_refuses_a_listener_it_cannot_serve(
    fleet: Fleet, run_cli: Callable[..., Result], listen: str, words: str
) -> None:
    result = run_cli("broker", "run", "--pki", str(fleet.pki_dir), "--listen", listen)
    assert_one_line_error(result, words)


# -- a shared registry: devices of every station --------------------------------------------------


@pytest.mark.slow
def test_tokens_of_every_active_station_are_accepted_on_a_shared_registry(
    tmp_path: Path, pg_url: str
) -> None:
    """One PostgreSQL registry, three issuing CAs: a broker run from station-1's directory takes
    the tokens of station-3's and the root station's devices (every CA the watcher trusts), and
    still refuses a token whose certificate comes from another fleet's CA, and the devices of a
    revoked station."""
    root = PKI.init(tmp_path / "root-ca", trust_domain="fleet.example", registry=pg_url)
    stations = {"root": root}
    for name in ("station-1", "station-3"):
        root.add_station(name, out=tmp_path / name)
        stations[name] = PKI.open(tmp_path / name)
    foreign = PKI.init(tmp_path / "foreign", trust_domain="fleet.example")
    creds: dict[str, Path] = {}
    for station, device in (("station-3", "dev-s3"), ("root", "dev-r"), ("station-1", "dev-s1")):
        creds[device] = tmp_path / "creds" / device
        stations[station].issue(device, kind=IdentityKind.DEVICE, out=creds[device])
    creds["dev-x"] = tmp_path / "creds" / "dev-x"
    foreign.issue("dev-x", kind=IdentityKind.DEVICE, out=creds["dev-x"])
    audit: list[dict[str, Any]] = []
    thread = BrokerThread(
        BrokerSettings(tmp_path / "station-1", listeners=(JWT,)),
        audit_sink=lambda line: audit.append(json.loads(line)),
    ).start()
    made: list[Peer] = []

    def connect(device: str) -> Peer:
        cert = x509.load_pem_x509_certificate((creds[device] / "device.crt").read_bytes())
        token = make_device_token(
            key=load_private_key(creds[device] / "device.key"),
            certificate=cert,
            device_id=device,
            audience="fleet.example",
        )
        peer = Peer(thread.port, None, device, context=client_context(trust=root.path / "root.crt"))
        peer.client.username_pw_set("unused", token)
        made.append(peer)
        return peer.connect(expect_ok=False)

    try:
        for device in ("dev-s3", "dev-r", "dev-s1"):
            assert connect(device).connected.is_set(), device
        assert connect("dev-x").refused  # negative twin: a CA of another fleet
        assert wait_until(
            lambda: any(r.get("reason") == "token-untrusted-certificate" for r in audit)
        )
        root.revoke_station("station-3", reason="key-compromise")
        assert wait_until(lambda: len(thread.broker.watcher.issuers) == 2)
        assert connect("dev-s3").refused  # a revoked station's devices are refused
    finally:
        for peer in made:
            peer.close()
        thread.stop()
        for ca in (*stations.values(), foreign):
            ca.close()


@pytest.mark.parametrize("where", ["option", "config"])
def test_broker_run_token_audience_takes_that_audience_only(
    fleet: Fleet, token_peer: Callable[..., Peer], tmp_path: Path, where: str
) -> None:
    """``broker run --token-audience A`` (or ``[tokens] audience`` in ``--config``): a token for
    A (``device token --audience A``) is in; the twin, a token for the trust domain (the default
    audience), is refused (wrong aud)."""
    config = tmp_path / "broker.toml"
    config.write_text('[tokens]\naudience = "mqtt.fleet.example"\n')
    audience = (
        ["--token-audience", "mqtt.fleet.example"]
        if where == "option"
        else ["--config", str(config)]
    )
    proc = subprocess.Popen(
        [*CLI, "broker", "run", "--pki", str(fleet.pki_dir), "--listen", "0:jwt", *audience,
         "--no-renewal", "--no-persist"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        banner = stderr_line(proc, "listening on")
        port = int(re.findall(r":(\d+) \(jwt\)", banner)[0])
        creds = fleet.creds("dev-1")
        token = make_device_token(
            key=load_private_key(creds / "device.key"),
            certificate=x509.load_pem_x509_certificate((creds / "device.crt").read_bytes()),
            device_id="dev-1",
            audience="mqtt.fleet.example",
        )
        ok = token_peer(port, token, "dev-1")
        assert not ok.connect().refused
        default = token_peer(port, _token(fleet, "dev-2"), "dev-2").connect(expect_ok=False)
        assert default.refused
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
