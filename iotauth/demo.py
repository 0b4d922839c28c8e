"""``iotauth demo``: the whole system, end to end, on this machine, with no hardware.

Each step prints what it does and the command that does the same by hand. Everything runs in
this process (broker, virtual devices, agents in threads) and is stopped on the way out, whether
the demo succeeds, fails or is interrupted: no process outlives it.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["MARKER", "DemoFailed", "WorkdirRefused", "prepare_workdir", "run_demo"]


class StepFailed(Exception):  # noqa: N818 - reads as the outcome it reports
    """Raised inside a step; the runner adds which step it was."""


class DemoFailed(Exception):  # noqa: N818 - reads as the outcome it reports
    """A step did not do what it should; the message says which and why."""

    def __init__(self, step: str, reason: str) -> None:
        self.step = step
        self.reason = reason
        super().__init__(f"{step}: {reason}")


@dataclass
class _State:
    work: Path
    devices: int
    broker_port: int
    console: Console
    stack: contextlib.ExitStack
    pki: Any = None
    broker: Any = None  # broker.server.BrokerThread
    endpoint: Any = None  # iotauth.testing.BrokerEndpoint
    virtual: list[Any] = field(default_factory=list)  # hardware.VirtualDevice
    results: list[Any] = field(default_factory=list)  # provisioning.station.ProvisionResult
    agents: dict[str, Any] = field(default_factory=dict)
    observer: Any = None  # iotauth.testing.ServiceClient
    summary: list[tuple[str, str]] = field(default_factory=list)


Commands = Callable[["_State"], list[str]]


def _step(
    state: _State, number: int, title: str, by_hand: Commands
) -> Callable[[Callable[[_State], str]], None]:
    """Run one step: a heading, the work, the commands that do it by hand, a result line.

    The commands are printed after the work, from what it really used (the broker's port, the
    devices' ports, the device names), so each one reproduces the step as it ran.
    """

    def run(body: Callable[[_State], str]) -> None:
        console = state.console
        console.print(f"\n[bold cyan]{number}. {title}[/]")
        t0 = time.monotonic()
        where = f"step {number} ({title.lower()})"
        try:
            outcome = body(state)
        except StepFailed as exc:
            raise DemoFailed(where, str(exc)) from exc
        except Exception as exc:  # each step's failure becomes one clear line
            raise DemoFailed(where, f"{type(exc).__name__}: {exc}") from exc
        elapsed = time.monotonic() - t0
        for line in by_hand(state):
            console.print(f"   [dim]$ {line}[/]", soft_wrap=True)
        console.print(f"   [green]✓[/] {outcome} [dim]({elapsed:.1f} s)[/]", soft_wrap=True)
        state.summary.append((title, outcome))

    return run


# -- the steps ---------------------------------------------------------------------------------


def _make_pki(state: _State) -> str:
    from provisioning.pki import PKI

    state.pki = PKI.init(state.work / "pki", trust_domain="demo.iotauth.test")
    state.stack.callback(state.pki.close)
    return f"root and issuing CA, broker certificate and an empty registry in {state.work / 'pki'}"


def _start_broker(state: _State) -> str:
    from broker.renewal import RenewalSettings
    from broker.server import BrokerThread
    from broker.settings import BrokerSettings
    from iotauth.testing import BrokerEndpoint

    settings = BrokerSettings(state.work / "pki", port=state.broker_port, renewal=RenewalSettings())
    thread = BrokerThread(settings)
    try:
        thread.start()
    except Exception as exc:
        raise StepFailed(f"cannot listen on 127.0.0.1:{state.broker_port}: {exc}") from exc
    state.stack.callback(thread.stop)
    state.broker = thread
    state.endpoint = BrokerEndpoint("127.0.0.1", thread.port, state.work / "pki")
    return (
        f"mutual-TLS MQTT broker on {state.endpoint.address} (client certificate required), "
        "with the certificate renewal service"
    )


def _start_devices(state: _State) -> str:
    from hardware import FaultConfig, VirtualDevice

    noise = 0.001 / 3
    for n in range(state.devices):
        kwargs: dict[str, Any] = {"hardware_serial": f"DEMO-{n:04d}"}
        if n == 0:
            kwargs["faults"] = FaultConfig(
                seed=7, flip_rate=noise, drop_rate=noise, garbage_rate=noise, boot_log=True
            )
        if n == 1:
            kwargs["can_genkey"] = False
        link = "pty" if n % 2 == 0 else "socket://127.0.0.1:0"
        device = VirtualDevice(state.work / "devices" / f"unit-{n}", link, **kwargs).start()
        state.stack.callback(device.stop)
        state.virtual.append(device)
    notes = "unit 0 on a noisy line with a boot log, unit 1 cannot generate keys"
    return f"{state.devices} virtual devices on ptys and sockets ({notes})"


def _provision(state: _State) -> str:
    from provisioning.station import StationSettings
    from provisioning.station_cli import run_with_progress, summary_table

    ports = [d.address for d in state.virtual]
    settings = StationSettings(timeout=0.2, retries=8)
    results = run_with_progress(
        state.work / "pki",
        ports,
        None,
        "dev-{serial}",
        "auto",
        state.endpoint.address,
        False,
        settings,
    )
    summary_table(results)
    failed = [r for r in results if not r.ok]
    if failed:
        raise StepFailed(f"{failed[0].port}: {failed[0].reason}")
    state.results = results
    modes = {str(r.key_mode) for r in results}
    return f"{len(results)} devices locked and recorded (key modes: {', '.join(sorted(modes))})"


def _observe(state: _State) -> str:
    from iotauth.testing import ServiceClient, issue_service

    creds = issue_service(state.pki, "telemetry-sink", state.work / "services" / "telemetry-sink")
    state.observer = ServiceClient(creds, state.endpoint).connect()
    state.stack.callback(state.observer.close)
    for topic_filter in ("devices/+/telemetry/#", "devices/+/state", "devices/+/replies/#"):
        if not state.observer.subscribe(topic_filter):
            raise StepFailed(f"the broker refused {topic_filter}")
    return "service 'telemetry-sink' subscribed to every device's telemetry and state"


def _probe_identity(state: _State) -> Path:
    out = state.work / "probe" / "dev-intruder"
    if not out.exists():
        state.pki.issue("dev-intruder", out=out)
    return out


def _audit(state: _State, event: str, **match: object) -> dict[str, Any] | None:
    found = state.broker.broker.audit.events(event, **match)
    return found[-1] if found else None


def _wait_audit(
    state: _State, event: str, timeout: float = 5.0, **match: object
) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = _audit(state, event, **match)
        if record is not None:
            return record
        time.sleep(0.05)
    return None


def _probes(state: _State) -> str:
    from iotauth.testing import ServiceClient
    from provisioning.pki import PKI

    console = state.console
    victim = state.results[0].device_id
    table = Table(box=None, pad_edge=False)
    for col in ("probe", "result", "broker's reason (audit log)"):
        table.add_column(col)

    intruder = ServiceClient(_probe_identity(state), state.endpoint).connect()
    try:
        granted = intruder.subscribe(f"devices/{victim}/#")
        record = _wait_audit(state, "deny", client_id="dev-intruder", action="subscribe")
        if granted:
            raise StepFailed(f"dev-intruder could subscribe to {victim}'s topics")
        table.add_row(f"dev-intruder reads devices/{victim}/#", "[green]refused[/]", _why(record))
        intruder.publish(f"devices/{victim}/commands/unlock", b"{}", qos=0)
        record = _wait_audit(state, "kick", client_id="dev-intruder")
        if record is None:
            raise StepFailed(
                f"dev-intruder's publish into {victim}'s subtree was not stopped",
            )
        table.add_row(
            f"dev-intruder writes devices/{victim}/commands/unlock",
            "[green]disconnected[/]",
            _why(record),
        )
    finally:
        intruder.close()

    no_cert = _raw_tls(state, None)
    record = _wait_audit(state, "refuse", reason="no-certificate")
    if no_cert or record is None:
        raise StepFailed("a client without a certificate was not refused")
    table.add_row("client without a certificate", "[green]refused[/]", _why(record))

    foreign = PKI.init(state.work / "foreign-pki", trust_domain="demo.iotauth.test")
    foreign.issue(victim, out=state.work / "foreign-creds")
    foreign.close()
    spoofed = _raw_tls(state, state.work / "foreign-creds")
    record = _wait_audit(state, "refuse", reason="unknown-ca")
    if spoofed or record is None:
        raise StepFailed("a certificate from a foreign CA was not refused")
    table.add_row(f"{victim} from a foreign CA (same name!)", "[green]refused[/]", _why(record))
    console.print(table)
    return "4 of 4 probes refused, each with its reason in the audit log"


def _why(record: dict[str, Any] | None) -> str:
    if record is None:
        return "-"
    parts = [
        str(record.get(k))
        for k in ("event", "reason", "action", "topic", "detail")
        if record.get(k)
    ]
    return " ".join(parts)


def _raw_tls(state: _State, creds: Path | None) -> bool:
    """A TLS connection to the broker; True if the broker accepted the client (it must not)."""
    from provisioning.tls import client_context

    ctx = client_context(
        trust=state.work / "pki" / "root.crt",
        cert_chain=creds / "device.crt" if creds else None,
        key=creds / "device.key" if creds else None,
    )
    try:
        with (
            socket.create_connection(("127.0.0.1", state.endpoint.port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            # MQTT CONNECT, client id "test"; a refused client cert surfaces here in TLS 1.3.
            tls.sendall(bytes.fromhex("101000044d5154540402003c000474657374"))
            return tls.recv(4) != b""
    except (ssl.SSLError, OSError):
        return False


def _revoke(state: _State) -> str:
    victim = state.results[-1].device_id
    before = set(state.broker.broker.connected())
    t0 = time.monotonic()
    state.pki.revoke(victim, reason="key-compromise")
    record = _wait_audit(state, "kick", client_id=victim, timeout=5) if victim in before else None
    elapsed = time.monotonic() - t0
    if victim in before and record is None:
        raise StepFailed(f"{victim} was not disconnected within 5 s")
    if victim in before and elapsed > 1.0:
        raise StepFailed(f"{victim} was disconnected after {elapsed:.2f} s (limit 1 s)")
    how = (
        f"kicked {elapsed * 1000:.0f} ms after the CRL was written"
        if victim in before
        else "not connected"
    )
    retry = (
        _wait_audit(state, "refuse", timeout=5, reason="revoked")
        if victim in state.agents
        else None
    )
    if state.agents and retry is None:
        raise StepFailed(f"{victim}'s reconnect was not refused as revoked")
    if state.agents:
        state.console.print(_fleet_table(state))
    refused = "; its agent's reconnect was refused (revoked)" if retry else ""
    return f"{victim} revoked (key-compromise): {how}{refused}"


# -- driver ------------------------------------------------------------------------------------


MARKER = ".iotauth-demo"  # marks a work directory as the demo's own: it may be emptied and reused


class WorkdirRefused(Exception):  # noqa: N818 - reads as the outcome it reports
    """``--workdir`` names a directory the demo must not write into."""


def prepare_workdir(workdir: Path | None) -> Path:
    """A work directory for the demo: a new temporary one, or ``workdir`` if it is safe.

    ``workdir`` may be missing, empty, or a previous demo's (its marker file): then it is
    emptied. Anything else (a PKI, a home directory) is refused before anything is written.
    """
    if workdir is None:
        path = Path(tempfile.mkdtemp(prefix="iotauth-demo-"))
    else:
        path = workdir
        if path.exists() and not path.is_dir():
            msg = f"--workdir {path} is not a directory; name a new or empty directory"
            raise WorkdirRefused(msg)
        if path.is_dir() and any(path.iterdir()):
            if not (path / MARKER).is_file():
                msg = (
                    f"--workdir {path} is not empty and is not an 'iotauth demo' work directory; "
                    "name a new or empty directory (the demo creates a PKI there)"
                )
                raise WorkdirRefused(msg)
            for child in path.iterdir():  # a previous demo's: start afresh
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("work directory of 'iotauth demo'; the demo may empty it\n")
    return path


def run_demo(
    *,
    devices: int = 4,
    workdir: Path | None = None,
    keep: bool = False,
    broker_port: int = 0,
    console: Console | None = None,
) -> int:
    """Run every step; 0 on success, 1 with the failing step named otherwise."""
    console = console or Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    if devices < 2:
        print("error: the demo needs at least 2 devices (--devices 2)", file=sys.stderr)
        return 1
    try:
        work = prepare_workdir(workdir)
    except (WorkdirRefused, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    kept = keep or workdir is not None
    try:
        return _run_steps(work, devices, broker_port, console, kept=kept)
    finally:
        if not kept:
            shutil.rmtree(work, ignore_errors=True)


def _run_steps(work: Path, devices: int, broker_port: int, console: Console, *, kept: bool) -> int:
    started = time.monotonic()
    pki = work / "pki"
    console.print(f"[bold]iotauth demo[/] — work directory {work}")
    steps = _steps(work, pki)
    failure: str | None = None
    with contextlib.ExitStack() as stack:
        state = _State(
            work=work, devices=devices, broker_port=broker_port, console=console, stack=stack
        )
        try:
            for number, (title, by_hand, body) in enumerate(steps, start=1):
                _step(state, number, title, by_hand)(body)
        except DemoFailed as exc:
            failure = f"\n[red]✗ demo failed at {exc.step}[/]: {exc.reason}"
        except KeyboardInterrupt:
            console.print("\n[yellow]interrupted[/]; stopping everything")
            return 130
    # Everything is stopped now (broker, agents, devices), so nothing prints after the summary.
    if failure is not None:
        console.print(failure)
        return 1
    console.print(
        f"\n[bold green]All {len(steps)} steps passed[/] in {time.monotonic() - started:.1f} s."
    )
    summary = Table(box=None, pad_edge=False, show_header=False)
    for title, outcome in state.summary:
        summary.add_row(f"[green]✓[/] {title}", outcome)
    console.print(summary)
    if kept:
        console.print(
            f"Work directory kept: {work}\nLook around: iotauth ledger verify --pki {pki}; "
            f"iotauth device list --pki {pki} --all",
            soft_wrap=True,
        )
    else:
        console.print(
            "The work directory is removed now; run 'iotauth demo --keep' (or --workdir DIR) "
            "to keep it and try the commands above."
        )
    return 0


def _steps(work: Path, pki: Path) -> list[tuple[str, Commands, Callable[[_State], str]]]:
    """Each step: its title, the commands that do it by hand, and the work."""
    return [
        (
            "Create the fleet PKI",
            lambda _s: [f"iotauth ca init --pki {pki} --trust-domain demo.iotauth.test"],
            _make_pki,
        ),
        (
            "Start the broker",
            lambda s: [f"iotauth broker run --pki {pki} --port {s.endpoint.port}"],
            _start_broker,
        ),
        ("Start virtual devices", _emulate_commands, _start_devices),
        (
            "Provision them over virtual serial, all at once",
            lambda s: [
                f"iotauth provision --pki {pki} "
                + " ".join(f"--port {d.address}" for d in s.virtual)
                + f" --broker {s.endpoint.address} --timeout 0.2"
            ],
            _provision,
        ),
        (
            "Connect a backend service",
            lambda s: [
                f"iotauth service issue telemetry-sink --pki {pki} --out {_sink(s)}",
                _mqtt(s, "mosquitto_sub", _sink(s), "telemetry-sink")
                + " -v -t 'devices/+/telemetry/#' -t 'devices/+/state'",
            ],
            _observe,
        ),
        (
            "Start the device agents",
            lambda s: [
                f"iotauth agent run --store {work}/devices/unit-{n} --broker "
                f"{s.endpoint.address} --telemetry-interval 0.5"
                for n in range(len(s.agents))
            ],
            _start_agents,
        ),
        (
            "Watch the live fleet",
            lambda _s: [
                f"iotauth device list --pki {pki}   # serials and expiry; the telemetry: the "
                "mosquitto_sub of step 5"
            ],
            _live,
        ),
        ("Isolation probes", _probe_commands, _probes),
        (
            "Revoke a device while it is connected",
            lambda s: [
                f"iotauth device revoke {s.results[-1].device_id} --pki {pki} "
                "--reason key-compromise"
            ],
            _revoke,
        ),
        (
            "Renew a certificate over MQTT",
            lambda s: [
                _mqtt(s, "mosquitto_pub", _sink(s), "telemetry-sink")
                + f" -t devices/{s.results[0].device_id}/commands/renew -m '{{}}'"
                "   # or wait for 2/3 of its lifetime; as telemetry-sink this takes over the"
                " mosquitto_sub of step 5 (one identity, one connection)"
            ],
            _renew,
        ),
    ]


def _sink(state: _State) -> Path:
    return state.work / "services" / "telemetry-sink"


def _mqtt(state: _State, tool: str, creds: Path, client_id: str) -> str:
    """A mosquitto client command line with ``creds``, against the demo's broker."""
    return (
        f"{tool} -h localhost -p {state.endpoint.port} --cafile {state.work / 'pki' / 'root.crt'}"
        f" --cert {creds / 'device.crt'} --key {creds / 'device.key'} -i {client_id}"
    )


def _emulate_commands(state: _State) -> list[str]:
    lines = []
    for n, device in enumerate(state.virtual):
        args = f"iotauth hw emulate --store {state.work}/devices/unit-{n} --serial DEMO-{n:04d}"
        if not device.address.startswith("/"):
            args += f" --link {device.address}"
        if n == 0:
            args += " --noise 0.001 --seed 7 --boot-log"
        if n == 1:
            args += " --no-keygen"
        lines.append(args)
    return lines


def _probe_commands(state: _State) -> list[str]:
    pki = state.work / "pki"
    victim = state.results[0].device_id
    probe = state.work / "probe" / "dev-intruder"
    return [
        f"iotauth device issue dev-intruder --pki {pki} --out {probe}",
        _mqtt(state, "mosquitto_sub", probe, "dev-intruder") + f" -t 'devices/{victim}/#'",
        _mqtt(state, "mosquitto_pub", probe, "dev-intruder")
        + f" -t devices/{victim}/commands/unlock -m '{{}}'",
        f"iotauth broker explain --pki {pki} --identity dev-intruder "
        f"--subscribe 'devices/{victim}/#'",
        f"openssl s_client -connect 127.0.0.1:{state.endpoint.port} -CAfile {pki}/root.crt"
        "   # no client certificate",
        f"iotauth ca init --pki {state.work}/foreign-pki --trust-domain demo.iotauth.test && "
        f"iotauth device issue {victim} --pki {state.work}/foreign-pki "
        f"--out {state.work}/foreign-creds",
    ]


def _start_agents(state: _State) -> str:
    from device_agent import Agent, AgentConfig, Reactor

    reactor = Reactor(name="demo-agents")
    reactor.start_thread()
    state.stack.callback(reactor.stop)
    for n, result in enumerate(state.results):
        config = AgentConfig(
            store=state.work / "devices" / f"unit-{n}",
            broker=state.endpoint.address,
            telemetry_interval=0.5,
            queue_path=":memory:",
            backoff_initial=0.5,
            renewal_timeout=10.0,
        )
        agent = Agent(config, reactor=reactor)
        state.agents[str(result.device_id)] = agent
        agent.start()
    state.stack.callback(_stop_agents, state)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(a.connected for a in state.agents.values()):
        time.sleep(0.1)
    offline = [name for name, a in state.agents.items() if not a.connected]
    if offline:
        raise StepFailed(f"not connected after 20 s: {', '.join(offline)}")
    return f"{len(state.agents)} agents connected with their own certificates (mutual TLS)"


def _stop_agents(state: _State) -> None:
    done = []
    for agent in state.agents.values():
        agent.stop(on_stopped=lambda: done.append(1))
    deadline = time.monotonic() + 5
    while len(done) < len(state.agents) and time.monotonic() < deadline:
        time.sleep(0.05)


def _fleet_table(state: _State) -> Table:
    counts: dict[str, int] = {}
    for message in list(state.observer.messages):
        parts = message.topic.split("/")
        if len(parts) > 2 and parts[2] == "telemetry":
            counts[parts[1]] = counts.get(parts[1], 0) + 1
    connected = set(state.broker.broker.connected())
    table = Table(
        title="live fleet (as the broker and the telemetry sink see it)", title_justify="left"
    )
    for col in ("device", "connected", "telemetry received", "certificate serial", "expires"):
        table.add_column(col)
    for name, agent in state.agents.items():
        creds = agent.credentials
        table.add_row(
            name,
            "[green]yes[/]" if name in connected else "[red]no[/]",
            str(counts.get(name, 0)),
            creds.serial[:16],
            creds.not_after.strftime("%Y-%m-%d"),
        )
    return table


def _live(state: _State) -> str:
    from rich.live import Live

    if state.console.is_terminal:
        with Live(_fleet_table(state), console=state.console, refresh_per_second=4) as live:
            end = time.monotonic() + 3
            while time.monotonic() < end:
                time.sleep(0.25)
                live.update(_fleet_table(state))
    else:  # a log gets the table once (Live's last frame ends without a newline there)
        time.sleep(3)
        state.console.print(_fleet_table(state))
    quiet = [
        name
        for name in state.agents
        if not any(m.topic.startswith(f"devices/{name}/telemetry") for m in state.observer.messages)
    ]
    if quiet:
        raise StepFailed(f"no telemetry from {', '.join(quiet)}")
    total = sum(1 for m in state.observer.messages if "/telemetry" in m.topic)
    return f"telemetry from every device ({total} messages so far)"


def _renew(state: _State) -> str:
    name = str(state.results[0].device_id)
    agent = state.agents[name]
    old = agent.credentials.serial
    agent.request_renewal()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if agent.credentials.serial != old and agent.connected:
            break
        time.sleep(0.1)
    else:
        raise StepFailed(f"{name} did not switch to a renewed certificate in 20 s")
    records = state.pki.registry.history(name)
    return (
        f"{name}: new key made on the device, CSR over MQTT, certificate "
        f"{agent.credentials.serial[:16]} issued and in use "
        f"(registry holds {len(records)} certificates for it)"
    )
