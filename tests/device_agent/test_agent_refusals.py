"""Refusals that will not fix themselves: classified, logged with the reason, retried slowly."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import random
import socket
import ssl
import threading
from collections.abc import Callable

import pytest

from broker.server import BrokerThread
from device_agent import Agent, Backoff, Failure
from device_agent.backoff import classify_connack, classify_exception, classify_log_text
from provisioning.pki import PKI
from provisioning.tls import server_context_for_pki
from tests.conftest import needs_mosquitto
from tests.device_agent.agent_helpers import wait_until
from tests.device_agent.conftest import Creds


def test_backoff_is_capped_and_fully_jittered() -> None:
    b = Backoff(initial=1.0, maximum=8.0, slow=600.0, rng=random.Random(7))  # noqa: S311 - jitter
    caps = []
    for _ in range(8):
        caps.append(b.cap())
        assert 0 <= b.next_delay() <= caps[-1]
    assert caps == [1, 2, 4, 8, 8, 8, 8, 8]
    delays = [b.next_delay() for _ in range(200)]
    assert min(delays) < 1
    assert max(delays) > 7
    slow = b.next_delay(Failure("revoked", "", True))
    assert 300 <= slow <= 600
    b.reset()
    assert b.cap() == 1


def test_failure_classification() -> None:
    assert (
        classify_log_text(
            "failed to receive on socket: [SSL: SSLV3_ALERT_CERTIFICATE_REVOKED]"
            " sslv3 alert certificate revoked"
        ).reason
        == "revoked"
    )
    assert classify_log_text("tlsv1 alert unknown ca").reason == "unknown-ca"
    assert classify_log_text("connection reset") is None
    assert classify_connack(2).reason == "identifier-rejected"
    assert classify_connack(2).permanent
    assert not classify_connack(3).permanent
    assert not classify_exception(ConnectionRefusedError()).permanent
    err = ssl.SSLCertVerificationError("x")
    err.verify_message = "Hostname mismatch, certificate is not valid for '127.0.0.1'."
    assert classify_exception(err).reason == "wrong-broker-name"


def test_revoked_device_stops_hammering_our_broker(
    broker: BrokerThread,
    pki: PKI,
    creds: Creds,
    agents: Callable[..., Agent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Our broker sends the TLS alert 'certificate revoked': one attempt, then a slow retry."""
    store = creds("dev-1")
    pki.revoke("dev-1", reason="key-compromise")
    broker.call(broker.broker.check_revocations())
    caplog.set_level(logging.INFO, "iotauth.agent")
    agent = agents(store, broker.port)
    assert wait_until(
        lambda: agent.stats.last_failure is not None and agent.stats.last_failure.permanent
    )
    attempts = agent.stats.attempts
    assert attempts == 1
    assert agent.stats.connects == 0
    failure = agent.stats.last_failure
    assert failure is not None
    assert failure.reason == "revoked"
    assert any("will not fix itself" in r.getMessage() for r in caplog.records)
    # backoff_initial is 0.05 s: without the slow retry this would be dozens of attempts.
    assert not wait_until(lambda: agent.stats.attempts > attempts, 1.0)
    assert len(broker.broker.audit.events("refuse", reason="revoked")) == 1


def test_a_broker_that_closes_without_a_reason_is_retried_slowly_after_three(
    pki: PKI, creds: Creds, agents: Callable[..., Agent]
) -> None:
    """Some brokers (amqtt, for one) end a refused connection after the TLS 1.3 handshake
    without an alert or CONNACK. After 3 such closes in a row the agent stops hammering."""
    store = creds("dev-1")
    context = server_context_for_pki(pki.path)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True):
                pass  # the handshake is done; close without an alert or CONNACK

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        agent = agents(store, listener.getsockname()[1])
        assert wait_until(
            lambda: agent.stats.last_failure is not None and agent.stats.last_failure.permanent
        )
        failure = agent.stats.last_failure
        assert failure is not None
        assert failure.reason == "closed-in-handshake"
        assert "most likely revoked" in failure.detail
        attempts = agent.stats.attempts
        # The first close followed a level-5 CONNECT: 'auto' takes it for a broker that does
        # not speak MQTT 5 and goes on in 3.1.1 at once; three closes in 3.1.1 make it a refusal.
        assert agent.stats.fallbacks == 1
        assert attempts == 4
        assert not wait_until(lambda: agent.stats.attempts > attempts, 1.0)
    finally:
        listener.close()


@needs_mosquitto
def test_revoked_device_against_mosquitto_names_the_alert(
    pki: PKI, creds: Creds, agents: Callable[..., Agent], tmp_path: object
) -> None:
    """mosquitto sends the TLS alert 'certificate revoked': classified at once, retried slowly."""
    from iotauth.fleet_backend import Mosquitto

    store = creds("dev-1")
    pki.revoke("dev-1")
    m = Mosquitto(pki.path, pki.path.parent / "mosq-revoked").start()  # reads the CRL at start
    try:
        agent = agents(store, m.port)
        assert wait_until(lambda: agent.stats.last_failure is not None)
        failure = agent.stats.last_failure
        assert failure is not None
        assert failure.reason == "revoked", failure
        assert failure.permanent
        assert agent.stats.attempts == 1
    finally:
        m.stop()


def test_expired_certificate_is_a_clear_error(
    broker: BrokerThread, creds: Creds, agents: Callable[..., Agent]
) -> None:
    """An expired certificate cannot renew over MQTT: the agent says so and does not hammer."""
    store = creds("dev-1", now=dt.datetime.now(dt.UTC) - dt.timedelta(days=3), days=1)
    agent = agents(store, broker.port)
    assert wait_until(lambda: agent.stats.last_failure is not None)
    failure = agent.stats.last_failure
    assert failure is not None
    assert failure.reason == "expired"
    assert "provisioned again" in failure.detail
    assert failure.permanent
    assert agent.stats.attempts == 1
    assert broker.broker.audit.events("refuse") == []  # never even reached the broker


def test_client_id_is_the_device_id(
    broker: BrokerThread, creds: Creds, agents: Callable[..., Agent]
) -> None:
    """The broker's audit shows client_id = device id and the certificate's serial."""
    agent = agents(creds("dev-7"), broker.port)
    assert wait_until(lambda: agent.connected)
    events = broker.broker.audit.events("connect", client_id="dev-7")
    assert events
    assert events[0]["credential"] == agent.credentials.serial
