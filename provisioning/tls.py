"""The one module that builds every ``ssl.SSLContext`` of the project.

Servers require a client certificate that chains to the fleet root, check the CRL for the leaf,
and refuse TLS below 1.2. Session tickets are off, so a resumed session can never skip a
revocation check that a full handshake would make. Clients verify the server against the
provisioned trust anchor and its host name. :func:`check_client_credentials` lets OpenSSL judge a
client credential locally, as such a server would, without a network and without ``cryptography``.

A client key may live in a TPM (``keystore``, a ``hardware.keygen.TpmBackend``): the context then
gets the certificate and a key whose signatures the TPM makes (``hardware.tpm``), and is otherwise
the same ``ssl.SSLContext``. Which key store a credential directory uses is in its
``identity.json`` (:func:`keystore_for_credentials`).
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from provisioning.config import PASSPHRASE_ENV
from provisioning.errors import PassphraseError, PKIError

if TYPE_CHECKING:
    from hardware.keygen import KeyBackend

__all__ = [
    "check_client_credentials",
    "client_context",
    "client_context_for_credentials",
    "keystore_for_credentials",
    "server_context",
    "server_context_for_pki",
]

# What a server asks of its clients: mutual TLS, a listener that also takes tokens or secrets, or
# one that takes no certificates at all.
ClientCertificates = Literal["required", "optional", "none"]
_VERIFY_MODES: dict[str, ssl.VerifyMode] = {
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
}


def _load_hardware_key(
    ctx: ssl.SSLContext, cert: Path, key: Path, keystore: KeyBackend | None
) -> bool:
    """Load a key that lives in a TPM (True), or leave a file key to the caller (False)."""
    from hardware.keygen import TpmBackend

    if not isinstance(keystore, TpmBackend):
        return False
    try:
        keystore.tpm.load_cert_chain(ctx, cert, key)
    except (OSError, ValueError) as exc:  # TpmError is an OSError; a mismatch a ValueError
        raise PKIError(str(exc)) from None
    return True


def _load_chain(
    ctx: ssl.SSLContext,
    cert: Path,
    key: Path,
    password: bytes | None,
    keystore: KeyBackend | None = None,
    source: str | None = PASSPHRASE_ENV,
) -> None:
    """``source`` names where the password comes from; None: the key must not be encrypted."""
    if _load_hardware_key(ctx, cert, key, keystore):
        return
    asked: list[bool] = []

    def give_password() -> bytes:
        # A callback, never None: without one OpenSSL prompts on the terminal for an encrypted
        # key, and a service must not wait on stdin. The keys in a PKI are encrypted with
        # IOTAUTH_CA_PASSPHRASE (``ca init``), so that is the variable to name.
        asked.append(True)
        if not password:
            fix = f"set {source}" if source else "an unencrypted PEM key is needed"
            msg = f"{key} is encrypted; {fix}"
            raise PassphraseError(msg)
        return password

    try:
        ctx.load_cert_chain(cert, key, password=give_password)
    except FileNotFoundError as exc:
        msg = f"cannot load TLS credentials: {exc.filename} is missing"
        raise PKIError(msg) from None
    except ssl.SSLError as exc:
        if asked and password:
            msg = f"cannot decrypt {key}: wrong {PASSPHRASE_ENV}"
            raise PassphraseError(msg) from None
        raise PKIError(_which_file(cert, key, exc)) from None


def _which_file(cert: Path, key: Path, exc: ssl.SSLError) -> str:
    """OpenSSL says "PEM lib" for either file: name the one that is broken."""
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"{key} does not belong to {cert}"
    try:
        ssl.create_default_context(cafile=cert)
    except ssl.SSLError:
        return f"{cert} is not a PEM certificate (cut short or edited?)"
    if cert != key:
        return f"{key} is not a PEM private key (cut short or edited?)"
    return f"cannot load TLS credentials {cert}: {exc.reason or exc}"


def _load_trust(ctx: ssl.SSLContext, cafile: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=cafile)
    except FileNotFoundError:
        msg = f"cannot load trust anchor {cafile}: the file is missing"
        raise PKIError(msg) from None
    except ssl.SSLError:
        msg = f"cannot load trust anchor {cafile}: not PEM (cut short or edited?)"
        raise PKIError(msg) from None


def server_context(
    *,
    cert_chain: Path,
    key: Path,
    trust: Path,
    crl: Path | None = None,
    password: bytes | None = None,
    client_certificates: ClientCertificates = "required",
) -> ssl.SSLContext:
    """A server that demands a client certificate from the fleet (mutual TLS).

    ``client_certificates`` is "optional" on a listener that also takes tokens or secrets (a
    certificate, when sent, is still verified against the fleet and the CRL) and "none" on one that
    takes no certificates: the client then proves itself inside MQTT, the server by this chain.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = _VERIFY_MODES[client_certificates]
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    # No TLS 1.3 tickets and no TLS 1.2 tickets. TLS 1.2 session-ID resumption stays possible
    # within one context's cache, so whoever reloads a CRL must build a new context (the cache
    # goes with the old one) rather than add the CRL to a live context.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    _load_trust(ctx, trust)
    if crl is not None:
        _load_trust(ctx, crl)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    _load_chain(ctx, cert_chain, key, password)
    return ctx


