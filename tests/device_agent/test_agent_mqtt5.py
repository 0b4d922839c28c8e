"""The agent on MQTT 5 and 3.1.1: version choice, fallback, session expiry, request/response.

The MQTT 5 peer is a real Mosquitto 2 (it speaks 5 fully); a broker that speaks only 3.1.1 is a
real TLS server in the test that does what MQTT-3.1.2-2 (3.1.1) tells such a broker to do with a
level-5 CONNECT: CONNACK return code 0x01, then close. Its MQTT 5 twin answers CONNACK 0x84
(MQTT 5, MQTT-3.1.2-2 allows it), and a third closes without any CONNACK (what some brokers do).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agent import Agent
from device_agent.agent import PROTOCOL_MEMORY
from device_agent.backoff import classify_refusal
from iotauth.fleet_backend import Mosquitto
from provisioning.pki import PKI
from provisioning.tls import client_context_for_credentials, server_context_for_pki
from tests.conftest import needs_mosquitto
from tests.device_agent.agent_helpers import start_agent, wait_until
from tests.device_agent.conftest import Creds, connected

CONNACK_311_REFUSED_VERSION = b"\x20\x02\x00\x01"  # 3.1.1 CONNACK, return code 1
CONNACK_311_ACCEPTED = b"\x20\x02\x00\x00"
CONNACK_5_UNSUPPORTED = b"\x20\x03\x00\x84\x00"  # MQTT 5 CONNACK 0x84, no properties


class OldBroker:
    """A TLS listener that reads one CONNECT and answers by its protocol level.

    ``on_v5`` is the bytes sent to a level-5 CONNECT before closing (b"" closes at once); a
    level-4 CONNECT gets CONNACK 0 and the connection stays open (PINGREQ answered), which is
    all the agent needs to count as connected in 3.1.1.
    """

    def __init__(self, pki: PKI, on_v5: bytes) -> None:
        self.on_v5 = on_v5
        self.levels: list[int] = []
        self._context = server_context_for_pki(pki.path)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        with contextlib.suppress(OSError), self._context.wrap_socket(raw, server_side=True) as c:
            self._conns.append(c)
            head = c.recv(2)  # CONNECT fixed header; our CONNECTs are < 128 bytes
            body = b""
            while len(body) < head[1]:
                body += c.recv(head[1] - len(body))
            level = body[6]  # after the protocol name "\0\4MQTT"
            self.levels.append(level)
            if level == 5:
                c.sendall(self.on_v5)
                return
            c.sendall(CONNACK_311_ACCEPTED)
            while data := c.recv(64):
                if data[0] == 0xC0:  # PINGREQ
                    c.sendall(b"\xd0\x00")

    def close(self) -> None:
        self._listener.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()


@pytest.fixture
def old_brokers(pki: PKI) -> Iterator[Callable[[bytes], OldBroker]]:
    made: list[OldBroker] = []

    def make(on_v5: bytes) -> OldBroker:
        made.append(OldBroker(pki, on_v5))
        return made[-1]

    PROTOCOL_MEMORY.forget()
    yield make
    for b in made:
        b.close()
    PROTOCOL_MEMORY.forget()


@pytest.mark.parametrize(
    "on_v5",
    [CONNACK_311_REFUSED_VERSION, CONNACK_5_UNSUPPORTED, b""],
    ids=["connack-311-rc1", "connack-5-0x84", "close-before-connack"],
)
def test_auto_falls_back_to_311_and_remembers_the_broker(
    old_brokers: Callable[[bytes], OldBroker],
    creds: Creds,
    agents: Callable[..., Agent],
    caplog: pytest.LogCaptureFixture,
    on_v5: bytes,
) -> None:
    """auto: MQTT 5 first; a broker that refuses it gets 3.1.1 at once, logged in one line, and
    the next agent of the process goes straight to 3.1.1 (one level-5 CONNECT in all)."""
    caplog.set_level(logging.INFO, "iotauth.agent")
    old = old_brokers(on_v5)
    first = agents(creds("dev-1"), old.port)
    assert connected(first), first.stats.last_failure
    assert first.stats.protocol == "3.1.1"
    assert first.stats.fallbacks == 1
    assert old.levels == [5, 4]
    second = agents(creds("dev-2"), old.port)
    assert connected(second), second.stats.last_failure
    assert second.stats.protocol == "3.1.1"
    assert second.stats.fallbacks == 0
    assert old.levels == [5, 4, 4]
    lines = [r.getMessage() for r in caplog.records if "refused MQTT 5" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "using MQTT 3.1.1 with this broker until the agent restarts" in lines[0]
    assert first.stats.failures == {}  # a fallback is not a failure


@pytest.mark.parametrize(
    "on_v5",
    [CONNACK_311_REFUSED_VERSION, CONNACK_5_UNSUPPORTED],
    ids=["connack-311-rc1", "connack-5-0x84"],
)
def test_mqtt_version_5_never_falls_back(
    old_brokers: Callable[[bytes], OldBroker],
    creds: Creds,
    agents: Callable[..., Agent],
    on_v5: bytes,
) -> None:
    """The negative twin: --mqtt-version 5 takes the refusal as final (retried slowly)."""
    old = old_brokers(on_v5)
    agent = agents(creds("dev-1"), old.port, mqtt_version="5")
    assert wait_until(lambda: agent.stats.last_failure is not None)
    failure = agent.stats.last_failure
    assert failure is not None
    assert failure.reason == "protocol-version"
    assert failure.permanent
    assert failure.detail == "refused by the broker: 0x84 unsupported protocol version"
    assert not wait_until(lambda: agent.stats.attempts > 1, 0.5)
    assert old.levels == [5]
    assert agent.stats.fallbacks == 0


def test_mqtt_version_311_sends_level_4_only(
    old_brokers: Callable[[bytes], OldBroker], creds: Creds, agents: Callable[..., Agent]
) -> None:
    old = old_brokers(CONNACK_311_REFUSED_VERSION)
    agent = agents(creds("dev-1"), old.port, mqtt_version="311")
    assert connected(agent)
    assert old.levels == [4]
    assert agent.stats.protocol == "3.1.1"


def test_refusals_are_named_by_reason_code_and_string() -> None:
    """MQTT 5 section 3.2.2.2: the code, its name, and the server's Reason String
    (3.2.2.3.9) in one line; on 3.1.1 the CONNACK return code and its meaning."""
    f = classify_refusal(0x87, "Not authorized", v5=True, reason_string="revoked")
    assert f.detail == "refused by the broker: 0x87 not authorized (revoked)"
    assert (f.reason, f.permanent) == ("revoked", True)
    f = classify_refusal(0x87, "Not authorized", v5=True)
    assert (f.reason, f.permanent) == ("not-authorized", True)
    assert f.detail == "refused by the broker: 0x87 not authorized"
    f = classify_refusal(0x87, "Not authorized", v5=False)
    assert f.detail == "refused by the broker: CONNACK 5 not authorized"
    assert f.reason == "not-authorized"
    # Transient on both versions: the broker is busy or unavailable, not the device refused.
    assert not classify_refusal(0x89, "Server busy", v5=True).permanent
    assert not classify_refusal(0x88, "Server unavailable", v5=False).permanent
    assert classify_refusal(0x88, "Server unavailable", v5=False).detail.endswith(
        "CONNACK 3 server unavailable"
    )
    assert classify_refusal(0x8C, "Bad authentication method", v5=True).permanent
    assert classify_refusal(0x86, "Bad user name or password", v5=True).reason == (
        "bad-credentials"
    )


# -- against Mosquitto 2 (MQTT 5 and 3.1.1) ------------------------------------------------------


class V5Service:
    """A backend service on MQTT 5 (paho): sends commands with Response Topic and Correlation
    Data and records what arrives with its properties."""

    def __init__(self, creds: Path, port: int, name: str = "sink") -> None:
        self.messages: list[tuple[str, bytes, bytes | None]] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        self.client.tls_set_context(client_context_for_credentials(creds))
        self.client.on_connect = lambda c, *_: c.subscribe("devices/+/replies/#", 1)
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)

    def _on_message(self, _c: object, _u: object, msg: Any) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), corr))

    def command(
        self, device: str, name: str, *, response: str | None, correlation: bytes | None
    ) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if response is not None:
            props.ResponseTopic = response
        if correlation is not None:
            props.CorrelationData = correlation
        payload = json.dumps({"request_id": "r1", "args": {}}).encode()
        self.client.publish(f"devices/{device}/commands/{name}", payload, 1, properties=props)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _subscribed(agent: Agent) -> None:
    """The agent subscribes right after CONNACK and publishes its queue after that, so a PUBACK
    for a queued message means the broker has its subscriptions."""
    acked = agent.stats.acked
    agent.enqueue({"probe": True})
    assert wait_until(lambda: agent.stats.acked > acked)


@needs_mosquitto
@pytest.mark.parametrize("version", ["5", "311"])
def test_agent_speaks_each_version_with_mosquitto(
    mosquitto: Mosquitto,
    creds: Creds,
    agents: Callable[..., Agent],
    sinks: Callable[..., Any],
    version: str,
) -> None:
    """Telemetry flows on both versions; auto picks 5 where the broker speaks it."""
    PROTOCOL_MEMORY.forget()
    sink = sinks(mosquitto.port)
    agent = agents(creds("dev-1"), mosquitto.port, mqtt_version=version, telemetry_interval=0.2)
    assert connected(agent), agent.stats.last_failure
    assert agent.stats.protocol == ("5" if version == "5" else "3.1.1")
    assert wait_until(lambda: len(sink.telemetry_ids("dev-1")) >= 2)
    auto = agents(creds("dev-2"), mosquitto.port)
    assert connected(auto)
    assert auto.stats.protocol == "5"
    assert auto.stats.fallbacks == 0


@needs_mosquitto
def test_commands_answer_on_the_response_topic_with_correlation_data(
    mosquitto: Mosquitto, creds: Creds, agents: Callable[..., Agent]
) -> None:
    """MQTT 5 section 4.10.1: the reply goes to the Response Topic with the Correlation Data;
    one outside the device's subtree is not followed (it would be an ACL denial anyway) and the
    reply goes to replies/<name> with the Correlation Data; without them, as on 3.1.1."""
    service = V5Service(creds("sink", service=True), mosquitto.port)
    try:
        agent = agents(creds("dev-1"), mosquitto.port, mqtt_version="5")
        assert connected(agent)
        _subscribed(agent)
        service.command("dev-1", "ping", response="devices/dev-1/replies/x1", correlation=b"c1")
        service.command("dev-1", "ping", response="devices/dev-2/replies/x2", correlation=b"c2")
        service.command("dev-1", "ping", response=None, correlation=None)
        assert wait_until(lambda: len(service.messages) >= 3), service.messages
        assert {(t, c) for t, _, c in service.messages} == {
            ("devices/dev-1/replies/x1", b"c1"),
            ("devices/dev-1/replies/ping", b"c2"),
            ("devices/dev-1/replies/ping", None),
        }
        assert all(json.loads(p)["ok"] for _, p, _ in service.messages)
    finally:
        service.close()


@needs_mosquitto
def test_commands_to_a_311_agent_are_answered_as_before(
    mosquitto: Mosquitto, creds: Creds, agents: Callable[..., Agent]
) -> None:
    """A 3.1.1 agent never sees the properties (MQTT 5 section 3.3.2.3 are dropped for it):
    the reply is on replies/<name>, exactly today's wire format."""
    service = V5Service(creds("sink", service=True), mosquitto.port)
    try:
        agent = agents(creds("dev-1"), mosquitto.port, mqtt_version="311")
        assert connected(agent)
        _subscribed(agent)
        service.command("dev-1", "ping", response="devices/dev-1/replies/x1", correlation=b"c1")
        assert wait_until(lambda: service.messages), service.messages
        assert [(t, c) for t, _, c in service.messages] == [("devices/dev-1/replies/ping", None)]
    finally:
        service.close()


