"""A real Mosquitto, started from `iotauth broker export`, enforces our policy and our revocations.

Each test exports the fleet PKI, starts /usr/sbin/mosquitto on a free 127.0.0.1 port from the
exported directory, and talks to it with paho clients holding certificates from ``pki.issue``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.export import export, load_inventory
from broker.policy import Policy, default_policy, load_policy
from provisioning.errors import RegistryError
from provisioning.identity import IdentityKind
from provisioning.pki import PKI
from tests.broker.broker_helpers import Fleet, Peer, wait_until
from tests.conftest import MOSQUITTO, Result, needs_mosquitto

pytestmark = needs_mosquitto

QUIET = 0.5  # how long "nothing arrives" is watched for (Mosquitto delivers in milliseconds)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Mosquitto:
    out: Path
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def reload(self) -> None:
        os.kill(self.proc.pid, signal.SIGHUP)
        time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def mosquitto(fleet: Fleet, tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    started: list[Mosquitto] = []
    short = Path(tempfile.mkdtemp(prefix="iam-", dir="/tmp"))  # AF_UNIX paths are short

    def start(policy: Policy | None = None, *, kick: bool = True, name: str = "m") -> Mosquitto:
        out = tmp_path / name
        port = _free_port()
        export(
            policy or default_policy(),
            load_inventory(fleet.pki_dir),
            out,
            fmt="mosquitto",
            options={
                "host": "127.0.0.1",
                "port": port,
                "run_as": "root" if os.geteuid() == 0 else None,
                "kick": kick,
                "admin_socket": short / f"{name}.sock",
            },
        )
        log = tmp_path / f"{name}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [str(MOSQUITTO), "-c", str(out / "mosquitto.conf")], stdout=sink, stderr=sink
            )
        m = Mosquitto(out, port, proc, log)
        started.append(m)

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                return False
            return (out / "mosquitto.pid").exists()

        assert wait_until(listening, 10), log.read_text()
        return m

    yield start
    for m in started:
        m.stop()
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def peers(fleet: Fleet) -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(m: Mosquitto, name: str, *, service: bool = False, ok: bool = True) -> Peer:
        peer = Peer(m.port, fleet.creds(name, service=service), name).connect(expect_ok=ok)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


def _quiet(*peers: Peer) -> None:
    time.sleep(QUIET)
    for peer in peers:
        peer.messages.clear()


def test_exported_mosquitto_enforces_the_device_table(
    mosquitto: Callable[..., Mosquitto], peers: Callable[..., Peer]
) -> None:
    """Own subtree works; other devices' topics, '#' and $SYS give nothing; services per table."""
    m = mosquitto()
    dev1, dev2 = peers(m, "dev-1"), peers(m, "dev-2")
    sink = peers(m, "sink", service=True)
    assert sink.subscribe("devices/+/telemetry/#", 1) == [1]
    assert dev2.subscribe("devices/dev-2/#", 1) == [1]
    # Mosquitto 2.0 acknowledges every SUBSCRIBE and filters each delivery by the read grants.
    for wide in ("devices/dev-2/#", "#", "devices/#", "$SYS/#"):
        assert dev1.subscribe(wide, 1) == [1]
    _quiet(dev1, dev2, sink)  # retained $SYS messages would have arrived by now

    dev1.publish("devices/dev-1/telemetry/temp", b"21.5", qos=1)
    assert wait_until(lambda: sink.messages)
    assert sink.messages == [("devices/dev-1/telemetry/temp", b"21.5", False)]
    dev2.publish("devices/dev-2/telemetry/temp", b"secret", qos=1)  # dev-1 holds '#'
    dev1.publish("devices/dev-2/commands/unlock", b"FORGED", qos=1)
    sink.publish("devices/dev-2/commands/reboot", b"now", qos=1)
    sink.publish("devices/dev-2/telemetry/temp", b"FORGED", qos=1)  # services may not write it
    assert wait_until(lambda: ("devices/dev-2/commands/reboot", b"now", False) in dev2.messages)
    time.sleep(QUIET)
    topics = [t for t, _, _ in dev1.messages]
    assert set(topics) == {"devices/dev-1/telemetry/temp"}  # only its own, despite '#'
    assert ("devices/dev-2/commands/unlock", b"FORGED", False) not in dev2.messages
    assert b"FORGED" not in [p for _, p, _ in sink.messages]


def test_sys_reaches_only_a_policy_that_grants_it(
    mosquitto: Callable[..., Mosquitto], peers: Callable[..., Peer], tmp_path: Path
) -> None:
    """The failing twin of the $SYS case: the same subscription delivers when a rule grants it."""
    policy = tmp_path / "policy.toml"
    policy.write_text(
        'version = 1\n[[rule]]\nname = "ops"\nkind = "service"\nsubscribe = ["$SYS/#"]\n'
        '[[rule]]\nname = "own"\nkind = "device"\nsubscribe = ["devices/{device_id}/#"]\n'
    )
    m = mosquitto(load_policy(policy))
    ops, dev1 = peers(m, "sink", service=True), peers(m, "dev-1")
    assert ops.subscribe("$SYS/#") == [0]
    assert dev1.subscribe("$SYS/#") == [0]
    assert wait_until(lambda: any(t == "$SYS/broker/version" for t, _, _ in ops.messages))
    time.sleep(QUIET)
    assert dev1.messages == []


