"""The fleet simulator: many real agents in one process against a real broker.

Every simulated device is an :class:`~device_agent.agent.Agent` with its own key and certificate
from the real PKI, the real TLS handshake and the real paho client; only the offline queue is in
memory and telemetry is synthetic. Agents share a few :class:`~device_agent.reactor.Reactor`
threads instead of one thread each.

What it needs from outside (certificates, revocations, a broker it may restart) comes through a
:class:`FleetBackend`, because ``device_agent`` may not import the PKI or the broker (the
dependency rule, docs/ARCHITECTURE.md). The composition root supplies one (``iotauth fleet
simulate``).

Scenarios (combine freely):

``steady``   every device publishes telemetry every ``telemetry_interval`` seconds (always on).
``storm``    the broker is restarted halfway; the report says how long the fleet took to return.
``churn``    every second, ``churn`` of the devices lose their connection (no DISCONNECT).
``revoked``  ``bad_fraction`` of the devices are revoked and as many expired before the start.
``renewal``  halfway, ``renew_fraction`` of the devices renew their certificate over MQTT.

Protocol mix: by default every device runs with ``mqtt_version = "auto"`` (MQTT 5, 3.1.1 with a
broker that refuses 5). ``mqtt5_share`` F pins a fraction F of the devices (chosen with the seed)
to MQTT 5 and the rest to 3.1.1, so one broker serves a mixed fleet; the report counts devices
by the protocol of their last connection.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.agent import Agent
from device_agent.config import AgentConfig, parse_address
from device_agent.errors import AgentConfigError, AgentError
from device_agent.queue import MemoryQueue
from device_agent.reactor import Reactor
from provisioning.tls import client_context_for_credentials

__all__ = ["SCENARIOS", "FleetBackend", "FleetProgress", "FleetReport", "FleetSpec", "run_fleet"]

log = logging.getLogger("iotauth.fleet")

SCENARIOS = ("steady", "storm", "churn", "revoked", "renewal")


class FleetBackend(Protocol):
    """What the simulator needs from the PKI and the broker."""

    @property
    def broker(self) -> str:
        """``HOST:PORT`` of the broker (127.0.0.1 only in tests and benchmarks)."""
        ...

    def issue(self, names: Sequence[str], out_root: Path, *, expired: bool = False) -> list[Path]:
        """Credential directories for ``names`` under ``out_root`` (expired ones if asked)."""
        ...

    def issue_monitor(self, out_root: Path) -> Path:
        """A service credential directory allowed to read ``devices/+/telemetry/#``."""
        ...

    def revoke(self, names: Sequence[str]) -> None: ...

    def restart_broker(self) -> None:
        """Stop and start the broker on the same address (raise AgentError if impossible)."""
        ...

    def close(self) -> None:
        """Stop what the backend started (after the run)."""
        ...


@dataclass(frozen=True, slots=True)
class FleetSpec:
    devices: int
    duration: float = 30.0
    scenarios: tuple[str, ...] = ("steady",)
    telemetry_interval: float = 5.0
    reactors: int = 4
    churn: float = 0.01
    bad_fraction: float = 0.02
    renew_fraction: float = 0.1
    prefix: str = "sim"
    workdir: Path | None = None
    seed: int = 1
    mqtt5_share: float | None = None  # None: every device "auto"

    def __post_init__(self) -> None:
        if self.devices <= 0:
            raise AgentConfigError("--devices must be positive")
        unknown = set(self.scenarios) - set(SCENARIOS)
        if unknown:
            msg = f"unknown scenario(s) {', '.join(sorted(unknown))}; use {', '.join(SCENARIOS)}"
            raise AgentConfigError(msg)
        if self.duration <= 0 or self.telemetry_interval <= 0 or self.reactors <= 0:
            raise AgentConfigError("duration, telemetry interval and reactors must be positive")
        if self.mqtt5_share is not None and not 0 <= self.mqtt5_share <= 1:
            raise AgentConfigError("--mqtt5-share is a fraction of the devices, from 0 to 1")

    def versions(self, names: Sequence[str]) -> dict[str, str]:
        """Each device's ``mqtt_version``: all "auto", or a seeded ``mqtt5_share`` on "5"."""
        if self.mqtt5_share is None:
            return dict.fromkeys(names, "auto")
        rng = random.Random(self.seed)  # noqa: S311 - a sample of devices, not cryptography
        on_v5 = set(rng.sample(list(names), round(len(names) * self.mqtt5_share)))
        return {n: "5" if n in on_v5 else "311" for n in names}

    @property
    def names(self) -> list[str]:
        """The simulated devices' ids: ``<prefix>-0000`` onwards."""
        width = max(4, len(str(self.devices)))
        return [f"{self.prefix}-{i:0{width}d}" for i in range(self.devices)]