@needs_mosquitto
@pytest.mark.parametrize("version", ["5", "311"])
def test_session_expiry_keeps_commands_for_a_sleeping_device(
    mosquitto: Mosquitto, creds: Creds, agents: Callable[..., Agent], version: str
) -> None:
    """MQTT 5 section 3.1.2.11.2: with a Session Expiry Interval the broker keeps the device's
    subscriptions and queues its QoS 1 commands while it is away; the agent answers them when
    it is back. The 3.1.1 twin uses clean session, as before: the command is lost."""
    store = creds("dev-1")
    service = V5Service(creds("sink", service=True), mosquitto.port)
    try:
        agent = agents(store, mosquitto.port, mqtt_version=version)
        assert connected(agent)
        _subscribed(agent)
        stopped = threading.Event()
        agent.stop(stopped.set)
        assert stopped.wait(10)
        service.command("dev-1", "ping", response=None, correlation=b"asleep")
        back = agents(store, mosquitto.port, mqtt_version=version)
        assert connected(back)
        if version == "5":
            assert wait_until(lambda: service.messages), "the queued command was not answered"
            assert [c for _, _, c in service.messages] == [b"asleep"]
        else:
            assert not wait_until(lambda: service.messages, 1.0)
    finally:
        service.close()


def test_version_session_and_auth_options_from_toml_and_the_command_line(
    creds: Creds, tmp_path: Path
) -> None:
    """[mqtt] and [auth] in agent.toml (``version = 5`` means "5"), overridden by options;
    a wrong value is refused with the key named."""
    from device_agent import AgentConfigError, load_config
    from device_agent.main import build_parser

    store = creds("dev-1")
    toml = tmp_path / "agent.toml"
    toml.write_text(
        "[mqtt]\nversion = 5\nsession_expiry = 0\n[auth]\nmethod = 'jwt'\ntoken_ttl = 600\n"
    )
    cfg = load_config(toml, store=store)
    assert (cfg.mqtt_version, cfg.session_expiry, cfg.auth, cfg.token_ttl) == ("5", 0, "jwt", 600)
    assert load_config(toml, store=store, mqtt_version="311").mqtt_version == "311"
    assert load_config(None, store=store).mqtt_version == "auto"
    toml.write_text("[mqtt]\nversion = 4\n")
    with pytest.raises(AgentConfigError, match="mqtt version '4'"):
        load_config(toml, store=store)
    toml.write_text("[auth]\ntoken_ttl = 90000\n")
    with pytest.raises(AgentConfigError, match="token_ttl"):
        load_config(toml, store=store)
    args = build_parser().parse_args(
        ["run", "--store", str(store), "--mqtt-version", "311", "--auth", "jwt"]
    )
    assert (args.mqtt_version, args.auth) == ("311", "jwt")


@pytest.mark.parametrize(
    "bad", [["--mqtt-version", "4"], ["--auth", "password"], ["--session-expiry", "-1"]]
)
def test_bad_version_or_auth_option_is_a_one_line_usage_error(creds: Creds, bad: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "device_agent", "run", "--store", str(creds("dev-1")), *bad],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), lines
    assert bad[0] in lines[0], lines


def test_a_restarted_agent_process_tries_mqtt_5_again(
    old_brokers: Callable[[bytes], OldBroker], creds: Creds
) -> None:
    """The fallback lives as long as the process: each new `python -m device_agent run` sends a
    level-5 CONNECT first (the broker may have been upgraded meanwhile), then 3.1.1."""
    old = old_brokers(CONNACK_311_REFUSED_VERSION)
    store = creds("dev-1")
    for run in (1, 2):
        proc = start_agent(store, old.port, stdout=subprocess.DEVNULL)
        try:
            assert wait_until(lambda r=run: old.levels == [5, 4] * r, 20), old.levels
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=20)
        assert "refused MQTT 5" in err, err
