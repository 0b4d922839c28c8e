"""``--auth jwt``: the agent signs a device token with its own key and sends it as the password.

Our broker runs an mTLS listener and a jwt listener (``--listen 0:mtls --listen 0:jwt``); the
agent connects to the jwt one over server-authenticated TLS (it verifies the broker against
``ca.crt`` and presents no certificate). The token is made in a child process, so the slim agent
never loads ``cryptography``; it is good for one CONNECT (the broker's replay cache), renewed by
reconnecting before it expires, and a revocation kicks the token session as it kicks a TLS one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509

from broker.server import BrokerThread
from broker.settings import BrokerSettings, ListenerSpec
from device_agent import Agent
from device_agent.token import DeviceToken, TokenSigningError, make_token
from provisioning.pki import PKI
from tests.device_agent.agent_helpers import Sink, start_agent, wait_until
from tests.device_agent.conftest import Creds, connected

MTLS, JWT = ListenerSpec(0, frozenset({"mtls"})), ListenerSpec(0, frozenset({"jwt"}))
FORBIDDEN = ("cryptography", "typer", "rich", "click", "amqtt", "broker", "iotauth")


class TwoListeners:
    def __init__(self, pki: PKI) -> None:
        self.audit: list[dict[str, Any]] = []
        self.thread = BrokerThread(
            BrokerSettings(pki.path, listeners=(MTLS, JWT), renewal=None),
            audit_sink=lambda line: self.audit.append(json.loads(line)),
        ).start()
        self.mtls_port, self.jwt_port = list(self.thread.broker.ports.values())

    def events(self, event: str, **match: object) -> list[dict[str, Any]]:
        return [
            e
            for e in self.audit
            if e["event"] == event and all(e.get(k) == v for k, v in match.items())
        ]


@pytest.fixture
def two(pki: PKI) -> Iterator[TwoListeners]:
    b = TwoListeners(pki)
    yield b
    b.thread.stop()


def _jwt_connects(b: TwoListeners, device: str) -> list[dict[str, Any]]:
    return [
        e
        for e in b.events("connect", client_id=device)
        if e.get("method") == "jwt" or "jwt" in json.dumps(e)
    ]


def test_the_token_is_signed_in_a_child_and_verifies(creds: Creds) -> None:
    """make_token in a process without cryptography: a child signs; the token verifies against
    the device certificate (ES256), names the device and the trust domain, lives ttl seconds."""
    store = creds("dev-1")
    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "from device_agent.token import make_token\n"
        f"t = make_token(Path({str(store)!r}), 'dev-1', ttl=120)\n"
        "assert 'cryptography' not in sys.modules, 'the agent process loaded cryptography'\n"
        "print(t.value)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert child.returncode == 0, child.stderr
    token = child.stdout.strip()
    cert = x509.load_pem_x509_certificate((store / "device.crt").read_bytes())
    claims = jwt.decode(token, cert.public_key(), algorithms=["ES256"], audience="fleet.example")
    assert claims["sub"] == "dev-1"
    assert claims["exp"] - claims["iat"] == 120
    parsed = DeviceToken.parse(token)
    assert parsed.expires_at - parsed.issued_at == 120
    assert parsed.renew_at(0.8) == parsed.issued_at + 96


def test_a_token_that_cannot_be_signed_is_one_clear_error(creds: Creds, tmp_path: Path) -> None:
    """Negative twins: a lifetime above the cap, and another device's id, each named."""
    store = creds("dev-1")
    with pytest.raises(TokenSigningError, match="--ttl must be between 1 and 86400"):
        make_token(store, "dev-1", ttl=100_000)
    with pytest.raises(TokenSigningError, match="not dev-2"):
        make_token(store, "dev-2", ttl=60)


def test_jwt_agent_connects_to_the_jwt_listener_and_is_held_to_its_acl(
    two: TwoListeners, creds: Creds, agents: Callable[..., Agent]
) -> None:
    """Telemetry over a token session reaches a service on the mTLS listener; the broker's
    audit says the method was jwt."""
    sink = Sink(creds("sink", service=True), two.mtls_port, "sink")
    try:
        agent = agents(creds("dev-1"), two.jwt_port, auth="jwt", telemetry_interval=0.2)
        assert connected(agent, 20), agent.stats.last_failure
        assert wait_until(lambda: len(sink.telemetry_ids("dev-1")) >= 2), sink.messages
    finally:
        sink.close()
    assert _jwt_connects(two, "dev-1"), two.audit
    assert agent.stats.failures == {}


def test_the_token_is_renewed_before_it_expires(
    two: TwoListeners, creds: Creds, agents: Callable[..., Agent]
) -> None:
    """A 4 s token renewed at half its life: the agent reconnects with a fresh token (a new
    jti each time: the broker refuses a replay) without a failure in between."""
    agent = agents(creds("dev-1"), two.jwt_port, auth="jwt", token_ttl=4, token_renew_at=0.5)
    assert connected(agent, 20), agent.stats.last_failure
    assert wait_until(lambda: agent.stats.token_renewals >= 2 and agent.connected, 30)
    assert agent.stats.connects >= 3
    assert agent.stats.failures == {}, agent.stats.failures
    assert len(_jwt_connects(two, "dev-1")) >= 3
    assert not two.events("refuse", reason="token-replayed")