@dataclass(frozen=True, slots=True)
class FleetProgress:
    """Where a run stands, for a progress line: ``elapsed_s`` of ``duration_s``."""

    elapsed_s: float
    duration_s: float
    online: int
    expected_online: int
    messages_acked: int


@dataclass
class FleetReport:
    devices: int
    expected_online: int
    scenarios: list[str]
    duration_s: float
    online_at_end: int
    first_connect_all_s: float | None
    connect_rate_per_s: float | None
    handshake_ms: dict[str, float]
    connects: int
    attempts: int
    messages_enqueued: int
    messages_acked: int
    messages_received: int
    messages_unique: int
    duplicates: int
    refusals: dict[str, int]
    storm_recovery_s: float | None = None
    renewals_requested: int = 0
    renewals_completed: int = 0
    # Devices by the MQTT version of their last connection ("5", "3.1.1", "never connected").
    protocols: dict[str, int] = field(default_factory=dict)
    mqtt5_share: float | None = None
    fallbacks: int = 0  # agents that found the broker refusing MQTT 5
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def lines(self) -> list[str]:
        hs = self.handshake_ms
        out = [
            f"devices {self.devices} ({self.expected_online} expected online), scenarios "
            f"{'+'.join(self.scenarios)}, {self.duration_s:.0f} s",
            f"online at end        {self.online_at_end}/{self.expected_online}",
            "all connected after  "
            + (f"{self.first_connect_all_s:.2f} s" if self.first_connect_all_s else "never"),
            "connect rate         "
            + (f"{self.connect_rate_per_s:.0f}/s" if self.connect_rate_per_s else "-"),
            f"connect latency ms   p50 {hs.get('p50', 0):.1f}  p90 {hs.get('p90', 0):.1f}  "
            f"p99 {hs.get('p99', 0):.1f}  max {hs.get('max', 0):.1f}",
            f"connects/attempts    {self.connects}/{self.attempts}",
            f"messages             enqueued {self.messages_enqueued}, acked {self.messages_acked},"
            f" received {self.messages_received} ({self.messages_unique} unique, "
            f"{self.duplicates} duplicates)",
            "refusals             "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.refusals.items())) or "none"),
            "protocols            "
            + (", ".join(f"MQTT {k} {v}" for k, v in sorted(self.protocols.items())) or "-")
            + (
                "  (auto)"
                if self.mqtt5_share is None
                else f"  (--mqtt5-share {self.mqtt5_share:g})"
            )
            + (f", {self.fallbacks} fell back to 3.1.1" if self.fallbacks else ""),
        ]
        if self.storm_recovery_s is not None:
            out.append(f"storm recovery       {self.storm_recovery_s:.2f} s")
        if self.renewals_requested:
            out.append(f"renewals             {self.renewals_completed}/{self.renewals_requested}")
        out.extend(f"note: {n}" for n in self.notes)
        return out


