"""Where a device's private key comes from: a small interface with swappable backends.

The responder only ever calls ``KeyBackend``. The CPython backend below uses ``cryptography``
(imported lazily, so a device without it still imports this module); a MicroPython build has no EC
key generation and uses ``NoKeygenBackend`` (the station then injects a key), and a secure element
or TPM backend would generate inside the chip and return only the CSR and a key *reference*.
This module runs unchanged under MicroPython, where ``Protocol`` is a plain base class.
"""

from hardware._compat import Protocol

__all__ = [
    "CryptographyBackend",
    "KeyBackend",
    "NoKeygenBackend",
    "default_backend",
]


class KeyBackend(Protocol):
    """What the responder needs from key generation."""

    @property
    def can_generate(self) -> bool:
        """Whether ``generate`` works; HELLO advertises it and GENKEY answers UNSUPPORTED if not."""
        ...

    def generate(self, device_id: str) -> tuple[bytes, bytes]:
        """A fresh private key (PEM, stored as ``device.key``) and a CSR for it (DER).

        The CSR's subject CN is ``device_id``; the station's CA decides everything else.
        """
        ...

    def key_matches_cert(self, key_pem: bytes, cert_pem: bytes) -> bool | None:
        """Whether the certificate certifies this key; ``None`` when the backend cannot tell."""
        ...


class NoKeygenBackend:
    """A device that cannot make keys (pure MicroPython): the station must inject one."""

    @property
    def can_generate(self) -> bool:
        return False

    def generate(self, device_id: str) -> tuple[bytes, bytes]:
        msg = f"this device cannot generate keys (asked for {device_id!r})"
        raise NotImplementedError(msg)

    def key_matches_cert(self, key_pem: bytes, cert_pem: bytes) -> bool | None:
        return None


class CryptographyBackend:
    """ECDSA P-256 keys and SHA-256-signed CSRs with ``cryptography``."""

    @property
    def can_generate(self) -> bool:
        return True

    def generate(self, device_id: str) -> tuple[bytes, bytes]:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return key_pem, csr.public_bytes(serialization.Encoding.DER)

    def key_matches_cert(self, key_pem: bytes, cert_pem: bytes) -> bool | None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
            cert = x509.load_pem_x509_certificate(cert_pem)
        except (ValueError, TypeError):
            return False
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def default_backend() -> KeyBackend:
    """``CryptographyBackend`` where ``cryptography`` is installed, else ``NoKeygenBackend``."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return NoKeygenBackend()
    return CryptographyBackend()
