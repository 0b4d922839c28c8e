"""The policy file: loading, the default table, deny-by-default, and `broker explain`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import broker_app
from broker.errors import PolicyError
from broker.policy import Action, default_policy, load_policy
from provisioning.identity import Identity, IdentityKind
from provisioning.pki import PKI

DEV1 = Identity.device("dev-1", "fleet.example")
SINK = Identity.service("sink", "fleet.example")
RENEWAL = Identity.service("renewal", "fleet.example")


@pytest.mark.parametrize(
    ("who", "action", "topic", "allowed"),
    [
        (DEV1, Action.PUBLISH, "devices/dev-1/telemetry/temp", True),
        (DEV1, Action.PUBLISH, "devices/dev-2/telemetry/temp", False),
        (DEV1, Action.SUBSCRIBE, "devices/dev-1/#", True),
        (DEV1, Action.SUBSCRIBE, "devices/+/commands/#", False),
        (DEV1, Action.SUBSCRIBE, "#", False),
        (DEV1, Action.SUBSCRIBE, "$SYS/#", False),
        (SINK, Action.SUBSCRIBE, "devices/+/telemetry/#", True),
        (SINK, Action.SUBSCRIBE, "devices/dev-1/state", True),
        (SINK, Action.SUBSCRIBE, "devices/+/#", False),
        (SINK, Action.PUBLISH, "devices/dev-1/commands/reboot", True),
        (SINK, Action.PUBLISH, "devices/dev-1/telemetry/t", False),
        (SINK, Action.SUBSCRIBE, "devices/+/certs/csr", False),
        (RENEWAL, Action.SUBSCRIBE, "devices/+/certs/csr", True),
        (RENEWAL, Action.PUBLISH, "devices/dev-1/certs/issued", True),
        (SINK, Action.RECEIVE, "devices/dev-1/telemetry/x/y", True),
        (SINK, Action.RECEIVE, "devices/dev-1/commands/x", False),
    ],
)
def test_default_policy_is_the_design_table(
    who: Identity, action: Action, topic: str, allowed: bool
) -> None:
    """Each grant of the default table, with the neighbouring topics it must not grant."""
    assert default_policy().decide(who, action, topic).allowed is allowed


def test_device_publish_to_own_subtree_root_follows_hash_parent_rule() -> None:
    """'devices/{id}/#' matches 'devices/{id}' itself (MQTT-4.7.1-2), so the grant includes it."""
    assert default_policy().decide(DEV1, Action.PUBLISH, "devices/dev-1").allowed


def test_decision_names_the_rule() -> None:
    """explain's data: the rule and concrete grant that allowed, or why nothing did."""
    yes = default_policy().decide(SINK, Action.SUBSCRIBE, "devices/+/telemetry/temp")
    assert (yes.rule, yes.grant) == ("service-fleet-io", "devices/+/telemetry/#")
    no = default_policy().decide(DEV1, Action.SUBSCRIBE, "devices/dev-2/#")
    assert no.rule is None
    assert "denied by default" in no.reason


def test_plus_grant_does_not_allow_hash_subscription(tmp_path: Path) -> None:
    """amqtt's topic_ac lets a '+' grant admit a '#' filter; containment does not."""
    path = tmp_path / "p.toml"
    path.write_text(
        'version = 1\n[[rule]]\nname = "one-level"\nkind = "device"\n'
        'subscribe = ["devices/{device_id}/+"]\n'
    )
    policy = load_policy(path)
    assert policy.decide(DEV1, Action.SUBSCRIBE, "devices/dev-1/x").allowed
    assert not policy.decide(DEV1, Action.SUBSCRIBE, "devices/dev-1/#").allowed


def test_names_restrict_a_rule(tmp_path: Path) -> None:
    """`names` limits a rule to listed identities; others fall through to deny."""
    path = tmp_path / "p.toml"
    path.write_text(
        'version = 1\n[[rule]]\nname = "ops"\nkind = "service"\nnames = ["ops"]\n'
        'subscribe = ["#"]\n'
    )
    policy = load_policy(path)
    assert policy.decide(Identity.service("ops", "fleet.example"), Action.SUBSCRIBE, "#").allowed
    assert not policy.decide(SINK, Action.SUBSCRIBE, "#").allowed
    # '#' never covers '$' topics, even for a service granted '#'.
    assert not policy.decide(
        Identity.service("ops", "fleet.example"), Action.SUBSCRIBE, "$SYS/#"
    ).allowed


