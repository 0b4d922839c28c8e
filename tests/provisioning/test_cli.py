"""The station's commands as a user runs them: the real ``iotauth`` in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from provisioning.cli import plural
from tests.conftest import CLI, Result, assert_one_line_error, fill_disk, openssl_verify

Run = Callable[..., Result]


def test_the_foundation_walkthrough(cli: Run, tmp_path: Path) -> None:
    """Exactly the commands of the foundation issue, in order, each succeeding."""
    cli("ca", "init", "--pki", "./pki", "--trust-domain", "fleet.example", check=True)
    cli("device", "issue", "dev-0001", "--pki", "./pki", "--out", "./creds/dev-0001", check=True)
    cli(
        "service",
        "issue",
        "telemetry-sink",
        "--pki",
        "./pki",
        "--out",
        "./creds/telemetry-sink",
        check=True,
    )
    listing = cli("device", "list", "--pki", "./pki", check=True)
    assert "dev-0001" in listing.stdout
    rows = json.loads(cli("device", "list", "--pki", "./pki", "--json", check=True).stdout)
    assert [(r["name"], r["state"]) for r in rows] == [("dev-0001", "active")]
    revoked = cli(
        "device", "revoke", "dev-0001", "--pki", "./pki", "--reason", "key-compromise", check=True
    )
    assert "CRL #2" in revoked.stdout
    verified = cli("ledger", "verify", "--pki", "./pki", check=True)
    assert "ledger OK: 4 entries" in verified.stdout

    pki = tmp_path / "pki"
    assert openssl_verify(pki, tmp_path / "creds" / "telemetry-sink" / "device.crt").returncode == 0
    assert openssl_verify(pki, tmp_path / "creds" / "dev-0001" / "device.crt").returncode == 0
    assert (
        openssl_verify(pki, tmp_path / "creds" / "dev-0001" / "device.crt", crl=True).returncode
        != 0
    )
    rows = json.loads(cli("device", "list", "--pki", "./pki", "--json", check=True).stdout)
    assert rows[0]["state"] == "revoked"
    assert rows[0]["revocation_reason"] == "key-compromise"
    shown = json.loads(
        cli("device", "show", "dev-0001", "--pki", "./pki", "--json", check=True).stdout
    )
    assert shown["spiffe_id"] == "spiffe://fleet.example/device/dev-0001"
    assert shown["certificates"][0]["issued_by"] == "test-station"


def test_pki_can_come_from_the_environment(cli: Run, tmp_path: Path) -> None:
    env = {"IOTAUTH_PKI": str(tmp_path / "pki")}
    cli("ca", "init", "--trust-domain", "fleet.example", env=env, check=True)
    cli("device", "issue", "dev-1", "--out", "d1", env=env, check=True)
    assert "dev-1" in cli("device", "list", env=env, check=True).stdout


@pytest.fixture
def initialised(cli: Run, tmp_path: Path) -> Path:
    cli("ca", "init", "--pki", "pki", "--trust-domain", "fleet.example", check=True)
    return tmp_path / "pki"


def _snapshot(pki: Path) -> tuple[bytes, bytes, list[str]]:
    rows = json.loads(
        subprocess.run(
            [*CLI, "device", "list", "--pki", str(pki), "--json", "--all"],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    return (
        (pki / "ledger.jsonl").read_bytes(),
        (pki / "crl.pem").read_bytes(),
        [r["serial"] for r in rows],
    )


@pytest.mark.parametrize(
    ("device_id", "reason"),
    [
        ("Dev-1", "upper-case"),
        ("dev/1", "'/'"),
        ("dev+1", "'+'"),
        ("dev#1", "'#'"),
        ("dev 1", "whitespace"),
        ("dév-1", "non-ASCII"),
        ("x" * 65, "65 characters"),
        ("", "empty"),
    ],
)
def test_invalid_ids_on_the_command_line(
    cli: Run, initialised: Path, tmp_path: Path, device_id: str, reason: str
) -> None:
    before = _snapshot(initialised)
    result = cli("device", "issue", device_id, "--pki", "pki", "--out", "creds/x")
    assert_one_line_error(result, "invalid device id", reason)
    assert result.returncode == 1
    assert _snapshot(initialised) == before
    assert not (tmp_path / "creds").exists()


def test_leading_dash_id_is_refused(cli: Run, initialised: Path, tmp_path: Path) -> None:
    result = cli("device", "issue", "--pki", "pki", "--out", "creds/x", "--", "-dev")
    assert_one_line_error(result, "starts with '-'")
    assert not (tmp_path / "creds").exists()


def test_bad_csr_on_the_command_line(cli: Run, initialised: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.csr").write_bytes(
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    )
    before = _snapshot(initialised)
    result = cli(
        "device", "issue", "dev-1", "--pki", "pki", "--csr", "bad.csr", "--out", "creds/dev-1"
    )
    assert_one_line_error(result, "CSR rejected")
    assert _snapshot(initialised) == before
    assert not (tmp_path / "creds").exists()
    missing = cli("device", "issue", "dev-1", "--pki", "pki", "--csr", "nope.csr")
    assert_one_line_error(missing, "No such file", "nope.csr")


def test_operational_errors_are_one_line(cli: Run, initialised: Path, tmp_path: Path) -> None:
    assert_one_line_error(
        cli("ca", "init", "--pki", "pki", "--trust-domain", "fleet.example"), "already holds a PKI"
    )
    assert_one_line_error(cli("device", "list", "--pki", "nowhere"), "not a PKI directory")
    assert_one_line_error(cli("device", "revoke", "ghost", "--pki", "pki"), "not in the registry")
    assert_one_line_error(
        cli("device", "revoke", "ghost", "--pki", "pki", "--reason", "bored"),
        "unknown revocation reason",
    )
    assert_one_line_error(cli("device", "issue", "dev-1", "--pki", "pki"), "--out is required")
    assert_one_line_error(
        cli("ca", "init", "--pki", "p2", "--trust-domain", "Bad Domain"), "invalid trust domain"
    )
    cli("device", "issue", "dev-1", "--pki", "pki", "--out", "d1", check=True)
    assert_one_line_error(
        cli("device", "issue", "dev-1", "--pki", "pki", "--out", "d2"), "--rotate"
    )
    assert_one_line_error(
        cli("service", "issue", "dev-1", "--pki", "pki", "--out", "s1"), "must not collide"
    )
    rotated = cli(
        "device", "issue", "dev-1", "--pki", "pki", "--out", "d2", "--rotate", "--json", check=True
    )
    assert json.loads(rotated.stdout)["state"] == "active"


@pytest.mark.parametrize("days", ["0", "-5"])
def test_days_below_one_are_refused(cli: Run, initialised: Path, tmp_path: Path, days: str) -> None:
    """`--days 0` once meant "the default" and gave a 90-day certificate."""
    before = _snapshot(initialised)
    for kind in ("device", "service"):
        result = cli(kind, "issue", "x-1", "--pki", "pki", "--out", "creds/x", "--days", days)
        assert_one_line_error(result, "--days must be at least 1", days)
    assert_one_line_error(
        cli("ca", "init", "--pki", "p2", "--trust-domain", "a.example", "--device-days", days),
        "--device-days must be at least 1",
    )
    assert _snapshot(initialised) == before
    assert not (tmp_path / "creds").exists()
    assert not (tmp_path / "p2").exists()


def test_a_validity_cut_by_the_issuing_ca_is_reported(cli: Run, initialised: Path) -> None:
    """A certificate never outlives its issuer; the user hears it, in text and in --json."""
    plain = cli("device", "issue", "dev-1", "--pki", "pki", "--out", "d1", "--days", "100000")
    assert plain.returncode == 0, plain.stderr
    warning = [line for line in plain.stderr.splitlines() if line.strip()]
    assert len(warning) == 1, plain.stderr
    assert warning[0].startswith("warning: the certificate is valid for ")
    assert "not the 100000 asked" in warning[0]
    assert "issuing CA expires" in warning[0]
    doc = json.loads(
        cli(
            "device", "issue", "dev-2", "--pki", "pki", "--out", "d2", "--days", "100000", "--json",
            check=True,
        ).stdout
    )  # fmt: skip
    assert doc["days_requested"] == 100000
    assert len(doc["warnings"]) == 1
    assert "not the 100000 asked" in doc["warnings"][0]
    normal = cli("device", "issue", "dev-3", "--pki", "pki", "--out", "d3", "--days", "30")
    assert normal.returncode == 0
    assert "warning" not in normal.stderr
    doc = json.loads(
        cli("device", "issue", "dev-4", "--pki", "pki", "--out", "d4", "--json", check=True).stdout
    )
    assert (doc["days_requested"], doc["warnings"]) == (90, [])


def test_device_and_service_commands_point_to_each_other(cli: Run, initialised: Path) -> None:
    """A service name given to `device revoke/show` (and the reverse): say which command fits."""
    cli("service", "issue", "sink", "--pki", "pki", "--out", "s", check=True)
    cli("device", "issue", "dev-1", "--pki", "pki", "--out", "d", check=True)
    before = _snapshot(initialised)
    for verb in ("revoke", "show"):
        assert_one_line_error(
            cli("device", verb, "sink", "--pki", "pki"), f"use 'iotauth service {verb} sink'"
        )
        assert_one_line_error(
            cli("service", verb, "dev-1", "--pki", "pki"), f"use 'iotauth device {verb} dev-1'"
        )
        assert_one_line_error(cli("device", verb, "ghost", "--pki", "pki"), "not in the registry")
    assert _snapshot(initialised) == before
    shown = json.loads(cli("service", "show", "sink", "--pki", "pki", "--json", check=True).stdout)
    assert shown["spiffe_id"] == "spiffe://fleet.example/service/sink"
    assert [c["name"] for c in shown["certificates"]] == ["sink"]


def test_json_for_scripts_uses_one_schema(cli: Run, initialised: Path) -> None:
    """revoke, ledger verify and ca show: one JSON document on stdout, the same field names
    (`state`, never `status`; `warnings` always a list), and plural words in the text."""
    cli("device", "issue", "dev-1", "--pki", "pki", "--out", "d1", check=True)
    cli("service", "issue", "sink", "--pki", "pki", "--out", "s1", check=True)
    shown = cli("ca", "show", "--pki", "pki", check=True).stdout
    assert "1 device, 1 service" in shown
    listed = json.loads(cli("device", "list", "--pki", "pki", "--json", check=True).stdout)
    assert "status" not in listed[0]
    assert listed[0]["state"] == "active"
    serial = listed[0]["serial"]
    for kind, name in (("device", "dev-1"), ("service", "sink")):
        result = cli(kind, "revoke", name, "--pki", "pki", "--reason", "superseded", "--json")
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)  # nothing but the document on stdout
        assert (doc["kind"], doc["name"], doc["reason"]) == (kind, name, "superseded")
        assert len(doc["revoked"]) == 1
        assert doc["crl"]["path"].endswith("crl.pem")
        assert (doc["export"], doc["warnings"]) == (None, [])
    assert doc["crl"]["number"] == 3
    again = cli("device", "revoke", "dev-1", "--pki", "pki", "--json")
    assert_one_line_error(again, "no active certificate")
    assert again.stdout == ""  # an error is the one stderr line, never half a document
    state = json.loads(cli("device", "show", "dev-1", "--pki", "pki", "--json").stdout)
    assert state["certificates"][0]["serial"] == serial
    assert state["certificates"][0]["state"] == "revoked"
    verified = json.loads(cli("ledger", "verify", "--pki", "pki", "--json", check=True).stdout)
    assert verified["ok"] is True
    assert verified["entries"] == 5
    assert verified["warnings"] == []
    assert len(verified["head"]["hash"]) == 64
    assert (plural(1, "entry", "entries"), plural(0, "device")) == ("1 entry", "0 devices")
    crl = json.loads(cli("ca", "crl", "--pki", "pki", "--json", check=True).stdout)["crl"]
    assert (crl["number"], crl["revoked"]) == (4, 2)
    created = json.loads(
        cli("ca", "init", "--pki", "p3", "--trust-domain", "b.example", "--json", check=True).stdout
    )
    assert (created["trust_domain"], created["encrypted_keys"]) == ("b.example", False)
    assert created["issuing"]["subject"].startswith("CN=b.example")
    ledger = initialised / "ledger.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(b"".join([lines[0], lines[1].replace(b"dev-1", b"dev-9"), *lines[2:]]))
    broken = cli("ledger", "verify", "--pki", "pki", "--json")
    assert_one_line_error(broken, "ledger line 2")
    verdict = json.loads(broken.stdout)
    assert (verdict["ok"], verdict["line"]) == (False, 2)


def test_encrypted_pki_through_the_environment(cli: Run, tmp_path: Path) -> None:
    secret = {"IOTAUTH_CA_PASSPHRASE": "s3cret"}
    init = cli(
        "ca", "init", "--pki", "pki", "--trust-domain", "fleet.example", env=secret, check=True
    )
    assert "encrypted" in init.stdout
    assert_one_line_error(
        cli("device", "issue", "dev-1", "--pki", "pki", "--out", "d"), "IOTAUTH_CA_PASSPHRASE"
    )
    wrong = cli(
        "device",
        "issue",
        "dev-1",
        "--pki",
        "pki",
        "--out",
        "d",
        env={"IOTAUTH_CA_PASSPHRASE": "nope"},
    )
    assert_one_line_error(wrong, "wrong IOTAUTH_CA_PASSPHRASE")
    assert not (tmp_path / "d").exists()
    cli("device", "issue", "dev-1", "--pki", "pki", "--out", "d", env=secret, check=True)
    assert_one_line_error(cli("device", "revoke", "dev-1", "--pki", "pki"), "IOTAUTH_CA_PASSPHRASE")
    cli("device", "revoke", "dev-1", "--pki", "pki", env=secret, check=True)


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (
            ("trust_domain = ", "# trust_domain = "),
            ["'trust_domain'", "is missing", "fleet.example"],
        ),
        (("device_days = 90", 'device_days = "90"'), ["'device_days'", "whole number", "'90'"]),
        (("device_days = 90", "device_days = true"), ["'device_days'", "whole number", "true"]),
        (("crl_hours = 168", "crl_hours = -1"), ["'crl_hours'", "above 0", "-1"]),
        (("encrypted_keys = false", "encrypted_keys = 0"), ["'encrypted_keys'", "true or false"]),
        (("trust_domain = ", "trust_domain = 7 #"), ["'trust_domain'", "trust domain", "7"]),
        (("crl_hours", "crl_hour"), ["unknown key(s) 'crl_hour'", "known:"]),
        (("version = 1", "version = 2"), ["'version'", "must be 1"]),
        (("[pki]", "[pki"), ["not valid TOML"]),
        (("[pki]", "[other]"), ["missing [pki] section"]),
        (("crl_hours = 168", "crl_hours = 168\nregistry = 5"), ["'registry'", "postgresql://"]),
        (
            ("crl_hours = 168", 'crl_hours = 168\nregistry = "postgresql://u:pw@db/f"'),
            ["registry", "contains a password", "PGPASSWORD"],
        ),
        (("crl_hours = 168", 'crl_hours = 168\nstation = "Line 2"'), ["'station'", "'Line 2'"]),
    ],
    ids=[
        "missing",
        "string-for-int",
        "bool-for-int",
        "negative",
        "int-for-bool",
        "int-for-str",
        "unknown",
        "version",
        "syntax",
        "section",
        "registry-not-a-string",
        "registry-password",
        "station-name",
    ],
)
def test_a_broken_pki_toml_names_file_key_and_expectation(
    cli: Run, initialised: Path, edit: tuple[str, str], fragments: list[str]
) -> None:
    """No Python internals (`__init__() missing ...`, `'<=' not supported ...`): the file, the key
    and what it expects, on one line, from every command that reads the PKI."""
    toml = initialised / "pki.toml"
    text = toml.read_text()
    assert edit[0] in text
    toml.write_text(text.replace(edit[0], edit[1], 1))
    for args in (["device", "list"], ["ca", "show"], ["broker", "explain", "--identity", "d"]):
        result = (
            cli(*args, "--pki", "pki", "--publish", "x")
            if args[0] == "broker"
            else cli(*args, "--pki", "pki")
        )
        assert_one_line_error(result, "pki.toml", *fragments)
        assert "__init__" not in result.stderr
        assert "not supported between" not in result.stderr


@pytest.mark.parametrize(
    "name",
    ["issuing.crt", "root.crt", "server.crt", "crl.pem", "private/server.key"],
)
def test_a_truncated_pki_file_is_named(cli: Run, initialised: Path, name: str) -> None:
    """Whichever file is cut short, the error names it: the station's commands and the broker."""
    path = initialised / name
    path.write_bytes(path.read_bytes()[:100])
    commands = [["broker", "run", "--port", "0", "--no-renewal"]]
    if name in ("issuing.crt", "root.crt"):
        commands.append(["device", "list"])
    for args in commands:
        result = cli(*args, "--pki", "pki")
        assert_one_line_error(result, str(Path("pki") / name))
        assert "cryptography.io" not in result.stderr
        assert "PEM lib" not in result.stderr


