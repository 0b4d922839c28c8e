"""``broker run --config FILE``: listeners, the methods each kind may use, and the identity
provider from a TOML file (broker/runconfig.py); the command line wins; bad files are one line."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.errors import ConfigError
from broker.runconfig import load_run_config
from broker.server import BrokerThread
from broker.settings import DEFAULT_METHODS_BY_KIND, BrokerSettings
from provisioning.tls import client_context
from tests.broker.broker_helpers import Fleet, Peer, stderr_line, wait_until
from tests.conftest import CLI, Result, assert_one_line_error

GOOD = """
version = 1
listen = ["0:mtls", "0:password,oidc"]

[methods]
service = ["mtls", "oidc"]

[tokens]
audience = "mqtt.fleet.example"
max_ttl = 600

[oidc]
issuer = "https://idp.example"
audience = "mqtt"
jwks = "jwks.json"
cafile = "idp-ca.pem"
"""


def _write(tmp_path: Path, text: str, name: str = "broker.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_config_file_gives_listeners_methods_and_the_provider(tmp_path: Path) -> None:
    config = load_run_config(_write(tmp_path, GOOD))
    assert [str(spec) for spec in config.listeners] == ["0:mtls", "0:oidc,password"]
    assert config.methods_by_kind == {
        "device": DEFAULT_METHODS_BY_KIND["device"],  # not named: the default
        "service": frozenset({"mtls", "oidc"}),
    }
    assert config.oidc is not None
    assert config.oidc.jwks == str(tmp_path / "jwks.json")  # relative to the file
    assert config.oidc.cafile == tmp_path / "idp-ca.pem"
    assert config.oidc.claim == "sub"
    assert (config.token_audience, config.token_max_ttl) == ("mqtt.fleet.example", 600)
    empty = load_run_config(_write(tmp_path, "version = 1\n", "empty.toml"))
    assert (empty.listeners, empty.methods_by_kind, empty.oidc) == ((), None, None)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("listen = [8883]", "listen must be a list"),
        ('listen = ["8883"]', "expected PORT:METHOD"),
        ('listen = ["8883:mtls,telepathy"]', "unknown method telepathy"),
        ('listner = ["8883:mtls"]', "unknown key 'listner'"),
        ('[methods]\ndevice = ["mtls", "password"]', "password is not a method a device can use"),
        ('[methods]\nservice = ["jwt"]', "jwt is not a method a service can use"),
        ('[methods]\nrobot = ["mtls"]', "unknown key in [methods] 'robot'"),
        ('[oidc]\nissuer = "https://idp"\njwks = "j.json"', "needs --oidc-audience"),
        ('[oidc]\nissuer = "i"\naudience = "a"\njwks = "http://idp/j"', "must come over https"),
        ("version = 2", "version 2 is not supported"),
        ("[tokens]\nmax_ttl = 90000", "max_ttl must be a number of seconds from 1 to 86400"),
        ('[tokens]\naudience = ""', "audience must be a non-empty string"),
        ("[tokens]\nleeway = 5", "unknown key in [tokens] 'leeway'"),
        ("listen = [", "not valid TOML"),
    ],
)
def test_a_bad_config_file_names_the_file_and_the_key(
    tmp_path: Path, text: str, words: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_run_config(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert words in str(caught.value)


@pytest.fixture
def secret_broker(fleet: Fleet, tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    """A broker whose listeners and methods come from a config file, and its audit."""
    started: list[BrokerThread] = []

    def start(methods: str) -> Any:
        path = _write(tmp_path, f'listen = ["0:mtls", "0:password"]\n{methods}')
        config = load_run_config(path)
        audit: list[dict[str, Any]] = []
        thread = BrokerThread(
            BrokerSettings(
                fleet.pki_dir,
                listeners=config.listeners,
                methods_by_kind=config.methods_by_kind or dict(DEFAULT_METHODS_BY_KIND),
            ),
            audit_sink=lambda line: audit.append(json.loads(line)),
        ).start()
        started.append(thread)
        return thread, audit

    yield start
    for thread in started:
        thread.stop()


def _password_peer(fleet: Fleet, port: int, secret: str) -> Peer:
    peer = Peer(port, None, "grafana", context=client_context(trust=fleet.pki_dir / "root.crt"))
    peer.client.username_pw_set("grafana", secret)
    return peer.connect(expect_ok=False)


def test_methods_from_the_file_narrow_what_a_service_may_use(
    fleet: Fleet, secret_broker: Callable[[str], Any]
) -> None:
    """[methods] service = ["mtls"]: the right secret on a listener that takes passwords is
    refused (method-not-allowed, audited); the twin without [methods] lets it in."""
    secret, _, _ = fleet.pki.set_service_secret("grafana")
    thread, audit = secret_broker('[methods]\nservice = ["mtls"]\n')
    _, password_port = thread.broker.ports.values()
    refused = _password_peer(fleet, password_port, secret)
    assert refused.refused
    refused.close()
    assert wait_until(lambda: any(r.get("reason") == "method-not-allowed" for r in audit))
    mtls_port = next(iter(thread.broker.ports.values()))
    sink = Peer(mtls_port, fleet.creds("sink", service=True), "sink")
    assert not sink.connect().refused  # mtls is still allowed
    sink.close()
    thread, audit = secret_broker("")
    _, password_port = thread.broker.ports.values()
    admitted = _password_peer(fleet, password_port, secret)
    assert not admitted.refused
    admitted.close()


def test_broker_run_and_explain_read_the_file_and_the_command_line_wins(
    fleet: Fleet, cli: Callable[..., Result], tmp_path: Path
) -> None:
    pki = str(fleet.pki_dir)
    methods = '[methods]\nservice = ["mtls"]\n'
    fixed = _write(tmp_path, f'listen = ["8883:mtls", "8884:password"]\n{methods}', "fixed.toml")
    explain = ("broker", "explain", "--pki", pki, "--identity", "sink", "--service", "--json")
    explained = cli(*explain, "--publish", "devices/dev-1/commands/x", "--config", str(fixed))
    assert json.loads(explained.stdout)["methods"] == {"8883": ["mtls"], "8884": []}
    path = _write(tmp_path, f'listen = ["0:mtls", "0:password"]\n{methods}')
    run = [*CLI, "broker", "run", "--pki", pki, "--no-renewal", "--no-persist", "--config"]
    proc = subprocess.Popen(
        [*run, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        cwd=tmp_path,
    )  # fmt: skip
    try:
        banner = stderr_line(proc, "listening on")
        assert re.findall(r"\((mtls|password)\)", banner) == ["mtls", "password"], banner
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
    proc = subprocess.Popen(
        [*run, str(path), "--listen", "0:jwt"], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        banner = stderr_line(proc, "listening on")
        assert re.findall(r"\((\w+)\)", banner)[:1] == ["jwt"], banner
        assert "(password)" not in banner
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
    bad = _write(tmp_path, '[methods]\ndevice = ["password"]\n', "bad.toml")
    result = cli("broker", "run", "--pki", pki, "--config", str(bad))
    assert_one_line_error(result, str(bad), "not a method a device can use")
    missing = cli("broker", "run", "--pki", pki, "--config", str(tmp_path / "nope.toml"))
    assert_one_line_error(missing, "nope.toml")
