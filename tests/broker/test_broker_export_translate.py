"""The policy -> Mosquitto ACL translation, the export directory, and the revoke hook's checks."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.export import (
    ExportError,
    active_identities,
    export,
    load_inventory,
    overlaps,
)
from broker.export_mosquitto import translate_acl
from broker.policy import Policy, _parse, default_policy
from broker.topics import matches
from provisioning.errors import RegistryError
from provisioning.export_hook import ExportHookError, publish_crl
from provisioning.identity import IdentityKind
from provisioning.pki import PKI
from provisioning.registry import CertRecord
from tests.broker.broker_helpers import Fleet
from tests.conftest import Result, assert_one_line_error


def _policy(text: str) -> Policy:
    return _parse("version = 1\n" + text, source="test.toml")


def _acl_lines(acl: str) -> list[str]:
    return [ln for ln in acl.splitlines() if ln and not ln.startswith("#")]


def _block(lines: list[str], user: str) -> list[str]:
    """The topic lines of one ``user`` block."""
    rest = lines[lines.index(f"user {user}") + 1 :]
    return list(itertools.takewhile(lambda ln: ln.startswith("topic "), rest))


# -- overlap ---------------------------------------------------------------------------------------

LEVELS = ["a", "b", "$s", "+", "#"]
FILTERS = [
    "/".join(p)
    for n in (1, 2, 3)
    for p in itertools.product(LEVELS, repeat=n)
    if all(lv != "#" for lv in p[:-1])
]
TOPICS = ["/".join(p) for n in (1, 2, 3, 4) for p in itertools.product(["a", "b", "$s"], repeat=n)]


def test_overlaps_agrees_with_brute_force_matching() -> None:
    """overlaps(a, b) <=> some topic name is matched by both filters (MQTT 3.1.1 section 4.7)."""
    matched = {f: {t for t in TOPICS if matches(f, t)} for f in FILTERS}
    for a, b in itertools.product(FILTERS, repeat=2):
        assert overlaps(a, b) == bool(matched[a] & matched[b]), (a, b)
    assert overlaps("devices/+/x", "devices/dev-1/#")  # and '#' matches the parent level:
    assert overlaps("a/#", "a")
    assert not overlaps("#", "$SYS/x")


# -- the ACL ---------------------------------------------------------------------------------------


def test_default_policy_translation(fleet: Fleet) -> None:
    fleet.creds("renewal", service=True)
    acl = translate_acl(default_policy(), load_inventory(fleet.pki_dir))
    lines = _acl_lines(acl.text)
    assert lines[0] == "pattern readwrite devices/%u/#"
    assert _block(lines, "sink") == [
        "topic deny devices/sink/#",
        "topic write devices/+/commands/#",
        "topic read devices/+/telemetry/#",
        "topic read devices/+/state",
        "topic read devices/+/replies/#",
    ]
    renewal = _block(lines, "renewal")
    assert "topic write devices/+/certs/issued" in renewal
    assert "topic read devices/+/certs/csr" in renewal
    assert "user dev-1" not in lines  # devices are served by the pattern
    warnings = [n for n in acl.notes if n.level == "warning"]
    assert {n.rule for n in warnings} >= {"service-fleet-io"}
    assert all("devices/sink/#" in n.message or "renewal" in n.message for n in warnings)


def test_unexpressible_templates_are_dropped_with_a_warning(fleet: Fleet) -> None:
    """Literal '%u' would be rewritten by Mosquitto; a trailing blank cannot be one ACL line."""
    policy = _policy(
        '[[rule]]\nname = "odd"\nkind = "device"\n'
        'publish = ["ops/%u/{device_id}", "devices/{device_id}/x "]\n'
        'subscribe = ["devices/{device_id}/#"]\n'
    )
    acl = translate_acl(policy, load_inventory(fleet.pki_dir))
    lines = _acl_lines(acl.text)
    assert "pattern read devices/%u/#" in lines  # narrower: the subscribe half survives
    assert not any("ops/" in ln or "/x" in ln for ln in lines)
    dropped = [n for n in acl.notes if n.level == "warning" and n.rule == "odd"]
    assert len(dropped) == 2
    assert "'ops/%u/{device_id}' dropped" in str(dropped[0])
    with pytest.raises(ExportError, match="--strict"):
        export(
            policy, load_inventory(fleet.pki_dir), fleet.root / "x", fmt="mosquitto", strict=True
        )
    assert not (fleet.root / "x").exists()


def test_named_and_any_rules_become_user_blocks_for_registered_identities(fleet: Fleet) -> None:
    policy = _policy(
        '[[rule]]\nname = "vip"\nkind = "device"\nnames = ["dev-1", "dev-9"]\n'
        'subscribe = ["broadcast/vip"]\n'
        '[[rule]]\nname = "hello"\nkind = "any"\npublish = ["hello/{name}"]\n'
    )
    acl = translate_acl(policy, load_inventory(fleet.pki_dir))
    lines = _acl_lines(acl.text)
    assert lines[lines.index("user dev-1") + 1] == "topic read broadcast/vip"
    assert "user dev-9" not in lines  # not in the registry: nothing for that CN
    assert "pattern write hello/%u" in lines  # 'any' reaches services exactly: no deny
    assert "user sink" not in lines  # no device pattern, so nothing to deny to services
    assert any("dev-9" in n.message and n.level == "info" for n in acl.notes)


def test_a_name_active_as_both_kinds_is_refused() -> None:
    def record(kind: str) -> CertRecord:
        now = dt.datetime.now(dt.UTC)
        return CertRecord(
            kind, "twin", kind[:2], kind, "k", "station", now, now + dt.timedelta(days=1),
            "active", now, "me",
        )  # fmt: skip

    with pytest.raises(ExportError, match="both named 'twin'"):
        active_identities([record("device"), record("service")])
    devices, services, notes = active_identities([record("device")])
    assert (devices, services, notes) == (("twin",), (), [])


def test_the_registry_never_lets_a_device_take_an_active_service_name(fleet: Fleet) -> None:
    with pytest.raises(RegistryError, match="must not collide"):
        fleet.pki.issue("sink", kind=IdentityKind.DEVICE)


# -- the directory ---------------------------------------------------------------------------------


def test_export_directory_layout_and_refresh(fleet: Fleet, tmp_path: Path) -> None:
    out = tmp_path / "mq"
    result = export(
        default_policy(), load_inventory(fleet.pki_dir), out, fmt="mosquitto",
        options={"admin_socket": "/tmp/iotauth-test.sock", "port": 18883},
    )  # fmt: skip
    conf = (out / "mosquitto.conf").read_text()
    for line in (
        "listener 18883",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        f"crlfile {out / 'crl.pem'}",
        f"pid_file {out / 'mosquitto.pid'}",
        "set_tcp_nodelay true",
        "allow_anonymous false",
    ):
        assert line in conf.splitlines(), line
    ca = (out / "ca.crt").read_bytes()
    assert (
        ca
        == (fleet.pki_dir / "root.crt").read_bytes() + (fleet.pki_dir / "issuing.crt").read_bytes()
    )
    assert (out / "server.key").stat().st_mode & 0o777 == 0o600
    assert "no kick channel" not in (out / "README.md").read_text()
    manifest = json.loads((out / "iotauth-export.json").read_text())
    assert manifest["format"] == "mosquitto"
    assert manifest["kick"]["socket"] == "/tmp/iotauth-test.sock"
    assert "README.md" in result.files
    # Refreshing an export in place works; a directory that is not an export is never touched.
    export(default_policy(), load_inventory(fleet.pki_dir), out, fmt="mosquitto")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an iotauth export"):
        export(default_policy(), load_inventory(fleet.pki_dir), other, fmt="mosquitto")
    with pytest.raises(ExportError, match="holds a mosquitto export"):
        export(default_policy(), load_inventory(fleet.pki_dir), out, fmt="emqx")


def test_cli_export_prints_warnings_and_strict_refuses(
    fleet: Fleet, cli: Callable[..., Result], tmp_path: Path
) -> None:
    pki = str(fleet.pki_dir)
    ok = cli("broker", "export", "--pki", pki, "--out", str(tmp_path / "a"), "--no-kick")
    assert ok.returncode == 0, ok.stderr
    assert "mosquitto configuration written to" in ok.stdout
    # How to start it, as root too (docs/EXPORT.md, "Files and ownership").
    out = tmp_path / "a"
    assert f"start it with: mosquitto -c {out / 'mosquitto.conf'}" in ok.stdout
    assert f"chown -R mosquitto {out}, or export again with --run-as USER" in ok.stdout
    as_me = cli(
        "broker", "export", "--pki", pki, "--out", str(tmp_path / "d"), "--run-as", "nobody"
    )
    assert f"runs as user 'nobody', who must own {tmp_path / 'd'}" in as_me.stdout, as_me.stderr
    assert "warning: rule 'service-fleet-io'" in ok.stderr
    strict = cli("broker", "export", "--pki", pki, "--out", str(tmp_path / "b"), "--strict")
    assert_one_line_error(strict, "--strict")
    bad = cli("broker", "export", "--pki", pki, "--out", str(tmp_path / "c"), "--format", "x")
    assert_one_line_error(bad, "unknown --format")


# -- the revoke hook -------------------------------------------------------------------------------


def test_revoke_hook_refuses_another_pkis_export_and_rollbacks(
    fleet: Fleet, foreign_pki: PKI, tmp_path: Path
) -> None:
    out = tmp_path / "mq"
    export(default_policy(), load_inventory(fleet.pki_dir), out, fmt="mosquitto")
    with pytest.raises(ExportHookError, match="another PKI"):
        publish_crl(out, foreign_pki)
    fleet.pki.revoke("dev-1")
    report = publish_crl(out, fleet.pki)  # no reload: copy only
    assert report.crl_number == fleet.pki.crl_info().number
    assert (out / "crl.pem").read_bytes() == (fleet.pki_dir / "crl.pem").read_bytes()
    newer = (out / "crl.pem").read_bytes()
    (fleet.pki_dir / "crl.pem").write_bytes(load_old_crl(tmp_path, fleet))
    with pytest.raises(ExportHookError, match="roll it back"):
        publish_crl(out, fleet.pki)
    assert (out / "crl.pem").read_bytes() == newer
    with pytest.raises(ExportHookError, match="not an iotauth export"):
        publish_crl(tmp_path, fleet.pki)


def load_old_crl(tmp_path: Path, fleet: Fleet) -> bytes:
    """An older, validly signed CRL of the same PKI (its first one, from the ledger's start)."""
    first = tmp_path / "first.pem"
    if not first.exists():
        # The export in the test above captured a newer CRL; re-sign an older number by hand.
        from cryptography import x509

        from provisioning.certificates import build_crl

        crl = x509.load_pem_x509_crl((fleet.pki_dir / "crl.pem").read_bytes())
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        old = build_crl(
            issuer=fleet.pki.issuing, issuer_key=fleet.pki.issuing_key(), revoked=[],
            number=number - 1, now=now, next_update=now + dt.timedelta(days=1),
        )  # fmt: skip
        from cryptography.hazmat.primitives import serialization

        first.write_bytes(old.public_bytes(serialization.Encoding.PEM))
    return first.read_bytes()


def test_cli_reload_needs_export_and_emqx_exports_cannot_be_reloaded(
    fleet: Fleet, cli: Callable[..., Result], tmp_path: Path
) -> None:
    pki = str(fleet.pki_dir)
    alone = cli("device", "revoke", "dev-1", "--pki", pki, "--reload")
    assert_one_line_error(alone, "--reload needs --export")
    out = tmp_path / "emqx"
    export(default_policy(), load_inventory(fleet.pki_dir), out, fmt="emqx")
    result = cli("device", "revoke", "dev-1", "--pki", pki, "--export", str(out), "--reload")
    assert_one_line_error(result, "dev-1 is revoked", "EMQX is not reloaded by signal")
    assert (out / "certs" / "crl.pem").read_bytes() == (fleet.pki_dir / "crl.pem").read_bytes()
