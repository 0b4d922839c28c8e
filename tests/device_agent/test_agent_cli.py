"""The command line: SIGTERM shuts down cleanly; bad input is one line and exit 1; config files.

Two spellings run the agent: ``iotauth agent run`` (typer, mounted by the composition root) and the
slim ``iotauth-agent run`` / ``python -m device_agent run`` a device runs. Both must behave alike,
and the slim one must not load what a device cannot afford (cryptography, typer, rich, amqtt).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.server import BrokerThread
from device_agent import AgentConfigError, load_config, load_credentials
from device_agent.cli import agent_app, fleet_app
from device_agent.errors import CredentialError
from device_agent.main import build_parser
from device_agent.telemetry import load_source, system_telemetry
from tests.conftest import Result, assert_one_line_error, needs
from tests.device_agent.agent_helpers import Sink, wait_until
from tests.device_agent.conftest import Creds

RUN_AGENT = "from device_agent.cli import agent_app; agent_app()"
# argv prefixes of the entry points; each is followed by "run --store ...".
TYPER = [sys.executable, "-c", RUN_AGENT]
SLIM_MODULE = [sys.executable, "-m", "device_agent"]
TELEMETRY = ("--telemetry-interval", "0.2")
SLIM_SCRIPT = [str(Path(sys.executable).with_name("iotauth-agent"))]
ENTRY_POINTS = pytest.mark.parametrize(
    "entry",
    [TYPER, SLIM_MODULE, SLIM_SCRIPT],
    ids=["typer-agent-app", "python-m-device_agent", "iotauth-agent-script"],
)
# Packages a running agent must not load: cryptography (its own OpenSSL, ~8 MB), the typer/rich
# command line (~9 MB), and station/broker code (the device side installs without it).
FORBIDDEN = ("cryptography", "typer", "rich", "click", "amqtt", "broker", "iotauth")


def _imported(importtime_stderr: str) -> set[str]:
    """Module names from -X importtime (PYTHONPROFILEIMPORTTIME) output."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in importtime_stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


def _start_agent(
    entry: list[str], store: Path, port: int, *, importtime: bool = False
) -> subprocess.Popen[str]:
    """The agent as its own process, telemetry every 0.2 s; ``importtime``: -X importtime."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"} if importtime else None
    return subprocess.Popen(
        [*entry, "run", "--store", str(store), "--broker", f"127.0.0.1:{port}", *TELEMETRY],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _sigterm(proc: subprocess.Popen[str]) -> str:
    """Stop it as systemd does; it must exit 0 without a traceback. Returns its stderr."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return err


def _heavy_imports(err: str) -> list[str]:
    return sorted(m for m in _imported(err) if m.split(".")[0] in FORBIDDEN)


def test_sigterm_publishes_offline_and_exits_0(
    broker: BrokerThread, creds: Creds, sinks: Callable[..., Sink], tmp_path: Path
) -> None:
    """The real process: connects, then SIGTERM -> retained offline, DISCONNECT, exit 0."""
    sink = sinks(broker.port)
    store = creds("dev-1")
    proc = _start_agent(TYPER, store, broker.port)
    try:
        assert wait_until(lambda: sink.telemetry_ids("dev-1"), 20)
        _sigterm(proc)
    finally:
        proc.kill()
    assert wait_until(lambda: sink.on("devices/dev-1/state")[-1:] == [b'{"state":"offline"}'])
    assert (store / "queue.sqlite3").exists()
    assert broker.broker.audit.events("disconnect", client_id="dev-1")


def test_slim_entry_point_runs_without_heavy_imports(
    broker: BrokerThread, creds: Creds, sinks: Callable[..., Sink]
) -> None:
    """`python -m device_agent run`: connects, publishes, stops cleanly; imported nothing heavy.

    The import list covers the whole life of the process: start-up, credential checks, the TLS
    connection, telemetry and the clean stop.
    """
    sink = sinks(broker.port)
    store = creds("dev-1")
    proc = _start_agent(SLIM_MODULE, store, broker.port, importtime=True)
    try:
        assert wait_until(lambda: sink.telemetry_ids("dev-1"), 20)
        err = _sigterm(proc)
    finally:
        proc.kill()
    assert wait_until(lambda: sink.on("devices/dev-1/state")[-1:] == [b'{"state":"offline"}'])
    imported = _imported(err)
    assert {"device_agent.main", "device_agent.agent", "paho.mqtt.client", "ssl"} <= imported
    assert _heavy_imports(err) == []


