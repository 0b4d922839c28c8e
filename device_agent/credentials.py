"""Read a credential directory (docs/ARCHITECTURE.md, "Files") and check it before use.

The agent never trusts what it reads blindly: the key must belong to the certificate, the
certificate must name the device of ``identity.json`` (CN and SPIFFE SAN URI), and it must chain
through ``chain.crt`` to ``ca.crt``. These checks are local, so an expired or mismatched
credential is reported as such instead of as an opaque TLS failure.

Where the key lives is the directory's choice, recorded in ``identity.json`` (``keystore``: a
PEM file, or a TPM whose TCTI comes from ``$IOTAUTH_TPM_TCTI``, default ``/dev/tpmrm0``); the
agent carries it as ``Credentials.keystore`` and hands it to every place that makes or uses a
key, so nothing else here depends on it. A TPM key that is absent, busy or another TPM's fails
the start-up check with one line naming the TCTI and the key.

They are made by the stdlib ``ssl`` module (``provisioning.tls.check_client_credentials``: OpenSSL
judges the credential as the broker will), not by ``cryptography``: loading cryptography's own
OpenSSL next to the system one behind ``ssl`` would cost a device about 8 MB of RSS just to start.
The renewal candidate is checked the same way (``Credentials.with_files``); the agent process
never imports cryptography (its renewal key and CSR are made in a child, ``device_agent.keygen``).
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_agent.errors import CredentialError
from hardware.keygen import backend_for, keystore_of
from provisioning.errors import InvalidIdentityError, PKIError
from provisioning.identity import Identity, IdentityKind, parse_spiffe_id
from provisioning.tls import check_client_credentials, client_context

if TYPE_CHECKING:
    from hardware.keygen import KeyBackend

__all__ = ["Credentials", "load_credentials"]

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True, slots=True)
class Credentials:
    """A checked credential directory (or the renewal candidate inside it)."""

    path: Path
    identity: Identity
    key_file: Path
    cert_file: Path
    ca_file: Path
    broker: str | None
    serial: str  # lower-case hex without leading zeros, as the broker's audit writes it
    not_before: dt.datetime
    not_after: dt.datetime
    keystore: KeyBackend

    @property
    def device_id(self) -> str:
        return self.identity.name

    def renew_due(self, fraction: float) -> dt.datetime:
        """When ``fraction`` of the lifetime has passed (2/3 by default)."""
        return self.not_before + (self.not_after - self.not_before) * fraction

    def expired(self, now: dt.datetime | None = None) -> bool:
        return (now or dt.datetime.now(dt.UTC)) >= self.not_after

    def context(
        self, *, check_hostname: bool = True, present_certificate: bool = True
    ) -> ssl.SSLContext:
        """The TLS context for the broker; without the certificate for token authentication
        (the broker still proves itself against ``ca.crt``)."""
        try:
            if not present_certificate:
                return client_context(trust=self.ca_file, check_hostname=check_hostname)
            return client_context(
                trust=self.ca_file,
                cert_chain=self.cert_file,
                key=self.key_file,
                check_hostname=check_hostname,
                keystore=self.keystore,
            )
        except PKIError as exc:
            raise CredentialError(str(self.path), str(exc)) from None

    def with_files(self, key_file: Path, cert_file: Path) -> Credentials:
        """The same device with another key and certificate (a renewal candidate), checked."""
        return _load(
            self.path,
            self.identity,
            key_file,
            cert_file,
            self.ca_file,
            self.broker,
            self.keystore,
        )


def load_credentials(path: Path) -> Credentials:
    """Load and check ``path``; CredentialError says which file is wrong and why."""
    where = str(path)
    if not path.is_dir():
        problem = "is not a directory" if path.exists() else "does not exist"
        raise CredentialError(where, f"{problem}; give the device's credential store as --store")
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
    try:
        keystore = backend_for(keystore_of(doc))
    except ValueError as exc:
        raise CredentialError(where, f"identity.json: {exc}") from None
    return _load(
        path,
        identity,
        path / "device.key",
        path / "device.crt",
        path / "ca.crt",
        broker if isinstance(broker, str) else None,
        keystore,
    )


def _utc(openssl_time: str) -> dt.datetime:
    # getpeercert() prints times as OpenSSL does ("Nov 27 22:46:22 2026 GMT").
    return dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(openssl_time), dt.UTC)


def _names(peer: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(subject CNs, SAN URIs) of a ``getpeercert()`` dictionary."""
    cns = [value for rdn in peer.get("subject", ()) for key, value in rdn if key == "commonName"]
    uris = [value for kind, value in peer.get("subjectAltName", ()) if kind == "URI"]
    return cns, uris


def _load(
    path: Path,
    identity: Identity,
    key_file: Path,
    cert_file: Path,
    ca_file: Path,
    broker: str | None,
    keystore: KeyBackend,
) -> Credentials:
    where = str(path)
    # Presence and shape first, so the reason names the file (OpenSSL's own errors do not).
    for file in (cert_file, key_file, ca_file):
        if not file.is_file():
            raise CredentialError(where, f"{file.name} is missing")
    try:
        certs = cert_file.read_bytes().count(_PEM_CERT)
    except OSError as exc:
        raise CredentialError(where, f"{cert_file.name} is unreadable: {exc}") from None
    if certs < 2:
        raise CredentialError(where, f"{cert_file.name} must hold the leaf and the issuing CA")
    try:
        peer = check_client_credentials(
            cert_chain=cert_file, key=key_file, trust=ca_file, keystore=keystore
        )
    except PKIError as exc:
        raise CredentialError(where, str(exc)) from None
    cns, uris = _names(peer)
    if uris != [identity.spiffe_id]:
        raise CredentialError(
            where, f"certificate SAN URI is {uris}, expected {identity.spiffe_id}"
        )
    if cns[:1] != [identity.name]:
        cn = cns[0] if cns else None
        raise CredentialError(where, f"certificate CN is {cn!r}, expected {identity.name!r}")
    try:
        serial = format(int(peer["serialNumber"], 16), "x")
        not_before, not_after = _utc(peer["notBefore"]), _utc(peer["notAfter"])
    except (KeyError, ValueError) as exc:
        raise CredentialError(where, f"{cert_file.name}: unreadable field {exc}") from None
    return Credentials(
        path,
        identity,
        key_file,
        cert_file,
        ca_file,
        broker,
        serial,
        not_before,
        not_after,
        keystore,
    )
