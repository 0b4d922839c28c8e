"""Test helpers behind the pytest plugin: a PKI, a broker and a service client, all real.

Everything listens on 127.0.0.1 with ephemeral ports and real certificates; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from provisioning.identity import IdentityKind
from provisioning.pki import PKI
from provisioning.tls import client_context_for_credentials

__all__ = [
    "BrokerEndpoint",
    "Fleet",
    "Message",
    "ServiceClient",
    "SoftTpm",
    "issue_service",
    "running_broker",
    "start_fleet",
]


@dataclass(frozen=True, slots=True)
class BrokerEndpoint:
    """Where a test broker listens, and the PKI it trusts."""

    host: str
    port: int
    pki_dir: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool


def issue_service(pki: PKI, name: str, out: Path) -> Path:
    """A service credential directory (reused if it already exists)."""
    if not (out / "device.crt").exists():
        pki.issue(name, kind=IdentityKind.SERVICE, out=out)
    return out


class ServiceClient:
    """A backend identity connected with mutual TLS: subscribe, collect, publish.

    ::

        with ServiceClient(creds_dir, endpoint) as sink:
            sink.subscribe("devices/+/telemetry/#")
            sink.wait_for(lambda msgs: len(msgs) >= 10)
    """

    def __init__(
        self, credentials: Path, endpoint: BrokerEndpoint, *, client_id: str | None = None
    ) -> None:
        import json

        identity = json.loads((credentials / "identity.json").read_text())
        self.name: str = client_id or identity.get("service_name") or identity["device_id"]
        self.endpoint = endpoint
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._subacks: dict[int, list[int]] = {}
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.name, protocol=mqtt.MQTTv311
        )
        self._client.tls_set_context(client_context_for_credentials(credentials))
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._connected = threading.Event()
        self._client.on_connect = lambda *_args: self._connected.set()

    def connect(self, timeout: float = 10.0) -> Self:
        self._client.connect(self.endpoint.host, self.endpoint.port, keepalive=30)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            msg = f"{self.name} could not connect to {self.endpoint.address}"
            raise ConnectionError(msg)
        return self

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def _on_subscribe(
        self, _c: mqtt.Client, _u: object, mid: int, codes: list[ReasonCode], _p: object
    ) -> None:
        with self._cond:
            self._subacks[mid] = [int(c.value) for c in codes]
            self._cond.notify_all()

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 10.0) -> bool:
        """Subscribe and wait for the SUBACK; True if the broker granted it."""
        _rc, sent = self._client.subscribe(topic_filter, qos=qos)
        if sent is None:
            msg = f"{self.name} is not connected"
            raise ConnectionError(msg)
        mid: int = sent
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, timeout):
                msg = f"no SUBACK for {topic_filter!r}"
                raise TimeoutError(msg)
            return all(code < 0x80 for code in self._subacks[mid])

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        info = self._client.publish(topic, payload, qos=qos)
        if qos:
            info.wait_for_publish(10)

    def wait_for(
        self, predicate: Callable[[list[Message]], bool], timeout: float = 30.0
    ) -> list[Message]:
        """Wait until ``predicate(messages)`` holds; returns a snapshot, or raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    count = len(self.messages)
                    msg = f"{self.name}: condition not met within {timeout} s ({count} messages)"
                    raise TimeoutError(msg)
                self._cond.wait(left)
            return list(self.messages)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Self:
        return self.connect() if not self._connected.is_set() else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@contextlib.contextmanager
def running_broker(pki_dir: Path) -> Iterator[BrokerEndpoint]:
    """Our broker on 127.0.0.1:0 in a background thread."""
    from broker.server import BrokerThread
    from broker.settings import BrokerSettings

    with BrokerThread(BrokerSettings(pki_dir)) as thread:
        yield BrokerEndpoint("127.0.0.1", thread.port, pki_dir)


@dataclass
class Fleet:
    """Running agents, one per device, each with its own certificate."""

    device_ids: list[str]
    agents: dict[str, Any]  # device_agent.Agent by device id
    credentials: dict[str, Path]

    def connected(self) -> list[str]:
        return [name for name, agent in self.agents.items() if agent.connected]


