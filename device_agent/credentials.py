"""Read a credential directory (DESIGN.md, "Files that others read") and check it before use.

The agent never trusts what it reads blindly: the key must belong to the certificate, the
certificate must name the device of ``identity.json`` (CN and SPIFFE SAN URI), and it must chain
through ``chain.crt`` to ``ca.crt``. These checks are local, so an expired or mismatched
credential is reported as such instead of as an opaque TLS failure.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from device_agent.errors import CredentialError
from provisioning.errors import InvalidIdentityError, PKIError
from provisioning.identity import Identity, IdentityKind, parse_spiffe_id
from provisioning.tls import client_context

__all__ = ["Credentials", "check_leaf", "load_credentials", "spiffe_uris"]


def spiffe_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def _common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else None
    return value if isinstance(value, str) else None


def check_leaf(
    leaf: x509.Certificate,
    *,
    identity: Identity,
    issuing: x509.Certificate,
    root: x509.Certificate,
) -> None:
    """Raise ValueError unless ``leaf`` names ``identity`` and chains issuing -> root."""
    if spiffe_uris(leaf) != [identity.spiffe_id]:
        msg = f"certificate SAN URI is {spiffe_uris(leaf)}, expected {identity.spiffe_id}"
        raise ValueError(msg)
    if _common_name(leaf) != identity.name:
        msg = f"certificate CN is {_common_name(leaf)!r}, expected {identity.name!r}"
        raise ValueError(msg)
    try:
        leaf.verify_directly_issued_by(issuing)
        issuing.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        msg = "certificate does not chain to the provisioned trust anchor (ca.crt)"
        raise ValueError(msg) from exc


@dataclass(frozen=True, slots=True)
class Credentials:
    """A checked credential directory (or the renewal candidate inside it)."""

    path: Path
    identity: Identity
    key_file: Path
    cert_file: Path
    ca_file: Path
    leaf: x509.Certificate
    broker: str | None

    @property
    def device_id(self) -> str:
        return self.identity.name

    @property
    def serial(self) -> str:
        return format(self.leaf.serial_number, "x")

    @property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    def renew_due(self, fraction: float) -> dt.datetime:
        """When ``fraction`` of the lifetime has passed (2/3 by default)."""
        return self.not_before + (self.not_after - self.not_before) * fraction

    def expired(self, now: dt.datetime | None = None) -> bool:
        return (now or dt.datetime.now(dt.UTC)) >= self.not_after

    def context(self, *, check_hostname: bool = True) -> ssl.SSLContext:
        try:
            return client_context(
                trust=self.ca_file,
                cert_chain=self.cert_file,
                key=self.key_file,
                check_hostname=check_hostname,
            )
        except PKIError as exc:
            raise CredentialError(str(self.path), str(exc)) from None

    def with_files(self, key_file: Path, cert_file: Path) -> Credentials:
        """The same device with another key and certificate (a renewal candidate), checked."""
        return _load(self.path, self.identity, key_file, cert_file, self.ca_file, self.broker)


def load_credentials(path: Path) -> Credentials:
    """Load and check ``path``; CredentialError says which file is wrong and why."""
    where = str(path)
    try:
        doc = json.loads((path / "identity.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CredentialError(where, "identity.json is missing (not provisioned?)") from None
    except (OSError, ValueError) as exc:
        raise CredentialError(where, f"identity.json is unreadable: {exc}") from None
    if not isinstance(doc, dict):
        raise CredentialError(where, "identity.json is not a JSON object")
    try:
        identity = parse_spiffe_id(str(doc.get("spiffe_id", "")))
    except InvalidIdentityError as exc:
        raise CredentialError(where, f"identity.json: {exc}") from None
    if identity.kind is not IdentityKind.DEVICE:
        raise CredentialError(where, f"{identity.spiffe_id} is a service, not a device")
    broker = doc.get("broker")
    return _load(
        path,
        identity,
        path / "device.key",
        path / "device.crt",
        path / "ca.crt",
        broker if isinstance(broker, str) else None,
    )


def _read_certs(path: Path, where: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except FileNotFoundError:
        raise CredentialError(where, f"{path.name} is missing") from None
    except (OSError, ValueError) as exc:
        raise CredentialError(where, f"{path.name} is not PEM certificates: {exc}") from None


def _load(
    path: Path,
    identity: Identity,
    key_file: Path,
    cert_file: Path,
    ca_file: Path,
    broker: str | None,
) -> Credentials:
    where = str(path)
    chain = _read_certs(cert_file, where)
    roots = _read_certs(ca_file, where)
    if len(chain) < 2:
        raise CredentialError(where, f"{cert_file.name} must hold the leaf and the issuing CA")
    leaf, issuing = chain[0], chain[1]
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except FileNotFoundError:
        raise CredentialError(where, f"{key_file.name} is missing") from None
    except (OSError, ValueError, TypeError) as exc:
        raise CredentialError(
            where, f"{key_file.name} is not an unencrypted PEM key: {exc}"
        ) from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, pub) != leaf.public_key().public_bytes(der, pub):
        raise CredentialError(where, f"{key_file.name} does not belong to {cert_file.name}")
    try:
        check_leaf(leaf, identity=identity, issuing=issuing, root=roots[0])
    except ValueError as exc:
        raise CredentialError(where, str(exc)) from None
    return Credentials(path, identity, key_file, cert_file, ca_file, leaf, broker)
