"""Independent peers: mosquitto_pub/sub against the broker, and `broker run` as a process."""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from broker.server import BrokerThread
from provisioning.pki import PKI
from tests.broker.broker_helpers import Fleet, Peer, mosquitto_tls_args, stderr_line, wait_until
from tests.conftest import (
    MOSQUITTO_PUB,
    MOSQUITTO_SUB,
    Result,
    assert_one_line_error,
    needs_mosquitto_clients,
)

needs_mosquitto = needs_mosquitto_clients


def _sub(creds: Path, port: int, client_id: str, topic: str) -> subprocess.Popen[str]:
    assert MOSQUITTO_SUB is not None
    return subprocess.Popen(
        [
            MOSQUITTO_SUB,
            *mosquitto_tls_args(creds, port, client_id),
            "-t",
            topic,
            "-v",
            "-C",
            "1",
            "-W",
            "10",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _pub(
    creds: Path, port: int, client_id: str, topic: str, message: str
) -> subprocess.CompletedProcess[str]:
    assert MOSQUITTO_PUB is not None
    return subprocess.run(
        [
            MOSQUITTO_PUB,
            *mosquitto_tls_args(creds, port, client_id),
            "-t",
            topic,
            "-m",
            message,
            "-q",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


@needs_mosquitto
def test_mosquitto_clients_allowed_flow(broker: BrokerThread, fleet: Fleet) -> None:
    """mosquitto_sub as the service receives what mosquitto_pub as the device sends."""
    sub = _sub(fleet.creds("sink"), broker.port, "sink", "devices/+/telemetry/#")
    assert wait_until(lambda: "sink" in broker.broker.connected())
    time.sleep(0.2)  # let the SUBSCRIBE land after CONNACK
    result = _pub(fleet.creds("dev-1"), broker.port, "dev-1", "devices/dev-1/telemetry/t", "42")
    assert result.returncode == 0, result.stderr
    out, err = sub.communicate(timeout=15)
    assert out.strip() == "devices/dev-1/telemetry/t 42", err


@needs_mosquitto
def test_mosquitto_clients_are_refused_where_they_must_be(
    broker: BrokerThread, fleet: Fleet, tmp_path: Path
) -> None:
    """Wrong client id, no certificate, and a publish into another device's subtree all fail."""
    mismatch = _pub(fleet.creds("dev-1"), broker.port, "dev-2", "devices/dev-1/state", "x")
    assert mismatch.returncode != 0
    assert broker.broker.audit.events("refuse", reason="client-id-mismatch")
    assert MOSQUITTO_PUB is not None
    no_cert = subprocess.run(
        [
            MOSQUITTO_PUB,
            "-h",
            "127.0.0.1",
            "-p",
            str(broker.port),
            "-i",
            "dev-1",
            "--cafile",
            str(fleet.creds("dev-1") / "ca.crt"),
            "-t",
            "devices/dev-1/state",
            "-m",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert no_cert.returncode != 0
    watcher = Peer(broker.port, fleet.creds("dev-2"), "dev-2").connect()
    assert watcher.subscribe("devices/dev-2/#") == [0]
    _pub(fleet.creds("dev-1"), broker.port, "dev-1", "devices/dev-2/commands/unlock", "FORGED")
    assert wait_until(lambda: broker.broker.audit.events("deny", action="publish"))
    assert watcher.messages == []
    watcher.close()


# -- broker run as a process --------------------------------------------------------------------

RUN = [sys.executable, "-c", "from broker.cli import broker_app; broker_app()"]


def test_broker_run_serves_and_exposes_metrics(fleet: Fleet) -> None:
    """`broker run --port 0 --metrics-port 0 --max-connections 1`: a device connects, audit line
    and metrics show it; a second device is refused at the connection limit."""
    proc = subprocess.Popen(
        [
            *RUN,
            "run",
            "--pki",
            str(fleet.pki_dir),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--no-renewal",
            "--max-connections",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert proc.stdout is not None
        banner = ""
        deadline = time.monotonic() + 20
        while "listening" not in banner and time.monotonic() < deadline:
            banner = proc.stderr.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+).*metrics on 127\.0\.0\.1:(\d+)", banner)
        assert match, banner
        port, metrics_port = int(match[1]), int(match[2])
        peer = Peer(port, fleet.creds("dev-1"), "dev-1").connect()
        line = proc.stdout.readline()
        assert '"event":"connect"' in line
        assert '"client_id":"dev-1"' in line
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert "iotauth_broker_connects_total 1" in text
        assert "iotauth_broker_connections 1" in text
        # --max-connections 1: a second device is closed at accept, and the audit says why.
        second = Peer(port, fleet.creds("dev-2"), "dev-2").connect(expect_ok=False)
        assert second.refused
        line = proc.stdout.readline()
        assert '"event":"refuse"' in line
        assert '"reason":"connection-limit"' in line
        peer.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ([], "not a PKI directory"),
        (["--policy", "/nonexistent/policy.toml"], "policy"),
    ],
)
def test_broker_run_errors_are_one_line(
    tmp_path: Path, fleet: Fleet, extra: list[str], fragment: str
) -> None:
    """Missing PKI or policy: one 'error:' line on stderr, exit 1, no traceback."""
    pki = tmp_path / "missing" if not extra else fleet.pki_dir
    proc = subprocess.run(
        [*RUN, "run", "--pki", str(pki), "--port", "0", *extra],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    assert_one_line_error(Result(proc.returncode, proc.stdout, proc.stderr), fragment)


def _run_once(pki: Path, *extra: str, passphrase: str | None = None) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTAUTH_")}
    if passphrase is not None:
        env["IOTAUTH_CA_PASSPHRASE"] = passphrase
    proc = subprocess.run(
        [*RUN, "run", "--pki", str(pki), "--port", "0", "--no-renewal", *extra],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.parametrize(
    ("passphrase", "fragment"),
    [(None, "set IOTAUTH_CA_PASSPHRASE"), ("wrong", "wrong IOTAUTH_CA_PASSPHRASE")],
    ids=["unset", "wrong"],
)
def test_broker_run_on_an_encrypted_pki_never_prompts(
    tmp_path: Path, passphrase: str | None, fragment: str
) -> None:
    """An encrypted PKI without (or with a wrong) IOTAUTH_CA_PASSPHRASE: the words of `device
    issue`, naming the key file, and no OpenSSL "Enter PEM pass phrase" prompt from a service."""
    PKI.init(tmp_path / "pki", trust_domain="fleet.example", passphrase=b"s3cret").close()
    result = _run_once(tmp_path / "pki", passphrase=passphrase)
    assert "pass phrase" not in result.stderr
    assert_one_line_error(result, fragment, "server.key")


def test_broker_run_names_a_taken_metrics_port(fleet: Fleet) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_once(fleet.pki_dir, "--metrics-port", str(port))
    assert_one_line_error(result, f"127.0.0.1:{port}", "--metrics-port")


def _open_file_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no 'Max open files' line")


@pytest.mark.parametrize("over_hard", [False, True], ids=["fits", "over-the-hard-limit"])
def test_max_connections_raises_the_open_file_limit(fleet: Fleet, over_hard: bool) -> None:
    """One socket per connection: `--max-connections N` lifts the soft RLIMIT_NOFILE to fit N,
    or, when the hard limit is lower, lifts it that far and says so at start."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard + 100 if over_hard else 2000
    if not over_hard and hard < wanted + 256:
        pytest.fail(f"hard open-file limit {hard} is too low for this test")
    proc = subprocess.Popen(
        [
            *RUN,
            *("run", "--pki", str(fleet.pki_dir), "--port", "0", "--no-renewal"),
            *("--max-connections", str(wanted)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard)),  # noqa: PLW1509
    )
    try:
        assert proc.stderr is not None
        seen = ""
        deadline = time.monotonic() + 20
        while "listening" not in seen and time.monotonic() < deadline:
            seen += proc.stderr.readline()
        assert "listening" in seen, seen
        soft = _open_file_limit(proc.pid)
        if over_hard:
            assert soft == hard
            assert "open-file limit" in seen
        else:
            assert soft >= wanted
            assert "open-file limit" not in seen
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _banner(pki_dir: Path, *extra: str) -> str:
    """Start `broker run --port 0`, return its banner line, stop it."""
    proc = subprocess.Popen(
        [*RUN, "run", "--pki", str(pki_dir), "--port", "0", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        return stderr_line(proc, "listening")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_broker_run_says_when_it_issues_the_renewal_certificate(fleet: Fleet) -> None:
    """The renewal service's certificate is issued on first start, and the banner says so."""
    services = fleet.pki_dir / "services" / "renewal"
    assert not services.exists()
    first = _banner(fleet.pki_dir)
    assert "renewal service on, as service 'renewal': issued its certificate into" in first, first
    assert str(services) in first
    assert (services / "device.crt").is_file()
    second = _banner(fleet.pki_dir)
    assert "renewal service on" in second, second
    assert "issued" not in second, second
    off = _banner(fleet.pki_dir, "--no-renewal")
    assert "renewal service off (--no-renewal)" in off, off