def client_context(
    *,
    trust: Path,
    cert_chain: Path | None = None,
    key: Path | None = None,
    password: bytes | None = None,
    check_hostname: bool = True,
    keystore: KeyBackend | None = None,
    password_source: str | None = PASSPHRASE_ENV,
) -> ssl.SSLContext:
    """A client that verifies the server against ``trust`` and presents its own certificate.

    ``keystore`` says where ``key`` lives; ``None`` or a file store: ``key`` is a PEM file.
    ``password_source`` is what an error names when ``key`` is encrypted and no password is
    given; None for a device's key, which is never encrypted.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.check_hostname = check_hostname
    _load_trust(ctx, trust)
    if cert_chain is not None:
        _load_chain(ctx, cert_chain, key or cert_chain, password, keystore, password_source)
    return ctx


def server_context_for_pki(
    pki_dir: Path,
    *,
    password: bytes | None = None,
    check_crl: bool = True,
    client_certificates: ClientCertificates = "required",
) -> ssl.SSLContext:
    """The broker's context from a PKI directory (docs/ARCHITECTURE.md, "Files")."""
    return server_context(
        cert_chain=pki_dir / "server.crt",
        key=pki_dir / "private" / "server.key",
        trust=pki_dir / "root.crt",
        crl=pki_dir / "crl.pem" if check_crl else None,
        password=password,
        client_certificates=client_certificates,
    )


def keystore_for_credentials(cred_dir: Path, tcti: str | None = None) -> KeyBackend:
    """The key store ``identity.json`` records for ``cred_dir`` (``file`` when it names none).

    A directory without ``identity.json`` (a certificate and key put together by hand) is a file
    key store too. ``tcti`` (for a TPM) defaults to ``$IOTAUTH_TPM_TCTI``, else
    ``device:/dev/tpmrm0``.
    """
    from hardware.keygen import backend_for, keystore_of

    path = cred_dir / "identity.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            msg = "not a JSON object"
            raise ValueError(msg)
        return backend_for(keystore_of(doc), tcti)
    except FileNotFoundError:
        return backend_for("file")
    except (OSError, ValueError) as exc:
        msg = f"{path}: {exc}"
        raise PKIError(msg) from None


def client_context_for_credentials(
    cred_dir: Path, *, check_hostname: bool = True
) -> ssl.SSLContext:
    """A device's or service's context from its credential directory (key in a file or TPM)."""
    return client_context(
        trust=cred_dir / "ca.crt",
        cert_chain=cred_dir / "device.crt",
        key=cred_dir / "device.key",
        check_hostname=check_hostname,
        keystore=keystore_for_credentials(cred_dir),
        password_source=None,
    )


# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (x509_vfy.h, OpenSSL >= 1.1.0; Python needs >= 1.1.1). The ssl
# module passes verify_flags through to X509_VERIFY_PARAM but has no name for this one.
_NO_CHECK_TIME = 0x200000
# A TLS 1.3 handshake between two memory BIOs takes 2-3 round trips; this bound only stops a
# handshake that would never finish from looping forever.
_MAX_ROUNDS = 16


def _load_checked_chain(
    ctx: ssl.SSLContext, cert_chain: Path, key: Path, keystore: KeyBackend | None
) -> None:
    if _load_hardware_key(ctx, cert_chain, key, keystore):
        return

    def password() -> bytes:
        # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
        msg = f"{key.name} is encrypted; an unencrypted PEM key is needed"
        raise PKIError(msg)

    try:
        ctx.load_cert_chain(cert_chain, key, password=password)
    except FileNotFoundError as exc:
        msg = f"{Path(exc.filename or key).name} is missing"
        raise PKIError(msg) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            msg = f"{key.name} does not belong to {cert_chain.name}"
        else:
            msg = f"cannot load {cert_chain.name} / {key.name}: {exc.reason or exc}"
        raise PKIError(msg) from None


def check_client_credentials(
    *, cert_chain: Path, key: Path, trust: Path, keystore: KeyBackend | None = None
) -> dict[str, Any]:
    """Check a client credential as a fleet server would; return the leaf as ``getpeercert()``.

    A TLS handshake between two in-memory ends: the client presents ``cert_chain`` + ``key``; the
    server (the same credential serving as its certificate) demands a client certificate and
    verifies it against ``trust`` with ``VERIFY_X509_STRICT``, the broker's settings. So OpenSSL
    proves that the key fits the leaf (``load_cert_chain``), that the chain leads to ``trust`` and
    that the leaf may authenticate a TLS client, and the leaf's subject, SAN, serial and validity
    come back decoded, with no X.509 parser of ours and without importing ``cryptography`` (whose
    own OpenSSL copy costs a device about 8 MB of RSS). Validity dates are not checked: a device
    whose clock is not set yet at boot must still read its credentials, and the caller reports an
    expired certificate with its date. Raises PKIError with the reason, naming the file. With a
    TPM ``keystore`` both ends sign in the TPM, so a key of another TPM (or none) fails here.
    """
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.verify_mode = ssl.CERT_REQUIRED
    server.verify_flags |= ssl.VERIFY_X509_STRICT | _NO_CHECK_TIME
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE  # the server's side of this check is not the question
    _load_checked_chain(client, cert_chain, key, keystore)
    _load_checked_chain(server, cert_chain, key, keystore)
    _load_trust(server, trust)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    ends = [
        client.wrap_bio(c_in, c_out, server_side=False),
        server.wrap_bio(s_in, s_out, server_side=True),
    ]
    done: set[int] = set()
    for _ in range(_MAX_ROUNDS):
        for i, end in enumerate(ends):
            if i in done:
                continue
            try:
                end.do_handshake()
                done.add(i)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError as exc:
                msg = (
                    f"{trust.name} does not accept {cert_chain.name} as a client certificate: "
                    f"{exc.verify_message}"
                )
                raise PKIError(msg) from None
            except ssl.SSLError as exc:
                msg = f"{cert_chain.name} / {key.name} fail a local TLS handshake: {exc}"
                raise PKIError(msg) from None
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if len(done) == len(ends):
            break
    peer = ends[1].getpeercert()
    if not peer:
        msg = f"{cert_chain.name} / {key.name}: the local TLS handshake did not finish"
        raise PKIError(msg)
    return dict(peer)