def test_revocation_kicks_the_token_session_and_the_agent_names_the_refusal(
    two: TwoListeners,
    pki: PKI,
    creds: Creds,
    agents: Callable[..., Agent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "iotauth.agent")
    agent = agents(creds("dev-1"), two.jwt_port, auth="jwt")
    assert connected(agent, 20), agent.stats.last_failure
    pki.revoke("dev-1", reason="key-compromise")
    assert wait_until(lambda: agent.stats.failures["connection-lost"] >= 1, 10)

    def refused() -> bool:
        failure = agent.stats.last_failure
        return failure is not None and failure.permanent

    assert wait_until(refused, 20), agent.stats.failures
    failure = agent.stats.last_failure
    assert failure is not None
    # On 3.1.1 "CONNACK 4 bad user name or password" / 5; on MQTT 5 the reason code and string.
    assert failure.detail.startswith("refused by the broker: "), failure
    assert failure.reason in ("bad-credentials", "not-authorized", "revoked"), failure
    assert two.events("refuse", reason="revoked"), two.audit
    assert any("refused by the broker" in r.getMessage() for r in caplog.records)
    assert not agent.connected


def test_a_jwt_agent_is_refused_by_the_mtls_listener(
    two: TwoListeners, creds: Creds, agents: Callable[..., Agent]
) -> None:
    """Downgrade twin: without a certificate the mTLS listener ends the handshake (alert
    'certificate required'): named, and not retried fast."""
    agent = agents(creds("dev-1"), two.mtls_port, auth="jwt")
    assert wait_until(lambda: agent.stats.last_failure is not None, 20)
    failure = agent.stats.last_failure
    assert failure is not None
    assert failure.permanent, failure
    assert not agent.connected
    assert agent.stats.connects == 0


def test_slim_agent_with_jwt_never_loads_cryptography(
    two: TwoListeners, creds: Creds, tmp_path: Path
) -> None:
    """`python -m device_agent run --auth jwt`: connects with a token and stops cleanly; the
    token code ran in the process, cryptography did not (the child signs)."""
    sink = Sink(creds("sink", service=True), two.mtls_port, "sink")
    store = creds("dev-1")
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = start_agent(
        store,
        two.jwt_port,
        "--auth",
        "jwt",
        "--token-ttl",
        "600",
        "--telemetry-interval",
        "0.2",
        env=env,
    )
    try:
        assert wait_until(lambda: sink.telemetry_ids("dev-1"), 30)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        sink.close()
    assert proc.returncode == 0, err
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in err.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    assert "device_agent.token" in imported
    assert sorted(m for m in imported if m.split(".")[0] in FORBIDDEN) == []
    assert _jwt_connects(two, "dev-1")


def test_a_jwt_agent_renews_its_certificate_make_before_break(
    pki: PKI, creds: Creds, agents: Callable[..., Agent]
) -> None:
    """Renewal over MQTT with --auth jwt: the candidate is tried first with a token signed by
    the candidate's key naming the new certificate, so the broker's connect event confirms the
    offer (via broker-connect) before the agent installs it; no session is kicked on the way."""
    from broker.renewal import RenewalSettings
    from device_agent import load_credentials

    audit: list[dict[str, Any]] = []
    thread = BrokerThread(
        BrokerSettings(pki.path, listeners=(MTLS, JWT), renewal=RenewalSettings()),
        audit_sink=lambda line: audit.append(json.loads(line)),
    ).start()
    try:
        assert thread.broker.renewal is not None
        assert thread.broker.renewal.wait_subscribed()
        jwt_port = list(thread.broker.ports.values())[-1]
        store = creds("dev-1")
        old = load_credentials(store).serial
        agent = agents(store, jwt_port, auth="jwt")
        assert connected(agent, 20), agent.stats.last_failure
        agent.request_renewal()
        assert wait_until(lambda: agent.stats.renewals == 1, 40), agent.stats
        new = load_credentials(store).serial
        assert new != old
        assert connected(agent, 20), agent.stats.last_failure
        assert agent.stats.failures == {}, agent.stats.failures
    finally:
        thread.stop()
    connects = [
        (e["credential"], e["method"])
        for e in audit
        if e["event"] == "connect" and e.get("client_id") == "dev-1"
    ]
    assert connects[:2] == [(old, "jwt"), (new, "jwt")], connects
    recorded = [e for e in audit if e["event"] == "renewal-recorded"]
    assert [(e["credential"], e["via"]) for e in recorded] == [(new, "broker-connect")]


def test_an_agent_with_the_brokers_token_audience_connects_and_one_without_is_refused(
    pki: PKI, creds: Creds, agents: Callable[..., Agent], tmp_path: Path
) -> None:
    """``broker run --token-audience A`` takes tokens for A only: an agent with ``[auth]
    token_audience = A`` (or ``--token-audience A``) connects; the twin, an agent signing for the
    trust domain (the default), is refused and says why."""
    from device_agent.config import load_config

    config = tmp_path / "agent.toml"
    config.write_text('[auth]\nmethod = "jwt"\ntoken_audience = "mqtt.fleet.example"\n')
    loaded = load_config(config, store=creds("dev-1"))
    assert (loaded.auth, loaded.token_audience) == ("jwt", "mqtt.fleet.example")
    audit: list[dict[str, Any]] = []
    thread = BrokerThread(
        BrokerSettings(
            pki.path, listeners=(JWT,), renewal=None, token_audience="mqtt.fleet.example"
        ),
        audit_sink=lambda line: audit.append(json.loads(line)),
    ).start()
    try:
        (port,) = thread.broker.ports.values()
        good = agents(creds("dev-1"), port, auth="jwt", token_audience="mqtt.fleet.example")
        assert connected(good, 20), good.stats.last_failure
        default = agents(creds("dev-2"), port, auth="jwt")
        assert wait_until(lambda: default.stats.last_failure is not None, 20)
        assert not default.connected
        assert any(e.get("reason") == "token-audience" for e in audit), audit
    finally:
        thread.stop()
