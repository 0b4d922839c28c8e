"""The registry under concurrency, and its records: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from provisioning.errors import RegistryError, UnknownDeviceError
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


def test_revoking_a_name_as_the_wrong_kind_names_the_right_command(pki: PKI) -> None:
    """Both backends give the same reason (one ``nothing_to_revoke``); the twin: the right kind
    revokes it."""
    pki.issue("dev-1")
    with pytest.raises(
        UnknownDeviceError, match="is not a service but a device: use 'iotauth device revoke dev-1'"
    ):
        pki.revoke("dev-1", kind=IdentityKind.SERVICE)
    assert [r.state() for r in pki.registry.history("dev-1")] == ["active"]
    assert [r.name for r in pki.revoke("dev-1", kind=IdentityKind.DEVICE)] == ["dev-1"]


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


# -- service secrets: the SCRAM verifier only --------------------------------------------------


def test_a_service_secret_is_stored_as_its_scram_verifier_only(pki: PKI) -> None:
    import base64
    import hashlib
    import hmac

    from provisioning.errors import RegistryError
    from provisioning.service_secrets import check_secret

    secret, record, replaced = pki.set_service_secret("dashboard")
    assert replaced is None
    assert record.version == 1
    assert record.iterations >= 4096
    stored = pki.service_secret("dashboard")
    assert stored == record
    assert secret not in repr(stored)
    # RFC 5802 §3, checked independently of scramp: SaltedPassword = PBKDF2(secret, salt, i),
    # StoredKey = H(HMAC(SaltedPassword, "Client Key")), ServerKey = HMAC(SaltedPassword,
    # "Server Key").
    salted = hashlib.pbkdf2_hmac(
        "sha256", secret.encode(), base64.b64decode(record.salt), record.iterations
    )
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    assert base64.b64decode(record.stored_key) == hashlib.sha256(client_key).digest()
    assert base64.b64decode(record.server_key) == hmac.digest(salted, b"Server Key", "sha256")
    assert check_secret(record, secret)
    assert not check_secret(record, secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    # Rotation: a new salt and verifier, the version bumped; the old secret no longer verifies.
    secret2, record2, replaced2 = pki.set_service_secret("dashboard")
    assert (replaced2, record2.version) == (1, 2)
    assert record2.salt != record.salt
    assert check_secret(record2, secret2)
    assert not check_secret(record2, secret)
    # The ledger records creation and rotation, never the secret.
    entries = [e for _, e in pki.ledger.entries()]
    events = [(e.event, e.data.get("version")) for e in entries if e.event.startswith("secret")]
    assert events == [("secret-create", 1), ("secret-rotate", 2)]
    text = "\n".join(str(e) for e in entries)
    assert secret not in text
    assert secret2 not in text
    assert record2.stored_key not in text
    pki.verify_ledger()
    # Names stay unique across kinds: a device cannot take the service's name, nor the reverse.
    with pytest.raises(RegistryError, match="device ids and service names must not collide"):
        pki.issue("dashboard", kind=IdentityKind.DEVICE)
    pki.issue("dev-1", kind=IdentityKind.DEVICE)
    with pytest.raises(RegistryError, match="must not collide"):
        pki.set_service_secret("dev-1")
    # A service with a secret can also get a certificate (same name, same kind).
    pki.issue("dashboard", kind=IdentityKind.SERVICE)


def test_revoking_a_service_revokes_its_secret_with_or_without_a_certificate(pki: PKI) -> None:
    pki.set_service_secret("telegraf")
    assert pki.revoke("telegraf", kind=IdentityKind.SERVICE, reason="key-compromise") == []
    record = pki.service_secret("telegraf")
    assert record is not None
    assert record.status == "revoked"
    assert record.revoked_at is not None
    assert pki.registry.secret_states() == {"telegraf": (1, "revoked")}
    # Negative twin: a device name is not a service with a secret.
    pki.issue("dev-2", kind=IdentityKind.DEVICE)
    pki.revoke("dev-2", kind=IdentityKind.DEVICE)
    with pytest.raises(UnknownDeviceError):
        pki.revoke("nobody", kind=IdentityKind.SERVICE)
    # A new secret after revocation is a fresh version (sessions named #1 stay kicked).
    _, again, replaced = pki.set_service_secret("telegraf")
    assert (again.version, again.status, replaced) == (2, "active", None)


def test_a_hardware_serial_in_use_is_refused_and_the_batch_records_nothing(pki: PKI) -> None:
    """Only the registry's unique index knows: on PostgreSQL the refusal comes back from the
    pipelined insert, and must still be the one line, with nothing of the batch kept."""
    pki.issue("dev-a", hardware_serial="HW-1")
    count, entries = pki.registry.count(), pki.verify_ledger().entries
    with pytest.raises(RegistryError, match="hardware serial 'HW-1' already belongs to an active"):
        pki.issue("dev-b", hardware_serial="HW-1")
    with pytest.raises(RegistryError, match="hardware serial 'HW-1' already belongs to an active"):
        pki.issue_many(["dev-c", "dev-d"], hardware_serials=["HW-2", "HW-1"])
    assert pki.registry.count() == count
    assert pki.verify_ledger().entries == entries
    assert pki.registry.active("dev-c") is None
    # The positive twin: a free hardware serial is recorded.
    pki.issue("dev-c", hardware_serial="HW-2")
    assert pki.registry.active_by_hardware_serial("HW-2") is not None


# -- services registered by name alone (the oidc method) ----------------------------------------


def test_a_service_registered_by_name_holds_no_credential_and_revoke_undoes_it(pki: PKI) -> None:
    record = pki.register_service("node-red")
    assert (record.name, record.status, record.revoked_at) == ("node-red", "active", None)
    assert pki.service_registration("node-red") == record
    assert pki.registry.registration_states() == {"node-red": "active"}
    # No certificate and no secret: it holds no credential of ours.
    assert pki.registry.history("node-red") == []
    assert pki.service_secret("node-red") is None
    # Its name is a service's: a device cannot take it, and it cannot be registered twice.
    with pytest.raises(RegistryError, match="device ids and service names must not collide"):
        pki.issue("node-red", kind=IdentityKind.DEVICE)
    with pytest.raises(RegistryError, match=r"already registered .* 'iotauth service revoke"):
        pki.register_service("node-red")
    # Revoke undoes it (no certificate, no CRL row), and it can be registered again.
    assert pki.revoke("node-red", kind=IdentityKind.SERVICE) == []
    revoked = pki.service_registration("node-red")
    assert revoked is not None
    assert revoked.status == "revoked"
    assert revoked.revoked_at is not None
    assert pki.registry.registration_states() == {"node-red": "revoked"}
    assert pki.register_service("node-red").status == "active"
    # The ledger records each step, with nothing else in it.
    events = [(e.event, e.data.get("name")) for _, e in pki.ledger.entries()]
    assert events[-3:] == [
        ("service-register", "node-red"),
        ("service-unregister", "node-red"),
        ("service-register", "node-red"),
    ]
    pki.verify_ledger()


def test_register_refuses_a_service_or_device_that_already_exists(pki: PKI) -> None:
    pki.issue("grafana", kind=IdentityKind.SERVICE)
    pki.set_service_secret("dash")
    pki.issue("dev-1", kind=IdentityKind.DEVICE)
    count, entries = pki.registry.count(), len(list(pki.ledger.entries()))
    with pytest.raises(RegistryError, match=r"'grafana' is already registered .*a certificate"):
        pki.register_service("grafana")
    with pytest.raises(RegistryError, match=r"'dash' is already registered .*a secret"):
        pki.register_service("dash")
    with pytest.raises(RegistryError, match="must not collide"):
        pki.register_service("dev-1")
    # Nothing was written by the refusals.
    assert pki.registry.registration_states() == {}
    assert (pki.registry.count(), len(list(pki.ledger.entries()))) == (count, entries)
    # The twin: a revoked service (its secret revoked) may be registered by name.
    pki.revoke("dash", kind=IdentityKind.SERVICE)
    assert pki.register_service("dash").status == "active"
