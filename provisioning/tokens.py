"""Device tokens: the contract between the device that signs one and the broker that checks it.

A device that holds its key but cannot present a client certificate (a microcontroller TLS stack
that can sign but not do client authentication, the scheme Google Cloud IoT used) sends a compact
JWS as its MQTT password, signed by its *own* private key:

- header: ``alg`` fixed by the key type (:data:`ALGORITHM_BY_KEY`), ``typ: JWT``, and ``x5c`` =
  [the device's certificate] (RFC 7515 section 4.1.6, standard base64 DER). The certificate is how
  the broker finds the key: it checks the certificate against the fleet CA and the CRL exactly as
  it would in a TLS handshake, so a revoked or superseded device is refused and its token sessions
  are kicked by the same revocation path as its TLS sessions.
- claims: ``sub`` = device id, ``aud`` = the fleet's trust domain (or a configured audience),
  ``iat``, ``exp`` (lifetime at most :data:`MAX_TTL`), ``jti`` (the broker refuses a replay).

Signing goes through PyJWT (docs/ARCHITECTURE.md: no hand-written JOSE). The broker side is
``broker.auth_jwt``; both read the names below so the two cannot drift.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from provisioning.errors import ProvisioningError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

    from hardware.tpm import Tpm
    from provisioning.keyfiles import PrivateKey

__all__ = [
    "ALGORITHM_BY_KEY",
    "DEFAULT_TTL",
    "MAX_TTL",
    "TokenError",
    "algorithm_for",
    "looks_like_jwt",
    "make_device_token",
    "make_device_token_tpm",
    "read_identity",
    "token_for_credentials",
]

DEFAULT_TTL: Final = 3600
# The broker refuses any token that claims to live longer: a stolen token is worth one day at most.
MAX_TTL: Final = 24 * 3600
# The only algorithm each key type may sign with. Choosing it from the *key* (never from the
# token's header) is what rules out algorithm confusion (`none`, HS256 keyed with a public key).
ALGORITHM_BY_KEY: Final = {"ec-secp256r1": "ES256", "ed25519": "EdDSA"}


class TokenError(ProvisioningError):
    """A token that cannot be made (unsupported key, bad lifetime)."""


def key_type(public_key: object) -> str:
    """``ec-secp256r1`` / ``ed25519`` / a description of anything else."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"ec-{public_key.curve.name}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    return type(public_key).__name__


def algorithm_for(public_key: object) -> str:
    """The one JWS algorithm a key of this type signs with; TokenError for any other key."""
    kind = key_type(public_key)
    try:
        return ALGORITHM_BY_KEY[kind]
    except KeyError:
        msg = f"a {kind} key cannot sign a device token (P-256 or Ed25519 keys only)"
        raise TokenError(msg) from None


def make_device_token(
    *,
    key: PrivateKey,
    certificate: x509.Certificate,
    device_id: str,
    audience: str,
    ttl: int = DEFAULT_TTL,
    now: dt.datetime | None = None,
) -> str:
    """Sign a device token with the device's own key. ``ttl`` in seconds, 1 to MAX_TTL."""
    import jwt

    _check_ttl(ttl)
    alg = algorithm_for(certificate.public_key())
    if _spki(key.public_key()) != _spki(certificate.public_key()):
        msg = "the key does not belong to the certificate"
        raise TokenError(msg)
    claims = _claims(device_id, audience, ttl, now)
    return jwt.encode(claims, key, algorithm=alg, headers=_header(certificate))


def _header(certificate: x509.Certificate) -> dict[str, Any]:
    """The JOSE header fields besides ``alg``: the certificate is how the broker finds the key."""
    from cryptography.hazmat.primitives.serialization import Encoding

    x5c = base64.b64encode(certificate.public_bytes(Encoding.DER)).decode()
    return {"typ": "JWT", "x5c": [x5c]}


def _check_ttl(ttl: int) -> None:
    if not 0 < ttl <= MAX_TTL:
        msg = f"--ttl must be between 1 and {MAX_TTL} seconds (got {ttl})"
        raise TokenError(msg)


def _claims(device_id: str, audience: str, ttl: int, now: dt.datetime | None) -> dict[str, Any]:
    issued = int((now or dt.datetime.now(dt.UTC)).timestamp())
    return {
        "sub": device_id,
        "aud": audience,
        "iat": issued,
        "exp": issued + ttl,
        "jti": secrets.token_urlsafe(16),
    }


