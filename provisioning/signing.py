"""The seam between what a CA signs and where its key lives.

Everything that signs for a CA (certificates, CRLs, ledger lines) is handed a :class:`Signer` and
never learns whether the key is a file in ``private/`` (:class:`FileSigner`) or an object in a
PKCS#11 token (:class:`provisioning.hsm.Pkcs11Signer`, a :class:`ExternalSigner`).

``cryptography`` signs certificates and CRLs only with keys it holds itself. For a key that it
cannot hold, :class:`ExternalSigner` lets ``cryptography`` build the structure to be signed (the
TBSCertificate or TBSCertList, signed once with a throwaway key of the same algorithm so the
AlgorithmIdentifier inside it is the right one), has the external key sign exactly those bytes,
and puts TBS, AlgorithmIdentifier and signature together with ``asn1crypto`` (no hand-written DER).
The result is parsed back and its signature verified with the CA's public key before anyone sees
it, so a token that answers with the wrong key or garbage is caught at once.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from provisioning.errors import PKIError

if TYPE_CHECKING:
    from provisioning.certificates import PublicKey
    from provisioning.keyfiles import PrivateKey

__all__ = ["ExternalSigner", "FileSigner", "Signer"]


class Signer(ABC):
    """A CA key that can sign: certificates, CRLs and ledger lines."""

    #: Where the key lives, for messages and ``ca show``: a path or a ``pkcs11:`` URI (no PIN).
    location: str

    @abstractmethod
    def public_key(self) -> PublicKey:
        """The public half, to put in a certificate or to check what the key signed."""

    @abstractmethod
    def sign(self, data: bytes) -> bytes:
        """ECDSA with SHA-256 over ``data``, DER-encoded (what the ledger's ``sig`` holds)."""

    @abstractmethod
    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Sign a fully built certificate."""

    @abstractmethod
    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        """Sign a fully built CRL."""

    @abstractmethod
    def close(self) -> None:
        """Let go of the key (a token session)."""


def _sig_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


class FileSigner(Signer):
    """A key ``cryptography`` holds in memory (loaded from ``private/``, or just generated)."""

    def __init__(self, key: PrivateKey, location: str = "memory") -> None:
        self.key = key
        self.location = location

    def public_key(self) -> PublicKey:
        return self.key.public_key()

    def sign(self, data: bytes) -> bytes:
        if not isinstance(self.key, ec.EllipticCurvePrivateKey):  # ca init only makes EC keys
            msg = f"the CA key {self.location} must be an EC key to sign the ledger"
            raise PKIError(msg)
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.sign(self.key, _sig_hash(self.key))

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        return builder.sign(self.key, _sig_hash(self.key))

    def close(self) -> None:
        """Nothing to release: the key is garbage once the last reference goes."""


_throwaway_lock = threading.Lock()
_throwaway: ec.EllipticCurvePrivateKey | None = None


def _tbs_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 key whose only job is to make ``cryptography`` emit a TBS structure.

    Its signature is thrown away; it never signs anything that leaves this process.
    """
    global _throwaway  # noqa: PLW0603 - one per process, made on first use
    with _throwaway_lock:
        if _throwaway is None:
            _throwaway = ec.generate_private_key(ec.SECP256R1())
        return _throwaway


class ExternalSigner(Signer):
    """A P-256 key outside this process: subclasses implement :meth:`sign` and nothing else."""

    _ALGORITHM = "sha256_ecdsa"  # ecdsa-with-SHA256, what the throwaway key puts in the TBS

    def _check_public_key(self) -> ec.EllipticCurvePublicKey:
        key = self.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            msg = f"the CA key {self.location} is not a P-256 key; iotauth signs with P-256 only"
            raise PKIError(msg)
        return key

    def _verified(self, signature: bytes, tbs: bytes, what: str) -> None:
        try:
            self._check_public_key().verify(signature, tbs, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            msg = f"the {what} signed by {self.location} does not verify with its public key"
            raise PKIError(msg) from None

    def _assemble(self, tbs: bytes, outer: Any, inner: Any, fields: tuple[str, str]) -> bytes:  # noqa: ANN401
        """DER of ``outer``: the TBS exactly as ``cryptography`` encoded it, the algorithm and
        the token's signature over those bytes."""
        tbs_field, signature_field = fields
        return bytes(
            outer(
                {
                    tbs_field: inner.load(tbs),
                    "signature_algorithm": {"algorithm": self._ALGORITHM},
                    signature_field: self.sign(tbs),
                }
            ).dump()
        )

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        from asn1crypto import x509 as asn1_x509

        self._check_public_key()
        tbs = builder.sign(_tbs_key(), hashes.SHA256()).tbs_certificate_bytes
        der = self._assemble(
            tbs,
            asn1_x509.Certificate,
            asn1_x509.TbsCertificate,
            ("tbs_certificate", "signature_value"),
        )
        cert = x509.load_der_x509_certificate(der)
        self._verified(cert.signature, cert.tbs_certificate_bytes, "certificate")
        return cert

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        from asn1crypto import crl as asn1_crl

        self._check_public_key()
        tbs = builder.sign(_tbs_key(), hashes.SHA256()).tbs_certlist_bytes
        der = self._assemble(
            tbs, asn1_crl.CertificateList, asn1_crl.TbsCertList, ("tbs_cert_list", "signature")
        )
        crl = x509.load_der_x509_crl(der)
        self._verified(crl.signature, crl.tbs_certlist_bytes, "CRL")
        return crl
