"""The device agent, the fleet simulator and `broker explain` against the exported Mosquitto.

Issue 8, item 4: everything works against a real Mosquitto started from `iotauth broker export`,
unchanged. The broker is started exactly as in test_broker_export_mosquitto.py (its fixtures are
reused); the agents are the real :class:`device_agent.Agent` with certificates from the fleet PKI.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import tests.broker.test_broker_export_mosquitto as exported
import tests.device_agent.conftest as agent_conftest
from broker.renewal import RenewalService, RenewalSettings
from device_agent import Agent
from device_agent.credentials import load_credentials
from device_agent.fleet import FleetSpec, run_fleet
from iotauth.fleet_backend import ExportedMosquittoBackend
from provisioning.tls import client_context_for_credentials
from tests.broker.broker_helpers import Fleet, Peer, stderr_line
from tests.conftest import CLI, Result
from tests.device_agent.agent_helpers import Sink, run_mixed_fleet, wait_until

pytestmark = exported.pytestmark  # skipped where mosquitto is not installed

# The fixtures of the Mosquitto export tests and of the agent tests, under their own names.
mosquitto = exported.mosquitto
peers = exported.peers
agents = agent_conftest.agents
Mosquitto = exported.Mosquitto

ONLINE = {"state": "online"}


def _state(messages: list[tuple[str, bytes, bool]], device: str) -> list[tuple[object, bool]]:
    return [(json.loads(p), r) for t, p, r in messages if t == f"devices/{device}/state"]


def test_agent_works_against_the_exported_mosquitto(
    mosquitto: Callable[..., Mosquitto],
    peers: Callable[..., Peer],
    agents: Callable[..., Agent],
    fleet: Fleet,
) -> None:
    """Telemetry reaches a service through Mosquitto; the retained state says online."""
    fleet.creds("sink-2", service=True)  # services get their rights from the export: issue first
    m = mosquitto()
    sink = Sink(fleet.creds("sink", service=True), m.port, "sink")
    try:
        agent = agents(fleet.creds("dev-1"), m.port, telemetry_interval=0.2)
        assert agent_conftest.connected(agent), agent.stats.last_failure
        assert wait_until(lambda: len(sink.telemetry_ids("dev-1")) >= 3), sink.messages
        ids = sink.telemetry_ids("dev-1")
        assert len(set(ids)) == len(ids)  # each message once, in QoS 1
        assert agent.stats.acked >= 3
        assert ONLINE in sink.json_on("devices/dev-1/state")
    finally:
        sink.close()
    # A service that connects later gets the state as a retained message.
    late = peers(m, "sink-2", service=True)
    assert late.subscribe("devices/+/state", 1) == [1]
    assert wait_until(lambda: _state(late.messages, "dev-1"))
    assert _state(late.messages, "dev-1") == [(ONLINE, True)]
    assert agent.stats.failures == {}  # connected at the first attempt, never dropped


@pytest.mark.parametrize("version", ["5", "311"])
def test_revoked_agent_is_closed_and_refused_by_the_exported_mosquitto(
    mosquitto: Callable[..., Mosquitto],
    agents: Callable[..., Agent],
    fleet: Fleet,
    cli: Callable[..., Result],
    caplog: pytest.LogCaptureFixture,
    version: str,
) -> None:
    """The negative twin: `device revoke --export --reload` ends the agent's session (on both MQTT
    versions), and the agent reports the reconnects as refused ('revoked', will not fix itself);
    dev-1 carries on."""
    m = mosquitto()
    sink = Sink(fleet.creds("sink", service=True), m.port, "sink")
    try:
        caplog.set_level(logging.INFO, "iotauth.agent")
        good = agents(fleet.creds("dev-1"), m.port, telemetry_interval=0.2, mqtt_version=version)
        bad = agents(fleet.creds("dev-2"), m.port, telemetry_interval=0.2, mqtt_version=version)
        assert agent_conftest.connected(good)
        assert agent_conftest.connected(bad)
        assert wait_until(lambda: sink.telemetry_ids("dev-2"))
        result = cli(
            "device", "revoke", "dev-2", "--pki", str(fleet.pki_dir), "--export", str(m.out),
            "--reload",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "Closed the live sessions of dev-2" in result.stdout

        def refused() -> bool:
            failure = bad.stats.last_failure
            return failure is not None and failure.reason == "revoked" and failure.permanent

        assert wait_until(refused), (bad.stats.failures, m.log.read_text()[-2000:])
        assert not bad.connected
        assert bad.stats.connects == 1  # the handshake never succeeds again
        assert bad.stats.failures["connection-lost"] == 1  # the kick
        # dev-2's will (retained offline) reached the service; nothing of dev-2 arrives any more.
        # (Mosquitto 2.0.11 does not publish the will of a session closed by disableClient: the
        # retained state of dev-2 still says online. Measured; not asserted either way.)
        seen = len(sink.telemetry_ids("dev-2"))
        before = len(sink.telemetry_ids("dev-1"))
        assert wait_until(lambda: len(sink.telemetry_ids("dev-1")) >= before + 3)
        assert len(sink.telemetry_ids("dev-2")) == seen
        assert good.connected
        assert good.stats.failures == {}
        # On MQTT 5 Mosquitto's kick (dynamic security disableClient) is a DISCONNECT with
        # reason code 0x98 (administrative action, MQTT 5 section 3.14.2.1), named in one line;
        # on 3.1.1 the connection just closes. Either way the reconnect meets the CRL in TLS.
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dev-2:")]
        kicked = "the broker disconnected: 0x98 administrative action"
        assert any(kicked in line for line in lines) == (version == "5"), lines
        assert any("refused, revoked" in line for line in lines), lines
    finally:
        sink.close()


# (identity, service, action, topic or filter, the decision our policy makes)
EXPLAIN_CASES = [
    ("dev-1", False, "publish", "devices/dev-1/telemetry/temp", True),
    ("dev-1", False, "publish", "devices/dev-2/telemetry/temp", False),
    ("dev-1", False, "subscribe", "devices/dev-2/telemetry/#", False),
    ("sink", True, "subscribe", "devices/+/telemetry/#", True),
]


def test_broker_explain_decides_what_the_exported_mosquitto_enforces(
    mosquitto: Callable[..., Mosquitto],
    peers: Callable[..., Peer],
    fleet: Fleet,
    cli: Callable[..., Result],
) -> None:
    """For allowed and denied cases, `broker explain` and the running Mosquitto agree."""
    fleet.creds("sink-2", service=True)
    m = mosquitto()
    dev1, dev2 = peers(m, "dev-1"), peers(m, "dev-2")
    witness = peers(m, "sink-2", service=True)  # sees all telemetry: messages did flow
    assert witness.subscribe("devices/+/telemetry/#", 1) == [1]
    for identity, service, action, topic, allowed in EXPLAIN_CASES:
        args = ["--identity", identity, f"--{action}", topic] + (["--service"] if service else [])
        result = cli("broker", "explain", "--pki", str(fleet.pki_dir), *args)
        assert result.returncode == (0 if allowed else 2), result
        assert result.stdout.startswith("ALLOW" if allowed else "DENY"), result.stdout
        case = f"{identity} {action} {topic}"
        if action == "publish":
            sender = dev1
            sender.publish(topic, b"case", qos=1)
            # A barrier: the same client's next, allowed message arrives after the first one.
            sender.publish("devices/dev-1/telemetry/barrier", b"barrier", qos=1)
            assert wait_until(
                lambda: ("devices/dev-1/telemetry/barrier", b"barrier", False) in witness.messages
            )
            delivered = (topic, b"case", False) in witness.messages
        else:
            who = peers(m, identity, service=service)
            assert who.subscribe(topic, 1) == [1]  # Mosquitto acknowledges; it filters deliveries
            dev2.publish("devices/dev-2/telemetry/temp", b"case", qos=1)
            assert wait_until(
                lambda: ("devices/dev-2/telemetry/temp", b"case", False) in witness.messages
            )
            if not allowed:
                time.sleep(exported.QUIET)
            delivered = any(p == b"case" for _, p, _ in who.messages)
            who.close()
        assert delivered == allowed, case
        witness.messages.clear()


@pytest.mark.slow
def test_fleet_simulator_runs_200_devices_against_the_exported_mosquitto(
    fleet: Fleet, tmp_path: Path
) -> None:
    """200 real agents, steady telemetry, Mosquitto started from `iotauth broker export`."""
    backend = ExportedMosquittoBackend(fleet.pki_dir, tmp_path / "exported")
    try:
        conf = (backend.out / "mosquitto.conf").read_text()
        assert "use_identity_as_username true" in conf
        assert "Generated by `iotauth broker export" in conf
        report = run_fleet(
            FleetSpec(devices=200, duration=15, telemetry_interval=1.0, reactors=4),
            backend,
            workdir=tmp_path / "fleet",
        )
        acl = (backend.out / "acl").read_text()
    finally:
        backend.close()
    text = "\n".join(report.lines())
    assert report.expected_online == 200, text
    assert report.first_connect_all_s is not None, text
    assert report.online_at_end == 200, text
    assert report.connects == report.attempts == 200, text  # one handshake each, no drops
    assert report.refusals == {}, text
    # Telemetry about once a second per device, acknowledged by Mosquitto and received by the
    # monitor (a service subscribed through Mosquitto). At most one message per device may be
    # acknowledged in the instant the monitor disconnects at the end, hence the slack.
    assert report.messages_acked >= 200 * 10, text
    assert report.messages_unique >= report.messages_acked - report.devices, text
    assert report.duplicates == 0, text
    assert "user fleet-monitor" in acl  # the monitor's rights came from the re-export


def test_fleet_backend_revocations_reach_the_exported_mosquitto(
    fleet: Fleet, tmp_path: Path
) -> None:
    """The backend's revoke goes through the export hook: revoked and expired devices refused."""
    backend = ExportedMosquittoBackend(fleet.pki_dir, tmp_path / "exported")
    run_mixed_fleet(backend, tmp_path / "fleet")