def test_no_certificate_and_a_foreign_ca_are_refused(
    mosquitto: Callable[..., Mosquitto],
    peers: Callable[..., Peer],
    fleet: Fleet,
    foreign_pki: PKI,
    tmp_path: Path,
) -> None:
    import ssl

    m = mosquitto()
    assert not peers(m, "dev-1").refused  # the twin: a fleet certificate connects
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(fleet.pki_dir / "root.crt")
    no_cert = Peer(m.port, None, "dev-1", context=bare).connect(expect_ok=False)
    assert no_cert.refused
    foreign = tmp_path / "foreign-dev"
    foreign_pki.issue("dev-1", out=foreign)
    (foreign / "ca.crt").write_bytes((fleet.pki_dir / "root.crt").read_bytes())
    impostor = Peer(m.port, foreign, "dev-1").connect(expect_ok=False)
    assert impostor.refused
    no_cert.close()
    impostor.close()


def test_revoke_with_export_and_reload_closes_the_live_session(
    mosquitto: Callable[..., Mosquitto],
    peers: Callable[..., Peer],
    fleet: Fleet,
    cli: Callable[..., Result],
) -> None:
    """`device revoke --export --reload`: CRL copied, SIGHUP, live session kicked, no reconnect."""
    m = mosquitto()
    dev1, dev2 = peers(m, "dev-1"), peers(m, "dev-2")
    assert dev2.subscribe("devices/dev-2/#") == [0]
    result = cli(
        "device", "revoke", "dev-2", "--pki", str(fleet.pki_dir), "--export", str(m.out),
        "--reload",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "reloaded (SIGHUP)" in result.stdout
    assert "Closed the live sessions of dev-2" in result.stdout
    assert (m.out / "crl.pem").read_bytes() == (fleet.pki_dir / "crl.pem").read_bytes()
    assert wait_until(dev2.disconnected.is_set, 5)
    again = Peer(m.port, fleet.creds("dev-2"), "dev-2").connect(expect_ok=False)
    assert again.refused
    again.close()
    assert not dev1.disconnected.is_set()  # everybody else keeps going
    assert dev1.subscribe("devices/dev-1/#") == [0]


def test_without_the_kick_channel_mosquitto_keeps_revoked_sessions(
    mosquitto: Callable[..., Mosquitto], peers: Callable[..., Peer], fleet: Fleet
) -> None:
    """The measurement behind docs/EXPORT.md: SIGHUP refuses new handshakes only."""
    m = mosquitto(kick=False)
    assert "dynamic_security" not in (m.out / "mosquitto.conf").read_text()
    dev2, sink = peers(m, "dev-2"), peers(m, "sink", service=True)
    assert sink.subscribe("devices/+/telemetry/#", 1) == [1]
    from provisioning.export_hook import publish_crl

    fleet.pki.revoke("dev-2")
    report = publish_crl(m.out, fleet.pki, reload=True, names=["dev-2"])
    assert report.reloaded_pid == m.proc.pid
    assert "stays connected" in report.notes[0]
    time.sleep(1.0)
    assert not dev2.disconnected.is_set()
    dev2.publish("devices/dev-2/telemetry/t", b"still here", qos=1)
    assert wait_until(lambda: sink.messages)  # the revoked device is still served
    fresh = Peer(m.port, fleet.creds("dev-2"), "dev-2").connect(expect_ok=False)
    assert fresh.refused  # but a new handshake is not
    fresh.close()


def test_device_patterns_do_not_reach_services(
    mosquitto: Callable[..., Mosquitto], peers: Callable[..., Peer], fleet: Fleet
) -> None:
    """A service cannot publish as a 'device' of its own name; without the deny lines it could."""
    fleet.creds("sink-2", service=True)
    m = mosquitto()
    sink, watcher = peers(m, "sink", service=True), peers(m, "sink-2", service=True)
    assert watcher.subscribe("devices/+/telemetry/#", 1) == [1]
    sink.publish("devices/sink/telemetry/t", b"spoof", qos=1)
    time.sleep(QUIET)
    assert watcher.messages == []
    acl = m.out / "acl"
    acl.write_text("\n".join(ln for ln in acl.read_text().splitlines() if "topic deny" not in ln))
    m.reload()
    sink.publish("devices/sink/telemetry/t", b"spoof", qos=1)
    assert wait_until(lambda: watcher.messages)  # the twin: the pattern leaks to the service


def test_a_device_can_never_take_a_service_name(
    mosquitto: Callable[..., Mosquitto], fleet: Fleet
) -> None:
    """Even after the service 'sink' is revoked, no device may be called 'sink': an export made
    earlier still grants that user name the service's rights."""
    fleet.pki.revoke("sink", kind=IdentityKind.SERVICE)
    with pytest.raises(RegistryError, match="even after revocation"):
        fleet.pki.issue("sink", kind=IdentityKind.DEVICE)
    m = mosquitto()
    assert "user sink" not in (m.out / "acl").read_text()


def test_a_secret_only_service_cannot_log_in_to_the_exported_mosquitto(
    mosquitto: Callable[..., Mosquitto], peers: Callable[..., Peer], fleet: Fleet
) -> None:
    """The export never widens: a service whose only credential is a secret (warned about, not
    exported) gets no way in, with its user name and the right secret; a certificate still works."""
    import ssl

    secret, _, _ = fleet.pki.set_service_secret("grafana")
    m = mosquitto()
    assert not peers(m, "sink", service=True).refused  # the twin
    server_only = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    server_only.load_verify_locations(fleet.pki_dir / "root.crt")
    attempt = Peer(m.port, None, "grafana", context=server_only)
    attempt.client.username_pw_set("grafana", secret)
    attempt.connect(expect_ok=False)
    assert attempt.refused
    attempt.close()
