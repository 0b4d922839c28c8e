"""The offline queue: bounded, drop-oldest, survives restarts; at least once across restarts."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.server import BrokerThread
from device_agent import Agent, AgentConfig, MemoryQueue, SqliteQueue
from device_agent.queue import MessageQueue
from iotauth.fleet_backend import Mosquitto
from provisioning.pki import PKI
from tests.conftest import needs_mosquitto
from tests.device_agent.agent_helpers import Gate, Sink, wait_until
from tests.device_agent.conftest import Creds, connected


def _queues(tmp_path: Path, **bounds: int) -> list[MessageQueue]:
    return [SqliteQueue(tmp_path / "q.sqlite3", **bounds), MemoryQueue(**bounds)]


@pytest.mark.parametrize("kind", [0, 1], ids=["sqlite", "memory"])
def test_queue_is_bounded_by_count_and_drops_the_oldest(tmp_path: Path, kind: int) -> None:
    q = _queues(tmp_path, max_messages=3, max_bytes=10_000)[kind]
    ids = [q.put("t", lambda i: i.encode()) for _ in range(5)]
    assert len(q) == 3
    assert q.dropped == 2
    assert [m.payload.decode() for m in q.pending(0, 10)] == ids[2:]
    assert len(set(ids)) == 5


@pytest.mark.parametrize("kind", [0, 1], ids=["sqlite", "memory"])
def test_queue_is_bounded_by_bytes(tmp_path: Path, kind: int) -> None:
    q = _queues(tmp_path, max_messages=100, max_bytes=250)[kind]
    for _ in range(5):
        q.put("t", lambda _i: b"x" * 100)
    assert len(q) == 2
    assert q.size_bytes == 200
    first = q.pending(0, 10)[0]
    q.ack(first.seq)
    assert len(q) == 1
    q.ack(first.seq)  # acking twice (a late PUBACK) is harmless
    assert len(q) == 1


def test_sqlite_queue_survives_reopening_and_ids_never_repeat(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    q = SqliteQueue(path, max_messages=10, max_bytes=10_000)
    a = q.put("t", lambda i: i.encode())
    b = q.put("t", lambda i: i.encode())
    q.ack(q.pending(0, 1)[0].seq)
    q.close()
    q = SqliteQueue(path, max_messages=10, max_bytes=10_000)
    assert [m.payload.decode() for m in q.pending(0, 10)] == [b]
    c = q.put("t", lambda i: i.encode())
    assert c not in (a, b)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    q.close()
    path.unlink()
    fresh = SqliteQueue(path, max_messages=10, max_bytes=10_000)
    assert fresh.put("t", lambda i: i.encode()) not in (a, b, c)  # a new epoch


def test_queued_messages_survive_an_agent_restart(
    broker: BrokerThread, creds: Creds, sinks: Callable[..., Sink], tmp_path: Path
) -> None:
    """Messages queued while the broker is unreachable are sent by the next agent process."""
    store = creds("dev-1")
    gate = Gate(broker.port)
    gate.down()
    config = AgentConfig(
        store=store,
        broker=f"127.0.0.1:{gate.port}",
        telemetry_interval=3600,
        backoff_initial=0.05,
        backoff_max=0.2,
        queue_path=str(tmp_path / "queue.sqlite3"),
    )
    first = Agent(config)
    first.reactor.start_thread()
    first.start()
    for n in range(50):
        first.enqueue({"n": n})
    assert wait_until(lambda: len(first.queue) == 50)
    stopped = threading.Event()
    first.stop(stopped.set)
    assert stopped.wait(5)
    first.reactor.stop()
    first.queue.close()

    sink = sinks(broker.port)
    gate.up()
    second = Agent(config)
    second.reactor.start_thread()
    second.start()
    try:
        assert wait_until(lambda: len(set(sink.telemetry_ids("dev-1"))) == 50, 20)
        assert sorted(d["data"]["n"] for d in sink.json_on("devices/dev-1/telemetry")) == list(
            range(50)
        )
        assert wait_until(lambda: len(second.queue) == 0)
    finally:
        second.stop(second.reactor.stop)
        gate.close()


def test_1000_qos1_messages_across_a_broker_restart(
    start_broker: Callable[..., BrokerThread],
    creds: Creds,
    sinks: Callable[..., Sink],
    agents: Callable[..., Agent],
) -> None:
    """The broker is killed and restarted mid-run: the consumer gets all 1,000 (dups allowed)."""
    first = start_broker(renewal=False)
    port = first.port
    gate = Gate(port)
    sink = sinks(port)
    agent = agents(creds("dev-1"), gate.port, max_inflight=20)
    assert connected(agent)
    for n in range(500):
        agent.enqueue({"n": n})
    assert wait_until(lambda: len(set(sink.telemetry_ids("dev-1"))) >= 200, 30)
    # Our broker keeps no state (docs/BROKER.md): what it acknowledged but had not yet forwarded
    # would die with it, whatever the device did. So cut the device off first, let the broker
    # finish forwarding, then kill it; what the device still holds is the agent's job.
    gate.down()
    assert wait_until(lambda: not agent.connected)
    # (>=: the broker may have forwarded messages whose PUBACK the cut swallowed)
    assert wait_until(lambda: len(set(sink.telemetry_ids("dev-1"))) >= agent.stats.acked)
    assert agent.stats.acked < 500  # the kill happens mid-run
    first.stop()  # kill: every connection dies with it
    assert wait_until(lambda: not sink.subscribed.is_set())  # the consumer noticed too
    for n in range(500, 1000):  # the second half is produced while the broker is down
        agent.enqueue({"n": n})
    second = start_broker(port=port, renewal=False)
    # Our broker keeps no sessions across restarts: let the consumer resubscribe first.
    assert wait_until(sink.subscribed.is_set, 15)
    gate.up()
    assert wait_until(lambda: len(set(sink.telemetry_ids("dev-1"))) == 1000, 60), len(
        set(sink.telemetry_ids("dev-1"))
    )
    ids = sink.telemetry_ids("dev-1")
    assert len(ids) >= 1000  # duplicates are allowed and detected by id
    assert sorted({d["data"]["n"] for d in sink.json_on("devices/dev-1/telemetry")}) == list(
        range(1000)
    )
    assert agent.stats.connects >= 2
    assert wait_until(lambda: len(agent.queue) == 0)
    second.stop()
    gate.close()


@needs_mosquitto
def test_1000_qos1_messages_across_a_mosquitto_restart(
    pki: PKI, creds: Creds, sinks: Callable[..., Sink], agents: Callable[..., Agent], tmp_path: Path
) -> None:
    """mosquitto with persistence, killed (SIGTERM) and restarted mid-run: all 1,000 arrive."""
    m = Mosquitto(pki.path, tmp_path / "mosq", persistence=True).start()
    try:
        sink = sinks(m.port, clean=False)
        agent = agents(creds("dev-1"), m.port, max_inflight=5)
        assert connected(agent)
        for n in range(500):
            agent.enqueue({"n": n})
        assert wait_until(lambda: agent.stats.acked >= 100, 30)
        m.stop()
        assert wait_until(lambda: not agent.connected)
        for n in range(500, 1000):
            agent.enqueue({"n": n})
        m.start()
        assert wait_until(lambda: len(set(sink.telemetry_ids("dev-1"))) == 1000, 60), len(
            set(sink.telemetry_ids("dev-1"))
        )
        assert sorted({d["data"]["n"] for d in sink.json_on("devices/dev-1/telemetry")}) == list(
            range(1000)
        )
    finally:
        m.stop()
