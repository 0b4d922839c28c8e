"""`ca init`: root, issuing CA and server certificate, judged by openssl; key files and modes."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from provisioning.errors import PassphraseError, PKIError, PKIExistsError
from provisioning.pki import PKI
from tests.conftest import openssl, openssl_verify


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_the_documented_layout(pki: PKI, pki_dir: Path) -> None:
    """Every file of the documented PKI directory exists; private keys are 0600 in a 0700 dir."""
    for name in ("pki.toml", "root.crt", "issuing.crt", "server.crt", "crl.pem", "ledger.jsonl"):
        assert (pki_dir / name).is_file(), name
    assert (pki_dir / "registry.sqlite3").is_file()
    assert _mode(pki_dir / "private") == 0o700
    for key in ("root.key", "issuing.key", "server.key"):
        assert _mode(pki_dir / "private" / key) == 0o600
        assert b"ENCRYPTED" not in (pki_dir / "private" / key).read_bytes()
    assert not list(pki_dir.parent.glob(".pki.tmp-*")), "staging directory left behind"


def test_ca_chain_and_server_cert_pass_openssl(pki: PKI, pki_dir: Path) -> None:
    """The issuing CA chains to the root; the server cert is good for sslserver, not sslclient."""
    result = openssl("verify", "-CAfile", pki_dir / "root.crt", pki_dir / "issuing.crt")
    assert result.returncode == 0, result.stderr
    assert openssl_verify(pki_dir, pki_dir / "server.crt", purpose="sslserver").returncode == 0
    assert openssl_verify(pki_dir, pki_dir / "server.crt", purpose="sslclient").returncode != 0


def test_ca_profiles(pki: PKI, pki_dir: Path) -> None:
    """CA:TRUE with path lengths 1 and 0, P-256 keys, server SANs include localhost and extras."""
    root, issuing = pki.root, pki.issuing
    for cert, pathlen in ((root, 1), (issuing, 0)):
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical
        assert bc.value.ca
        assert bc.value.path_length == pathlen
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert ku.key_cert_sign
        assert ku.crl_sign
        assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    server = x509.load_pem_x509_certificates((pki_dir / "server.crt").read_bytes())
    assert len(server) == 2
    assert server[1] == issuing
    san = server[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "broker.test"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = server[0].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_initial_crl_is_signed_by_the_issuing_ca(pki: PKI, pki_dir: Path) -> None:
    result = openssl(
        "crl", "-in", pki_dir / "crl.pem", "-CAfile", pki_dir / "issuing.crt", "-noout"
    )
    assert result.returncode == 0
    assert "verify OK" in result.stderr + result.stdout
    info = pki.crl_info()
    assert info.number == 1
    assert info.revoked == 0
    assert info.this_update <= dt.datetime.now(dt.UTC)


def test_init_refuses_to_overwrite_an_existing_pki(pki: PKI, pki_dir: Path) -> None:
    before = (pki_dir / "private" / "root.key").read_bytes()
    with pytest.raises(PKIExistsError):
        PKI.init(pki_dir, trust_domain="other.example")
    assert (pki_dir / "private" / "root.key").read_bytes() == before


def test_init_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    target = tmp_path / "somewhere"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(PKIError, match="not empty"):
        PKI.init(target, trust_domain="fleet.example")
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]


def test_encrypted_keys_need_the_passphrase(tmp_path: Path) -> None:
    """With a passphrase every key is encrypted; issuing without it or with a wrong one fails."""
    pki_dir = tmp_path / "pki"
    PKI.init(pki_dir, trust_domain="fleet.example", passphrase=b"correct horse").close()
    for key in ("root.key", "issuing.key", "server.key"):
        assert b"ENCRYPTED" in (pki_dir / "private" / key).read_bytes()
    with PKI.open(pki_dir) as ca, pytest.raises(PassphraseError, match="IOTAUTH_CA_PASSPHRASE"):
        ca.issue("dev-1")
    with (
        PKI.open(pki_dir, passphrase=b"wrong") as ca,
        pytest.raises(PassphraseError, match="wrong"),
    ):
        ca.issue("dev-1")
    with PKI.open(pki_dir, passphrase=b"correct horse") as ca:
        assert ca.registry.count() == 0
        ca.issue("dev-1", out=tmp_path / "creds")
    # The device's own key is for a machine without an operator: never encrypted.
    assert b"ENCRYPTED" not in (tmp_path / "creds" / "device.key").read_bytes()


def test_root_key_can_be_moved_offline(pki: PKI, pki_dir: Path, tmp_path: Path) -> None:
    """Issuance, revocation and CRLs need only the issuing CA."""
    (pki_dir / "private" / "root.key").rename(tmp_path / "root.key.offline")
    with PKI.open(pki_dir) as ca:
        ca.issue("dev-1", out=tmp_path / "dev-1")
        ca.revoke("dev-1", reason="key-compromise")
        assert ca.refresh_crl().number == 3
    assert openssl_verify(pki_dir, tmp_path / "dev-1" / "device.crt").returncode == 0
