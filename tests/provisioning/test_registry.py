"""The registry under concurrency, and its records: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from provisioning.errors import UnknownDeviceError
from provisioning.identity import IdentityKind
from provisioning.pki import PKI


@pytest.fixture
def pki(backend_pki: PKI) -> PKI:
    return backend_pki


WORKER = """
import sys
from pathlib import Path
from provisioning.errors import DeviceExistsError
from provisioning.pki import PKI

pki_dir, prefix, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
issued = refused = 0
with PKI.open(pki_dir) as ca:
    for n in range(count):
        try:
            ca.issue(f"{prefix}-{n}")
            issued += 1
        except DeviceExistsError:
            refused += 1
print(issued, refused)
"""


def _run_workers(pki_dir: Path, prefixes: list[str], count: int) -> list[tuple[int, int]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(pki_dir), prefix, str(count)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for prefix in prefixes
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr
        issued, refused = map(int, stdout.split())
        results.append((issued, refused))
    return results


@pytest.mark.slow
def test_two_processes_issue_300_each_and_lose_nothing(pki: PKI, pki_dir: Path) -> None:
    """600 rows, 600 issue entries, a valid chain, and serials and fingerprints all distinct."""
    assert _run_workers(pki_dir, ["a", "b"], 300) == [(300, 0), (300, 0)]
    rows = pki.registry.all()
    assert len(rows) == 600
    assert len({r.serial for r in rows}) == 600
    assert len({r.fingerprint for r in rows}) == 600
    report = pki.verify_ledger()
    assert report.entries == 1 + 600  # ca-init + issues
    assert report.warnings == []
    issues = [e for _, e in pki.ledger.entries() if e.event == "issue"]
    assert sorted(e.data["serial"] for e in issues) == sorted(r.serial for r in rows)


@pytest.mark.slow
def test_two_processes_racing_for_the_same_ids_create_no_duplicates(
    pki: PKI, pki_dir: Path
) -> None:
    results = _run_workers(pki_dir, ["same", "same"], 150)
    assert sum(issued for issued, _ in results) == 150
    assert sum(refused for _, refused in results) == 150
    assert pki.registry.count() == 150
    assert pki.verify_ledger().entries == 151


def test_listing_shows_the_newest_certificate_per_name(pki: PKI) -> None:
    pki.issue("dev-b")
    pki.issue("dev-a")
    pki.issue("dev-a", rotate=True)
    pki.issue("svc", kind=IdentityKind.SERVICE)
    devices = pki.registry.latest("device")
    assert [(r.name, r.status) for r in devices] == [("dev-a", "active"), ("dev-b", "active")]
    assert [r.name for r in pki.registry.latest("service")] == ["svc"]
    assert len(pki.registry.history("dev-a")) == 2


def test_revoking_unknown_or_revoked_devices_is_a_clear_error(pki: PKI) -> None:
    with pytest.raises(UnknownDeviceError, match="not in the registry"):
        pki.revoke("ghost")
    pki.issue("dev-1")
    pki.revoke("dev-1", reason="cessation-of-operation")
    with pytest.raises(UnknownDeviceError, match="no active certificate"):
        pki.revoke("dev-1")
    record = pki.registry.history("dev-1")[0]
    assert record.state() == "revoked"
    assert record.revocation_reason == "cessation-of-operation"


def test_revocation_updates_the_crl_monotonically(pki: PKI) -> None:
    pki.issue("dev-1")
    pki.issue("dev-2")
    first = pki.crl_info()
    pki.revoke("dev-1")
    second = pki.crl_info()
    pki.revoke("dev-2", reason="key-compromise")
    third = pki.refresh_crl()
    assert first.number < second.number < third.number
    assert first.this_update <= second.this_update <= third.this_update
    assert third.revoked == 2
    assert third.next_update > third.this_update
