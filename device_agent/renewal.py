"""Certificate renewal on the device: new key, CSR, check the answer, switch make-before-break.

Theory of operation
-------------------
At ``renewal.at`` of the certificate's lifetime (2/3 by default) the agent makes a new P-256 key
*on the device* and sends a CSR on ``devices/<id>/certs/csr``. The renewal service answers on
``devices/<id>/certs/issued``. The messages (JSON with a ``type``: ``csr`` and ``installed`` from
the device; ``certificate``, ``refused`` and ``recorded`` from the service) are defined, for both
sides, in ``provisioning/renewal_protocol.py``.

The candidate lives in ``<store>/.renewal/`` (0700: ``device.key`` 0600, ``device.crt``,
``state.json``) and goes through three phases, each written atomically before it counts:

``requested``  key and CSR made; the CSR is re-sent with the same request id after a timeout or a
               reconnect (the service answers a repeated request with the same certificate).
``received``   the certificate was checked (our key, our identity, chains to ``ca.crt``, clientAuth,
               valid now, a new serial). The agent disconnects and connects with the candidate.
               The old credentials stay untouched in the credential directory: if the candidate
               is refused, the agent goes back to them.
``installed``  a connection with the candidate succeeded; key and certificate were committed into
               the credential directory with the store's journaled, all-or-nothing commit
               (``hardware.store.CredentialStore``). The agent reports ``installed`` until the
               service answers ``recorded``; then ``.renewal/`` is deleted.

If the current credentials are refused for good while a ``received`` candidate exists (the agent
died between connecting with the candidate and committing it, and the service has since revoked the
old certificate as superseded), the agent tries the candidate.

The agent process never imports ``cryptography`` (its own OpenSSL would add about 11 MB of RSS
for the rest of the process's life, above the device budget: bench/notes/agent_footprint.md). The
key and CSR are made in a short-lived child process (``device_agent.keygen``; in-process only where
cryptography is loaded anyway, as in the fleet simulator). The answer is checked by the stdlib
``ssl``: the PEM blocks are split as text, and the candidate goes through the same OpenSSL check
as the credential directory at start-up (``Credentials.with_files``: key fits, CN and SAN URI,
chain to ``ca.crt``, clientAuth), which also decodes the serial and validity dates. The credential
store is imported when the candidate is installed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import secrets
import ssl
from dataclasses import asdict, dataclass
from pathlib import Path

from device_agent.credentials import Credentials
from device_agent.errors import CredentialError, RenewalError
from device_agent.keygen import make_key_and_csr
from provisioning.keyfiles import atomic_write

__all__ = ["RENEWAL_DIR", "RenewalState", "RenewalStore"]

RENEWAL_DIR = ".renewal"
_PEM_CERT_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.DOTALL)
# A new certificate may start up to this far ahead of our clock (which may lag the CA's).
_CLOCK_SKEW = dt.timedelta(minutes=5)


def _pem_certificates(data: bytes) -> list[str]:
    """The CERTIFICATE blocks of ``data``, each re-encoded in the one canonical PEM layout.

    Split as text, not parsed: whether a block is a certificate for our key and identity is for
    OpenSSL to judge (``Credentials.with_files``). Re-encoding through the stdlib's base64 helpers
    drops text between and around the blocks and CRLF line ends, and makes equal
    certificates equal bytes. Raises ValueError for a block that is not base64 or is empty.
    """
    blocks = []
    for match in _PEM_CERT_BLOCK.finditer(data):
        der = ssl.PEM_cert_to_DER_cert(match.group().decode("ascii"))
        if not der:
            msg = "an empty CERTIFICATE block"
            raise ValueError(msg)
        blocks.append(ssl.DER_cert_to_PEM_cert(der))
    return blocks


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
        atomic_write(self._state_file, json.dumps(asdict(state)).encode(), mode=0o600)

    def begin(self, creds: Credentials) -> tuple[RenewalState, bytes]:
        """New key and CSR (phase ``requested``); RenewalError if they cannot be made."""
        self.clear()
        self.path.mkdir(mode=0o700, exist_ok=True)
        # In a child process (see device_agent.keygen): the key goes straight to its 0600 file.
        make_key_and_csr(
            self.key_file,
            self.csr_file,
            device_id=creds.device_id,
            spiffe_id=creds.identity.spiffe_id,
            keystore=creds.keystore,
        )
        try:
            csr = self.csr_file.read_bytes()
        except OSError as exc:
            raise RenewalError(f"no CSR was written: {exc}", device_id=creds.device_id) from None
        if not self.key_file.is_file() or not csr.startswith(b"-----BEGIN CERTIFICATE REQUEST"):
            raise RenewalError("key generation left no key or CSR", device_id=creds.device_id)
        state = RenewalState(secrets.token_hex(8), "requested", dt.datetime.now(dt.UTC).timestamp())
        self._save(state)
        return state, csr

    def csr(self) -> bytes:
        return self.csr_file.read_bytes()

    def accept(self, chain_pem: bytes, creds: Credentials) -> Credentials:
        """Check the issued certificate against our key and identity; phase ``received``."""
        state = self.load()
        if state is None or state.phase != "requested":
            raise RenewalError("no renewal is waiting for a certificate", device_id=creds.device_id)
        try:
            chain = _pem_certificates(chain_pem)
        except ValueError as exc:
            raise RenewalError(
                f"unreadable certificate: {exc}", device_id=creds.device_id
            ) from None
        if not chain:
            raise RenewalError(
                "unreadable certificate: no PEM certificate in the answer",
                device_id=creds.device_id,
            )
        if len(chain) < 2:
            raise RenewalError("the answer lacks the issuing CA", device_id=creds.device_id)
        # Leaf and issuing CA only, as device.crt holds them; a root sent along is not needed.
        atomic_write(self.cert_file, "".join(chain[:2]).encode("ascii"), mode=0o644)
        try:
            # OpenSSL judges the candidate as the broker will and as it judges device.crt at
            # start-up: our new key fits the leaf (a certificate for any other key is refused
            # here), CN and SAN URI are our identity, it chains through the issuing CA to
            # ca.crt, clientAuth. It also decodes the serial and dates checked below.
            candidate = self.candidate(creds)
            now = dt.datetime.now(dt.UTC)
            if not candidate.not_before <= now + _CLOCK_SKEW < candidate.not_after:
                raise RenewalError("the certificate is not valid now", device_id=creds.device_id)
            if candidate.serial == creds.serial:
                raise RenewalError("the certificate is the one we have", device_id=creds.device_id)
        except RenewalError:
            # Never leave a refused certificate where a later phase could pick it up.
            self.cert_file.unlink(missing_ok=True)
            raise
        self._save(RenewalState(state.request_id, "received", state.started_at, candidate.serial))
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
        from hardware.codec import ObjectKind
        from hardware.errors import StoreError
        from hardware.store import CredentialStore

        state = self.load()
        if state is None or state.phase != "received":
            return
        try:
            chain = _pem_certificates(self.cert_file.read_bytes())
            if len(chain) < 2:
                msg = f"{self.cert_file} lost its issuing CA"
                raise ValueError(msg)
            leaf, issuing = chain[0].encode("ascii"), chain[1].encode("ascii")
            try:
                current_chain = _pem_certificates((self.store / "chain.crt").read_bytes())
            except FileNotFoundError:
                current_chain = []  # staged below, so device.crt gets its issuing CA back
            store = CredentialStore(self.store)
            tag = f"renewal-{state.request_id}"
            store.stage_whole(ObjectKind.KEY, self.key_file.read_bytes(), tag=tag)
            store.stage_whole(ObjectKind.CERT, leaf, tag=tag)
            kinds = [ObjectKind.KEY, ObjectKind.CERT]
            # Compared block by block after re-encoding, so a chain.crt written with another line
            # layout is not staged again for nothing.
            if current_chain != [chain[1]]:
                store.stage_whole(ObjectKind.CHAIN, issuing, tag=tag)
                kinds.append(ObjectKind.CHAIN)
            store.commit(kinds)
        except (StoreError, OSError, ValueError) as exc:
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
