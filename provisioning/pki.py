"""A PKI directory: the fleet CA on disk, with its registry, ledger and CRL.

Layout (DESIGN.md, "Files that others read")::

    pki.toml  root.crt  issuing.crt  server.crt  crl.pem  registry.sqlite3  ledger.jsonl
    private/  root.key  issuing.key  server.key           (0700 / 0600)

Only ``ca init`` uses the root key: issuance, revocation and CRLs need the issuing CA alone, so
``private/root.key`` can be moved offline right after init.

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

from provisioning.certificates import (
    PublicKey,
    build_crl,
    build_issuing_ca,
    build_leaf,
    build_root_ca,
    build_server_cert,
    fingerprint,
    generate_key,
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

if TYPE_CHECKING:
    from provisioning.keyfiles import PrivateKey
    from provisioning.registry_pg import PgLedger, PostgresRegistry, StationRecord
from provisioning.registry import CertRecord, Registry, RegistryBackend

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


def identity_json(identity: Identity, broker: str | None = None) -> bytes:
    """``identity.json`` of a credential directory: who this is and, optionally, the broker."""
    doc: dict[str, Any] = {
        "kind": identity.kind.value,
        "trust_domain": identity.trust_domain,
        "spiffe_id": identity.spiffe_id,
    }
    doc["device_id" if identity.is_device else "service_name"] = identity.name
    if broker:
        doc["broker"] = broker
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
        self._issuing_key: PrivateKey | None = None

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
        registry: str | None = None,
        station: str = "main",
    ) -> PKI:
        """Create root, issuing CA, server certificate, empty registry, ledger and CRL.

        Built in a staging directory and renamed into place, so a failure leaves nothing behind.
        With ``registry`` (a postgresql:// URL) the registry and ledger live in that database,
        which must be empty of any other PKI, and this directory is its first station.
        """
        if (path / "pki.toml").exists():
            raise PKIExistsError(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            msg = f"{path} exists and is not empty; choose a new directory for the PKI"
            raise PKIError(msg)
        config = PKIConfig(
            trust_domain=trust_domain,
            encrypted_keys=bool(passphrase),
            device_days=device_days,
            registry=registry or "",
            station=station if registry else "",
        )
        if registry:
            return cls._init_shared(
                path,
                config,
                server_names=server_names,
                passphrase=passphrase,
                now=now,
            )
        names = ["localhost", "127.0.0.1", *server_names]
        for name in server_names:
            _check_server_name(name)
        when = _now(now)
        root_key, issuing_key, server_key = generate_key(), generate_key(), generate_key()
        root = build_root_ca(root_key, trust_domain, now=when)
        issuing = build_issuing_ca(
            issuing_key, trust_domain, root=root, root_key=root_key, now=when
        )
        server = build_server_cert(
            server_key.public_key(), names=names, issuer=issuing, issuer_key=issuing_key, now=when
        )
        with StagedDirectory(path) as staged:
            private = staged.path / "private"
            private.mkdir(mode=PRIVATE_DIR_MODE)
            for name, key in (("root", root_key), ("issuing", issuing_key), ("server", server_key)):
                atomic_write(
                    private / f"{name}.key", private_key_pem(key, passphrase), mode=KEY_MODE
                )
            staged.write("pki.toml", config.to_toml().encode())
            staged.write("root.crt", _pem(root))
            staged.write("issuing.crt", _pem(issuing))
            staged.write("server.crt", _pem(server) + _pem(issuing))
            store = Registry(staged.path / "registry.sqlite3", create=True)
            ledger = Ledger(staged.path / "ledger.jsonl")
            try:
                with store.transaction():
                    entries, _ = ledger.append(
                        [
                            (
                                "ca-init",
                                {
                                    "trust_domain": trust_domain,
                                    "root": fingerprint(root),
                                    "issuing": fingerprint(issuing),
                                    "server": fingerprint(server),
                                    "server_names": names,
                                    "station": station_id(),
                                },
                            )
                        ],
                        signer=issuing_key,
                        now=when,
                    )
                    _record_head(store, entries)
                    crl = _make_crl(store, config, issuing, issuing_key, when)
                    atomic_write(staged.path / "crl.pem", crl)
            finally:
                store.close()
            os.chmod(staged.path, 0o755)  # noqa: S103 - certificates are public; private/ is 0700
            staged.commit()
        return cls(path, passphrase=passphrase)

    @classmethod
    def _init_shared(
        cls,
        path: Path,
        config: PKIConfig,
        *,
        server_names: Sequence[str],
        passphrase: bytes | None,
        now: dt.datetime | None,
    ) -> PKI:
        """``ca init --registry``: the root directory, and the database's first station."""
        from provisioning.identity import validate_name
        from provisioning.registry_pg import PgLedger, PostgresRegistry

        validate_name(config.station, what="station name")
        for name in server_names:
            _check_server_name(name)
        # Connect (and migrate) before any key is made: a wrong URL or password changes nothing.
        registry = PostgresRegistry(config.registry)
        try:
            owner = registry.get_meta("root")
            if owner is not None or registry.stations():
                msg = (
                    f"the registry {registry.where} already holds a PKI (root {owner or '?'}); "
                    "use an empty database"
                )
                raise PKIError(msg)
            names = ["localhost", "127.0.0.1", *server_names]
            when = _now(now)
            root_key, issuing_key, server_key = generate_key(), generate_key(), generate_key()
            root = build_root_ca(root_key, config.trust_domain, now=when)
            issuing = build_issuing_ca(
                issuing_key,
                config.trust_domain,
                root=root,
                root_key=root_key,
                now=when,
                common_name=f"{config.trust_domain} Issuing CA {config.station}",
            )
            server = build_server_cert(
                server_key.public_key(),
                names=names,
                issuer=issuing,
                issuer_key=issuing_key,
                now=when,
            )
            issuing_fp = fingerprint(issuing)
            ledger = PgLedger(registry, signer_id=issuing_fp)
            with StagedDirectory(path) as staged:
                private = staged.path / "private"
                private.mkdir(mode=PRIVATE_DIR_MODE)
                for name, key in (
                    ("root", root_key),
                    ("issuing", issuing_key),
                    ("server", server_key),
                ):
                    atomic_write(
                        private / f"{name}.key", private_key_pem(key, passphrase), mode=KEY_MODE
                    )
                staged.write("pki.toml", config.to_toml().encode())
                staged.write("root.crt", _pem(root))
                staged.write("issuing.crt", _pem(issuing))
                staged.write("server.crt", _pem(server) + _pem(issuing))
                os.chmod(staged.path, 0o755)  # noqa: S103 - certificates are public
                with registry.transaction():
                    registry.set_meta("root", fingerprint(root))
                    registry.set_meta("trust_domain", config.trust_domain)
                    registry.add_station(config.station, issuing_fp, _pem(issuing))
                    entries, _ = ledger.append(
                        [
                            (
                                "ca-init",
                                {
                                    "trust_domain": config.trust_domain,
                                    "root": fingerprint(root),
                                    "issuing": issuing_fp,
                                    "server": fingerprint(server),
                                    "server_names": names,
                                    "station": station_id(),
                                    "station_name": config.station,
                                },
                            )
                        ],
                        signer=issuing_key,
                        now=when,
                    )
                    _record_head(registry, entries)
                    crl = _make_crl(registry, config, issuing, issuing_key, when, issuing_fp)
                    atomic_write(staged.path / "crl.pem", crl)
                    staged.commit()
        finally:
            registry.close()
        return cls(path, passphrase=passphrase)

    def close(self) -> None:
        self.registry.close()

    def __enter__(self) -> PKI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load_cert(self, name: str) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate((self.path / name).read_bytes())
        except FileNotFoundError:
            msg = f"{self.path / name} is missing"
            raise PKIError(msg) from None
        except ValueError as exc:
            msg = f"{self.path / name} is not a PEM certificate"
            raise PKIError(msg) from exc

    @property
    def trust_domain(self) -> str:
        return self.config.trust_domain

    def issuing_key(self) -> PrivateKey:
        if self._issuing_key is None:
            key = load_private_key(self.path / "private" / "issuing.key", self._passphrase)
            if key.public_key() != self.issuing.public_key():
                msg = "private/issuing.key does not belong to issuing.crt"
                raise PKIError(msg)
            self._issuing_key = key
        return self._issuing_key

    def _ledger_signer(self) -> ec.EllipticCurvePrivateKey:
        key = self.issuing_key()
        if not isinstance(key, ec.EllipticCurvePrivateKey):  # ca init only makes EC keys
            msg = "the issuing CA key must be an EC key to sign the ledger"
            raise PKIError(msg)
        return key

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
        record = dataclasses.replace(
            self._record_for(prepared, when),
            status="revoked",
            revoked_at=when,
            revocation_reason=reason,
        )

        def body(change: _Change) -> None:
            self.registry.insert(record)
            event = _issue_event(record)
            event.update(details or {})
            change.events.append(("issue", event))
            change.events.append(("revoke", _revoke_event(record, reason, record.issued_by)))
            change.crl_dirty = True

        self._write(when, body)
        return record

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
        lifetime = days or (
            self.config.device_days if kind is IdentityKind.DEVICE else self.config.service_days
        )
        if lifetime <= 0:
            msg = "validity must be at least one day"
            raise PKIError(msg)
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
        """Write the credential directory of DESIGN.md into a staging directory."""
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

    def _record_for(self, p: Prepared, now: dt.datetime) -> CertRecord:
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
            issued_by=station_id(),
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
        records = [self._record_for(p.prepared, now) for p in pending]
        # Renames happen once, even when a lost connection makes the transaction run again.
        steps = [_once(p.staged.commit) for p in pending if p.staged is not None]

        def body(change: _Change) -> None:
            # Re-checked under the lock: another station may have issued since prepare.
            states = self.registry.name_states([p.identity.name for p in pending])
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
            change.on_commit = list(steps)

        self._write(now, body)
        return [self._issued(p, r) for p, r in zip(pending, records, strict=True)]

    # -- revocation and CRL --------------------------------------------------------------------

    def revoke(
        self,
        name: str,
        *,
        reason: str = "unspecified",
        kind: IdentityKind | None = None,
        now: dt.datetime | None = None,
    ) -> list[CertRecord]:
        """Revoke every active certificate of ``name`` and publish a new CRL."""
        if reason not in REVOCATION_REASONS:
            msg = (
                f"unknown revocation reason {reason!r}; use one of {', '.join(REVOCATION_REASONS)}"
            )
            raise PKIError(msg)
        Identity(kind or IdentityKind.DEVICE, name, self.trust_domain)  # validates the name
        when = _now(now)
        by = station_id()

        def body(change: _Change) -> list[CertRecord]:
            rows = self.registry.mark_revoked(
                name, reason=reason, when=when, kind=kind.value if kind else None
            )
            change.events.extend(("revoke", _revoke_event(r, reason, by)) for r in rows)
            change.crl_dirty = True
            return rows

        return self._write(when, body)

    def refresh_crl(self, *, now: dt.datetime | None = None) -> CRLInfo:
        """Re-sign the CRL with a new number and nextUpdate (run before it goes stale)."""

        def body(change: _Change) -> None:
            change.crl_dirty = True

        self._write(_now(now), body)
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
        for st in self.stations():
            if st.fingerprint == self.issuer_fingerprint and st.status == "revoked":
                msg = (
                    f"station {st.name!r} (this directory's issuing CA) was revoked; it can no "
                    "longer issue, revoke or sign"
                )
                raise PKIError(msg)

    def add_station(
        self,
        name: str,
        *,
        out: Path,
        server_names: Sequence[str] = (),
        now: dt.datetime | None = None,
    ) -> Path:
        """A station directory with its own issuing CA, signed by this directory's root.

        Needs ``private/root.key`` here (bring it back from offline for this). The station is
        registered in the shared registry, with its first CRL, in one transaction.
        """
        from provisioning.identity import validate_name

        registry = self._shared("ca add-station")
        validate_name(name, what="station name")
        root_key_path = self.path / "private" / "root.key"
        if not root_key_path.exists():
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
        root_key = load_private_key(root_key_path, self._passphrase)
        if not isinstance(root_key, ec.EllipticCurvePrivateKey) or (
            root_key.public_key() != self.root.public_key()
        ):
            msg = "private/root.key does not belong to root.crt"
            raise PKIError(msg)
        when = _now(now)
        issuing_key, server_key = generate_key(), generate_key()
        issuing = build_issuing_ca(
            issuing_key,
            self.trust_domain,
            root=self.root,
            root_key=root_key,
            now=when,
            common_name=f"{self.trust_domain} Issuing CA {name}",
        )
        names = ["localhost", "127.0.0.1", *server_names]
        server = build_server_cert(
            server_key.public_key(), names=names, issuer=issuing, issuer_key=issuing_key, now=when
        )
        config = dataclasses.replace(self.config, station=name)
        issuing_fp = fingerprint(issuing)
        with StagedDirectory(out) as staged:
            private = staged.path / "private"
            private.mkdir(mode=PRIVATE_DIR_MODE)
            for key_name, key in (("issuing", issuing_key), ("server", server_key)):
                atomic_write(
                    private / f"{key_name}.key",
                    private_key_pem(key, self._passphrase),
                    mode=KEY_MODE,
                )
            staged.write("pki.toml", config.to_toml().encode())
            staged.write("root.crt", _pem(self.root))
            staged.write("issuing.crt", _pem(issuing))
            staged.write("server.crt", _pem(server) + _pem(issuing))
            os.chmod(staged.path, 0o755)  # noqa: S103 - certificates are public; private/ is 0700
            step = _once(staged.commit)

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
                change.on_commit = [step]

            self._write(when, body)
        return out

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
        COMMIT succeeded but whose answer was lost is recognised and not applied twice.
        """
        txid = secrets.token_hex(16)
        deadline = time.monotonic() + REGISTRY_RETRY_SECONDS
        while True:
            ran = False
            result: T | None = None
            try:
                change = _Change()
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
                    log.warning("the COMMIT whose answer was lost had succeeded; not repeating it")
                    return result  # type: ignore[return-value]

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
                yield
                self.registry.mark_applied(txid)
                if change.events:
                    entries, appended_at = self.ledger.append(
                        change.events, signer=self._ledger_signer(), now=now
                    )
                    _record_head(self.registry, entries)
                if change.crl_dirty or self._crl_behind():
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

    def _crl_behind(self) -> bool:
        """Shared registry: another station revoked one of ours since our CRL was signed."""
        if not self.registry.shared:
            return False
        recorded = self.registry.get_meta(f"crl_revoked:{self.issuer_fingerprint}")
        count = self._shared("a station CRL").revoked_count(self.issuer_fingerprint)
        return str(count) != (recorded or "0")


def _once(step: Callable[[], None]) -> Callable[[], None]:
    done = False

    def run() -> None:
        nonlocal done
        if not done:
            step()
            done = True

    return run


def _open_shared(url: str, issuer_fingerprint: str) -> tuple[PostgresRegistry, PgLedger]:
    from provisioning.registry_pg import PgLedger, PostgresRegistry

    registry = PostgresRegistry(url)
    return registry, PgLedger(registry, signer_id=issuer_fingerprint)


@dataclass(slots=True)
class _Change:
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    crl_dirty: bool = False
    on_commit: list[Any] = field(default_factory=list)


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
    issuing_key: PrivateKey,
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