def test_hw_emulate_names_a_store_that_is_a_file(cli: Run, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    assert_one_line_error(cli("hw", "emulate", "--store", "afile"), "--store afile is a file")


def test_every_pki_toml_key_has_a_rule() -> None:
    """The validation table and the settings stay in step (a new key needs both)."""
    from dataclasses import fields

    from provisioning.config import SETTINGS, PKIConfig

    assert list(SETTINGS) == [f.name for f in fields(PKIConfig)]


def test_ledger_verify_names_the_bad_line(cli: Run, initialised: Path) -> None:
    cli("device", "issue", "dev-1", "--pki", "pki", "--out", "d1", check=True)
    cli("device", "issue", "dev-2", "--pki", "pki", "--out", "d2", check=True)
    ledger = initialised / "ledger.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(lines[0] + lines[1].replace(b"dev-1", b"dev-9") + lines[2])
    assert_one_line_error(cli("ledger", "verify", "--pki", "pki"), "ledger line 2", "edited")


# The sizes hit, in turn: the registry opening, the credential files, the registry commit after
# the ledger line was written (so the line must be taken back), and success. Each size names the
# stage it must fail at, so a change that moves the failure (or lets it pass) is seen.
@pytest.mark.parametrize(
    ("free_bytes", "stage"),
    [
        (0, "cannot open registry"),
        (32768, "No space left on device: {out}/"),
        (61440, "cannot commit to registry"),
        (73728, "cannot commit to registry"),
        (131072, None),
    ],
)
def test_a_full_disk_loses_nothing(
    tmpfs: Callable[[str], Path], free_bytes: int, stage: str | None
) -> None:
    """Whatever runs out of space first (registry, ledger, credentials), nothing is half-done."""
    small_disk = tmpfs("1m")
    pki = small_disk / "pki"
    subprocess.run(
        [*CLI, "ca", "init", "--pki", str(pki), "--trust-domain", "fleet.example"],
        check=True,
        capture_output=True,
    )
    for n in range(3):
        subprocess.run(
            [
                *CLI,
                "device",
                "issue",
                f"dev-{n}",
                "--pki",
                str(pki),
                "--out",
                str(small_disk / f"d{n}"),
            ],
            check=True,
            capture_output=True,
        )
    before = _snapshot(pki)
    filler = fill_disk(small_disk, free_bytes)
    out = small_disk / "creds" / "dev-new"
    proc = subprocess.run(
        [*CLI, "device", "issue", "dev-new", "--pki", str(pki), "--out", str(out)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    filler.unlink()
    after = _snapshot(pki)
    if stage is None:  # enough room: then it must be complete
        assert proc.returncode == 0, proc.stderr
        assert len(after[2]) == len(before[2]) + 1
        assert (out / "device.key").exists()
    else:
        assert_one_line_error(
            Result(proc.returncode, proc.stdout, proc.stderr), stage.format(out=out)
        )
        assert after == before
        assert not out.exists()
        assert not [p.name for p in (small_disk).iterdir() if p.name.startswith(".")]
    verified = subprocess.run(
        [*CLI, "ledger", "verify", "--pki", str(pki)], capture_output=True, text=True, check=False
    )
    assert verified.returncode == 0, verified.stderr


def test_help_and_version(cli: Run) -> None:
    assert cli("--version", check=True).stdout.startswith("iotauth ")
    for group in ("ca", "device", "service", "ledger"):
        assert "Usage" in cli(group, "--help", check=True).stdout


def test_module_entry_point_matches_console_script() -> None:
    script = Path(sys.executable).parent / "iotauth"
    if not script.exists():
        pytest.fail("the console script 'iotauth' was not installed next to the interpreter")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert proc.stdout.startswith("iotauth ")
