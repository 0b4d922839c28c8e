"""``iotauth fleet simulate`` leaves the user's PKI alone unless told otherwise (issue 17, item 4).

By default the simulation issues into a scratch PKI of its own; ``--into-pki`` issues into the
given one after a warning, refuses names that are active there, and revokes what it issued when
it ends. Progress goes to stderr, the report (``--json``) to stdout. ``IOTAUTH_PKI`` is honoured.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

from broker.server import BrokerThread
from provisioning.pki import PKI
from tests.conftest import Result, assert_one_line_error

FAST = ("--devices", "3", "--duration", "3", "--telemetry-interval", "0.5", "--reactors", "1")


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_default_simulation_leaves_the_users_pki_byte_identical(
    pki: PKI, cli: Callable[..., Result]
) -> None:
    """--pki from IOTAUTH_PKI; registry, ledger, CRL and every other file unchanged after a run."""
    pki.issue("sim-0000", out=pki.path.parent / "creds" / "sim-0000")  # a real device, same name
    before = _tree(pki.path)
    result = cli(
        "fleet", "simulate", *FAST, "--json", env={"IOTAUTH_PKI": str(pki.path)}, check=True
    )
    report = json.loads(result.stdout)
    assert report["online_at_end"] == 3, result.stdout
    assert report["messages_acked"] > 0, result.stdout
    assert sum(report["protocols"].values()) == 3, result.stdout  # devices per MQTT version
    assert "scratch PKI" in result.stderr
    assert re.search(r"online \d/3  messages acked \d+", result.stderr), result.stderr  # progress
    assert _tree(pki.path) == before
    assert pki.registry.active("sim-0000") is not None  # the real device was not superseded


def test_simulation_refuses_a_pki_that_does_not_exist(
    tmp_path: Path, cli: Callable[..., Result]
) -> None:
    result = cli("fleet", "simulate", "--pki", str(tmp_path / "nope"), *FAST, check=False)
    assert_one_line_error(result, "not a PKI directory")


def test_an_external_broker_needs_into_pki(pki: PKI, cli: Callable[..., Result]) -> None:
    """A broker the user runs trusts its PKI, not a scratch one: say what to add, change nothing."""
    before = _tree(pki.path)
    result = cli(
        "fleet", "simulate", "--pki", str(pki.path), "--broker", "127.0.0.1:1", *FAST, check=False
    )
    assert_one_line_error(result, "127.0.0.1:1", "--into-pki")
    assert _tree(pki.path) == before


def test_into_pki_warns_issues_and_revokes_at_the_end(
    pki: PKI, cli: Callable[..., Result], start_broker: Callable[..., BrokerThread]
) -> None:
    """Against a broker the user runs on that PKI: the devices connect, then are retired."""
    broker = start_broker(renewal=False)
    result = cli(
        "fleet", "simulate", "--pki", str(pki.path), "--into-pki",
        "--broker", f"127.0.0.1:{broker.port}", *FAST, check=True,
    )  # fmt: skip
    assert "warning: issuing 3 simulated devices" in result.stderr, result.stderr
    assert "online at end        3/3" in result.stdout, result.stdout
    for name in ("sim-0000", "sim-0001", "sim-0002", "fleet-monitor"):
        history = pki.registry.history(name)
        assert history, name
        assert all(r.status == "revoked" for r in history), name
        assert {r.revocation_reason for r in history} == {"cessation-of-operation"}
    assert cli("ledger", "verify", "--pki", str(pki.path)).returncode == 0
    # Revoked names are free again: a second run issues afresh and supersedes nothing.
    again = cli(
        "fleet", "simulate", "--pki", str(pki.path), "--into-pki",
        "--broker", f"127.0.0.1:{broker.port}", *FAST, check=True,
    )  # fmt: skip
    assert "superseded" not in {r.revocation_reason for r in pki.registry.history("sim-0000")}
    assert "online at end        3/3" in again.stdout


def test_into_pki_refuses_names_it_would_supersede(pki: PKI, cli: Callable[..., Result]) -> None:
    pki.issue("sim-0001", out=pki.path.parent / "creds" / "sim-0001")
    before = _tree(pki.path)
    rows = pki.registry.all()
    result = cli("fleet", "simulate", "--pki", str(pki.path), "--into-pki", *FAST, check=False)
    assert_one_line_error(result, "sim-0001", "supersede")
    # Opening the registry (to find the names) may fold SQLite's WAL into the database file, so
    # the registry is compared by its rows; every other file by its bytes.
    assert pki.registry.all() == rows
    after = _tree(pki.path)
    for name in ("registry.sqlite3", "registry.sqlite3-wal", "registry.sqlite3-shm"):
        before.pop(name, None)
        after.pop(name, None)
    assert after == before


def test_mqtt5_share_out_of_range_is_a_one_line_error(cli: Callable[..., Result]) -> None:
    result = cli("fleet", "simulate", *FAST, "--mqtt5-share", "1.5")
    assert_one_line_error(result, "--mqtt5-share", "from 0 to 1")