def test_empty_policy_denies_everything(tmp_path: Path) -> None:
    """Deny by default: no rules, no rights."""
    path = tmp_path / "p.toml"
    path.write_text("version = 1\n")
    assert not load_policy(path).decide(DEV1, Action.PUBLISH, "devices/dev-1/x").allowed


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "version = 1"),
        ("version = 1\n[[rule]]\nname='x'\nkind='robot'\n", "'kind'"),
        ("version = 1\n[[rule]]\nname='x'\nkind='any'\npublish=['a/{owner}']\n", "owner"),
        ("version = 1\n[[rule]]\nname='x'\nkind='service'\npublish=['d/{device_id}']\n", "device"),
        ("version = 1\n[[rule]]\nname='x'\nkind='any'\npublish=['a/#/b']\n", "'#'"),
        ("version = 1\n[[rule]]\nname='x'\nkind='any'\npublsh=['a']\n", "publsh"),
        ("version = 1\n[[rule]]\nname='x'\nkind='any'\n[[rule]]\nname='x'\nkind='any'\n", "dup"),
        ("version = 1\n[[rule]]\nname='x'\nkind='any'\nnames=['Bad']\n", "upper-case"),
        ("version = [", "Invalid value"),
    ],
)
def test_bad_policy_files_are_refused_with_a_reason(
    tmp_path: Path, text: str, fragment: str
) -> None:
    """Every mistake is a one-line PolicyError that names the file (and rule)."""
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(path) in str(err.value)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


# -- broker explain ------------------------------------------------------------------------------


def _explain(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(broker_app, ["explain", *args])
    return result.exit_code, result.stdout, result.stderr


def test_explain_prints_decision_and_rule(pki_dir: Path, pki: object) -> None:
    """ALLOW names the rule and grant; DENY says why; the exit status tells them apart."""
    code, out, _ = _explain(
        "--pki", str(pki_dir), "--identity", "dev-0001", "--subscribe", "devices/dev-0001/#"
    )
    assert code == 0
    assert "ALLOW" in out
    assert "device-subtree" in out
    code, out, _ = _explain(
        "--pki", str(pki_dir), "--identity", "dev-0001", "--subscribe", "devices/dev-0002/#"
    )
    assert code == 2
    assert "DENY" in out
    code, out, _ = _explain(
        "--pki",
        str(pki_dir),
        "--identity",
        "sink",
        "--service",
        "--publish",
        "devices/dev-0001/commands/reboot",
    )
    assert code == 0
    assert "service-fleet-io" in out


def test_explain_notes_an_identity_the_broker_would_refuse_first(
    pki_dir: Path, pki: PKI, tmp_path: Path
) -> None:
    """The ACL is the last check: for an identity without an active certificate (unknown,
    revoked, or of the other kind) explain says the TLS handshake refuses it before any ACL."""
    pki.issue("dev-live", out=tmp_path / "live")
    pki.issue("dev-gone", out=tmp_path / "gone")
    pki.revoke("dev-gone", reason="key-compromise")
    pki.issue("sink", kind=IdentityKind.SERVICE, out=tmp_path / "sink")
    cases = {
        "dev-live": None,
        "dev-gone": "the newest is revoked",
        "dev-never": "is not in the registry",
        "sink": "add --service",
    }
    for name, fragment in cases.items():
        topic = f"devices/{name}/telemetry/t"
        code, out, _ = _explain("--pki", str(pki_dir), "--identity", name, "--publish", topic)
        assert code == 0, out  # the policy's own answer is unchanged
        notes = [line for line in out.splitlines() if line.strip().startswith("note:")]
        if fragment is None:
            assert notes == [], out
        else:
            assert len(notes) == 1, out
            assert fragment in notes[0]
            assert "refuses it at the TLS handshake, before any ACL" in notes[0]
        code, out, _ = _explain(
            "--pki", str(pki_dir), "--identity", name, "--publish", topic, "--json"
        )
        doc = json.loads(out)
        assert doc["allowed"] is True
        assert doc["rule"] == "device-subtree"
        assert len(doc["warnings"]) == (0 if fragment is None else 1)


def test_explain_uses_a_policy_file(pki_dir: Path, pki: object, tmp_path: Path) -> None:
    """--policy replaces the default table."""
    path = tmp_path / "open.toml"
    path.write_text('version = 1\n[[rule]]\nname = "lab"\nkind = "device"\nsubscribe = ["lab/#"]\n')
    code, out, _ = _explain(
        "--pki", str(pki_dir), "--identity", "dev-1", "--subscribe", "lab/x", "--policy", str(path)
    )
    assert code == 0
    assert "'lab'" in out


@pytest.mark.parametrize(
    "args",
    [
        ["--identity", "Dev_1", "--publish", "a"],
        ["--identity", "dev-1"],
        ["--identity", "dev-1", "--publish", "a", "--subscribe", "b"],
        ["--identity", "dev-1", "--publish", "a", "--policy", "/nonexistent.toml"],
    ],
)
def test_explain_errors_are_one_line(pki_dir: Path, pki: object, args: list[str]) -> None:
    """Bad input: exit 1, one 'error:' line on stderr, no traceback."""
    code, _, err = _explain("--pki", str(pki_dir), *args)
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")


def test_explain_without_pki_is_one_line(tmp_path: Path) -> None:
    """A missing PKI directory is an error, not a traceback."""
    code, _, err = _explain("--pki", str(tmp_path / "none"), "--identity", "d", "--publish", "a")
    assert code == 1
    assert err.startswith("error:")
