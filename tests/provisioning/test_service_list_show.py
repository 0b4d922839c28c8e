"""`iotauth service list` and `service show`: services with a secret and no certificate appear,
with their methods and their secret's version, time and iteration count, and never the secret or
its verifier keys (docs/JSON.md)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from provisioning.identity import IdentityKind
from provisioning.pki import PKI
from tests.conftest import Result, assert_one_line_error


@pytest.fixture
def pki(tmp_path: Path) -> str:
    ca = PKI.init(tmp_path / "pki", trust_domain="fleet.example")
    ca.issue("sink", kind=IdentityKind.SERVICE, out=tmp_path / "sink")  # certificate only
    ca.issue("bridge", kind=IdentityKind.SERVICE, out=tmp_path / "bridge")  # certificate and secret
    ca.issue("dev-1", out=tmp_path / "dev-1")
    ca.close()
    return str(tmp_path / "pki")


def _secret(cli: Callable[..., Result], pki: str, name: str) -> str:
    result = cli("service", "secret", name, "--pki", pki, "--json", check=True)
    return str(json.loads(result.stdout)["secret"])


def _key_material(pki: str) -> list[str]:
    with PKI.open(Path(pki)) as ca:
        records = [ca.service_secret(n) for n in ("grafana", "bridge")]
    return [v for r in records if r is not None for v in (r.salt, r.stored_key, r.server_key)]


def test_service_list_shows_secret_only_services_and_no_secret(
    pki: str, cli: Callable[..., Result]
) -> None:
    secrets = [
        _secret(cli, pki, "grafana"),
        _secret(cli, pki, "bridge"),
        _secret(cli, pki, "bridge"),
    ]
    text = cli("service", "list", "--pki", pki, check=True).stdout
    doc = cli("service", "list", "--pki", pki, "--json", check=True).stdout
    for output in (text, doc):
        for hidden in [*secrets, *_key_material(pki)]:
            assert hidden not in output
    assert "grafana" in text
    assert "no certificate" in text
    assert "v2 rotated" in text  # bridge's secret was rotated once
    rows = {row["name"]: row for row in json.loads(doc)}
    assert set(rows) == {"sink", "bridge", "grafana"}  # devices stay in device list
    grafana = rows["grafana"]
    assert grafana["serial"] is None
    assert grafana["state"] is None  # the state of a certificate, and it has none
    assert grafana["methods"] == ["oidc", "scram", "password"]
    assert grafana["secret"]["version"] == 1
    assert grafana["secret"]["iterations"] >= 4096
    assert grafana["secret"]["state"] == "active"
    assert grafana["secret"]["rotated"] is False
    assert set(grafana["secret"]) == {
        "name", "version", "mechanism", "iterations", "state", "created_at", "revoked_at",
        "rotated",
    }  # fmt: skip
    assert rows["bridge"]["methods"] == ["mtls", "oidc", "scram", "password"]
    assert rows["bridge"]["secret"]["rotated"] is True
    assert rows["bridge"]["serial"]  # the certificate record is all there
    # The twin: a service with a certificate and no secret.
    assert rows["sink"]["methods"] == ["mtls", "oidc"]
    assert rows["sink"]["secret"] is None
    devices = json.loads(cli("device", "list", "--pki", pki, "--json", check=True).stdout)
    assert [d["name"] for d in devices] == ["dev-1"]


def test_service_show_a_secret_only_service_and_after_its_revocation(
    pki: str, cli: Callable[..., Result]
) -> None:
    secret = _secret(cli, pki, "grafana")
    shown = cli("service", "show", "grafana", "--pki", pki, check=True).stdout
    assert "methods     oidc, scram, password" in shown
    assert "version 1, SCRAM-SHA-256, 4096 iterations, created" in shown
    doc = json.loads(cli("service", "show", "grafana", "--pki", pki, "--json", check=True).stdout)
    assert doc["service"] == "grafana"
    assert doc["certificates"] == []
    assert doc["secret"]["state"] == "active"
    for hidden in [secret, *_key_material(pki)]:
        assert hidden not in shown
        assert hidden not in json.dumps(doc)
    cli("service", "revoke", "grafana", "--pki", pki, check=True)
    doc = json.loads(cli("service", "show", "grafana", "--pki", pki, "--json", check=True).stdout)
    assert doc["methods"] == []
    assert doc["secret"]["state"] == "revoked"
    assert doc["secret"]["revoked_at"] is not None
    assert "revoked" in cli("service", "show", "grafana", "--pki", pki, check=True).stdout
    sink = json.loads(cli("service", "show", "sink", "--pki", pki, "--json", check=True).stdout)
    assert sink["methods"] == ["mtls", "oidc"]
    assert sink["secret"] is None


def test_show_names_the_other_kind_and_unknown_names(pki: str, cli: Callable[..., Result]) -> None:
    _secret(cli, pki, "grafana")
    assert_one_line_error(
        cli("device", "show", "grafana", "--pki", pki), "not a device but a service"
    )
    assert_one_line_error(cli("service", "show", "nobody", "--pki", pki), "not in the registry")
    assert_one_line_error(cli("service", "show", "dev-1", "--pki", pki), "not a service")


def test_a_service_registered_by_name_is_listed_and_shown_with_oidc_only(
    pki: str, cli: Callable[..., Result]
) -> None:
    doc = json.loads(cli("service", "register", "node-red", "--pki", pki, "--json",
                         check=True).stdout)  # fmt: skip
    assert (doc["name"], doc["state"], doc["methods"]) == ("node-red", "active", ["oidc"])
    assert doc["revoked_at"] is None
    rows = {r["name"]: r for r in json.loads(
        cli("service", "list", "--pki", pki, "--json", check=True).stdout)}  # fmt: skip
    node = rows["node-red"]
    assert node["methods"] == ["oidc"]  # no certificate, no secret
    assert (node["serial"], node["state"], node["secret"]) == (None, None, None)
    assert node["registration"]["state"] == "active"
    assert rows["sink"]["registration"] is None  # the twin: registered by its certificate
    text = cli("service", "list", "--pki", pki, check=True).stdout
    assert "registered" in text
    shown = cli("service", "show", "node-red", "--pki", pki, check=True).stdout
    assert "methods     oidc (as" in shown
    assert "registered  " in shown
    # Registered and then given a secret: the secret's methods join oidc.
    _secret(cli, pki, "node-red")
    shown_doc = json.loads(
        cli("service", "show", "node-red", "--pki", pki, "--json", check=True).stdout
    )
    assert shown_doc["methods"] == ["oidc", "scram", "password"]
    # Revoked: no methods; the device command names the other kind.
    revoked = json.loads(
        cli("service", "revoke", "node-red", "--pki", pki, "--json", check=True).stdout
    )
    assert (revoked["registration_revoked"], revoked["secret_revoked"]) == (True, True)
    shown_doc = json.loads(
        cli("service", "show", "node-red", "--pki", pki, "--json", check=True).stdout
    )
    assert shown_doc["methods"] == []
    assert shown_doc["registration"]["state"] == "revoked"
    assert_one_line_error(
        cli("device", "show", "node-red", "--pki", pki), "not a device but a service"
    )


def test_register_refuses_bad_and_taken_names_in_one_line(
    pki: str, cli: Callable[..., Result]
) -> None:
    assert_one_line_error(cli("service", "register", "Bad_Name", "--pki", pki), "service name")
    assert_one_line_error(cli("service", "register", "sink", "--pki", pki), "already registered")
    assert_one_line_error(cli("service", "register", "dev-1", "--pki", pki), "must not collide")
    rows = json.loads(cli("service", "list", "--pki", pki, "--json", check=True).stdout)
    assert [r["registration"] for r in rows] == [None, None]  # the refusals registered nothing
