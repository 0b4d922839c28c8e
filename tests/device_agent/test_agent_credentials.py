"""load_credentials: the facts it reads (checked against cryptography) and every refusal's twin.

The agent reads and checks its credential directory with the stdlib ``ssl`` alone (no
cryptography on a running device); these tests make sure nothing was lost on the way: each broken
directory is refused with a reason naming the file, and the good one next to it loads.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from device_agent import CredentialError, load_credentials
from provisioning.pki import PKI
from tests.device_agent.conftest import Creds


@dataclass
class Sources:
    """Where a breakage takes its wrong parts from: our PKI, or an unrelated one."""

    creds: Creds
    foreign: Path  # dev-1 issued by a different root with the same trust domain name


@pytest.fixture
def sources(creds: Creds, foreign_pki: PKI, tmp_path: Path) -> Sources:
    foreign_pki.issue("dev-1", out=tmp_path / "foreign")
    return Sources(creds, tmp_path / "foreign")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_facts_agree_with_cryptography(creds: Creds) -> None:
    store = creds("dev-1", broker="broker.local:8883")
    loaded = load_credentials(store)
    leaf = x509.load_pem_x509_certificates((store / "device.crt").read_bytes())[0]
    assert loaded.device_id == "dev-1"
    assert loaded.identity.spiffe_id == "spiffe://fleet.example/device/dev-1"
    assert loaded.serial == format(leaf.serial_number, "x")
    assert loaded.not_before == leaf.not_valid_before_utc
    assert loaded.not_after == leaf.not_valid_after_utc
    assert loaded.broker == "broker.local:8883"
    assert not loaded.expired()
    assert loaded.context().verify_mode.name == "CERT_REQUIRED"


@pytest.mark.parametrize(
    ("now", "expired"),
    [
        (dt.datetime.now(dt.UTC) - dt.timedelta(days=30), True),
        # Not yet valid (a device clock behind the CA's): still loads, the broker will judge.
        (dt.datetime.now(dt.UTC) + dt.timedelta(days=30), False),
    ],
)
def test_dates_are_reported_not_refused(
    pki: PKI, tmp_path: Path, now: dt.datetime, expired: bool
) -> None:
    """An expired certificate loads, so the agent can say 'expired at ...' instead of failing."""
    pki.issue("dev-old", out=tmp_path / "old", now=now, days=1)
    loaded = load_credentials(tmp_path / "old")
    assert loaded.expired() is expired
    assert loaded.not_after - loaded.not_before == dt.timedelta(days=1, minutes=5)


def _key_of_another_device(store: Path, src: Sources) -> None:
    shutil.copy(src.creds("dev-2") / "device.key", store / "device.key")


def _foreign_trust_anchor(store: Path, src: Sources) -> None:
    shutil.copy(src.foreign / "ca.crt", store / "ca.crt")


def _foreign_chain(store: Path, src: Sources) -> None:
    for name in ("device.crt", "device.key"):
        shutil.copy(src.foreign / name, store / name)


def _identity_of_another_device(store: Path, src: Sources) -> None:
    shutil.copy(src.creds("dev-2") / "identity.json", store / "identity.json")


def _leaf_only(store: Path, src: Sources) -> None:
    leaf = x509.load_pem_x509_certificates((store / "device.crt").read_bytes())[0]
    (store / "device.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))


def _missing_key(store: Path, src: Sources) -> None:
    (store / "device.key").unlink()


def _missing_trust_anchor(store: Path, src: Sources) -> None:
    (store / "ca.crt").unlink()


def _encrypted_key(store: Path, src: Sources) -> None:
    key = serialization.load_pem_private_key((store / "device.key").read_bytes(), None)
    (store / "device.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )


def _garbage_key(store: Path, src: Sources) -> None:
    (store / "device.key").write_bytes(b"not a key\n")


def _server_auth_only(store: Path, src: Sources) -> None:
    other = src.creds("dev-3", extended_key_usage=[ExtendedKeyUsageOID.SERVER_AUTH])
    for name in ("device.crt", "device.key", "identity.json"):
        shutil.copy(other / name, store / name)


def _service_identity(store: Path, src: Sources) -> None:
    shutil.copy(src.creds("svc", service=True) / "identity.json", store / "identity.json")


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        (_key_of_another_device, "device.key does not belong to device.crt"),
        (_foreign_trust_anchor, "ca.crt does not accept device.crt as a client certificate"),
        (_foreign_chain, "ca.crt does not accept device.crt as a client certificate"),
        (_identity_of_another_device, "certificate SAN URI is"),
        (_leaf_only, "device.crt must hold the leaf and the issuing CA"),
        (_missing_key, "device.key is missing"),
        (_missing_trust_anchor, "ca.crt is missing"),
        (_encrypted_key, "device.key is encrypted"),
        (_garbage_key, "cannot load device.crt / device.key"),
        (_server_auth_only, "unsuitable certificate purpose"),
        (_service_identity, "is a service, not a device"),
    ],
)
def test_broken_directories_are_refused_with_the_reason(
    sources: Sources, tmp_path: Path, breakage: Callable[[Path, Sources], None], reason: str
) -> None:
    store = _copy(sources.creds("dev-1"), tmp_path / "broken")
    assert load_credentials(store).device_id == "dev-1"  # the twin that loads
    breakage(store, sources)
    with pytest.raises(CredentialError) as caught:
        load_credentials(store)
    message = str(caught.value)
    assert reason in message, message
    assert str(store) in message
    assert "\n" not in message


def test_identity_json_problems(creds: Creds, tmp_path: Path) -> None:
    store = _copy(creds("dev-1"), tmp_path / "s")
    (store / "identity.json").write_text("[]")
    with pytest.raises(CredentialError, match="not a JSON object"):
        load_credentials(store)
    (store / "identity.json").write_text(json.dumps({"spiffe_id": "spiffe://x/device/UPPER"}))
    with pytest.raises(CredentialError, match=r"identity\.json: invalid"):
        load_credentials(store)
    (store / "identity.json").unlink()
    with pytest.raises(CredentialError, match="not provisioned"):
        load_credentials(store)