def test_renewal_key_and_csr_never_load_cryptography(creds: Creds, tmp_path: Path) -> None:
    """Beginning a renewal in a process without cryptography makes the key and CSR in a child:
    the files appear (key 0600) and cryptography is still not loaded in the caller."""
    store = tmp_path / "store"
    shutil.copytree(creds("dev-1"), store)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from device_agent import load_credentials\n"
        "from device_agent.renewal import RenewalStore\n"
        f"creds = load_credentials(Path({str(store)!r}))\n"
        "state, csr = RenewalStore(creds.path).begin(creds)\n"
        "assert csr.startswith(b'-----BEGIN CERTIFICATE REQUEST-----'), csr\n"
        "assert 'cryptography' not in sys.modules, 'loaded by the renewal'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    key = store / ".renewal" / "device.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_slim_agent_renews_without_importing_cryptography(
    broker: BrokerThread, creds: Creds, sinks: Callable[..., Sink]
) -> None:
    """`python -m device_agent run` through a whole renewal over MQTT (key and CSR, certificate
    checked, switch, commit, recorded), then a clean stop: cryptography never in its imports."""
    sink = sinks(broker.port)
    store = creds("dev-1")
    old = load_credentials(store)
    proc = _start_agent(SLIM_MODULE, store, broker.port, importtime=True)
    try:
        assert wait_until(lambda: sink.telemetry_ids("dev-1"), 20)
        sink.command("dev-1", "renew", {"request_id": "r1"})
        # Complete: the broker saw the new certificate, and .renewal/ is gone once the service
        # answered `recorded` (the last phase).
        assert wait_until(lambda: _serial_between_commits(store) not in (None, old.serial), 30)
        new = load_credentials(store)
        assert wait_until(lambda: not (store / ".renewal").exists(), 30)
        assert broker.broker.audit.events("connect", client_id="dev-1", credential=new.serial)
        assert proc.poll() is None
        err = _sigterm(proc)
    finally:
        proc.kill()
    # The renewal code really ran in this process (the child's imports go to a pipe of its own).
    assert {"device_agent.renewal", "device_agent.keygen", "hardware.store"} <= _imported(err)
    assert _heavy_imports(err) == []


def _serial_between_commits(store: Path) -> str | None:
    """The store's certificate serial, or None while the agent's commit is renaming the new key
    and certificate into place: a reader beside it can see one new file and one old for that
    moment (the store's journal makes the pair whole again after a crash; the agent itself only
    reads at start)."""
    try:
        return load_credentials(store).serial
    except CredentialError:
        return None