def make_device_token_tpm(
    *,
    tpm: Tpm,
    blob: bytes,
    certificate: x509.Certificate,
    device_id: str,
    audience: str,
    ttl: int = DEFAULT_TTL,
    now: dt.datetime | None = None,
) -> str:
    """:func:`make_device_token` for a key inside a TPM (P-256, ES256).

    The TPM signs the SHA-256 digest of the JWS signing input (RFC 7515 section 5.1); PyJWT's
    helpers make the rest: the base64url segments, the DER-to-raw ``r || s`` conversion that
    ES256 requires (RFC 7518 section 3.4), and a verification of the result against the
    certificate's key before it leaves this function.
    """
    import hashlib

    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.utils import base64url_encode, der_to_raw_signature

    _check_ttl(ttl)
    public = certificate.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or algorithm_for(public) != "ES256":
        msg = "a TPM key signs device tokens with ES256 (P-256) only"
        raise TokenError(msg)
    if tpm.public_key(blob) != _spki(public):
        msg = "the TPM key does not belong to the certificate"
        raise TokenError(msg)
    header = {"alg": "ES256", **_header(certificate)}
    claims = _claims(device_id, audience, ttl, now)

    def segment(doc: dict[str, Any]) -> bytes:
        return base64url_encode(json.dumps(doc, separators=(",", ":")).encode())

    signing_input = segment(header) + b"." + segment(claims)
    der = tpm.sign_digest(blob, hashlib.sha256(signing_input).digest())
    raw = der_to_raw_signature(der, ec.SECP256R1())
    token = (signing_input + b"." + base64url_encode(raw)).decode("ascii")
    jwt.decode(token, public, algorithms=["ES256"], audience=audience)  # raises if malformed
    return token


def token_for_credentials(
    cred_dir: Path,
    device_id: str,
    *,
    ttl: int = DEFAULT_TTL,
    audience: str | None = None,
    now: dt.datetime | None = None,
    tcti: str | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> tuple[str, dict[str, object]]:
    """A token for the device whose credential directory this is, and its claims (for --json).

    ``device_id`` must be the directory's own device: a token is never made for another identity.
    A directory whose key lives in a TPM (``identity.json`` ``keystore: tpm``) signs in the TPM
    at ``tcti`` (default: ``$IOTAUTH_TPM_TCTI``, else ``/dev/tpmrm0``). ``cert_file`` and
    ``key_file`` (default: the directory's ``device.crt`` and ``device.key``) name another pair of
    the same device: the agent signs with a renewed certificate's pair before installing it.
    """
    import jwt

    from hardware.keygen import keystore_of
    from provisioning.certificates import load_certificate
    from provisioning.identity import parse_spiffe_id
    from provisioning.keyfiles import load_private_key

    doc = read_identity(cred_dir)
    try:
        identity = parse_spiffe_id(str(doc.get("spiffe_id", "")))
    except ProvisioningError as exc:
        msg = f"{cred_dir / 'identity.json'}: {exc}"
        raise TokenError(msg) from None
    if not identity.is_device:
        msg = f"{cred_dir} holds service {identity.name}: only devices sign their own tokens"
        raise TokenError(msg)
    if identity.name != device_id:
        msg = f"{cred_dir} holds device {identity.name}, not {device_id}"
        raise TokenError(msg)
    cert_path = cert_file or cred_dir / "device.crt"
    key_path = key_file or cred_dir / "device.key"
    certificate = load_certificate(cert_path)
    try:
        keystore = keystore_of(doc)
    except ValueError as exc:
        msg = f"{cred_dir / 'identity.json'}: {exc}"
        raise TokenError(msg) from None
    if keystore == "tpm":
        from hardware.tpm import Tpm

        token = make_device_token_tpm(
            tpm=Tpm(tcti),
            blob=key_path.read_bytes(),
            certificate=certificate,
            device_id=identity.name,
            audience=audience or identity.trust_domain,
            ttl=ttl,
            now=now,
        )
        return token, dict(jwt.decode(token, options={"verify_signature": False}))
    key = load_private_key(key_path)
    token = make_device_token(
        key=key,
        certificate=certificate,
        device_id=identity.name,
        audience=audience or identity.trust_domain,
        ttl=ttl,
        now=now,
    )
    return token, dict(jwt.decode(token, options={"verify_signature": False}))


def read_identity(cred_dir: Path) -> dict[str, object]:
    """A credential directory's ``identity.json``; TokenError naming the path if unusable."""
    path = cred_dir / "identity.json"
    if not cred_dir.is_dir():
        msg = f"credential directory {cred_dir} does not exist"
        raise TokenError(msg)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        msg = f"{path} is missing: {cred_dir} is not a credential directory"
        raise TokenError(msg) from None
    except (ValueError, UnicodeDecodeError):
        msg = f"{path} is not valid JSON"
        raise TokenError(msg) from None
    if not isinstance(doc, dict):
        msg = f"{path} is not a JSON object"
        raise TokenError(msg)
    return doc


def looks_like_jwt(value: str | None) -> bool:
    """Three base64url segments: what a compact JWS looks like (not whether it is valid)."""
    if not value or value.count(".") != 2:
        return False
    alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    return set(value) <= alphabet


def _spki(public_key: PublicKeyTypes) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
