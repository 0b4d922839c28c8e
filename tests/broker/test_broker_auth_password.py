"""The password method: a service's API key as the MQTT password, against the real broker.

The broker runs an mTLS listener and a ``password`` listener (``--listen 0:mtls --listen
0:password``); the clients are real paho clients over server-authenticated TLS. The secret comes
from ``iotauth service secret``; the registry holds only its SCRAM verifier. Negative twins: a
wrong secret, a device name, a revoked or rotated secret, the mTLS-only listener, 50 guesses.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from broker.auth import ConnectionFacts, ListenerAuthenticator
from broker.auth_password import Backoff, PasswordAuthenticator, SecretSource
from broker.errors import Refused
from broker.settings import DEFAULT_METHODS_BY_KIND, BrokerSettings, ListenerSpec
from provisioning.tls import client_context
from tests.broker.broker_helpers import (
    AuditedBroker,
    FakeClock,
    Fleet,
    Peer,
    service_secret,
    wait_until,
)
from tests.conftest import Result, assert_one_line_error

MTLS = ListenerSpec(0, frozenset({"mtls"}))
PASSWORD = ListenerSpec(0, frozenset({"password"}))
# paho reports a 3.1.1 CONNACK return code as the MQTT 5 reason of the same meaning.
BAD_CREDENTIALS, NOT_AUTHORIZED = 0x86, 0x87


class Broker(AuditedBroker):
    def __init__(self, fleet: Fleet, **kw: Any) -> None:
        super().__init__(BrokerSettings(fleet.pki_dir, listeners=(MTLS, PASSWORD)), **kw)
        self.mtls_port, self.password_port = self.ports


@pytest.fixture
def broker(fleet: Fleet) -> Iterator[Broker]:
    b = Broker(fleet)
    yield b
    b.thread.stop()


@pytest.fixture
def secret_peer(fleet: Fleet) -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(port: int, username: str, secret: str, client_id: str | None = None) -> Peer:
        # Server-authenticated TLS: the client checks the broker's certificate, shows none.
        ctx = client_context(trust=fleet.pki_dir / "root.crt")
        peer = Peer(port, None, client_id or username, context=ctx)
        peer.client.username_pw_set(username, secret)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


def test_service_secret_prints_the_secret_once_and_stores_no_secret(
    fleet: Fleet, cli: Callable[..., Result]
) -> None:
    first = cli("service", "secret", "dash", "--pki", str(fleet.pki_dir), check=True)
    secret = first.stdout.strip()
    assert len(secret) >= 43
    assert "shown once" in first.stderr
    registry = (fleet.pki_dir / "registry.sqlite3").read_bytes()
    ledger = (fleet.pki_dir / "ledger.jsonl").read_text()
    assert secret.encode() not in registry
    assert secret not in ledger
    assert '"secret-create"' in ledger
    doc = json.loads(cli("service", "secret", "dash", "--pki", str(fleet.pki_dir), "--json",
                         check=True).stdout)  # fmt: skip
    assert (doc["version"], doc["replaced_version"], doc["iterations"]) == (2, 1, 4096)
    assert doc["secret"] != secret
    assert "stored_key" not in doc
    # Negative twins: a bad name and a device's name are one-line errors that change nothing.
    fleet.creds("dev-1")
    for name, fragment in (("Bad", "invalid service name"), ("dev-1", "must not collide")):
        bad = cli("service", "secret", name, "--pki", str(fleet.pki_dir))
        assert_one_line_error(bad, fragment)
        assert bad.stdout == ""


def test_a_service_with_its_secret_gets_exactly_the_service_grants(
    broker: Broker,
    fleet: Fleet,
    cli: Callable[..., Result],
    secret_peer: Callable[..., Peer],
    peers: Callable[..., Peer],
) -> None:
    secret = service_secret(cli, fleet, "dash")
    dev = peers(broker.mtls_port, "dev-1").connect()
    svc = secret_peer(broker.password_port, "dash", secret).connect()
    assert svc.subscribe("devices/+/telemetry/#", qos=1) == [1]
    # Deny by default (MQTT-3.9.3-2 lets a server refuse a filter with 0x80): not a device's
    # subtree nor a renewal-service topic.
    assert svc.subscribe("devices/dev-1/certs/csr", qos=1) == [0x80]
    assert svc.subscribe("#", qos=1) == [0x80]
    assert dev.subscribe("devices/dev-1/commands/#", qos=1) == [1]
    svc.publish("devices/dev-1/commands/reboot", b"now", qos=1)
    assert wait_until(lambda: ("devices/dev-1/commands/reboot", b"now", False) in dev.messages)
    dev.publish("devices/dev-1/telemetry/t", b"20", qos=1)
    assert wait_until(lambda: ("devices/dev-1/telemetry/t", b"20", False) in svc.messages)
    connects = [r for r in broker.audit if r["event"] == "connect" and r.get("identity")]
    assert any(r.get("method") == "password" and r["identity"].endswith("/service/dash")
               for r in connects)  # fmt: skip
    metrics = broker.thread.broker.metrics
    assert metrics.value("iotauth_broker_authentications_total", method="password") == 1
    assert metrics.value("iotauth_broker_authentications_total", method="mtls") == 1
    # A publish outside the service's grants ends the session (denied_publish = disconnect).
    svc.client.publish("devices/dev-1/telemetry/fake", b"x", qos=1)
    assert wait_until(svc.disconnected.is_set)


def test_wrong_secrets_devices_and_the_mtls_listener_are_refused(
    broker: Broker,
    fleet: Fleet,
    cli: Callable[..., Result],
    secret_peer: Callable[..., Peer],
) -> None:
    secret = service_secret(cli, fleet, "dash")
    fleet.creds("dev-1")
    wrong = secret_peer(broker.password_port, "dash", secret + "x").connect(expect_ok=False)
    assert wrong.refused
    assert int(wrong.connack.value) == BAD_CREDENTIALS  # MQTT 3.1.1 CONNACK 4
    assert wait_until(lambda: "password-wrong" in broker.refusals())
    # A device cannot use a password even where a listener lists the method: it has no secret.
    dev = secret_peer(broker.password_port, "dev-1", secret).connect(expect_ok=False)
    assert dev.refused
    assert wait_until(lambda: "password-unknown" in broker.refusals())
    # Another service's secret does not open this one (client id = username = identity).
    other = service_secret(cli, fleet, "grafana")
    swap = secret_peer(broker.password_port, "dash", other).connect(expect_ok=False)
    assert swap.refused
    # Downgrade twin: the mTLS-only listener wants a certificate in the handshake.
    plain = secret_peer(broker.mtls_port, "dash", secret).connect(expect_ok=False)
    assert plain.refused
    # The right secret on the right listener works (the refusals above were not backoffs).
    assert secret_peer(broker.password_port, "dash", secret).connect().connected.is_set()


def test_rotation_and_revocation_kick_live_secret_sessions_within_one_second(
    broker: Broker,
    fleet: Fleet,
    cli: Callable[..., Result],
    secret_peer: Callable[..., Peer],
) -> None:
    old = service_secret(cli, fleet, "dash")
    keep = service_secret(cli, fleet, "grafana")
    live = secret_peer(broker.password_port, "dash", old).connect()
    other = secret_peer(broker.password_port, "grafana", keep).connect()
    new = service_secret(cli, fleet, "dash")  # rotation
    assert wait_until(live.disconnected.is_set, 1.0)
    assert not wait_until(other.disconnected.is_set, 0.3)  # negative twin stays
    kicks = [r for r in broker.audit if r["event"] == "kick"]
    assert any(r["reason"] == "secret-revoked" and r.get("credential") == "dash#1" for r in kicks)
    assert secret_peer(broker.password_port, "dash", old, "dash").connect(expect_ok=False).refused
    again = secret_peer(broker.password_port, "dash", new).connect()
    cli("service", "revoke", "dash", "--pki", str(fleet.pki_dir), check=True)
    assert wait_until(again.disconnected.is_set, 1.0)
    assert secret_peer(broker.password_port, "dash", new).connect(expect_ok=False).refused
    assert wait_until(lambda: "password-revoked" in broker.refusals())
    assert other.connected.is_set()
    assert not other.disconnected.is_set()


def test_fifty_guesses_are_backed_off_audited_and_the_secret_still_works_after(
    fleet: Fleet, cli: Callable[..., Result], secret_peer: Callable[..., Peer]
) -> None:
    secret = service_secret(cli, fleet, "dash")
    clock = FakeClock()
    source = SecretSource(fleet.pki_dir)
    password = PasswordAuthenticator(
        trust_domain="fleet.example", secret=source.secret, backoff=Backoff(clock=clock)
    )
    auth = ListenerAuthenticator(
        frozenset({"password"}), {"password": password}, dict(DEFAULT_METHODS_BY_KIND)
    )
    b = AuditedBroker(BrokerSettings(fleet.pki_dir, listeners=(PASSWORD,)), authenticator=auth)
    try:
        for n in range(50):
            guess = secret_peer(b.thread.port, "dash", f"guess-{n}").connect(expect_ok=False)
            assert guess.refused
            guess.close()
        reasons = b.refusals()
        assert len(reasons) == 50
        # Three free failures, the fourth starts the backoff; every later guess is refused
        # unchecked (auth-backoff) with MQTT 3.1.1 CONNACK 5.
        assert reasons[:4] == ["password-wrong"] * 4
        assert reasons[4:] == ["auth-backoff"] * 46
        backed_off = [r["detail"] for r in b.refusal_records() if "backed off" in r["detail"]]
        assert "backed off for 1 s" in backed_off[0]
        # The right secret while backed off is refused too: the backoff does not check.
        early = secret_peer(b.thread.port, "dash", secret).connect(expect_ok=False)
        assert early.refused
        assert int(early.connack.value) == NOT_AUTHORIZED
        early.close()
        clock.now += 1.5  # the first backoff (1 s) is over
        late = secret_peer(b.thread.port, "dash", secret).connect()
        assert late.connected.is_set()
    finally:
        b.thread.stop()
        source.close()


def test_the_backoff_is_per_address_and_per_identity_and_grows() -> None:
    clock = FakeClock()
    calls: list[str] = []

    async def no_secret(name: str) -> None:
        calls.append(name)

    auth = PasswordAuthenticator(
        trust_domain="fleet.example", secret=no_secret, backoff=Backoff(clock=clock, cap=8)
    )

    def attempt(user: str, peer: str) -> str:
        facts = ConnectionFacts(user, user, "guess", peer, None)
        with pytest.raises(Refused) as info:
            asyncio.run(auth.authenticate(facts))
        return info.value.reason

    for _ in range(4):
        assert attempt("dash", "10.0.0.1:5000") == "password-unknown"
    # The identity is backed off from any address; the address for any identity.
    assert attempt("dash", "10.0.0.2:5000") == "auth-backoff"
    assert attempt("grafana", "10.0.0.1:6000") == "auth-backoff"
    assert calls == ["dash"] * 4  # nothing was looked up while backed off
    assert attempt("grafana", "10.0.0.3:1") == "password-unknown"  # a fresh pair is checked
    # Exponential: 1, 2, 4, 8 (the cap) seconds after the 4th, 5th, 6th, 7th failure.
    waits = []
    for _ in range(4):
        clock.now += 100
        attempt("dash", "10.0.0.9:1")
        waits.append(auth.backoff.wait("service:dash"))
    assert waits == [2.0, 4.0, 8.0, 8.0]


def test_broker_explain_says_which_methods_an_identity_may_use_on_each_listener(
    fleet: Fleet, cli: Callable[..., Result]
) -> None:
    service_secret(cli, fleet, "dash")
    fleet.creds("dev-1")
    pki = str(fleet.pki_dir)
    listen = ("--listen", "8883:mtls", "--listen", "8884:jwt,password,oidc")
    svc = cli("broker", "explain", "--pki", pki, "--identity", "dash", "--service",
              "--subscribe", "devices/+/telemetry/#", *listen, "--json", check=True)  # fmt: skip
    doc = json.loads(svc.stdout)
    # dash holds a secret and no certificate: no mtls, even on the mtls listener.
    assert doc["methods"] == {"8883": [], "8884": ["oidc", "password"]}
    assert "comes in with its secret" in doc["warnings"][0]
    # The twin: sink holds a certificate and no secret, so mtls and oidc but no password.
    sink = cli("broker", "explain", "--pki", pki, "--identity", "sink", "--service",
               "--subscribe", "devices/+/telemetry/#", *listen, "--json", check=True)  # fmt: skip
    assert json.loads(sink.stdout)["methods"] == {"8883": ["mtls"], "8884": ["oidc"]}
    nobody = cli("broker", "explain", "--pki", pki, "--identity", "dev-9",
                 "--subscribe", "devices/dev-9/#", *listen)  # fmt: skip
    assert "methods on 8884: none" in nobody.stdout  # no certificate: no token either
    dev = cli("broker", "explain", "--pki", pki, "--identity", "dev-1",
              "--subscribe", "devices/dev-1/#", *listen, check=True)  # fmt: skip
    assert "methods on 8883: mtls" in dev.stdout
    assert "methods on 8884: jwt" in dev.stdout
    assert "password" not in dev.stdout  # a device never uses a shared secret
