"""Fixtures for agent tests: a fleet PKI, our broker (with renewal), mosquitto, agents, a sink."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import BrokerSettings
from broker.renewal import RenewalSettings
from broker.server import BrokerThread
from device_agent import Agent, AgentConfig
from iotauth.fleet_backend import Mosquitto
from provisioning.identity import IdentityKind
from provisioning.pki import PKI
from tests.device_agent.agent_helpers import Sink, wait_until


class Creds:
    def __init__(self, pki: PKI, root: Path) -> None:
        self.pki = pki
        self.root = root

    def __call__(self, name: str, *, service: bool = False, **kwargs: Any) -> Path:
        out = self.root / "creds" / name
        if not out.exists():
            kind = IdentityKind.SERVICE if service else IdentityKind.DEVICE
            self.pki.issue(name, kind=kind, out=out, **kwargs)
        return out


@pytest.fixture
def creds(pki: PKI, tmp_path: Path) -> Creds:
    return Creds(pki, tmp_path)


@pytest.fixture
def start_broker(pki: PKI) -> Iterator[Callable[..., BrokerThread]]:
    started: list[BrokerThread] = []

    def start(*, port: int = 0, renewal: bool = True, **kw: Any) -> BrokerThread:
        settings = BrokerSettings(
            pki.path, port=port, renewal=RenewalSettings(**kw) if renewal else None
        )
        thread = BrokerThread(settings, audit_sink=lambda _: None).start()
        started.append(thread)
        if thread.broker.renewal is not None:
            assert thread.broker.renewal.wait_subscribed()
        return thread

    yield start
    for thread in started:
        thread.stop()


@pytest.fixture
def broker(start_broker: Callable[..., BrokerThread]) -> BrokerThread:
    return start_broker()


@pytest.fixture
def mosquitto(pki: PKI, tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(pki.path, tmp_path / "mosquitto")
    yield m.start()
    m.stop()


@pytest.fixture
def sinks(creds: Creds) -> Iterator[Callable[..., Sink]]:
    made: list[Sink] = []

    def make(port: int, name: str = "sink", **kw: Any) -> Sink:
        sink = Sink(creds(name, service=True), port, name, **kw)
        made.append(sink)
        return sink

    yield make
    for s in made:
        s.close()


@pytest.fixture
def agents() -> Iterator[Callable[..., Agent]]:
    """Start agents on their own reactor thread; stop them (offline + DISCONNECT) at the end."""
    made: list[Agent] = []

    def make(store: Path, port: int, **config: Any) -> Agent:
        options: dict[str, Any] = {
            "broker": f"127.0.0.1:{port}",
            "telemetry_interval": 3600.0,
            "backoff_initial": 0.05,
            "backoff_max": 0.5,
            "slow_retry": 3600.0,
            "queue_path": ":memory:",
        }
        options.update(config)
        agent = Agent(AgentConfig(store=store, **options))
        agent.reactor.start_thread()
        agent.start()
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.stop(agent.reactor.stop)
    for agent in made:
        if agent.reactor.thread is not None:
            agent.reactor.thread.join(5)
        agent.queue.close()


def connected(agent: Agent, timeout: float = 10) -> bool:
    return wait_until(lambda: agent.connected, timeout)