@ENTRY_POINTS
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["run", "--store", "/nonexistent/store", "--broker", "127.0.0.1:1"],
            "/nonexistent/store: does not exist",
        ),
        (["run", "--store", "{bad}", "--broker", "127.0.0.1:1"], "agent.toml: is not a directory"),
        (["run", "--store", "{half}", "--broker", "127.0.0.1:1"], "identity.json is missing"),
        (["run", "--store", "{store}", "--broker", "127.0.0.1:notaport"], "port"),
        (["run", "--store", "{store}"], "no broker address"),
        (["run", "--store", "{store}", "--config", "{bad}"], "unknown key"),
        (["run", "--store", "{empty}", "--broker", "127.0.0.1:1"], "device.crt is missing"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(
    creds: Creds, tmp_path: Path, entry: list[str], args: list[str], fragment: str
) -> None:
    """Every entry point: the same one `error:` line and exit 1."""
    store = creds("dev-1")
    bad = tmp_path / "agent.toml"
    bad.write_text("brokr = 'x'\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "identity.json").write_text((store / "identity.json").read_text())
    half = tmp_path / "half"
    half.mkdir()
    argv = [a.format(store=store, bad=bad, empty=empty, half=half) for a in args]
    proc = subprocess.run(
        [*entry, *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    assert_one_line_error(Result(proc.returncode, proc.stdout, proc.stderr), fragment)


def test_nothing_listening_names_the_broker_address(creds: Creds) -> None:
    """Connection refused: the log line says which HOST:PORT the agent tried."""
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = _start_agent(SLIM_MODULE, creds("dev-1"), port)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
    finally:
        _sigterm(proc)
    assert f"nothing listens at 127.0.0.1:{port}" in line, line


@ENTRY_POINTS
@pytest.mark.parametrize(
    "args",
    [["run"], ["run", "--store"], ["run", "--store", "x", "--stor", "y"], ["run", "--nope", "1"]],
)
def test_usage_errors_exit_2(entry: list[str], args: list[str]) -> None:
    proc = subprocess.run([*entry, *args], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(Result(proc.returncode, proc.stdout, proc.stderr), "--help'")


@ENTRY_POINTS
def test_help_lists_the_same_options(entry: list[str]) -> None:
    """One definition of the options (device_agent.main) behind every spelling."""
    proc = subprocess.run(
        [*entry, "run", "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    for option in ("--store", "--broker", "--config", "--telemetry-interval", "--verbose"):
        assert option in proc.stdout, proc.stdout


def test_config_file_sections(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        'broker = "broker.local:8883"\n[telemetry]\ninterval = 30\n'
        "[backoff]\ninitial = 2\nmax = 120\n[queue]\nmax_messages = 5\n[renewal]\nat = 0.5\n"
    )
    cfg = load_config(path, store=tmp_path, telemetry_interval=None)
    assert cfg.address == ("broker.local", 8883)
    assert (cfg.telemetry_interval, cfg.backoff_initial, cfg.backoff_max) == (30, 2, 120)
    assert (cfg.queue_max_messages, cfg.renew_at) == (5, 0.5)
    assert load_config(path, store=tmp_path, broker="h:1").address == ("h", 1)
    path.write_text("[renewal]\nat = 1.5\n")
    with pytest.raises(AgentConfigError, match="fraction"):
        load_config(path, store=tmp_path)
    path.write_text("[telemetry]\ninterval = 'soon'\n")
    with pytest.raises(AgentConfigError, match="wrong type"):
        load_config(path, store=tmp_path)


def test_telemetry_sources() -> None:
    """The default source reads /proc; 'module:function' and unknown names."""
    reading = system_telemetry()
    assert reading["uptime_s"] > 0
    assert len(reading["load"]) == 3
    assert load_source("default") is system_telemetry
    assert load_source("device_agent.telemetry:system_telemetry") is system_telemetry
    with pytest.raises(AgentConfigError, match="no telemetry source"):
        load_source("nope")


def test_fleet_cli_without_a_backend_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(fleet_app, ["simulate", "--pki", str(tmp_path), "--devices", "2"])
    assert result.exit_code == 1
    assert "error:" in result.output or "error:" in (result.stderr or "")
    assert CliRunner().invoke(agent_app, ["--help"]).exit_code == 0


def test_systemd_unit_runs_the_slim_entry_point() -> None:
    """The unit's ExecStart is the `iotauth-agent` script, with options its parser accepts."""
    root = Path(__file__).resolve().parents[2]
    unit = (root / "packaging" / "iotauth-agent.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    program, *args = shlex.split(exec_start.removeprefix("ExecStart="))
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert Path(program).name == "iotauth-agent"
    assert scripts["iotauth-agent"] == "device_agent.main:console_main"
    parsed = build_parser().parse_args(args)
    assert (parsed.command, parsed.store) == ("run", Path("/var/lib/iotauth"))


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
HARDENING = ("Protect", "Restrict", "Private", "NoNewPrivileges", "SystemCall", "Capability")


def _unit_for_this_machine(tmp_path: Path, *, hardened: bool = True) -> Path:
    """The packaged unit with ExecStart pointing at this venv's script (verify checks it exists)."""
    root = Path(__file__).resolve().parents[2]
    unit = (root / "packaging" / "iotauth-agent.service").read_text()
    script = Path(sys.executable).with_name("iotauth-agent")
    assert script.exists(), "the editable install puts iotauth-agent next to python"
    unit = unit.replace("/opt/iotauth/bin/iotauth-agent", str(script))
    if not hardened:
        unit = "\n".join(line for line in unit.splitlines() if not line.startswith(HARDENING))
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "iotauth-agent.service"
    path.write_text(unit)
    return path


def _systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False
    )


@needs(SYSTEMD_ANALYZE, what="systemd-analyze")
def test_systemd_unit_passes_systemds_own_checks(tmp_path: Path) -> None:
    """systemd judges the unit: `verify` accepts it, and `security` rates its exposure at most
    2.5 of 10 ("OK"); the same unit without its hardening lines fails that threshold."""
    unit = _unit_for_this_machine(tmp_path)
    verify = _systemd_analyze("verify", str(unit))
    assert verify.returncode == 0, verify.stderr
    security = _systemd_analyze("security", "--offline=true", "--threshold=25", str(unit))
    assert security.returncode == 0, security.stdout[-600:]
    bare = _unit_for_this_machine(tmp_path / "bare", hardened=False)
    weak = _systemd_analyze("security", "--offline=true", "--threshold=25", str(bare))
    assert weak.returncode != 0, weak.stdout[-600:]
