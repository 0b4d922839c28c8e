"""Certificate renewal on the device: new key, CSR, check the answer, switch make-before-break.

Theory of operation
-------------------
At ``renewal.at`` of the certificate's lifetime (2/3 by default) the agent makes a new P-256 key
*on the device* and sends a CSR on ``devices/<id>/certs/csr``. The renewal service answers on
``devices/<id>/certs/issued``. Messages are JSON with a ``type``::

    device -> certs/csr      {"type": "csr", "request_id": R, "csr": PEM}
                             {"type": "installed", "request_id": R, "serial": HEX}
    service -> certs/issued  {"type": "certificate", "request_id": R, "certificate": PEM chain}
                             {"type": "refused", "request_id": R, "reason": TOKEN, "detail": TEXT}
                             {"type": "recorded", "request_id": R, "serial": HEX}

The candidate lives in ``<store>/.renewal/`` (0700: ``device.key`` 0600, ``device.crt``,
``state.json``) and goes through three phases, each written atomically before it counts:

``requested``  key and CSR made; the CSR is re-sent with the same request id after a timeout or a
               reconnect (the service answers a repeated request with the same certificate).
``received``   the certificate was checked (our key, our identity, chains to ``ca.crt``). The agent
               disconnects and connects with the candidate. The old credentials stay untouched in
               the credential directory: if the candidate is refused, the agent goes back to them.
``installed``  a connection with the candidate succeeded; key and certificate were committed into
               the credential directory with the store's journaled, all-or-nothing commit
               (``hardware.store.CredentialStore``). The agent reports ``installed`` until the
               service answers ``recorded``; then ``.renewal/`` is deleted.

If the current credentials are refused for good while a ``received`` candidate exists (the agent
died between connecting with the candidate and committing it, and the service has since revoked the
old certificate as superseded), the agent tries the candidate.

``cryptography`` (key generation, the CSR, reading the answer) and the credential store are
imported inside the methods that need them, when a renewal begins or ends: an agent that is not
renewing runs with the stdlib ``ssl`` alone, which keeps its RSS within the device budget
(bench/notes/agent_footprint.md). Loading, clearing and the phases need neither.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from device_agent.credentials import Credentials
from device_agent.errors import CredentialError, RenewalError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["RENEWAL_DIR", "RenewalState", "RenewalStore", "make_csr"]

RENEWAL_DIR = ".renewal"


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """tmp file with its final mode from the first byte, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def make_csr(key: ec.EllipticCurvePrivateKey, *, device_id: str, spiffe_id: str) -> bytes:
    """A CSR naming the device (CN and SAN URI); the service checks both against the topic."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class RenewalState:
    request_id: str
    phase: str  # requested | received | installed
    started_at: float
    serial: str | None = None


class RenewalStore:
    """``<store>/.renewal``: the candidate key and certificate and the phase they are in."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.path = store / RENEWAL_DIR
        self.key_file = self.path / "device.key"
        self.cert_file = self.path / "device.crt"
        self.csr_file = self.path / "csr.pem"
        self._state_file = self.path / "state.json"

    def load(self) -> RenewalState | None:
        try:
            doc = json.loads(self._state_file.read_text(encoding="utf-8"))
            return RenewalState(**doc)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            # A damaged state is a renewal that never happened: start again.
            self.clear()
            return None

    def _save(self, state: RenewalState) -> None:
        _write_atomic(self._state_file, json.dumps(asdict(state)).encode(), 0o600)

    def begin(self, creds: Credentials) -> tuple[RenewalState, bytes]:
        """New key and CSR (phase ``requested``)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        self.clear()
        self.path.mkdir(mode=0o700, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        csr = make_csr(key, device_id=creds.device_id, spiffe_id=creds.identity.spiffe_id)
        _write_atomic(self.key_file, key_pem, 0o600)
        _write_atomic(self.csr_file, csr, 0o644)
        state = RenewalState(secrets.token_hex(8), "requested", dt.datetime.now(dt.UTC).timestamp())
        self._save(state)
        return state, csr

    def csr(self) -> bytes:
        return self.csr_file.read_bytes()

    def accept(self, chain_pem: bytes, creds: Credentials) -> Credentials:
        """Check the issued certificate against our key and identity; phase ``received``."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.x509.oid import ExtendedKeyUsageOID

        state = self.load()
        if state is None or state.phase != "requested":
            raise RenewalError("no renewal is waiting for a certificate", device_id=creds.device_id)
        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
            key = serialization.load_pem_private_key(self.key_file.read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise RenewalError(
                f"unreadable certificate: {exc}", device_id=creds.device_id
            ) from None
        if len(chain) < 2:
            raise RenewalError("the answer lacks the issuing CA", device_id=creds.device_id)
        leaf = chain[0]
        pub, der = serialization.PublicFormat.SubjectPublicKeyInfo, serialization.Encoding.DER
        if leaf.public_key().public_bytes(der, pub) != key.public_key().public_bytes(der, pub):
            raise RenewalError("the certificate is not for our new key", device_id=creds.device_id)
        now = dt.datetime.now(dt.UTC)
        if (
            not leaf.not_valid_before_utc
            <= now + dt.timedelta(minutes=5)
            < leaf.not_valid_after_utc
        ):
            raise RenewalError("the certificate is not valid now", device_id=creds.device_id)
        try:
            eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise RenewalError("the certificate lacks clientAuth", device_id=creds.device_id)
        serial = format(leaf.serial_number, "x")
        if serial == creds.serial:
            raise RenewalError("the certificate is the one we have", device_id=creds.device_id)
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain[:2])
        _write_atomic(self.cert_file, pem, 0o644)
        # Identity (CN, SAN URI) and chain to ca.crt: the same check as at start-up, made by
        # OpenSSL as the broker will make it, before the phase says the candidate is usable.
        candidate = self.candidate(creds)
        self._save(RenewalState(state.request_id, "received", state.started_at, serial))
        return candidate

    def candidate(self, creds: Credentials) -> Credentials:
        try:
            return creds.with_files(self.key_file, self.cert_file)
        except CredentialError as exc:
            raise RenewalError(
                f"the candidate is unusable: {exc.reason}", device_id=creds.device_id
            ) from None

    def install(self, creds: Credentials) -> None:
        """Commit the candidate into the credential directory (all or nothing); ``installed``."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from hardware.codec import ObjectKind
        from hardware.errors import StoreError
        from hardware.store import CredentialStore

        state = self.load()
        if state is None or state.phase != "received":
            return
        chain = x509.load_pem_x509_certificates(self.cert_file.read_bytes())
        pem = serialization.Encoding.PEM
        leaf, issuing = chain[0].public_bytes(pem), chain[1].public_bytes(pem)
        try:
            store = CredentialStore(self.store)
            tag = f"renewal-{state.request_id}"
            store.stage_whole(ObjectKind.KEY, self.key_file.read_bytes(), tag=tag)
            store.stage_whole(ObjectKind.CERT, leaf, tag=tag)
            kinds = [ObjectKind.KEY, ObjectKind.CERT]
            if (self.store / "chain.crt").read_bytes() != issuing:
                store.stage_whole(ObjectKind.CHAIN, issuing, tag=tag)
                kinds.append(ObjectKind.CHAIN)
            store.commit(kinds)
        except (StoreError, OSError) as exc:
            raise RenewalError(
                f"cannot store the new credentials: {exc}", device_id=creds.device_id
            ) from None
        self._save(RenewalState(state.request_id, "installed", state.started_at, state.serial))

    def clear(self) -> None:
        if not self.path.exists():
            return
        for name in ("state.json", "device.crt", "csr.pem", "device.key"):
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
        for leftover in self.path.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.path.rmdir()
