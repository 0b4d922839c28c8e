"""A PKI directory: the fleet CA on disk, with its registry, ledger and CRL.

Layout (docs/ARCHITECTURE.md, "Files")::

    pki.toml  root.crt  issuing.crt  server.crt  crl.pem  registry.sqlite3  ledger.jsonl
    private/  root.key  issuing.key  server.key           (0700 / 0600)

Only ``ca init`` uses the root key: issuing, revoking and CRLs need the issuing CA alone, so
``private/root.key`` can be moved offline right after init.

Either CA key can live in a PKCS#11 token instead (``pki.toml`` then names it by a ``pkcs11:``
URI and ``private/`` holds no file for it): everything that signs gets a
:class:`~provisioning.signing.Signer` and does not care which (docs/HSM.md).

Every change runs inside the registry's write transaction (see :mod:`provisioning.registry`): the
registry row, the ledger line, the CRL and the credential directory land together or not at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import getpass
import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from provisioning import hsm
from provisioning.certificates import (
    PublicKey,
    build_crl,
    build_issuing_ca,
    build_leaf,
    build_root_ca,
    build_server_cert,
    fingerprint,
    generate_key,
    load_certificate,
    load_csr,
    public_key_sha256,
)
from provisioning.config import PASSPHRASE_ENV, PKIConfig
from provisioning.errors import (
    DeviceExistsError,
    InvalidIdentityError,
    PKIError,
    PKIExistsError,
    PKINotFoundError,
    RegistryError,
    RegistryUnavailableError,
    UnknownDeviceError,
)
from provisioning.identity import Identity, IdentityKind
from provisioning.keyfiles import (
    KEY_MODE,
    PRIVATE_DIR_MODE,
    StagedDirectory,
    atomic_write,
    load_private_key,
    private_key_pem,
)
from provisioning.ledger import Ledger, LedgerEntry, LedgerHead, export_jsonl
from provisioning.offers import OFFERS_FILE, Offer, OfferBook, OfferEvent, OfferState, next_state
from provisioning.registry import (
    CertRecord,
    RegistrationRecord,
    Registry,
    RegistryBackend,
    SecretRecord,
)
from provisioning.signing import FileSigner, Signer

if TYPE_CHECKING:
    from provisioning.registry_pg import PgLedger, PostgresRegistry, StationRecord

log = logging.getLogger("iotauth.registry")
T = TypeVar("T")
# How long a station keeps retrying a transaction while the shared registry is unreachable (a
# database restart, a failover): long enough for a restart, short enough for a person waiting.
REGISTRY_RETRY_SECONDS = 60.0

__all__ = [
    "PKI",
    "REVOCATION_REASONS",
    "CRLInfo",
    "Issued",
    "LedgerReport",
    "Prepared",
    "identity_json",
    "open_root",
    "passphrase_from_env",
    "station_id",
]

REVOCATION_REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "ca-compromise": x509.ReasonFlags.ca_compromise,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
    "privilege-withdrawn": x509.ReasonFlags.privilege_withdrawn,
}
_HW_SERIAL_RE = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces


def passphrase_from_env() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def station_id() -> str:
    """Who issues: ``IOTAUTH_STATION_ID`` or user@host, recorded in the registry and ledger."""
    explicit = os.environ.get("IOTAUTH_STATION_ID")
    if explicit:
        return explicit
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _now(now: dt.datetime | None) -> dt.datetime:
    return (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).replace(microsecond=0)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class Issued:
    """A freshly issued certificate and, for station-generated keys, its private key."""

    identity: Identity
    certificate: x509.Certificate
    issuing: x509.Certificate
    root: x509.Certificate
    record: CertRecord
    key_pem: bytes | None = None
    out: Path | None = None

    @property
    def cert_chain_pem(self) -> bytes:
        """``device.crt``: the leaf followed by the issuing CA."""
        return _pem(self.certificate) + _pem(self.issuing)

    def identity_json(self, broker: str | None = None) -> bytes:
        return identity_json(self.identity, broker)


def identity_json(
    identity: Identity, broker: str | None = None, *, keystore: str = "file"
) -> bytes:
    """``identity.json`` of a credential directory: who this is and, optionally, the broker.

    ``keystore`` other than ``file`` (``tpm``: ``device.key`` is a TPM-wrapped blob) is recorded
    so that whoever uses the key knows where it lives (``hardware.keygen.keystore_of``).
    """
    doc: dict[str, Any] = {
        "kind": identity.kind.value,
        "trust_domain": identity.trust_domain,
        "spiffe_id": identity.spiffe_id,
    }
    doc["device_id" if identity.is_device else "service_name"] = identity.name
    if broker:
        doc["broker"] = broker
    if keystore != "file":
        doc["keystore"] = keystore
    return (json.dumps(doc, indent=2) + "\n").encode()


@dataclass(frozen=True, slots=True)
class CRLInfo:
    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    revoked: int

    def stale(self, now: dt.datetime | None = None) -> bool:
        return _now(now) >= self.next_update


@dataclass(frozen=True, slots=True)
class LedgerReport:
    entries: int
    head: LedgerHead
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A signed certificate that is not yet recorded (the first half of two-phase issuance).

    The bench station uploads it to a device, verifies and locks the device, and only then calls
    :meth:`PKI.record`; if the device fails after the certificate may have reached it, the station
    calls :meth:`PKI.void`, which records it as revoked so the CRL covers it.
    """

    identity: Identity
    certificate: x509.Certificate
    issuing: x509.Certificate
    key_pem: bytes | None
    key_origin: str
    hardware_serial: str | None
    rotate: bool

    @property
    def cert_chain_pem(self) -> bytes:
        """``device.crt``: the leaf followed by the issuing CA."""
        return _pem(self.certificate) + _pem(self.issuing)


@dataclass(slots=True)
class _Pending:
    prepared: Prepared
    staged: StagedDirectory | None

    @property
    def identity(self) -> Identity:
        return self.prepared.identity


