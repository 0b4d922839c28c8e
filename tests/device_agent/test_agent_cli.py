"""The command line: SIGTERM shuts down cleanly; bad input is one line and exit 1; config files."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.server import BrokerThread
from device_agent import AgentConfigError, load_config
from device_agent.cli import agent_app, fleet_app
from device_agent.telemetry import load_source, system_telemetry
from tests.device_agent.agent_helpers import Sink, wait_until
from tests.device_agent.conftest import Creds

RUN_AGENT = "from device_agent.cli import agent_app; agent_app()"


def test_sigterm_publishes_offline_and_exits_0(
    broker: BrokerThread, creds: Creds, sinks: Callable[..., Sink], tmp_path: Path
) -> None:
    """The real process: connects, then SIGTERM -> retained offline, DISCONNECT, exit 0."""
    sink = sinks(broker.port)
    store = creds("dev-1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            RUN_AGENT,
            "run",
            "--store",
            str(store),
            "--broker",
            f"127.0.0.1:{broker.port}",
            "--telemetry-interval",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: sink.telemetry_ids("dev-1"), 20)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert wait_until(lambda: sink.on("devices/dev-1/state")[-1:] == [b'{"state":"offline"}'])
    assert (store / "queue.sqlite3").exists()
    assert broker.broker.audit.events("disconnect", client_id="dev-1")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run", "--store", "/nonexistent/store", "--broker", "127.0.0.1:1"], "identity.json"),
        (["run", "--store", "{store}", "--broker", "127.0.0.1:notaport"], "port"),
        (["run", "--store", "{store}"], "no broker address"),
        (["run", "--store", "{store}", "--config", "{bad}"], "unknown key"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(
    creds: Creds, tmp_path: Path, args: list[str], fragment: str
) -> None:
    store = creds("dev-1")
    bad = tmp_path / "agent.toml"
    bad.write_text("brokr = 'x'\n")
    argv = [a.format(store=store, bad=bad) for a in args]
    proc = subprocess.run(
        [sys.executable, "-c", RUN_AGENT, *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), lines[0]
    assert fragment in lines[0], lines[0]


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
