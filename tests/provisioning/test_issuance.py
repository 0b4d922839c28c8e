"""Issuance: the device and service profiles, CSR policy, and nothing written on refusal."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning.errors import (
    CSRRejectedError,
    DeviceExistsError,
    InvalidIdentityError,
    PKIError,
    RegistryError,
)
from provisioning.identity import IdentityKind
from provisioning.pki import PKI
from tests.conftest import openssl, openssl_verify


@pytest.fixture
def pki(backend_pki: PKI) -> PKI:
    """Issuance holds on both registries (SQLite and PostgreSQL)."""
    return backend_pki


def _ledger(pki: PKI) -> list[str]:
    """The ledger's hashes, wherever it lives (file or database)."""
    return [e.hash for _, e in pki.ledger.entries()]


def _leaf(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def test_device_credentials_follow_the_profile(pki: PKI, pki_dir: Path, tmp_path: Path) -> None:
    """CN, SPIFFE SAN, clientAuth, digitalSignature, CA:FALSE critical, SKI/AKI, back-dated."""
    out = tmp_path / "creds" / "dev-0001"
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    issued = pki.issue(
        "dev-0001", out=out, hardware_serial="SN-123", broker="broker.test:8883", now=now
    )

    assert sorted(p.name for p in out.iterdir()) == [
        "ca.crt",
        "chain.crt",
        "device.crt",
        "device.key",
        "identity.json",
    ]
    assert stat.S_IMODE((out / "device.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    chain = x509.load_pem_x509_certificates((out / "device.crt").read_bytes())
    assert chain[1] == pki.issuing
    assert x509.load_pem_x509_certificate((out / "chain.crt").read_bytes()) == pki.issuing
    assert x509.load_pem_x509_certificate((out / "ca.crt").read_bytes()) == pki.root
    key = serialization.load_pem_private_key((out / "device.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert key.public_key() == chain[0].public_key()
    assert json.loads((out / "identity.json").read_text()) == {
        "kind": "device",
        "device_id": "dev-0001",
        "trust_domain": "fleet.example",
        "spiffe_id": "spiffe://fleet.example/device/dev-0001",
        "broker": "broker.test:8883",
    }

    cert = chain[0]
    assert cert == issued.certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-0001"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://fleet.example/device/dev-0001"
    ]
    assert san.get_values_for_type(x509.DNSName) == []
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not ku.value.key_cert_sign
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert not bc.value.ca
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    issuer_ski = pki.issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski.digest
    assert aki.key_identifier == issuer_ski.digest
    assert cert.not_valid_before_utc == now - dt.timedelta(minutes=5)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == dt.timedelta(days=90, minutes=5)

    record = pki.registry.active("dev-0001")
    assert record is not None
    assert record.hardware_serial == "SN-123"
    assert record.serial == format(cert.serial_number, "x")
    assert record.fingerprint == cert.fingerprint(hashes.SHA256()).hex()

    assert openssl_verify(pki_dir, out / "device.crt").returncode == 0
    assert openssl_verify(pki_dir, out / "device.crt", purpose="sslserver").returncode != 0


def test_service_certificate_profile(pki: PKI, pki_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "svc"
    pki.issue("telemetry-sink", kind=IdentityKind.SERVICE, out=out)
    cert = _leaf(out / "device.crt")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://fleet.example/service/telemetry-sink"
    ]
    assert json.loads((out / "identity.json").read_text())["service_name"] == "telemetry-sink"
    assert openssl_verify(pki_dir, out / "device.crt").returncode == 0


def test_validity_is_configurable(pki: PKI) -> None:
    issued = pki.issue("dev-short", days=7)
    cert = issued.certificate
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=7, minutes=5)


def _openssl_csr(tmp_path: Path, *newkey: str, subj: str = "/CN=evil") -> bytes:
    key, csr = tmp_path / "k.pem", tmp_path / "r.csr"
    result = openssl(
        "req", "-new", "-nodes", *newkey, "-keyout", key, "-out", csr, "-subj", subj,
        "-addext", "subjectAltName=URI:spiffe://fleet.example/service/admin,DNS:evil.example",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return csr.read_bytes()


def test_csr_from_openssl_gets_the_station_identity_not_its_own(
    pki: PKI, pki_dir: Path, tmp_path: Path
) -> None:
    """A CSR asking for CN=evil and a service SAN still gets CN=dev-7 and the device SAN."""
    csr = _openssl_csr(tmp_path, "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256")
    issued = pki.issue("dev-7", csr=csr, out=tmp_path / "dev-7")
    cert = issued.certificate
    assert cert.subject.rfc4514_string() == "CN=dev-7"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://fleet.example/device/dev-7")]
    assert not (tmp_path / "dev-7" / "device.key").exists(), "key stays on the device"
    assert issued.key_pem is None
    record = pki.registry.active("dev-7")
    assert record is not None
    assert record.key_origin == "csr"
    # openssl agrees the certificate carries the CSR's key.
    pub_from_cert = openssl("x509", "-in", tmp_path / "dev-7" / "device.crt", "-noout", "-pubkey")
    pub_from_key = openssl("pkey", "-in", tmp_path / "k.pem", "-pubout")
    assert pub_from_cert.stdout == pub_from_key.stdout
    assert openssl_verify(pki_dir, tmp_path / "dev-7" / "device.crt").returncode == 0


@pytest.mark.parametrize(
    "newkey",
    [
        ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"),
        ("-newkey", "ed25519"),
        ("-newkey", "rsa:2048"),
    ],
    ids=["p384", "ed25519", "rsa2048"],
)
def test_acceptable_csr_keys(
    pki: PKI, pki_dir: Path, tmp_path: Path, newkey: tuple[str, ...]
) -> None:
    csr = _openssl_csr(tmp_path, *newkey)
    pki.issue("dev-ok", csr=csr, out=tmp_path / "out")
    assert openssl_verify(pki_dir, tmp_path / "out" / "device.crt").returncode == 0


@pytest.mark.parametrize(
    ("newkey", "reason"),
    [
        (("-newkey", "rsa:1024"), "1024 bits is too weak"),
        (("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp256k1"), "secp256k1 is not allowed"),
        (("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"), "secp521r1 is not allowed"),
        (("-newkey", "ed448"), "not allowed"),
    ],
    ids=["rsa1024", "secp256k1", "p521", "ed448"],
)
def test_weak_or_exotic_csr_keys_are_refused(
    pki: PKI, pki_dir: Path, tmp_path: Path, newkey: tuple[str, ...], reason: str
) -> None:
    csr = _openssl_csr(tmp_path, *newkey)
    ledger_before = _ledger(pki)
    with pytest.raises(CSRRejectedError, match=reason):
        pki.issue("dev-weak", csr=csr, out=tmp_path / "out" / "dev-weak")
    assert pki.registry.count() == 0
    assert _ledger(pki) == ledger_before
    assert not (tmp_path / "out").exists()


def _signed_csr(key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")]))
        .sign(key, hashes.SHA256())
    )


def test_csr_with_a_bad_signature_is_refused(pki: PKI, pki_dir: Path, tmp_path: Path) -> None:
    """A CSR whose signature does not verify proves nothing about the key: refused."""
    csr = _signed_csr(ec.generate_private_key(ec.SECP256R1()))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the ECDSA signature's last integer
    with pytest.raises(CSRRejectedError, match="signature does not verify"):
        pki.issue("dev-1", csr=bytes(der), out=tmp_path / "out")
    # Signed by one key but carrying another's public key (someone else's key, say): refused.
    victim = ec.generate_private_key(ec.SECP256R1()).public_key()
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    own = csr.public_key().public_bytes(*spki)
    spliced = csr.public_bytes(serialization.Encoding.DER).replace(own, victim.public_bytes(*spki))
    with pytest.raises(CSRRejectedError, match="signature does not verify"):
        pki.issue("dev-1", csr=spliced, out=tmp_path / "out")
    with pytest.raises(CSRRejectedError, match="not a PEM or DER"):
        pki.issue("dev-1", csr=b"-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n")
    assert pki.registry.count() == 0
    assert not (tmp_path / "out").exists()


def test_ed25519_and_rsa_keys_from_python_csrs(pki: PKI) -> None:
    ed = ed25519.Ed25519PrivateKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(ed, None)
        .public_bytes(serialization.Encoding.PEM)
    )
    assert pki.issue("dev-ed", csr=csr).certificate.public_key() == ed.public_key()
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(weak, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(CSRRejectedError, match="too weak"):
        pki.issue("dev-rsa", csr=weak_csr)


@pytest.mark.parametrize("bad", ["", "Dev-1", "a/b", "x" * 65, "-x", "d\x00v", "dév", "a b", "#"])
def test_invalid_ids_write_nothing(pki: PKI, pki_dir: Path, tmp_path: Path, bad: str) -> None:
    ledger_before = _ledger(pki)
    with pytest.raises(InvalidIdentityError):
        pki.issue(bad, out=tmp_path / "creds" / "x")
    assert pki.registry.count() == 0
    assert _ledger(pki) == ledger_before
    assert not (tmp_path / "creds").exists()


def test_reissue_needs_rotate_and_rotation_revokes_the_old(
    pki: PKI, pki_dir: Path, tmp_path: Path
) -> None:
    first = pki.issue("dev-1", out=tmp_path / "a")
    with pytest.raises(DeviceExistsError, match="--rotate"):
        pki.issue("dev-1", out=tmp_path / "b")
    assert not (tmp_path / "b").exists()
    second = pki.issue("dev-1", out=tmp_path / "b", rotate=True)
    history = pki.registry.history("dev-1")
    assert [r.status for r in history] == ["revoked", "active"]
    assert history[0].revocation_reason == "superseded"
    assert history[0].serial == first.record.serial
    assert history[1].serial == second.record.serial
    assert openssl_verify(pki_dir, tmp_path / "a" / "device.crt", crl=True).returncode != 0
    assert openssl_verify(pki_dir, tmp_path / "b" / "device.crt", crl=True).returncode == 0


def test_device_and_service_names_never_collide(pki: PKI) -> None:
    pki.issue("shared-name", kind=IdentityKind.SERVICE)
    with pytest.raises(RegistryError, match="must not collide"):
        pki.issue("shared-name")
    with pytest.raises(RegistryError, match="must not collide"):
        pki.issue("shared-name", rotate=True)


def test_hardware_serial_is_unique_among_active_devices(pki: PKI) -> None:
    pki.issue("dev-1", hardware_serial="HW-1")
    with pytest.raises(RegistryError, match="HW-1"):
        pki.issue("dev-2", hardware_serial="HW-1")
    with pytest.raises(InvalidIdentityError, match="hardware serial"):
        pki.issue("dev-3", hardware_serial="has space")
    assert pki.registry.active("dev-2") is None


def test_existing_credential_directory_is_never_overwritten(pki: PKI, tmp_path: Path) -> None:
    out = tmp_path / "creds"
    out.mkdir()
    (out / "device.key").write_text("precious")
    with pytest.raises(PKIError, match="refusing to overwrite"):
        pki.issue("dev-1", out=out)
    assert (out / "device.key").read_text() == "precious"
    assert pki.registry.count() == 0


def test_batch_issuance_is_one_transaction(pki: PKI, tmp_path: Path) -> None:
    issued = pki.issue_many(
        [f"dev-{n}" for n in range(20)], out_dirs=[tmp_path / f"d{n}" for n in range(20)]
    )
    assert len(issued) == 20
    assert pki.registry.count() == 20
    assert len({i.record.serial for i in issued}) == 20
    # A batch that collides with an existing id changes nothing at all.
    with pytest.raises(DeviceExistsError):
        pki.issue_many(["dev-new", "dev-3"], out_dirs=[tmp_path / "x1", tmp_path / "x2"])
    assert pki.registry.count() == 20
    assert not (tmp_path / "x1").exists()


def test_two_phase_issuance_records_only_when_asked(pki: PKI, pki_dir: Path) -> None:
    """prepare() signs and records nothing; record() adds the row and a ledger line with details."""
    ledger_before = _ledger(pki)
    prepared = pki.prepare("dev-1", hardware_serial="HW-9")
    assert pki.registry.count() == 0
    assert _ledger(pki) == ledger_before
    record = pki.record(prepared, details={"port": "loop://", "verified": ["cert"]})
    assert record.serial == format(prepared.certificate.serial_number, "x")
    last = [e for _, e in pki.ledger.entries()][-1]
    assert last.event == "issue"
    assert last.data["port"] == "loop://"
    assert last.data["hardware_serial"] == "HW-9"
    assert pki.verify_ledger().entries == 2


def test_void_puts_an_unrecorded_certificate_on_the_crl(
    pki: PKI, pki_dir: Path, tmp_path: Path
) -> None:
    """A certificate that may have reached a device that then failed is revoked, not forgotten."""
    prepared = pki.prepare("dev-1")
    (tmp_path / "leaf.crt").write_bytes(prepared.cert_chain_pem)
    record = pki.void(prepared, details={"failure": "LOCK timed out"})
    assert record.status == "revoked"
    assert pki.registry.active("dev-1") is None
    assert openssl_verify(pki_dir, tmp_path / "leaf.crt", crl=True).returncode != 0
    assert pki.verify_ledger().entries == 3
    pki.issue("dev-1")  # the id is free again


def test_a_name_never_changes_kind_even_after_revocation(pki: PKI) -> None:
    pki.issue("shared", kind=IdentityKind.SERVICE)
    pki.revoke("shared", kind=IdentityKind.SERVICE)
    with pytest.raises(RegistryError, match="even after revocation"):
        pki.issue("shared")
    pki.issue("shared", kind=IdentityKind.SERVICE)  # the same kind may come back