class PKI:
    """An open PKI directory. One instance per process (it holds a SQLite connection)."""

    def __init__(self, path: Path, *, passphrase: bytes | None = None) -> None:
        self.path = path
        if not (path / "pki.toml").is_file():
            raise PKINotFoundError(path)
        self.config = PKIConfig.load(path / "pki.toml")
        self._passphrase = passphrase
        self.root = self._load_cert("root.crt")
        self.issuing = self._load_cert("issuing.crt")
        self.issuer_fingerprint = fingerprint(self.issuing)
        self.registry: RegistryBackend
        self.ledger: Ledger | PgLedger
        if self.config.registry:
            self.registry, self.ledger = _open_shared(self.config.registry, self.issuer_fingerprint)
            self._check_station_known()
        else:
            self.registry = Registry(path / "registry.sqlite3")
            self.ledger = Ledger(path / "ledger.jsonl")
        self._issuing_key: Signer | None = None
        self._offers: OfferBook | None = None

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, passphrase: bytes | None = None) -> PKI:
        return cls(path, passphrase=passphrase)

    @classmethod
    def init(
        cls,
        path: Path,
        *,
        trust_domain: str,
        server_names: Sequence[str] = (),
        passphrase: bytes | None = None,
        device_days: int = 90,
        now: dt.datetime | None = None,
        issuing_key: str | None = None,
        root_key: str | None = None,
        existing_root: tuple[x509.Certificate, Signer] | None = None,
        registry: str | None = None,
        station: str = "main",
    ) -> PKI:
        """Create root, issuing CA, server certificate, empty registry, ledger and CRL.

        ``issuing_key`` / ``root_key``: a ``pkcs11:`` URI to make that CA key inside a token
        instead of a file in ``private/``. ``existing_root`` (from :func:`open_root`) keeps an
        existing root instead of making one: the new PKI gets a new issuing CA under the same
        trust anchor (the way back after losing the issuing CA's token); its key is not stored.

        With ``registry`` (a postgresql:// URL) the registry and ledger live in that database,
        which must be empty of any other PKI, and this directory is its first station,
        ``station``.

        Built in a staging directory and renamed into place, so a failure leaves nothing behind
        (a key already made in a token is deleted again).
        """
        if (path / "pki.toml").exists():
            raise PKIExistsError(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            msg = f"{path} exists and is not empty; choose a new directory for the PKI"
            raise PKIError(msg)
        root_uri = hsm.Pkcs11URI.parse(root_key) if root_key else None
        if existing_root is not None:
            _check_root(existing_root[0], trust_domain)
            kept = existing_root[1]
            root_uri = kept.uri if isinstance(kept, hsm.Pkcs11Signer) else None
        issuing_uri = hsm.Pkcs11URI.parse(issuing_key) if issuing_key else None
        if (
            root_uri
            and issuing_uri
            and (root_uri.token, root_uri.object)
            == (
                issuing_uri.token,
                issuing_uri.object,
            )
        ):
            msg = "the root and issuing CA keys need different object= names"
            raise PKIError(msg)
        config = PKIConfig(
            trust_domain=trust_domain,
            encrypted_keys=bool(passphrase),
            device_days=device_days,
            issuing_key=str(issuing_uri) if issuing_uri else None,
            root_key=str(root_uri) if root_uri else None,
            registry=registry or "",
            station=station if registry else "",
        )
        names = ["localhost", "127.0.0.1", *server_names]
        for name in server_names:
            _check_server_name(name)
        # Connect (and migrate) before any key is made: a wrong URL or password changes nothing.
        shared = _open_empty_registry(config) if registry else None
        made: list[Signer] = []
        root: tuple[x509.Certificate | None, Signer]
        try:
            if existing_root is None:
                made.append(_new_ca_key(root_uri))
                root = (None, made[0])
            else:
                root = existing_root
            made.append(_new_ca_key(issuing_uri))
            cls._build(path, config, names, root, made[-1], passphrase, _now(now), shared)
        except BaseException:
            _destroy_token_keys(made)
            raise
        finally:
            for signer in made:
                signer.close()
            if shared is not None:
                shared.close()
        return cls(path, passphrase=passphrase)

    @staticmethod
    def _build(
        path: Path,
        config: PKIConfig,
        names: list[str],
        root_pair: tuple[x509.Certificate | None, Signer],
        issuing_key: Signer,
        passphrase: bytes | None,
        when: dt.datetime,
        shared: PostgresRegistry | None = None,
    ) -> None:
        """The new directory; its registry and ledger are files in it, or ``shared``."""
        trust_domain = config.trust_domain
        server_key = generate_key()
        kept_root, root_key = root_pair
        root = kept_root or build_root_ca(root_key, trust_domain, now=when)
        issuing = build_issuing_ca(
            issuing_key.public_key(),
            trust_domain,
            root=root,
            root_key=root_key,
            now=when,
            # A second issuing CA under the same root gets a name of its own, as does a station.
            generation=when.strftime("%Y%m%d%H%M%S") if kept_root else "1",
            common_name=f"{trust_domain} Issuing CA {config.station}" if shared else None,
        )
        server = build_server_cert(
            server_key.public_key(), names=names, issuer=issuing, issuer_key=issuing_key, now=when
        )
        with StagedDirectory(path) as staged:
            private = staged.path / "private"
            private.mkdir(mode=PRIVATE_DIR_MODE)
            keys = [("issuing", issuing_key)] + ([] if kept_root else [("root", root_key)])
            for name, signer in keys:
                if isinstance(signer, FileSigner):  # a token-held (or kept offline) key: no file
                    atomic_write(
                        private / f"{name}.key",
                        private_key_pem(signer.key, passphrase),
                        mode=KEY_MODE,
                    )
            atomic_write(
                private / "server.key", private_key_pem(server_key, passphrase), mode=KEY_MODE
            )
            staged.write("pki.toml", config.to_toml().encode())
            staged.write("root.crt", _pem(root))
            staged.write("issuing.crt", _pem(issuing))
            staged.write("server.crt", _pem(server) + _pem(issuing))
            os.chmod(staged.path, 0o755)  # noqa: S103 - certificates are public; private/ is 0700
            issuing_fp = fingerprint(issuing)
            store: RegistryBackend
            ledger: Ledger | PgLedger
            if shared is None:
                store = Registry(staged.path / "registry.sqlite3", create=True)
                ledger = Ledger(staged.path / "ledger.jsonl")
            else:
                from provisioning.registry_pg import PgLedger

                store, ledger = shared, PgLedger(shared, signer_id=issuing_fp)
            try:
                with store.transaction():
                    if shared is not None:
                        shared.set_meta("root", fingerprint(root))
                        shared.set_meta("trust_domain", trust_domain)
                        shared.add_station(config.station, issuing_fp, _pem(issuing))
                    entries, _ = ledger.append(
                        [
                            (
                                "ca-init",
                                {
                                    "trust_domain": trust_domain,
                                    "root": fingerprint(root),
                                    "issuing": issuing_fp,
                                    "server": fingerprint(server),
                                    "server_names": names,
                                    **({"root_reused": True} if kept_root else {}),
                                    "station": station_id(),
                                    **({"station_name": config.station} if shared else {}),
                                },
                            )
                        ],
                        signer=issuing_key,
                        now=when,
                    )
                    _record_head(store, entries)
                    crl = _make_crl(store, config, issuing, issuing_key, when, issuing_fp)
                    atomic_write(staged.path / "crl.pem", crl)
                    if shared is not None:
                        staged.commit()  # before COMMIT: a failed rename leaves the database empty
            finally:
                if shared is None:
                    store.close()
            if shared is None:
                staged.commit()

    def close(self) -> None:
        if self._issuing_key is not None:
            self._issuing_key.close()
            self._issuing_key = None
        self.registry.close()
        if self._offers is not None:
            self._offers.close()

    def __enter__(self) -> PKI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load_cert(self, name: str) -> x509.Certificate:
        return load_certificate(self.path / name)

    @property
    def trust_domain(self) -> str:
        return self.config.trust_domain

    def issuing_key(self) -> Signer:
        """The issuing CA's signer, opened on first use (a token asks for its PIN only then)."""
        if self._issuing_key is None:
            expected = self.issuing.public_key()
            if self.config.issuing_key:
                if not isinstance(expected, ec.EllipticCurvePublicKey):
                    msg = "issuing.crt must hold an EC key when the issuing key is in a token"
                    raise PKIError(msg)
                self._issuing_key = hsm.open_key(self.config.issuing_key, public_key=expected)
            else:
                path = self.path / "private" / "issuing.key"
                key = load_private_key(path, self._passphrase)
                if key.public_key() != expected:
                    msg = "private/issuing.key does not belong to issuing.crt"
                    raise PKIError(msg)
                self._issuing_key = FileSigner(key, str(path))
        return self._issuing_key

    # -- issuance ------------------------------------------------------------------------------

    def issue(
        self,
        name: str,
        *,
        kind: IdentityKind = IdentityKind.DEVICE,
        csr: bytes | None = None,
        out: Path | None = None,
        rotate: bool = False,
        hardware_serial: str | None = None,
        broker: str | None = None,
        days: int | None = None,
        now: dt.datetime | None = None,
        extended_key_usage: Iterable[x509.ObjectIdentifier] | None = None,
    ) -> Issued:
        """Issue one certificate, from a CSR or with a key generated here.

        With ``out``, writes a credential directory (key only if generated here). Raises before
        anything is written if the name, the CSR, the hardware serial or the directory is wrong.
        """
        return self.issue_many(
            [name],
            kind=kind,
            csr=csr,
            out_dirs=[out] if out else None,
            rotate=rotate,
            hardware_serials=[hardware_serial] if hardware_serial else None,
            broker=broker,
            days=days,
            now=now,
            extended_key_usage=extended_key_usage,
        )[0]

    def issue_many(
        self,
        names: Sequence[str],
        *,
        kind: IdentityKind = IdentityKind.DEVICE,
        csr: bytes | None = None,
        out_dirs: Sequence[Path] | None = None,
        rotate: bool = False,
        hardware_serials: Sequence[str | None] | None = None,
        broker: str | None = None,
        days: int | None = None,
        now: dt.datetime | None = None,
        extended_key_usage: Iterable[x509.ObjectIdentifier] | None = None,
    ) -> list[Issued]:
        """Issue a batch in one transaction and one ledger fsync (fleets, benchmarks)."""
        if csr is not None and len(names) != 1:
            msg = "a CSR issues exactly one certificate"
            raise ValueError(msg)
        if out_dirs is not None and len(out_dirs) != len(names):
            msg = "out_dirs must match names"
            raise ValueError(msg)
        prepared = self._prepare_batch(
            names,
            kind=kind,
            csr=csr,
            rotate=rotate,
            hardware_serials=hardware_serials,
            days=days,
            now=now,
            extended_key_usage=extended_key_usage,
        )
        pending: list[_Pending] = []
        try:
            for idx, item in enumerate(prepared):
                staged = StagedDirectory(out_dirs[idx]) if out_dirs else None
                pending.append(_Pending(item, staged))
                if staged is not None:
                    self._stage_credentials(item, staged, broker)
            return self._commit_issuance(pending, rotate=rotate, now=_now(now))
        except BaseException:
            for entry in pending:
                if entry.staged is not None:
                    entry.staged.discard()
            raise

    def prepare(
        self,
        name: str,
        *,
        kind: IdentityKind = IdentityKind.DEVICE,
        csr: bytes | None = None,
        rotate: bool = False,
        hardware_serial: str | None = None,
        days: int | None = None,
        now: dt.datetime | None = None,
    ) -> Prepared:
        """Check and sign, but record nothing: see :class:`Prepared`."""
        return self._prepare_batch(
            [name],
            kind=kind,
            csr=csr,
            rotate=rotate,
            hardware_serials=[hardware_serial] if hardware_serial else None,
            days=days,
            now=now,
        )[0]

    def record(
        self,
        prepared: Prepared,
        *,
        details: dict[str, Any] | None = None,
        now: dt.datetime | None = None,
    ) -> CertRecord:
        """Record a prepared certificate as issued; ``details`` go into its ledger line."""
        return self._commit_issuance(
            [_Pending(prepared, None)], rotate=prepared.rotate, now=_now(now), details=details
        )[0].record

    def void(
        self,
        prepared: Prepared,
        *,
        reason: str = "cessation-of-operation",
        details: dict[str, Any] | None = None,
        now: dt.datetime | None = None,
    ) -> CertRecord:
        """Record a prepared certificate that may exist on a device as revoked; re-sign the CRL."""
        when = _now(now)
        return self._write(
            when,
            lambda change: self._void_in(
                change, prepared, reason=reason, details=details, now=when
            ),
        )

    def _void_in(
        self,
        change: _Change,
        prepared: Prepared,
        *,
        reason: str,
        details: dict[str, Any] | None,
        now: dt.datetime,
    ) -> CertRecord:
        record = dataclasses.replace(
            self._record_for(prepared, now),
            status="revoked",
            revoked_at=now,
            revocation_reason=reason,
        )
        self.registry.insert(record)
        event = _issue_event(record)
        event.update(details or {})
        change.events.append(("issue", event))
        change.events.append(("revoke", _revoke_event(record, reason, record.issued_by)))
        change.crl_dirty = True
        return record

    def lifetime_days(self, kind: IdentityKind, days: int | None = None) -> int:
        """The validity asked for: ``days``, else pki.toml's default for ``kind``; at least 1."""
        if days is None:
            return (
                self.config.device_days if kind is IdentityKind.DEVICE else self.config.service_days
            )
        if days <= 0:  # 0 once meant "the default": a 90-day certificate for --days 0
            msg = f"--days must be at least 1, not {days}"
            raise PKIError(msg)
        return days

    def _prepare_batch(
        self,
        names: Sequence[str],
        *,
        kind: IdentityKind,
        csr: bytes | None,
        rotate: bool,
        hardware_serials: Sequence[str | None] | None,
        days: int | None,
        now: dt.datetime | None,
        extended_key_usage: Iterable[x509.ObjectIdentifier] | None = None,
    ) -> list[Prepared]:
        serials = list(hardware_serials) if hardware_serials else [None] * len(names)
        identities = self._validate_batch(names, kind, serials, rotate=rotate)
        lifetime = self.lifetime_days(kind, days)
        when = _now(now)
        eku = list(extended_key_usage or (ExtendedKeyUsageOID.CLIENT_AUTH,))
        issuer_key = self.issuing_key()
        csr_key: PublicKey | None = load_csr(csr)[1] if csr is not None else None
        out: list[Prepared] = []
        for ident, hardware_serial in zip(identities, serials, strict=True):
            key_pem: bytes | None = None
            if csr_key is not None:
                public_key: PublicKey = csr_key
            else:
                key = generate_key()
                public_key = key.public_key()
                key_pem = private_key_pem(key)
            cert = build_leaf(
                ident,
                public_key,
                issuer=self.issuing,
                issuer_key=issuer_key,
                now=when,
                days=lifetime,
                extended_key_usage=eku,
            )
            origin = "csr" if csr_key else "station"
            out.append(
                Prepared(ident, cert, self.issuing, key_pem, origin, hardware_serial, rotate)
            )
        return out

    def _validate_batch(
        self,
        names: Sequence[str],
        kind: IdentityKind,
        serials: Sequence[str | None],
        *,
        rotate: bool,
    ) -> list[Identity]:
        identities = [Identity(kind, n, self.trust_domain) for n in names]
        if len({i.name for i in identities}) != len(identities):
            msg = "the batch names the same identity twice"
            raise RegistryError(msg)
        for hw in serials:
            if hw is not None and not _HW_SERIAL_RE.fullmatch(hw):
                raise InvalidIdentityError(
                    hw.encode("unicode_escape").decode(),
                    "use 1-128 printable ASCII characters without spaces",
                    what="hardware serial",
                )
        states = self.registry.name_states([i.name for i in identities])  # one query
        for ident in identities:
            self._check_name_free(
                ident, rotate=rotate, state=states.get(ident.name, (set(), False))
            )
        return identities

    def _check_name_free(
        self, ident: Identity, *, rotate: bool, state: tuple[set[str], bool] | None = None
    ) -> None:
        """``state``: (kinds the name ever had, has an active certificate), if already read."""
        if state is None:
            history = self.registry.history(ident.name)
            state = ({r.kind for r in history}, any(r.status == "active" for r in history))
        # A name never changes kind, even after revocation: an exported broker (Mosquitto, EMQX)
        # that still lists the old identity's rights would otherwise hand them to the new one.
        other = state[0] - {ident.kind.value}
        if other:
            msg = (
                f"{ident.name!r} is (or was) the name of a {other.pop()}; device ids and "
                "service names must not collide, even after revocation"
            )
            raise RegistryError(msg)
        if state[1] and not rotate:
            raise DeviceExistsError(ident.name, kind=ident.kind.value)

    def _stage_credentials(
        self, item: Prepared, staged: StagedDirectory, broker: str | None
    ) -> None:
        """Write the credential directory of docs/ARCHITECTURE.md into a staging directory."""
        if item.key_pem is not None:
            staged.write("device.key", item.key_pem, mode=KEY_MODE)
        staged.write("device.crt", item.cert_chain_pem)
        staged.write("chain.crt", _pem(self.issuing))
        staged.write("ca.crt", _pem(self.root))
        staged.write("identity.json", identity_json(item.identity, broker))

    def _issued(self, item: _Pending, record: CertRecord) -> Issued:
        return Issued(
            identity=item.identity,
            certificate=item.prepared.certificate,
            issuing=self.issuing,
            root=self.root,
            record=record,
            key_pem=item.prepared.key_pem,
            out=item.staged.final if item.staged else None,
        )

    def _record_for(self, p: Prepared, now: dt.datetime, station: str | None = None) -> CertRecord:
        """The registry row of ``p``; ``station`` (``station_id()``) once per batch, not per row."""
        cert = p.certificate
        return CertRecord(
            kind=p.identity.kind.value,
            name=p.identity.name,
            serial=format(cert.serial_number, "x"),
            fingerprint=fingerprint(cert),
            public_key_sha256=public_key_sha256(cert.public_key()),  # type: ignore[arg-type]
            key_origin=p.key_origin,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            status="active",
            issued_at=now,
            issued_by=station or station_id(),
            hardware_serial=p.hardware_serial,
            issuer=self.issuer_fingerprint if self.registry.shared else None,
        )

    def _commit_issuance(
        self,
        pending: list[_Pending],
        *,
        rotate: bool,
        now: dt.datetime,
        details: dict[str, Any] | None = None,
    ) -> list[Issued]:
        # The rows (fingerprints, hashes) are computed before the lock: under it, a batch only
        # checks, inserts and chains, so other stations wait as little as possible.
        station = station_id()
        ready = [self._record_for(p.prepared, now, station) for p in pending]
        records = self._write(
            now,
            lambda change: self._issue_in(
                change, pending, rotate=rotate, now=now, details=details, records=ready
            ),
        )
        return [self._issued(p, r) for p, r in zip(pending, records, strict=True)]

    def _issue_in(
        self,
        change: _Change,
        pending: list[_Pending],
        *,
        rotate: bool,
        now: dt.datetime,
        details: dict[str, Any] | None = None,
        records: list[CertRecord] | None = None,
    ) -> list[CertRecord]:
        """Record ``pending`` as issued within ``change`` (the caller holds the lock).

        ``records``: their rows, if already made (outside the lock)."""
        if records is None:
            station = station_id()
            records = [self._record_for(p.prepared, now, station) for p in pending]
        # Re-checked under the lock: another station or process may have issued since prepare.
        states = self.registry.name_states([p.identity.name for p in pending])  # one query
        for item, record in zip(pending, records, strict=True):
            state = states.get(item.identity.name)
            if state is not None and state[1]:
                self._check_name_free(item.identity, rotate=rotate, state=state)
                for old in self.registry.mark_revoked(
                    item.identity.name, reason="superseded", when=now
                ):
                    change.events.append(
                        ("revoke", _revoke_event(old, "superseded", record.issued_by))
                    )
                change.crl_dirty = True
            event = _issue_event(record)
            event.update(details or {})
            change.events.append(("issue", event))
        self.registry.insert_many(records)
        # A rename happens once even when a lost connection makes the transaction run again
        # (StagedDirectory.commit does nothing the second time).
        change.on_commit.extend(p.staged.commit for p in pending if p.staged is not None)
        return records

    # -- revocation and CRL --------------------------------------------------------------------

    def revoke(
        self,
        name: str,
        *,
        reason: str = "unspecified",
        kind: IdentityKind | None = None,
        now: dt.datetime | None = None,
    ) -> list[CertRecord]:
        """Revoke every active certificate of ``name`` and publish a new CRL.

        A device's renewed certificate on offer (provisioning/offers.py) is voided in the same
        change and returned with the others: it exists, so it goes on the CRL now."""
        if reason not in REVOCATION_REASONS:
            msg = (
                f"unknown revocation reason {reason!r}; use one of {', '.join(REVOCATION_REASONS)}"
            )
            raise PKIError(msg)
        Identity(kind or IdentityKind.DEVICE, name, self.trust_domain)  # validates the name
        when = _now(now)
        by = station_id()

        def body(change: _Change) -> list[CertRecord]:
            secret = registration = None
            if kind in (None, IdentityKind.SERVICE):
                secret = self.registry.revoke_secret(name, when)
                registration = self.registry.revoke_registration(name, when)
            if secret is not None:
                event = {"kind": "service", "name": name, "version": secret.version}
                change.events.append(("secret-revoke", {**event, "reason": reason, "station": by}))
            if registration is not None:
                event = {"kind": "service", "name": name, "reason": reason, "station": by}
                change.events.append(("service-unregister", event))
            try:
                rows = self.registry.mark_revoked(
                    name, reason=reason, when=when, kind=kind.value if kind else None
                )
            except UnknownDeviceError:
                # A service with a secret or a registration and no certificate is revoked.
                if secret is None and registration is None:
                    raise
                return []
            change.events.extend(("revoke", _revoke_event(r, reason, by)) for r in rows)
            change.crl_dirty = True
            # A renewed certificate on offer is this device's too: it goes on the same CRL now,
            # not when the renewal service next looks (see provisioning/offers.py).
            if kind in (None, IdentityKind.DEVICE):
                for offer in self._open_offers_of(name):
                    self._void_offer_in(
                        change, offer, reason=reason, answer="the device was revoked", now=when
                    )
                    voided = self.registry.by_serial(offer.new_serial)
                    if voided is not None:
                        rows.append(voided)
            return rows

        return self._write(when, body)

    # -- service secrets (provisioning/service_secrets.py) ----------------------------------------

    def set_service_secret(
        self, name: str, *, now: dt.datetime | None = None
    ) -> tuple[str, SecretRecord, int | None]:
        """Create or rotate the shared secret of service ``name``; return (the secret, its
        verifier, the version it replaced or None).

        The registry stores only the verifier; the ledger records ``secret-create`` or
        ``secret-rotate`` with the version, never the secret. A service needs no certificate to
        have a secret (this registers it); a name that is or was a device's is refused.
        """
        from provisioning.service_secrets import make_secret, make_verifier

        ident = Identity(IdentityKind.SERVICE, name, self.trust_domain)  # validates the name
        when = _now(now)
        secret = make_secret()

        def body(change: _Change) -> tuple[SecretRecord, int | None]:
            state = self.registry.name_states([name]).get(name)
            if state is not None:
                self._check_name_free(ident, rotate=True, state=state)
            old = self.registry.secret(name)
            version = old.version + 1 if old is not None else 1
            record = make_verifier(name, secret, version=version, now=when)
            self.registry.put_secret(record)
            replaced = old.version if old is not None and old.status == "active" else None
            event = {
                "kind": "service",
                "name": name,
                "version": version,
                "mechanism": record.mechanism,
                "iterations": record.iterations,
                "station": station_id(),
            }
            if replaced is not None:
                event["replaces"] = replaced
            change.events.append(("secret-rotate" if old is not None else "secret-create", event))
            return record, replaced

        record, replaced = self._write(when, body)
        return secret, record, replaced

    def register_service(self, name: str, *, now: dt.datetime | None = None) -> RegistrationRecord:
        """Register service ``name`` with no credential of ours (the oidc method: its
        identity provider's token names it); the ledger records ``service-register``.

        Refused (DeviceExistsError) while the service is active in any way: an active
        registration, certificate or secret; a name that is or was a device's is refused too.
        A revoked service may be registered again."""
        ident = Identity(IdentityKind.SERVICE, name, self.trust_domain)  # validates the name
        when = _now(now)

        def body(change: _Change) -> RegistrationRecord:
            state = self.registry.name_states([name]).get(name)
            if state is not None:
                self._check_name_free(ident, rotate=True, state=state)  # the kind only
            secret = self.registry.secret(name)
            registration = self.registry.registration(name)
            secret_active = secret is not None and secret.status == "active"
            registered = registration is not None and registration.status == "active"
            held = [
                what
                for what, active in (
                    ("a certificate", state is not None and state[1]),
                    ("a secret", secret_active),
                    ("a registration", registered),
                )
                if active
            ]
            if held:
                msg = (
                    f"service {name!r} is already registered (it has {held[0]}); "
                    f"'iotauth service revoke {name}' first to register it anew"
                )
                raise RegistryError(msg)
            record = RegistrationRecord(name=name, status="active", registered_at=when)
            self.registry.put_registration(record)
            event = {"kind": "service", "name": name, "station": station_id()}
            change.events.append(("service-register", event))
            return record

        return self._write(when, body)

    def service_registration(self, name: str) -> RegistrationRecord | None:
        """A service's registration by name (active or revoked), or None."""
        return self.registry.registration(name)

    def service_secret(self, name: str) -> SecretRecord | None:
        """The verifier of a service's secret (active or revoked), or None."""
        return self.registry.secret(name)

    # -- renewal offers (provisioning/offers.py) ------------------------------------------------

    @property
    def offers(self) -> OfferBook:
        """``renewals.sqlite3``, opened (and created) on first use."""
        if self._offers is None:
            self._offers = OfferBook(self.path / OFFERS_FILE)
        return self._offers

    def _open_offers_of(self, name: str) -> list[Offer]:
        # No book yet means no renewal service ever ran here: do not create one for a read.
        if self._offers is None and not (self.path / OFFERS_FILE).exists():
            return []
        return self.offers.open_offers(name)

    def offer(
        self, prepared: Prepared, *, request_id: str, replaces: str, now: dt.datetime | None = None
    ) -> Offer:
        """Keep a signed renewal certificate as an open offer, with a ``renewal-offer`` ledger line.

        Checked under the lock: the certificate it replaces is still active and the device has no
        other open offer (PKIError otherwise: the caller voids ``prepared``)."""
        when = _now(now)
        cert = prepared.certificate
        name = prepared.identity.name
        offer = Offer(
            request_id,
            name,
            replaces,
            format(cert.serial_number, "x"),
            _pem(cert),
            when.timestamp(),
            OfferState.OFFERED,
        )

        def body(change: _Change) -> None:
            active = self.registry.active(name)
            if active is None or active.serial != replaces:
                msg = f"{name}'s certificate {replaces} is no longer active"
                raise PKIError(msg)
            if self.offers.open_offers(name):
                msg = f"{name} already has a renewed certificate on offer"
                raise PKIError(msg)
            change.events.append(
                (
                    "renewal-offer",
                    {
                        "name": name,
                        "request_id": request_id,
                        "serial": offer.new_serial,
                        "fingerprint": fingerprint(cert),
                        "replaces": replaces,
                        "not_after": cert.not_valid_after_utc.isoformat(),
                    },
                )
            )
            self._book_write(change, offer)

        self._write(when, body)
        return offer

    def record_offer(
        self, offer: Offer, *, via: str, now: dt.datetime | None = None
    ) -> tuple[Offer, CertRecord | None]:
        """The device uses the offered certificate: register it, revoke the one it replaces.

        Returns the offer as it is now and the new registry row. An offer that is no longer open
        is returned unchanged with None; one whose device changed meanwhile (the replaced
        certificate is not active any more: revoked, or rotated) is voided instead."""
        when = _now(now)

        def body(change: _Change) -> tuple[Offer, CertRecord | None]:
            current = self.offers.get(offer.request_id)
            if current is None or current.state is not OfferState.OFFERED:
                return current or offer, None
            active = self.registry.active(current.device_id)
            if active is None or active.serial != current.old_serial:
                voided = self._void_offer_in(
                    change,
                    current,
                    reason="superseded",
                    answer="the device changed meanwhile",
                    now=when,
                )
                return voided, None
            prepared = self._offer_prepared(current, active.hardware_serial)
            details = {"renewal": current.request_id, "replaces": current.old_serial, "via": via}
            [record] = self._issue_in(
                change, [_Pending(prepared, None)], rotate=True, now=when, details=details
            )
            return self._book_write(change, current, OfferEvent.CONFIRM), record

        return self._write(when, body)

    def void_offer(self, offer: Offer, *, answer: str, now: dt.datetime | None = None) -> Offer:
        """Record an offered certificate as issued and revoked (superseded); re-sign the CRL."""
        when = _now(now)

        def body(change: _Change) -> Offer:
            current = self.offers.get(offer.request_id)
            if current is None or current.state is not OfferState.OFFERED:
                return current or offer
            return self._void_offer_in(
                change, current, reason="superseded", answer=answer, now=when
            )

        return self._write(when, body)

    def _void_offer_in(
        self, change: _Change, offer: Offer, *, reason: str, answer: str, now: dt.datetime
    ) -> Offer:
        event = OfferEvent.VOID
        known = self.registry.by_serial(offer.new_serial)
        if known is None:
            active = self.registry.active(offer.device_id)
            prepared = self._offer_prepared(offer, active.hardware_serial if active else None)
            details = {"renewal": offer.request_id, "voided": answer}
            self._void_in(change, prepared, reason=reason, details=details, now=now)
        elif known.status == "active":
            # Recorded by a change that could not update the book: the book follows the registry.
            event = OfferEvent.CONFIRM
        return self._book_write(change, offer, event)

    def _book_write(self, change: _Change, offer: Offer, event: OfferEvent | None = None) -> Offer:
        """Insert ``offer`` in the book (``event`` None) or move it, in step with ``change``.

        Written just before the registry's COMMIT, under its lock, as every write to the book;
        taken back if that COMMIT does not happen, so a transaction that ``_write`` runs again
        (a lost connection to a shared registry) writes it once. Returns the offer as it will be.
        """
        if event is None:
            change.on_commit.append(lambda: self.offers.insert(offer))
            change.undo.append(lambda: self.offers.remove(offer))
            return offer
        change.on_commit.append(lambda: self.offers.move(offer, event))
        change.undo.append(lambda: self.offers.reset(offer))
        return dataclasses.replace(offer, state=next_state(offer.state, event))

    def _offer_prepared(self, offer: Offer, hardware_serial: str | None) -> Prepared:
        return Prepared(
            identity=Identity.device(offer.device_id, self.trust_domain),
            certificate=x509.load_pem_x509_certificate(offer.cert_pem),
            issuing=self.issuing,
            key_pem=None,
            key_origin="csr",
            hardware_serial=hardware_serial,
            rotate=True,
        )

    def refresh_crl(self, *, now: dt.datetime | None = None) -> CRLInfo:
        """Re-sign the CRL with a new number and nextUpdate (run before it goes stale)."""

        def body(change: _Change) -> None:
            change.crl_dirty = True

        self._write(_now(now), body)
        return self.crl_info()

    def catch_up_crl(self, *, now: dt.datetime | None = None) -> CRLInfo | None:
        """Shared registry: re-sign this station's CRL if another station revoked one of its
        certificates since it was signed (a broker running from this directory calls it when the
        revocation feed moves); None if it was current. Every write does the same check."""
        if not self.registry.shared or not self._crl_behind()():
            return None
        # An empty change: under the lock, _change sees the CRL behind and re-signs it (once,
        # however many brokers of this station race for it).
        self._write(_now(now), lambda change: None)
        return self.crl_info()

    def crl_info(self) -> CRLInfo:
        try:
            crl = x509.load_pem_x509_crl((self.path / "crl.pem").read_bytes())
        except (FileNotFoundError, ValueError) as exc:
            msg = f"{self.path / 'crl.pem'} is missing or unreadable; run 'iotauth ca crl'"
            raise PKIError(msg) from exc
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        next_update = crl.next_update_utc
        assert next_update is not None  # noqa: S101 - we always set it
        return CRLInfo(number, crl.last_update_utc, next_update, len(crl))

    # -- ledger --------------------------------------------------------------------------------

    def record_event(
        self, event: str, data: dict[str, Any], *, now: dt.datetime | None = None
    ) -> None:
        """Append a non-issuance event (provisioning, factory reset, ...) to the ledger."""

        def body(change: _Change) -> None:
            change.events.append((event, data))

        self._write(_now(now), body)

    def verify_ledger(self) -> LedgerReport:
        """Check the chain, every signature, the recorded head and the registry's rows.

        A shared registry's lines are signed by several stations: each line is checked against
        the issuing CA it names (``signed_by``), which must be a station the registry knows and
        whose certificate the root signed.
        """
        head = _recorded_head(self.registry)
        entries = self._verified_entries(head)
        warnings: list[str] = []
        issued = {e.data.get("serial") for e in entries if e.event == "issue"}
        missing = [r for r in self.registry.all() if r.serial not in issued]
        if missing:
            r = missing[0]
            msg = (
                f"the registry holds {len(missing)} certificate(s) the ledger never recorded, "
                f"first {r.kind} {r.name} serial {r.serial}"
            )
            raise PKIError(msg)
        if head is not None and len(entries) > head.seq:
            warnings.append(
                f"{len(entries) - head.seq} entr(y/ies) after the registry's last recorded one "
                "(an interrupted write); they are chained and signed, but not in the registry"
            )
        last = entries[-1] if entries else None
        return LedgerReport(
            len(entries), LedgerHead(last.seq, last.hash) if last else LedgerHead(0, ""), warnings
        )

    def _verified_entries(self, head: LedgerHead | None) -> list[LedgerEntry]:
        if isinstance(self.ledger, Ledger):
            public_key = self.issuing.public_key()
            assert isinstance(public_key, ec.EllipticCurvePublicKey)  # noqa: S101 - EC by init
            return self.ledger.verify(public_key=public_key, expected_head=head)
        keys = self.station_keys()
        return self.ledger.verify(
            key_for=lambda e: keys.get(str(e.data.get("signed_by"))), expected_head=head
        )

    def station_keys(self) -> dict[str, ec.EllipticCurvePublicKey]:
        """Issuing CA fingerprint -> public key, for every CA whose lines a ledger may hold.

        Only certificates the root signed count; a station row with a forged certificate adds
        nothing, so lines it signed fail verification.
        """
        keys: dict[str, ec.EllipticCurvePublicKey] = {}
        certs = [self.issuing]
        if self.registry.shared:
            certs += [x509.load_pem_x509_certificate(st.certificate_pem) for st in self.stations()]
        for cert in certs:
            try:
                cert.verify_directly_issued_by(self.root)
            except (ValueError, TypeError, InvalidSignature):
                continue
            key = cert.public_key()
            if isinstance(key, ec.EllipticCurvePublicKey):
                keys[fingerprint(cert)] = key
        return keys

    def export_ledger(self, out: Path) -> LedgerReport:
        """Verify the ledger, then write it as ``ledger.jsonl`` lines to ``out`` (for an auditor).

        The copy verifies on its own with ``iotauth ledger verify --file``: every line names its
        signer, and the signers' certificates are in the registry and chain to ``root.crt``.
        """
        report = self.verify_ledger()
        export_jsonl((e for _, e in self.ledger.entries()), out)
        return report

    # -- stations (shared registry) ------------------------------------------------------------

    def _shared(self, what: str) -> PostgresRegistry:
        from provisioning.registry_pg import PostgresRegistry

        if not isinstance(self.registry, PostgresRegistry):
            msg = (
                f"{what} needs a shared registry; create the root with "
                "'iotauth ca init --registry postgresql://...'"
            )
            raise PKIError(msg)
        return self.registry

    def stations(self) -> list[StationRecord]:
        """Every station CA of the shared registry (empty for a SQLite registry)."""
        if not self.registry.shared:
            return []
        return self._shared("stations").stations()

    def _check_station_known(self) -> None:
        for st in self.stations():
            if st.fingerprint == self.issuer_fingerprint:
                return
        msg = (
            f"the issuing CA of {self.path} is not a station of the registry "
            f"{self.registry.where}; make station directories with 'iotauth ca add-station'"
        )
        raise PKIError(msg)

    def _check_station_active(self) -> None:
        # One small row under the lock, not every station's certificate and CRL.
        if self._shared("a station").station_status(self.issuer_fingerprint) == "revoked":
            name = self.config.station or self.issuer_fingerprint
            msg = (
                f"station {name!r} (this directory's issuing CA) was revoked; it can no "
                "longer issue, revoke or sign"
            )
            raise PKIError(msg)

    def add_station(
        self,
        name: str,
        *,
        out: Path,
        server_names: Sequence[str] = (),
        issuing_key: str | None = None,
        now: dt.datetime | None = None,
    ) -> Path:
        """A station directory with its own issuing CA, signed by this directory's root.

        Needs the root key: ``private/root.key`` here (bring it back from offline for this), or
        the token ``pki.toml`` names. ``issuing_key``: a ``pkcs11:`` URI to make the station's
        issuing key in a token instead of a file in its ``private/``. The station is registered
        in the shared registry, with its first CRL, in one transaction.
        """
        from provisioning.identity import validate_name

        registry = self._shared("ca add-station")
        validate_name(name, what="station name")
        root_key_path = self.path / "private" / "root.key"
        if not self.config.root_key and not root_key_path.exists():
            msg = f"{root_key_path} is offline; bring the root key back to add a station"
            raise PKIError(msg)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            msg = f"{out} exists and is not empty; choose a new directory for the station"
            raise PKIError(msg)
        if any(st.name == name for st in registry.stations()):
            msg = f"the registry {registry.where} already has a station named {name!r}"
            raise RegistryError(msg)
        for server_name in server_names:
            _check_server_name(server_name)
        issuing_uri = hsm.Pkcs11URI.parse(issuing_key) if issuing_key else None
        root, root_key = open_root(
            self.path / "root.crt", self.config.root_key or str(root_key_path), self._passphrase
        )
        made: list[Signer] = []
        try:
            made.append(_new_ca_key(issuing_uri))
            self._build_station(name, out, server_names, (root, root_key), made[0], _now(now))
        except BaseException:
            _destroy_token_keys(made)
            raise
        finally:
            for signer in (*made, root_key):
                signer.close()
        return out

    def _build_station(
        self,
        name: str,
        out: Path,
        server_names: Sequence[str],
        root_pair: tuple[x509.Certificate, Signer],
        issuing_key: Signer,
        when: dt.datetime,
    ) -> None:
        registry = self._shared("ca add-station")
        root, root_key = root_pair
        server_key = generate_key()
        issuing = build_issuing_ca(
            issuing_key.public_key(),
            self.trust_domain,
            root=root,
            root_key=root_key,
            now=when,
            common_name=f"{self.trust_domain} Issuing CA {name}",
        )
        names = ["localhost", "127.0.0.1", *server_names]
        server = build_server_cert(
            server_key.public_key(), names=names, issuer=issuing, issuer_key=issuing_key, now=when
        )
        # The station's own key locations: its issuing key (file or token), no root key.
        token_uri = issuing_key.uri if isinstance(issuing_key, hsm.Pkcs11Signer) else None
        config = dataclasses.replace(
            self.config,
            station=name,
            issuing_key=str(token_uri) if token_uri else None,
            root_key=None,
        )
        issuing_fp = fingerprint(issuing)
        with StagedDirectory(out) as staged:
            private = staged.path / "private"
            private.mkdir(mode=PRIVATE_DIR_MODE)
            if isinstance(issuing_key, FileSigner):  # a token-held key: no file
                atomic_write(
                    private / "issuing.key",
                    private_key_pem(issuing_key.key, self._passphrase),
                    mode=KEY_MODE,
                )
            atomic_write(
                private / "server.key",
                private_key_pem(server_key, self._passphrase),
                mode=KEY_MODE,
            )
            staged.write("pki.toml", config.to_toml().encode())
            staged.write("root.crt", _pem(root))
            staged.write("issuing.crt", _pem(issuing))
            staged.write("server.crt", _pem(server) + _pem(issuing))
            os.chmod(staged.path, 0o755)  # noqa: S103 - certificates are public; private/ is 0700

            def body(change: _Change) -> None:
                registry.add_station(name, issuing_fp, _pem(issuing))
                change.events.append(
                    (
                        "station-add",
                        {
                            "name": name,
                            "issuing": issuing_fp,
                            "subject": issuing.subject.rfc4514_string(),
                            "station": station_id(),
                        },
                    )
                )
                crl = _make_crl(registry, self.config, issuing, issuing_key, when, issuing_fp)
                atomic_write(staged.path / "crl.pem", crl)
                change.on_commit.append(staged.commit)

            self._write(when, body)

    def revoke_station(
        self, name: str, *, reason: str = "unspecified", now: dt.datetime | None = None
    ) -> StationRecord:
        """Revoke a station's issuing CA: every broker refuses all of its certificates."""
        registry = self._shared("ca revoke-station")
        if reason not in REVOCATION_REASONS:
            msg = (
                f"unknown revocation reason {reason!r}; use one of {', '.join(REVOCATION_REASONS)}"
            )
            raise PKIError(msg)
        when = _now(now)

        def body(change: _Change) -> StationRecord:
            st = registry.revoke_station(name, when)
            change.events.append(
                (
                    "station-revoke",
                    {
                        "name": name,
                        "issuing": st.fingerprint,
                        "reason": reason,
                        "station": station_id(),
                    },
                )
            )
            return st

        return self._write(when, body)

    # -- the one write path --------------------------------------------------------------------

    def _write(self, now: dt.datetime, body: Callable[[_Change], T]) -> T:
        """Run ``body`` under the write lock; ledger lines, CRL and directories land with it.

        With a shared registry, a lost connection (the database restarting, a network blip)
        makes the station reconnect and run the transaction again, for up to
        REGISTRY_RETRY_SECONDS. Each attempt records a random transaction id, so an attempt whose
        COMMIT succeeded but whose answer was lost is recognised and not applied twice. What an
        attempt wrote outside the registry before a COMMIT that did not happen (the renewal offer
        book, ``_Change.undo``) is taken back, so the next attempt starts from the same book.
        """
        txid = secrets.token_hex(16)
        deadline = time.monotonic() + REGISTRY_RETRY_SECONDS
        while True:
            ran = False
            result: T | None = None
            change = _Change()
            try:
                try:
                    with self._change(now, change, txid):
                        result = body(change)
                        ran = True
                    return result
                except RegistryUnavailableError as exc:
                    if exc.permanent or not self.registry.shared:
                        raise
                    self._await_registry(exc, deadline)
                    # The id is written after the body, so ``ran`` holds when it was applied.
                    if ran and self.registry.was_applied(txid):
                        log.warning(
                            "the COMMIT whose answer was lost had succeeded; not repeating it"
                        )
                        return result  # type: ignore[return-value]
            except BaseException:
                change.take_back()
                raise
            change.take_back()  # not applied: the next attempt starts from where this one did

    def _await_registry(self, first: RegistryUnavailableError, deadline: float) -> None:
        """Reconnect to the shared registry; raise the last error past the deadline."""
        from provisioning.registry_pg import PostgresRegistry

        assert isinstance(self.registry, PostgresRegistry)  # noqa: S101 - shared only
        log.warning("%s; retrying for up to %.0f s", first, REGISTRY_RETRY_SECONDS)
        delay = 0.1
        while True:
            try:
                self.registry.reconnect()
                return
            except RegistryUnavailableError as exc:
                if exc.permanent or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    @contextlib.contextmanager
    def _change(self, now: dt.datetime, change: _Change, txid: str) -> Iterator[None]:
        """One attempt of a change under the write lock."""
        crl_path = self.path / "crl.pem"
        old_crl: bytes | None = None
        appended_at: int | None = None
        crl_written = False
        try:
            with self.registry.transaction():
                if self.registry.shared:
                    self._check_station_active()
                # PostgreSQL: the change's writes are queued, not awaited one by one (a read
                # syncs); the server applies them while the ledger lines are chained and signed
                # here, and the rest of the bookkeeping goes with them in one round trip.
                with self.registry.pipeline():
                    yield
                    behind = self._crl_behind()
                    self.registry.mark_applied(txid)
                    if change.events:
                        entries, appended_at = self.ledger.append(
                            change.events, signer=self.issuing_key(), now=now
                        )
                        _record_head(self.registry, entries)
                if change.crl_dirty or behind():
                    old_crl = crl_path.read_bytes() if crl_path.exists() else None
                    crl = _make_crl(
                        self.registry,
                        self.config,
                        self.issuing,
                        self.issuing_key(),
                        now,
                        self.issuer_fingerprint,
                    )
                    atomic_write(crl_path, crl)
                    crl_written = True
                for step in change.on_commit:
                    step()
        except BaseException:
            if appended_at is not None:
                self.ledger.truncate(appended_at)
            if crl_written and old_crl is not None:
                atomic_write(crl_path, old_crl)
            raise

    def _crl_behind(self) -> Callable[[], bool]:
        """Shared registry: another station revoked one of ours since our CRL was signed.

        Asked now, answered when called (so the question rides in the write's pipeline)."""
        if not self.registry.shared:
            return lambda: False
        return self._shared("a station CRL").crl_behind(self.issuer_fingerprint)


def _open_shared(url: str, issuer_fingerprint: str) -> tuple[PostgresRegistry, PgLedger]:
    from provisioning.registry_pg import PgLedger, PostgresRegistry

    registry = PostgresRegistry(url)
    registry.station_fingerprint = issuer_fingerprint
    return registry, PgLedger(registry, signer_id=issuer_fingerprint)


@dataclass(slots=True)
class _Change:
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    crl_dirty: bool = False
    # Run inside the transaction, just before COMMIT (directory renames, the offer book).
    on_commit: list[Callable[[], object]] = field(default_factory=list)
    # Undo on_commit steps outside the registry (the offer book) when COMMIT did not happen.
    undo: list[Callable[[], object]] = field(default_factory=list)

    def take_back(self) -> None:
        for step in reversed(self.undo):
            # Best effort: the error that made the change fail is the one to report.
            with contextlib.suppress(Exception):
                step()


def open_root(
    root_cert: Path, root_key: str, passphrase: bytes | None = None
) -> tuple[x509.Certificate, Signer]:
    """An existing root CA: its certificate and its key (a PEM file or a ``pkcs11:`` URI).

    The key must be the certificate's; the caller closes the signer.
    """
    cert = load_certificate(root_cert, what="root certificate ")
    public = cert.public_key()
    if root_key.lower().startswith("pkcs11:"):
        if not isinstance(public, ec.EllipticCurvePublicKey):
            msg = f"{root_cert} must hold an EC key to be signed for by a token"
            raise PKIError(msg)
        return cert, hsm.open_key(root_key, public_key=public)
    key = load_private_key(Path(root_key), passphrase)
    if key.public_key() != public:
        msg = f"{root_key} is not the key of {root_cert}"
        raise PKIError(msg)
    return cert, FileSigner(key, root_key)


def _check_root(cert: x509.Certificate, trust_domain: str) -> None:
    expected = f"{trust_domain} Root CA"
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not names or names[0].value != expected:
        msg = f"the root certificate is not the root of {trust_domain} (its CN is not {expected!r})"
        raise PKIError(msg)
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca or cert.issuer != cert.subject:
        msg = "the root certificate is not a self-signed CA certificate"
        raise PKIError(msg)


def _new_ca_key(uri: hsm.Pkcs11URI | None) -> Signer:
    """A fresh P-256 CA key: in the token the URI names, or in memory (written to private/)."""
    return hsm.generate_key(uri) if uri else FileSigner(generate_key())


def _destroy_token_keys(made: Iterable[Signer]) -> None:
    """Delete the CA keys a failed init or add-station made in a token."""
    for signer in made:
        if isinstance(signer, hsm.Pkcs11Signer):
            # A leftover would block the retry; if deleting fails, the retry says so.
            with contextlib.suppress(PKIError):
                signer.destroy()


def _open_empty_registry(config: PKIConfig) -> PostgresRegistry:
    """The shared registry ``ca init --registry`` starts: it must hold no PKI yet."""
    from provisioning.identity import validate_name
    from provisioning.registry_pg import PostgresRegistry

    validate_name(config.station, what="station name")
    registry = PostgresRegistry(config.registry)
    owner = registry.get_meta("root")
    if owner is not None or registry.stations():
        registry.close()
        msg = (
            f"the registry {registry.where} already holds a PKI (root {owner or '?'}); "
            "use an empty database"
        )
        raise PKIError(msg)
    return registry


def _check_server_name(name: str) -> None:
    if not name or len(name) > 253 or not re.fullmatch(r"[A-Za-z0-9.:*-]+", name):
        raise InvalidIdentityError(name, "not a host name or IP address", what="server name")


def _issue_event(record: CertRecord) -> dict[str, Any]:
    return {
        "kind": record.kind,
        "name": record.name,
        "serial": record.serial,
        "fingerprint": record.fingerprint,
        "public_key_sha256": record.public_key_sha256,
        "key_origin": record.key_origin,
        "hardware_serial": record.hardware_serial,
        "not_after": record.not_after.isoformat(),
        "station": record.issued_by,
    }


def _revoke_event(record: CertRecord, reason: str, by: str) -> dict[str, Any]:
    return {
        "kind": record.kind,
        "name": record.name,
        "serial": record.serial,
        "reason": reason,
        "station": by,
    }


def _record_head(registry: RegistryBackend, entries: list[LedgerEntry]) -> None:
    if entries:
        registry.set_meta("ledger_seq", str(entries[-1].seq))
        registry.set_meta("ledger_hash", entries[-1].hash)


def _recorded_head(registry: RegistryBackend) -> LedgerHead | None:
    seq, digest = registry.get_meta("ledger_seq"), registry.get_meta("ledger_hash")
    if seq is None or digest is None:
        return None
    return LedgerHead(int(seq), digest)


def _make_crl(
    registry: RegistryBackend,
    config: PKIConfig,
    issuing: x509.Certificate,
    issuing_key: Signer,
    now: dt.datetime,
    issuer_fingerprint: str | None = None,
) -> bytes:
    """Sign the next CRL. Its number always grows, so a reader can tell the newest one.

    A shared registry keeps one CRL (and number) per station and publishes it to the brokers.
    """
    shared = registry.shared and issuer_fingerprint is not None
    number_key = f"crl_number:{issuer_fingerprint}" if shared else "crl_number"
    number = int(registry.get_meta(number_key) or "0") + 1
    registry.set_meta(number_key, str(number))
    rows = registry.revoked(issuer_fingerprint if shared else None)
    revoked = [
        (
            int(r.serial, 16),
            r.revoked_at or now,
            REVOCATION_REASONS.get(r.revocation_reason or "", x509.ReasonFlags.unspecified),
        )
        for r in rows
    ]
    crl = build_crl(
        issuer=issuing,
        issuer_key=issuing_key,
        revoked=revoked,
        number=number,
        now=now,
        next_update=now + dt.timedelta(hours=config.crl_hours),
    )
    pem = crl.public_bytes(serialization.Encoding.PEM)
    if shared and issuer_fingerprint is not None:
        registry.set_meta(f"crl_revoked:{issuer_fingerprint}", str(len(rows)))
        registry.publish_crl(issuer_fingerprint, pem, number)
    return pem