@contextlib.contextmanager
def start_fleet(
    pki: PKI,
    endpoint: BrokerEndpoint,
    count: int,
    *,
    prefix: str = "dev",
    telemetry_interval: float = 0.5,
    timeout: float = 60.0,
) -> Iterator[Fleet]:
    """Issue ``count`` devices, run the real agent for each, wait until all are connected."""
    from device_agent import Agent, AgentConfig, MemoryQueue, Reactor

    root = pki.path.parent / "fleet"
    start = len(list(root.iterdir())) if root.exists() else 0
    names = [f"{prefix}-{n:04d}" for n in range(start, start + count)]
    dirs = [root / name for name in names]
    pki.issue_many(names, out_dirs=dirs, broker=endpoint.address)
    reactors = [Reactor(name=f"iotauth-fleet-{i}") for i in range(min(4, count))]
    for reactor in reactors:
        reactor.start_thread()
    agents: dict[str, Any] = {}
    try:
        for n, (name, store) in enumerate(zip(names, dirs, strict=True)):
            config = AgentConfig(
                store=store,
                broker=endpoint.address,
                telemetry_interval=telemetry_interval,
                queue_path=":memory:",
                backoff_initial=0.2,
                backoff_max=2.0,
            )
            agent = Agent(
                config,
                reactor=reactors[n % len(reactors)],
                queue=MemoryQueue(max_messages=1000, max_bytes=1 << 20),
            )
            agents[name] = agent
            agent.start()
        fleet = Fleet(names, agents, dict(zip(names, dirs, strict=True)))
        deadline = time.monotonic() + timeout
        while len(fleet.connected()) < count:
            if time.monotonic() > deadline:
                missing = sorted(set(names) - set(fleet.connected()))
                msg = (
                    f"{len(missing)}/{count} agents not connected after {timeout} s: {missing[:5]}"
                )
                raise TimeoutError(msg)
            time.sleep(0.05)
        yield fleet
    finally:
        stopped: list[int] = []
        for agent in agents.values():
            agent.stop(on_stopped=lambda: stopped.append(1))
        deadline = time.monotonic() + 10
        while len(stopped) < len(agents) and time.monotonic() < deadline:
            time.sleep(0.05)
        for reactor in reactors:
            reactor.stop()


def _free_port_pair() -> int:
    """A port P on 127.0.0.1 with P+1 free too (swtpm's server and control ports)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    msg = "no two adjacent free ports on 127.0.0.1"
    raise RuntimeError(msg)


class SoftTpm:
    """A software TPM 2.0 (``swtpm``) on free 127.0.0.1 ports, its state in ``state_dir``.

    Like a TPM without a resource manager: three transient object slots, one client at a time.
    ``tcti`` is what ``--tpm`` and ``IOTAUTH_TPM_TCTI`` take. ``stop`` ends the process it
    started, by PID.
    """

    def __init__(self, state_dir: Path, *, swtpm: str | None = None) -> None:
        self.state_dir = state_dir
        self.swtpm = swtpm or shutil.which("swtpm")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self) -> Self:
        if self.swtpm is None:
            msg = "swtpm is not installed (Debian: apt-get install swtpm swtpm-tools)"
            raise RuntimeError(msg)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):
            self.port = _free_port_pair()
            with (self.state_dir / "swtpm.log").open("ab") as log:
                self.proc = subprocess.Popen(
                    [
                        self.swtpm,
                        "socket",
                        "--tpm2",
                        "--server",
                        f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                        "--ctrl",
                        f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                        "--tpmstate",
                        f"dir={self.state_dir}",
                        "--flags",
                        "not-need-init,startup-clear",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    # The control port, not the server port: swtpm serves one client at a time.
                    socket.create_connection(("127.0.0.1", self.port + 1), timeout=1).close()
                except OSError:
                    time.sleep(0.05)
                    continue
                return self
            self.stop()  # lost a race for the ports, or did not come up: try other ports
        msg = f"swtpm did not start in {self.state_dir} (see swtpm.log there)"
        raise RuntimeError(msg)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