@pytest.mark.parametrize("version", ["5", "311"])
def test_agent_renews_through_the_exported_mosquitto(
    mosquitto: Callable[..., Mosquitto],
    agents: Callable[..., Agent],
    fleet: Fleet,
    cli: Callable[..., Result],
    version: str,
) -> None:
    """Renewal does not need our broker: `iotauth broker renewal` runs beside the exported
    Mosquitto, answers the agent's CSR, and records the renewal when the agent reports it, with
    the agent on MQTT 5 (Response Topic + Correlation Data) or 3.1.1."""
    service_dir = fleet.pki_dir / "services" / "renewal"
    cli("service", "issue", "renewal", "--pki", str(fleet.pki_dir), "--out", str(service_dir))
    m = mosquitto()  # the export now grants 'renewal' its topics
    store = fleet.creds("dev-1")
    old = load_credentials(store)
    service = subprocess.Popen(
        [*CLI, "broker", "renewal", "--pki", str(fleet.pki_dir), "--broker", f"127.0.0.1:{m.port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = stderr_line(service, "serving through")
        assert "serving through" in banner, banner
        agent = agents(store, m.port, mqtt_version=version)
        assert agent_conftest.connected(agent), agent.stats.last_failure
        agent.request_renewal()
        assert wait_until(lambda: agent.stats.renewals == 1, 30), agent.stats
        assert agent_conftest.connected(agent)
    finally:
        service.terminate()
        service.wait(10)
    assert service.returncode == 0
    assert load_credentials(store).serial != old.serial
    lines = (fleet.pki_dir / "ledger.jsonl").read_text().splitlines()
    renewals = [
        e for e in map(json.loads, lines) if e["event"] == "issue" and e["data"].get("renewal")
    ]
    assert [(e["data"]["name"], e["data"]["via"]) for e in renewals] == [("dev-1", "device-report")]


class _V5Device:
    """A device on MQTT 5 speaking the renewal protocol by hand, recording the answers with
    their Correlation Data."""

    def __init__(self, store: Path, port: int, device: str, *, v5: bool = True) -> None:
        self.device = device
        self.answers: list[tuple[str, dict[str, object], bytes | None]] = []
        ready = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        )
        self.client.tls_set_context(client_context_for_credentials(store))
        self.client.on_connect = lambda c, *_: c.subscribe(f"devices/{device}/#", 1)
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)

    def _on_message(self, _c: object, _u: object, msg: Any) -> None:
        if msg.topic.endswith("/certs/csr"):
            return
        corr = getattr(getattr(msg, "properties", None), "CorrelationData", None)
        self.answers.append((msg.topic, json.loads(msg.payload), corr))

    def report(self, request_id: str, *, response: str | None) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if response is not None:
            props.ResponseTopic = response
            props.CorrelationData = request_id.encode()
        doc = {"type": "installed", "request_id": request_id, "serial": "abc"}
        self.client.publish(
            f"devices/{self.device}/certs/csr", json.dumps(doc).encode(), 1, properties=props
        )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_renewal_service_answers_on_the_response_topic_beside_mosquitto(
    mosquitto: Callable[..., Mosquitto], fleet: Fleet
) -> None:
    """MQTT 5 section 4.10: beside Mosquitto (which speaks 5) the renewal service connects with
    MQTT 5 and answers a request on its Response Topic with its Correlation Data. Negative
    twins: a Response Topic outside the requesting device's subtree is not followed (the answer
    goes to the device's own certs/issued, never to dev-2), and a 3.1.1 request is answered
    exactly as before (no properties)."""
    fleet.creds("renewal", service=True)  # the export grants 'renewal' its topics
    fleet.creds("dev-2")
    m = mosquitto()
    service = RenewalService(
        fleet.pki_dir, host="127.0.0.1", port=m.port, settings=RenewalSettings()
    ).start()
    dev1 = _V5Device(fleet.creds("dev-1"), m.port, "dev-1")
    dev2 = _V5Device(fleet.creds("dev-2"), m.port, "dev-2")
    old = _V5Device(fleet.creds("dev-3"), m.port, "dev-3", v5=False)
    try:
        assert service.wait_subscribed()
        assert service.protocol == "5"
        dev1.report("r1", response="devices/dev-1/certs/issued")
        assert wait_until(lambda: dev1.answers), dev1.answers
        topic, doc, corr = dev1.answers[0]
        assert (topic, doc["type"], doc["request_id"], corr) == (
            "devices/dev-1/certs/issued",
            "refused",
            "r1",
            b"r1",
        )
        assert doc["reason"] == "unknown-request"
        dev1.report("r2", response="devices/dev-2/certs/issued")
        assert wait_until(lambda: len(dev1.answers) == 2), dev1.answers
        assert dev1.answers[1][0] == "devices/dev-1/certs/issued"
        assert dev1.answers[1][1]["request_id"] == "r2"
        assert dev1.answers[1][2] is None
        old.report("r3", response=None)
        assert wait_until(lambda: old.answers), old.answers
        assert old.answers[0][0] == "devices/dev-3/certs/issued"
        assert old.answers[0][2] is None
        assert dev2.answers == []  # nothing reached dev-2's topics
    finally:
        for client in (dev1, dev2, old):
            client.close()
        service.stop()
