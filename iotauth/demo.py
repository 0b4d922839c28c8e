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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["DemoFailed", "run_demo"]


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


def _step(
    state: _State, number: int, title: str, by_hand: list[str]
) -> Callable[[Callable[[_State], str]], None]:
    """Run one step: a heading, the work, a result line; DemoFailed names the step."""

    def run(body: Callable[[_State], str]) -> None:
        console = state.console
        console.print(f"\n[bold cyan]{number}. {title}[/]")
        for line in by_hand:
            console.print(f"   [dim]$ {line}[/]")
        t0 = time.monotonic()
        try:
            outcome = body(state)
        except DemoFailed:
            raise
        except Exception as exc:  # each step's failure becomes one clear line
            raise DemoFailed(f"step {number} ({title})", f"{type(exc).__name__}: {exc}") from exc
        console.print(f"   [green]✓[/] {outcome} [dim]({time.monotonic() - t0:.1f} s)[/]")
        state.summary.append((title, outcome))

    return run


# -- the steps ---------------------------------------------------------------------------------


def _make_pki(state: _State) -> str:
    from provisioning.pki import PKI

    state.pki = PKI.init(state.work / "pki", trust_domain="demo.iotauth.test")
    state.stack.callback(state.pki.close)
    return f"root and issuing CA, broker certificate and an empty registry in {state.work / 'pki'}"


def _start_broker(state: _State) -> str:
    from broker.server import BrokerThread
    from broker.settings import BrokerSettings
    from iotauth.testing import BrokerEndpoint

    settings = BrokerSettings(state.work / "pki", port=state.broker_port)
    thread = BrokerThread(settings)
    try:
        thread.start()
    except Exception as exc:
        raise DemoFailed(
            "step 2 (start the broker)", f"cannot listen on 127.0.0.1:{state.broker_port}: {exc}"
        ) from exc
    state.stack.callback(thread.stop)
    state.broker = thread
    state.endpoint = BrokerEndpoint("127.0.0.1", thread.port, state.work / "pki")
    return f"mutual-TLS MQTT broker on {state.endpoint.address} (client certificate required)"


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
        raise DemoFailed("step 4 (provision)", f"{failed[0].port}: {failed[0].reason}")
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
            raise DemoFailed("step 5 (observer)", f"the broker refused {topic_filter}")
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
            raise DemoFailed(
                "step 7 (isolation)", f"dev-intruder could subscribe to {victim}'s topics"
            )
        table.add_row(f"dev-intruder reads devices/{victim}/#", "[green]refused[/]", _why(record))
        intruder.publish(f"devices/{victim}/commands/unlock", b"{}", qos=0)
        record = _wait_audit(state, "kick", client_id="dev-intruder")
        if record is None:
            raise DemoFailed(
                "step 7 (isolation)",
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
        raise DemoFailed("step 7 (isolation)", "a client without a certificate was not refused")
    table.add_row("client without a certificate", "[green]refused[/]", _why(record))

    foreign = PKI.init(state.work / "foreign-pki", trust_domain="demo.iotauth.test")
    foreign.issue(victim, out=state.work / "foreign-creds")
    foreign.close()
    spoofed = _raw_tls(state, state.work / "foreign-creds")
    record = _wait_audit(state, "refuse", reason="unknown-ca")
    if spoofed or record is None:
        raise DemoFailed("step 7 (isolation)", "a certificate from a foreign CA was not refused")
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
    ctx = ssl.create_default_context(cafile=str(state.work / "pki" / "root.crt"))
    if creds is not None:
        ctx.load_cert_chain(creds / "device.crt", creds / "device.key")
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
        raise DemoFailed("step 8 (revoke)", f"{victim} was not disconnected within 5 s")
    if victim in before and elapsed > 1.0:
        raise DemoFailed(
            "step 8 (revoke)", f"{victim} was disconnected after {elapsed:.2f} s (limit 1 s)"
        )
    how = (
        f"kicked {elapsed * 1000:.0f} ms after the CRL was written"
        if victim in before
        else "not connected"
    )
    return f"{victim} revoked (key-compromise): {how}; its reconnects are refused"


# -- driver ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _workdir(workdir: Path | None, keep: bool, console: Console) -> Iterator[Path]:
    path = workdir or Path(tempfile.mkdtemp(prefix="iotauth-demo-"))
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        if keep or workdir is not None:
            console.print(f"\nwork directory kept: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


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
        console.print("[red]error:[/] the demo needs at least 2 devices")
        return 1
    started = time.monotonic()
    with _workdir(workdir, keep, console) as work, contextlib.ExitStack() as stack:
        state = _State(
            work=work, devices=devices, broker_port=broker_port, console=console, stack=stack
        )
        pki = work / "pki"
        console.print(f"[bold]iotauth demo[/] — work directory {work}")
        steps: list[tuple[str, list[str], Callable[[_State], str]]] = [
            (
                "Create the fleet PKI",
                [f"iotauth ca init --pki {pki} --trust-domain demo.iotauth.test"],
                _make_pki,
            ),
            ("Start the broker", [f"iotauth broker run --pki {pki} --port 8883"], _start_broker),
            (
                "Start virtual devices",
                [f"iotauth hw emulate --store {work}/devices/unit-0"],
                _start_devices,
            ),
            (
                "Provision them over virtual serial, all at once",
                [f"iotauth provision --pki {pki} --port PORT --port PORT ..."],
                _provision,
            ),
            (
                "Connect a backend service",
                [
                    f"iotauth service issue telemetry-sink --pki {pki} "
                    f"--out {work}/services/telemetry-sink"
                ],
                _observe,
            ),
        ]
        steps += _agent_steps(work, pki)
        steps += [
            (
                "Isolation probes",
                [
                    f"iotauth broker explain --pki {pki} --identity dev-intruder "
                    "--subscribe 'devices/OTHER/#'"
                ],
                _probes,
            ),
            (
                "Revoke a device while it is connected",
                [f"iotauth device revoke DEVICE --pki {pki} --reason key-compromise"],
                _revoke,
            ),
        ]
        steps += _renewal_steps(work, pki)
        try:
            for number, (title, by_hand, body) in enumerate(steps, start=1):
                _step(state, number, title, by_hand)(body)
        except DemoFailed as exc:
            console.print(f"\n[red]✗ demo failed at {exc.step}[/]: {exc.reason}")
            return 1
        except KeyboardInterrupt:
            console.print("\n[yellow]interrupted[/]; stopping everything")
            return 130
        console.print(
            f"\n[bold green]All {len(steps)} steps passed[/] in {time.monotonic() - started:.1f} s."
        )
        summary = Table(box=None, pad_edge=False, show_header=False)
        for title, outcome in state.summary:
            summary.add_row(f"[green]✓[/] {title}", outcome)
        console.print(summary)
        console.print(
            f"Ledger: iotauth ledger verify --pki {pki}   Registry: iotauth device list --pki {pki}"
        )
    return 0


def _agent_steps(work: Path, pki: Path) -> list[tuple[str, list[str], Callable[[_State], str]]]:
    """Start the device agents and show the live fleet (filled in once device_agent lands)."""
    return []


def _renewal_steps(work: Path, pki: Path) -> list[tuple[str, list[str], Callable[[_State], str]]]:
    return []
