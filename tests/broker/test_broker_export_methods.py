"""What the Mosquitto and EMQX exports do with the methods besides mutual TLS: they are warned
about, one line per identity and method, and never written, so nobody gets in without a check the
target can make (docs/EXPORT.md, "Authentication methods").

The EMQX files are checked against EMQX 5's documented schema with the HOCON reader of
test_broker_export_emqx.py (no EMQX runs here); the real Mosquitto twin is in
test_broker_export_mosquitto.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.export import ExportError, Note, export, load_inventory
from broker.policy import default_policy
from broker.settings import ListenerSpec
from tests.broker.broker_helpers import Fleet
from tests.broker.test_broker_export_emqx import consult, hocon
from tests.conftest import Result, assert_one_line_error

EVERYTHING = (ListenerSpec(8883, frozenset({"mtls"})), ListenerSpec.parse("8884:jwt,oidc,password"))


@pytest.fixture
def secret_only(fleet: Fleet) -> str:
    """A service that holds a secret and no certificate (``service secret`` registers it)."""
    fleet.pki.set_service_secret("grafana")
    fleet.pki.set_service_secret("sink")  # sink has both
    fleet.pki.register_service("node-red")  # registered by name alone: oidc only
    return "grafana"


def _methods(notes: list[Note]) -> dict[tuple[str | None, str], Note]:
    return {(n.identity, n.method): n for n in notes if n.method is not None}


@pytest.mark.parametrize("fmt", ["mosquitto", "emqx"])
def test_every_other_method_is_one_warning_per_identity(
    fleet: Fleet, secret_only: str, tmp_path: Path, fmt: str
) -> None:
    result = export(
        default_policy(), load_inventory(fleet.pki_dir), tmp_path / fmt, fmt=fmt,
        listeners=EVERYTHING,
    )  # fmt: skip
    methods = _methods(result.notes)
    assert set(methods) == {
        ("dev-1", "jwt"),
        ("dev-2", "jwt"),
        ("grafana", "password"),
        ("sink", "password"),
        ("grafana", "oidc"),
        ("sink", "oidc"),
        ("node-red", "oidc"),
    }
    assert all(n.level == "warning" for n in methods.values())
    assert result.narrowed
    assert "cannot connect to the exported broker at all" in str(methods["grafana", "password"])
    assert "certificate only" in str(methods["sink", "password"])
    assert "certificate only" in str(methods["dev-1", "jwt"])
    assert "cannot connect to the exported broker at all" in str(methods["node-red", "oidc"])
    # Said in the export's README too, and the listener is the mtls one of --listen.
    readme = (tmp_path / fmt / "README.md").read_text()
    assert "## Authentication methods not exported" in readme
    assert "'grafana': password is not exported" in readme


def test_the_default_listener_warns_nothing_and_strict_agrees(
    fleet: Fleet, secret_only: str, tmp_path: Path
) -> None:
    """The twin: with broker run's default (mtls only) the export is as wide as our broker, so no
    method warning and --strict passes; the secret-only service is an info note."""
    for fmt in ("mosquitto", "emqx"):
        result = export(
            default_policy(), load_inventory(fleet.pki_dir), tmp_path / fmt, fmt=fmt,
            listeners=[ListenerSpec(8883, frozenset({"mtls"}))],
        )  # fmt: skip
        assert not any(n.method for n in result.notes)
        infos = [n for n in result.notes if n.identity == secret_only]
        assert [n.level for n in infos] == ["info"]
        registered = [n for n in result.notes if n.identity == "node-red"]
        assert [n.level for n in registered] == ["info"]
        assert "registration by name but no certificate" in registered[0].message
        assert "cannot connect" in infos[0].message
    with pytest.raises(ExportError, match="--strict"):
        export(
            default_policy(), load_inventory(fleet.pki_dir), tmp_path / "s", fmt="emqx",
            strict=True, listeners=EVERYTHING,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("listen", "words"),
    [
        ([ListenerSpec.parse("8884:jwt,password")], "list mtls on exactly one --listen"),
        (
            [ListenerSpec.parse("8883:mtls"), ListenerSpec.parse("8885:mtls,jwt")],
            "list mtls on exactly one --listen",
        ),
        ([ListenerSpec.parse("0:mtls")], "needs a fixed port"),
    ],
)
def test_one_mtls_listener_is_required(
    fleet: Fleet, tmp_path: Path, listen: list[ListenerSpec], words: str
) -> None:
    with pytest.raises(ExportError, match=words):
        export(default_policy(), load_inventory(fleet.pki_dir), tmp_path / "x", fmt="mosquitto",
               listeners=listen)  # fmt: skip
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_emqx_gets_no_authenticator_and_no_rule_for_a_secret_only_service(
    fleet: Fleet, secret_only: str, tmp_path: Path
) -> None:
    """EMQX 5: no ``authentication`` chain (with none, a client that passed the verify_peer and
    fail_if_no_peer_cert handshake is in), the mTLS listener on the --listen port, and no ACL
    tuple for a name that has no certificate."""
    out = tmp_path / "emqx"
    export(default_policy(), load_inventory(fleet.pki_dir), out, fmt="emqx",
           options={"emqx_dir": "/etc/emqx/iotauth"}, listeners=EVERYTHING)  # fmt: skip
    conf = hocon((out / "emqx.conf").read_text())
    assert "authentication" not in conf
    ssl = conf["listeners"]["ssl"]["default"]
    assert ssl["bind"].endswith(":8883")
    assert ssl["ssl_options"]["verify"] == "verify_peer"
    assert ssl["ssl_options"]["fail_if_no_peer_cert"] is True
    assert set(conf["listeners"]) == {"ssl", "tcp", "ws", "wss"}  # no listener for 8884
    terms = consult((out / "acl.conf").read_text())
    names = json.dumps([repr(t) for t in terms])
    assert "grafana" not in names
    assert "sink" in names  # the twin: the certificate service has its rules


def test_mosquitto_conf_takes_certificates_only(
    fleet: Fleet, secret_only: str, tmp_path: Path
) -> None:
    out = tmp_path / "m"
    export(default_policy(), load_inventory(fleet.pki_dir), out, fmt="mosquitto",
           options={"kick": False}, listeners=EVERYTHING)  # fmt: skip
    conf = (out / "mosquitto.conf").read_text().splitlines()
    assert "allow_anonymous false" in conf
    assert "require_certificate true" in conf
    assert "use_identity_as_username true" in conf
    assert not any(line.startswith(("password_file", "plugin", "auth_plugin")) for line in conf)
    assert [ln for ln in conf if ln.startswith("listener ")] == ["listener 8883"]
    acl = (out / "acl").read_text()
    assert "user grafana" not in acl
    assert "user sink" in acl


def test_cli_export_json_carries_the_method_warnings(
    fleet: Fleet, secret_only: str, cli: Callable[..., Result], tmp_path: Path
) -> None:
    pki = str(fleet.pki_dir)
    args = ("broker", "export", "--pki", pki, "--format", "emqx", "--json")
    ok = cli(*args, "--out", str(tmp_path / "a"), "--listen", "8883:mtls",
             "--listen", "8884:jwt,password")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["format"] == "emqx"
    assert doc["narrowed"] is True
    got = {(n["identity"], n["method"]) for n in doc["notes"] if n["method"]}
    assert got == {
        ("dev-1", "jwt"),
        ("dev-2", "jwt"),
        ("grafana", "password"),
        ("sink", "password"),
    }
    assert any("'grafana': password is not exported to emqx" in w for w in doc["warnings"])
    assert "'grafana': password" in ok.stderr  # people see them too
    bad = cli(*args, "--out", str(tmp_path / "b"), "--listen", "8884:jwt")
    assert_one_line_error(bad, "mtls")
    assert bad.stdout == ""
    strict = cli(*args, "--out", str(tmp_path / "c"), "--strict", "--listen", "8883:mtls,jwt")
    assert_one_line_error(strict, "--strict")
    assert not (tmp_path / "c").exists()
