"""The device key store: where a device's private key is made and used, behind one interface.

Everything that makes or uses a device key goes through ``KeyBackend``: the responder on GENKEY
and COMMIT, the agent's renewal (``device_agent.keygen``) and the TLS context
(``provisioning.tls``). Two key stores exist, named as ``identity.json`` records them:

``file``  ``CryptographyBackend``: ``device.key`` is a PKCS#8 PEM key made with ``cryptography``
          (imported lazily, so a device without it still imports this module). A MicroPython build
          has no EC key generation and uses ``NoKeygenBackend`` (the station then injects a key).
``tpm``   ``TpmBackend``: the key is made inside a TPM 2.0 and never leaves it; ``device.key`` holds
          only the TSS2 PEM blob that the TPM wrapped with its storage key, useless anywhere else.
          Signatures (the CSR, each TLS handshake) are made by the TPM (``hardware.tpm``).

``backend_for(keystore, tcti)`` picks one; ``keystore_of(identity)`` reads a credential directory's
choice (no ``keystore`` field: ``file``, as every directory made before TPMs were supported). This
module runs unchanged under MicroPython, where ``Protocol`` is a plain base class.
"""

from hardware._compat import Protocol

__all__ = [
    "KEYSTORES",
    "CryptographyBackend",
    "KeyBackend",
    "NoKeygenBackend",
    "TpmBackend",
    "backend_for",
    "default_backend",
    "keystore_of",
]

KEYSTORES = ("file", "tpm")


class KeyBackend(Protocol):
    """What the responder, the agent and the TLS context need from a key store."""

    @property
    def keystore(self) -> str:
        """``file`` or ``tpm``: what ``identity.json`` records for keys made here."""
        ...

    @property
    def can_generate(self) -> bool:
        """Whether ``generate`` works; HELLO advertises it and GENKEY answers UNSUPPORTED if not."""
        ...

    def generate(self, device_id: str, uri: str | None = None) -> tuple[bytes, bytes]:
        """A fresh key (what ``device.key`` stores) and a CSR for it (DER).

        The CSR's subject CN is ``device_id``, with ``uri`` as its SAN URI when given (renewal);
        the station's CA decides everything else.
        """
        ...

    def key_matches_cert(self, key_pem: bytes, cert_pem: bytes) -> bool | None:
        """Whether the certificate certifies this key; ``None`` when the backend cannot tell."""
        ...


class NoKeygenBackend:
    """A device that cannot make keys (pure MicroPython): the station must inject one."""

    @property
    def keystore(self) -> str:
        return "file"

    @property
    def can_generate(self) -> bool:
        return False

    def generate(self, device_id: str, uri: str | None = None) -> tuple[bytes, bytes]:
        msg = f"this device cannot generate keys (asked for {device_id!r})"
        raise NotImplementedError(msg)

    def key_matches_cert(self, key_pem: bytes, cert_pem: bytes) -> bool | None:
        return None


class CryptographyBackend:
    """ECDSA P-256 keys and SHA-256-signed CSRs with ``cryptography``."""

    @property
    def keystore(self) -> str:
        return "file"

    @property
    def can_generate(self) -> bool:
        return True

    def generate(self, device_id: str, uri: str | None = None) -> tuple[bytes, bytes]:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        builder = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
        )
        if uri is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                critical=False,
            )
        csr = builder.sign(key, hashes.SHA256())
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


class TpmBackend:
    """ECDSA P-256 keys made and kept in a TPM 2.0 (``hardware.tpm``; CPython on Linux only).

    ``tcti`` None means ``$IOTAUTH_TPM_TCTI``, else ``device:/dev/tpmrm0``. Failures are
    ``hardware.tpm.TpmError`` (an ``OSError``) naming the TCTI and the key.
    """

    def __init__(self, tcti: str | None = None) -> None:
        from hardware.tpm import Tpm

        self.tpm = Tpm(tcti)

    @property
    def tcti(self) -> str:
        return self.tpm.tcti

    @property
    def keystore(self) -> str:
        return "tpm"

    @property
    def can_generate(self) -> bool:
        return True

    def generate(self, device_id: str, uri: str | None = None) -> tuple[bytes, bytes]:
        blob = self.tpm.generate()
        return blob, self.tpm.csr(blob, device_id, uri=uri)

    def key_matches_cert(self, key_pem: bytes, cert_pem: bytes) -> bool | None:
        from hardware.tpm import certificate_public_key, is_tpm_blob

        if not is_tpm_blob(key_pem):
            return False  # a TPM device keeps TPM keys only
        try:
            cert_key = certificate_public_key(cert_pem)
        except ValueError:
            return False
        # Loading the blob also proves it belongs to this TPM (TpmError, an OSError, if not).
        return self.tpm.public_key(key_pem) == cert_key

    def __repr__(self) -> str:
        return f"TpmBackend({self.tcti!r})"


def backend_for(keystore: str, tcti: str | None = None) -> KeyBackend:
    """The backend of a key store named as ``identity.json`` and ``--keystore`` name it."""
    if keystore == "tpm":
        return TpmBackend(tcti)
    if keystore == "file":
        return CryptographyBackend()
    msg = f"unknown key store {keystore!r} (expected one of: {', '.join(KEYSTORES)})"
    raise ValueError(msg)


def keystore_of(identity: "dict[str, object]") -> str:
    """The key store a credential directory's ``identity.json`` records (``file`` if none)."""
    value = identity.get("keystore", "file")
    if value not in KEYSTORES:
        msg = f"unknown key store {value!r} (expected one of: {', '.join(KEYSTORES)})"
        raise ValueError(msg)
    return str(value)


def default_backend() -> KeyBackend:
    """``CryptographyBackend`` where ``cryptography`` is installed, else ``NoKeygenBackend``."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return NoKeygenBackend()
    return CryptographyBackend()