class _Monitor:
    """A service that counts telemetry received, and duplicates by message id."""

    def __init__(self, creds: Path, broker: str) -> None:
        self.received = 0
        self.ids: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self.ready = threading.Event()
        ident = json.loads((creds / "identity.json").read_text())
        name = ident.get("service_name") or ident.get("device_id")
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, clean_session=True)
        self.client.tls_set_context(client_context_for_credentials(creds))
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = lambda c, *_: c.subscribe("devices/+/telemetry/#", qos=1)
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = self._on_message
        host, port = parse_address(broker)
        self.client.connect_async(host, port, keepalive=30)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        device = msg.topic.split("/")[1]
        try:
            msg_id = str(json.loads(msg.payload)["id"])
        except (ValueError, KeyError, TypeError):
            msg_id = ""
        with self._lock:
            self.received += 1
            self.ids.add((device, msg_id))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ms = sorted(v * 1000 for v in values)
    if len(ms) == 1:
        return {"p50": ms[0], "p90": ms[0], "p99": ms[0], "max": ms[0]}
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98], "max": ms[-1]}


def _wait(predicate: Callable[[], object], timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def run_fleet(  # noqa: PLR0912, PLR0915 - the whole run, in order
    spec: FleetSpec,
    backend: FleetBackend,
    *,
    workdir: Path,
    progress: Callable[[FleetProgress], None] | None = None,
) -> FleetReport:
    """Issue, start, run the scenarios for ``spec.duration`` seconds, stop, report.

    ``progress`` (if given) is called about once a second from this thread while the fleet runs.
    """
    rng = random.Random(spec.seed)  # noqa: S311 - scenario choice, not cryptography
    names = spec.names
    bad = 0
    if "revoked" in spec.scenarios:
        bad = max(1, int(spec.devices * spec.bad_fraction))
    revoked = names[:bad]
    expired = names[bad : 2 * bad]
    good = names[2 * bad :]
    creds_root = workdir / "creds"
    dirs = dict(zip(good + revoked, backend.issue(good + revoked, creds_root), strict=True))
    if expired:
        dirs.update(zip(expired, backend.issue(expired, creds_root, expired=True), strict=True))
    if revoked:
        backend.revoke(revoked)
    monitor = _Monitor(backend.issue_monitor(workdir), backend.broker)
    if not monitor.ready.wait(30):
        monitor.close()
        raise AgentError(f"the fleet monitor could not subscribe at {backend.broker}")

    reactors = [Reactor(name=f"fleet-{i}") for i in range(min(spec.reactors, spec.devices))]
    for r in reactors:
        r.start_thread()
    lock = threading.Lock()
    online: set[str] = set()
    first_online: dict[str, float] = {}
    renewed: set[str] = set()
    storm_at: list[float] = []
    back_after_storm: set[str] = set()

    def on_event(agent: Agent, event: str, detail: object) -> None:
        now = time.monotonic()
        with lock:
            if event == "connected":
                online.add(agent.device_id)
                first_online.setdefault(agent.device_id, now)
                if storm_at and now >= storm_at[0]:
                    back_after_storm.add(agent.device_id)
            elif event in ("disconnected", "failure", "stopped"):
                online.discard(agent.device_id)
            elif event == "renewed":
                renewed.add(agent.device_id)

    agents: list[Agent] = []
    versions = spec.versions(names)
    for idx, name in enumerate(names):
        config = AgentConfig(
            store=dirs[name],
            broker=backend.broker,
            telemetry_interval=spec.telemetry_interval,
            backoff_initial=1.0,
            backoff_max=30.0,
            slow_retry=300.0,
            queue_path=":memory:",
            connect_timeout=30.0,
            renewal_timeout=5.0,
            mqtt_version=versions[name],
        )
        agents.append(
            Agent(
                config,
                reactor=reactors[idx % len(reactors)],
                queue=MemoryQueue(max_messages=1000, max_bytes=1 << 20),
                telemetry=lambda: {"v": 1},
                on_event=on_event,
            )
        )
    expected = set(good)
    start = time.monotonic()
    for agent in agents:
        agent.start()
    notes: list[str] = []
    all_connected_at: float | None = None
    storm_recovery: float | None = None
    renew_targets: list[Agent] = []
    # Renewal at 30 % and the broker restart at 50 % of the run, so neither hides the other.
    renew_at, storm_at_t = start + spec.duration * 0.3, start + spec.duration * 0.5
    renewal_done = storm_done = False
    end = start + spec.duration
    last_progress = start
    while time.monotonic() < end:
        time.sleep(0.05 if all_connected_at is None else 0.5)
        now = time.monotonic()
        with lock:
            everyone = expected <= set(first_online)
            online_now = len(online & expected)
        if progress is not None and now - last_progress >= 1.0:
            last_progress = now
            acked = sum(a.stats.acked for a in agents)
            progress(FleetProgress(now - start, spec.duration, online_now, len(expected), acked))
        if all_connected_at is None and everyone:
            all_connected_at = now
        # Churn stops for the last quarter, so the end state says whether the fleet recovered.
        churning = now < start + spec.duration * 0.75
        if "churn" in spec.scenarios and all_connected_at is not None and churning:
            for agent in rng.sample(agents, max(1, int(len(agents) * spec.churn))):
                agent.drop_connection()
        if not renewal_done and now >= renew_at:
            renewal_done = True
            if "renewal" in spec.scenarios:
                good_agents = [a for a in agents if a.device_id in expected]
                renew_targets = rng.sample(
                    good_agents, max(1, int(len(good_agents) * spec.renew_fraction))
                )
                for agent in renew_targets:
                    agent.request_renewal()
        if not storm_done and now >= storm_at_t:
            storm_done = True
            if "storm" in spec.scenarios:
                try:
                    t0 = time.monotonic()
                    with lock:
                        storm_at.append(t0)
                    # (no clearing of `online`: each disconnect removes its device, and a device
                    # may already be back before restart_broker() returns)
                    backend.restart_broker()
                    if _wait(
                        lambda: expected <= back_after_storm, max(1.0, end - time.monotonic())
                    ):
                        storm_recovery = time.monotonic() - t0
                    else:
                        notes.append("not every device was back online before the end")
                except AgentError as exc:
                    notes.append(f"storm skipped: {exc}")
    if renew_targets:
        _wait(lambda: {a.device_id for a in renew_targets} <= renewed, 30)
    elapsed = time.monotonic() - start
    # Settle: devices still in backoff after the last disruption get up to 10 s to return.
    _wait(lambda: expected <= online, 10)
    with lock:
        online_at_end = len(online & expected)
    # Let in-flight telemetry land before counting.
    _wait(lambda: sum(len(a.queue) for a in agents if a.device_id in expected) == 0, 10)
    time.sleep(0.5)
    done = threading.Semaphore(0)
    for agent in agents:
        agent.stop(done.release)
    for _ in agents:
        done.acquire(timeout=10)
    for r in reactors:
        r.stop()
    for r in reactors:
        if r.thread is not None:
            r.thread.join(5)
    monitor.close()

    refusals: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    for agent in agents:
        latencies.extend(agent.stats.connect_latency)
        for reason, n in agent.stats.failures.items():
            if reason not in ("connection-lost",):
                refusals[reason] += n
    protocols = collections.Counter(
        a.stats.protocol or "never connected" for a in agents if a.device_id in expected
    )
    first = sorted(first_online[n] - start for n in expected if n in first_online)
    rate = len(first) / first[-1] if first and first[-1] > 0 else None
    return FleetReport(
        devices=spec.devices,
        expected_online=len(expected),
        scenarios=list(spec.scenarios),
        duration_s=elapsed,
        online_at_end=online_at_end,
        first_connect_all_s=(all_connected_at - start) if all_connected_at else None,
        connect_rate_per_s=rate,
        handshake_ms=_percentiles(latencies),
        connects=sum(a.stats.connects for a in agents),
        attempts=sum(a.stats.attempts for a in agents),
        messages_enqueued=sum(a.stats.enqueued for a in agents),
        messages_acked=sum(a.stats.acked for a in agents),
        messages_received=monitor.received,
        messages_unique=len(monitor.ids),
        duplicates=monitor.received - len(monitor.ids),
        refusals=dict(refusals),
        storm_recovery_s=storm_recovery,
        renewals_requested=len(renew_targets),
        renewals_completed=len(renewed & {a.device_id for a in renew_targets}),
        protocols=dict(protocols),
        mqtt5_share=spec.mqtt5_share,
        fallbacks=sum(1 for a in agents if a.stats.fallbacks),
        notes=notes,
    )
