"""Certificate profiles and the CSR policy: pure functions over cryptography objects, no disk.

The profiles are those of docs/ARCHITECTURE.md ("Certificates"): a root that signs one online
issuing CA, device and service leaves that carry their identity as a SPIFFE URI (CN agrees), and
the broker's server certificate.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning.errors import CSRRejectedError, PKIError
from provisioning.identity import Identity

if TYPE_CHECKING:
    from provisioning.signing import Signer

__all__ = [
    "ALLOWED_CURVES",
    "BACKDATE",
    "MIN_RSA_BITS",
    "PublicKey",
    "build_crl",
    "build_issuing_ca",
    "build_leaf",
    "build_root_ca",
    "build_server_cert",
    "check_public_key",
    "fingerprint",
    "generate_key",
    "load_certificate",
    "load_csr",
    "public_key_sha256",
]

BACKDATE = dt.timedelta(minutes=5)  # device clocks lag, especially before their first NTP sync
MIN_RSA_BITS = 2048
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


def generate_key() -> ec.EllipticCurvePrivateKey:
    """The default key of every certificate we make: ECDSA P-256."""
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _base(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: PublicKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def build_root_ca(
    key: Signer, trust_domain: str, *, now: dt.datetime, days: int = 3650
) -> x509.Certificate:
    name = _name(f"{trust_domain} Root CA", "iotauth")
    return key.sign_certificate(
        _base(name, name, key.public_key(), now - BACKDATE, now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
    )


def build_issuing_ca(
    public_key: PublicKey,
    trust_domain: str,
    *,
    root: x509.Certificate,
    root_key: Signer,
    now: dt.datetime,
    days: int = 1825,
    generation: str = "1",
    common_name: str | None = None,
) -> x509.Certificate:
    """``generation`` tells a re-issued issuing CA (same root, new key) from its predecessors;
    ``common_name`` names a station's CA (stations of one fleet need distinct names: OpenSSL
    finds a CA's CRL by its subject)."""
    return root_key.sign_certificate(
        _base(
            _name(common_name or f"{trust_domain} Issuing CA {generation}", "iotauth"),
            root.subject,
            public_key,
            now - BACKDATE,
            min(now + dt.timedelta(days=days), root.not_valid_after_utc),
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_aki(root), critical=False)
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def build_server_cert(
    public_key: PublicKey,
    *,
    names: Sequence[str],
    issuer: x509.Certificate,
    issuer_key: Signer,
    now: dt.datetime,
    days: int = 397,
) -> x509.Certificate:
    """The broker's certificate: serverAuth, SANs for each host name or IP address."""
    sans: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # keep order, drop repeats
        sans.append(_general_name(name))
    return issuer_key.sign_certificate(
        _base(
            _name(names[0] if names else "iotauth broker"),
            issuer.subject,
            public_key,
            now - BACKDATE,
            min(now + dt.timedelta(days=days), issuer.not_valid_after_utc),
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(_aki(issuer), critical=False)
    )


def build_leaf(
    identity: Identity,
    public_key: PublicKey,
    *,
    issuer: x509.Certificate,
    issuer_key: Signer,
    now: dt.datetime,
    days: int,
    extended_key_usage: Iterable[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
) -> x509.Certificate:
    """A device or service certificate: CN = name, SAN URI = SPIFFE ID, clientAuth.

    ``extended_key_usage`` exists so tests can mint deliberately wrong certificates
    (serverAuth only).
    """
    not_after = min(now + dt.timedelta(days=days), issuer.not_valid_after_utc)
    return issuer_key.sign_certificate(
        _base(_name(identity.name), issuer.subject, public_key, now - BACKDATE, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(extended_key_usage)), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.spiffe_id)]),
            critical=False,
        )
        .add_extension(_aki(issuer), critical=False)
    )


def check_public_key(key: object) -> PublicKey:
    """Refuse keys too weak (or too exotic) for a fleet: RSA < 2048, curves but P-256/P-384."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            msg = f"RSA key of {key.key_size} bits is too weak (minimum {MIN_RSA_BITS})"
            raise CSRRejectedError(msg)
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            msg = f"elliptic curve {key.curve.name} is not allowed (use P-256 or P-384)"
            raise CSRRejectedError(msg)
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    kind = type(key).__name__.lstrip("_")
    msg = f"key type {kind} is not allowed (use P-256, P-384, Ed25519 or RSA >= 2048)"
    raise CSRRejectedError(msg)


def load_csr(data: bytes) -> tuple[x509.CertificateSigningRequest, PublicKey]:
    """Parse a PEM or DER CSR, check its self-signature and its key; return both.

    Names inside the CSR are deliberately ignored: identity comes from the station.
    """
    try:
        if b"-----BEGIN" in data:
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
    except ValueError as exc:
        msg = "not a PEM or DER certificate signing request"
        raise CSRRejectedError(msg) from exc
    try:
        public_key = csr.public_key()
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        msg = f"unsupported or malformed public key ({exc})"
        raise CSRRejectedError(msg) from exc
    if not valid:
        msg = "its signature does not verify (the requester does not hold the key)"
        raise CSRRejectedError(msg)
    return csr, check_public_key(public_key)


def build_crl(
    *,
    issuer: x509.Certificate,
    issuer_key: Signer,
    revoked: Iterable[tuple[int, dt.datetime, x509.ReasonFlags]],
    number: int,
    now: dt.datetime,
    next_update: dt.datetime,
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_aki(issuer), critical=False)
    )
    for serial, when, reason in revoked:
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(when)
            .add_extension(x509.CRLReason(reason), critical=False)
            .build()
        )
        builder = builder.add_revoked_certificate(entry)
    return issuer_key.sign_crl(builder)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lower-case hex (what ``openssl x509 -fingerprint`` shows)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def public_key_sha256(key: PublicKey) -> str:
    """SHA-256 of the SubjectPublicKeyInfo: stable across re-issues of the same key."""
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def load_certificate(path: Path, *, what: str = "") -> x509.Certificate:
    """A PEM certificate file, or one PKIError line naming it (``what`` prefixes the path)."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        msg = f"{what}{path} is missing"
        raise PKIError(msg) from None
    except ValueError:
        msg = f"{path} is not a PEM certificate"
        raise PKIError(msg) from None
