"""The device registry: one SQLite file (WAL) holding every certificate the station issued.

:class:`RegistryBackend` is the interface; :class:`Registry` (this file) and
:class:`provisioning.registry_pg.PostgresRegistry` (several stations, one database) implement it,
and one test suite runs against both.

A row is a certificate, not a device: a device that was rotated has one active row and older
revoked ones. SQLite's ``BEGIN IMMEDIATE`` is the one lock of a PKI directory: every change to the
registry, the ledger and the CRL happens inside such a transaction, so several processes can issue
into the same directory at once without duplicates or a forked ledger.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from provisioning.errors import DeviceExistsError, RegistryError, UnknownDeviceError

__all__ = [
    "SQLITE_MIGRATIONS",
    "CertRecord",
    "RegistrationRecord",
    "Registry",
    "RegistryBackend",
    "SecretRecord",
    "Status",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS certificates (
    id                INTEGER PRIMARY KEY,
    kind              TEXT NOT NULL CHECK (kind IN ('device', 'service')),
    name              TEXT NOT NULL,
    hardware_serial   TEXT,
    serial            TEXT NOT NULL UNIQUE,
    fingerprint       TEXT NOT NULL UNIQUE,
    public_key_sha256 TEXT NOT NULL,
    key_origin        TEXT NOT NULL,
    not_before        TEXT NOT NULL,
    not_after         TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    issued_at         TEXT NOT NULL,
    issued_by         TEXT NOT NULL,
    revoked_at        TEXT,
    revocation_reason TEXT
);
-- One active certificate per name across kinds: a device can never share a name with a service.
CREATE UNIQUE INDEX IF NOT EXISTS one_active_name
    ON certificates (name) WHERE status = 'active';
CREATE UNIQUE INDEX IF NOT EXISTS one_active_hardware
    ON certificates (hardware_serial) WHERE status = 'active' AND hardware_serial IS NOT NULL;
CREATE INDEX IF NOT EXISTS by_name ON certificates (name, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# Versioned schema (PRAGMA user_version). Version 1 is the schema above, which registries made
# before versioning already have (its statements are idempotent). Append; never edit.
SQLITE_MIGRATIONS: tuple[str, ...] = (
    _SCHEMA,
    # 2: a service's shared secret, as its SCRAM-SHA-256 verifier only (never the secret). One row
    # per service; a rotation replaces it and bumps ``version`` (what a session's credential names).
    """
    CREATE TABLE IF NOT EXISTS service_secrets (
        name        TEXT PRIMARY KEY,
        version     INTEGER NOT NULL CHECK (version >= 1),
        mechanism   TEXT NOT NULL,
        salt        TEXT NOT NULL,
        iterations  INTEGER NOT NULL CHECK (iterations >= 4096),
        stored_key  TEXT NOT NULL,
        server_key  TEXT NOT NULL,
        status      TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
        created_at  TEXT NOT NULL,
        revoked_at  TEXT
    )
    """,
    # 3: a service registered without any credential of ours (``iotauth service register``), for
    # the oidc method: the identity provider holds its credential, the registry only its name.
    """
    CREATE TABLE IF NOT EXISTS service_registrations (
        name          TEXT PRIMARY KEY,
        status        TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
        registered_at TEXT NOT NULL,
        revoked_at    TEXT
    )
    """,
)

Status = str  # 'active' | 'revoked'


def _ts(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="seconds")


def _parse_ts(value: str | dt.datetime | None) -> dt.datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):  # PostgreSQL timestamptz
        return value.astimezone(dt.UTC)
    return dt.datetime.fromisoformat(value)


def _req_ts(value: str | dt.datetime) -> dt.datetime:
    parsed = _parse_ts(value)
    assert parsed is not None  # noqa: S101 - NOT NULL columns
    return parsed


@dataclass(frozen=True, slots=True)
class CertRecord:
    kind: str
    name: str
    serial: str
    fingerprint: str
    public_key_sha256: str
    key_origin: str
    not_before: dt.datetime
    not_after: dt.datetime
    status: Status
    issued_at: dt.datetime
    issued_by: str
    hardware_serial: str | None = None
    revoked_at: dt.datetime | None = None
    revocation_reason: str | None = None
    # SHA-256 fingerprint of the issuing CA that signed it. A SQLite registry belongs to one
    # issuing CA and leaves it None; the shared registry has one per station.
    issuer: str | None = None

    def state(self, now: dt.datetime | None = None) -> str:
        """'active', 'revoked' or 'expired' as a user means it."""
        if self.status == "revoked":
            return "revoked"
        if (now or dt.datetime.now(dt.UTC)) >= self.not_after:
            return "expired"
        return "active"

    def to_json(self) -> dict[str, object]:
        """The record for --json (docs/JSON.md): ``state`` is active, revoked or expired; the
        stored ``status`` column (which never says expired) is not repeated."""
        out: dict[str, object] = {}
        for key in self.__slots__:
            if key == "status":
                continue
            value = getattr(self, key)
            if key == "issuer" and value is None:
                continue
            out[key] = _ts(value) if isinstance(value, dt.datetime) else value
        out["state"] = self.state()
        return out

    @classmethod
    def _from_row(cls, row: sqlite3.Row | Mapping[str, Any]) -> CertRecord:
        keys = row.keys()
        return cls(
            kind=row["kind"],
            name=row["name"],
            serial=row["serial"],
            fingerprint=row["fingerprint"],
            public_key_sha256=row["public_key_sha256"],
            key_origin=row["key_origin"],
            not_before=_req_ts(row["not_before"]),
            not_after=_req_ts(row["not_after"]),
            status=row["status"],
            issued_at=_req_ts(row["issued_at"]),
            issued_by=row["issued_by"],
            hardware_serial=row["hardware_serial"],
            revoked_at=_parse_ts(row["revoked_at"]),
            revocation_reason=row["revocation_reason"],
            issuer=row["issuer"] if "issuer" in keys else None,
        )


@dataclass(frozen=True, slots=True)
class SecretRecord:
    """A service's SCRAM verifier (RFC 5802 / RFC 7677): what the broker checks a secret against.

    ``salt``, ``stored_key`` and ``server_key`` are base64 as on the SCRAM wire. Knowing them does
    not give the secret (PBKDF2 with ``iterations`` >= 4096 stands between), but ``stored_key``
    and ``server_key`` let a thief impersonate the *broker* to a SCRAM client: keep the registry
    private as ever.
    """

    name: str
    version: int
    mechanism: str
    salt: str
    iterations: int
    stored_key: str
    server_key: str
    status: Status
    created_at: dt.datetime
    revoked_at: dt.datetime | None = None

    @property
    def credential(self) -> str:
        """What a session that used this secret names, so a rotation or revocation finds it."""
        return f"{self.name}#{self.version}"

    def to_json(self) -> dict[str, object]:
        """The record without its key material (docs/JSON.md): ``state`` is active or revoked."""
        return {
            "name": self.name,
            "version": self.version,
            "mechanism": self.mechanism,
            "iterations": self.iterations,
            "state": self.status,
            "created_at": _ts(self.created_at),
            "revoked_at": _ts(self.revoked_at) if self.revoked_at else None,
        }

    @classmethod
    def _from_row(cls, row: sqlite3.Row | Mapping[str, Any]) -> SecretRecord:
        return cls(
            name=row["name"],
            version=int(row["version"]),
            mechanism=row["mechanism"],
            salt=row["salt"],
            iterations=int(row["iterations"]),
            stored_key=row["stored_key"],
            server_key=row["server_key"],
            status=row["status"],
            created_at=_req_ts(row["created_at"]),
            revoked_at=_parse_ts(row["revoked_at"]),
        )


@dataclass(frozen=True, slots=True)
class RegistrationRecord:
    """A service registered by name alone (``iotauth service register``): no certificate, no
    secret; an identity-provider token naming it (the oidc method) is what it connects with."""

    name: str
    status: Status
    registered_at: dt.datetime
    revoked_at: dt.datetime | None = None

    def to_json(self) -> dict[str, object]:
        """docs/JSON.md: ``state`` is active or revoked."""
        return {
            "name": self.name,
            "state": self.status,
            "registered_at": _ts(self.registered_at),
            "revoked_at": _ts(self.revoked_at) if self.revoked_at else None,
        }

    @classmethod
    def _from_row(cls, row: sqlite3.Row | Mapping[str, Any]) -> RegistrationRecord:
        return cls(
            name=row["name"],
            status=row["status"],
            registered_at=_req_ts(row["registered_at"]),
            revoked_at=_parse_ts(row["revoked_at"]),
        )


class RegistryBackend(Protocol):
    """What the PKI needs from a registry; SQLite (one station) or PostgreSQL (a factory)."""

    shared: bool  # True: several stations and brokers use it (PostgreSQL)
    where: str  # what messages name: the file, or the URL without its password

    def close(self) -> None: ...
    def transaction(self) -> AbstractContextManager[None]: ...
    def pipeline(self) -> AbstractContextManager[None]: ...
    def active(self, name: str) -> CertRecord | None: ...
    def active_by_hardware_serial(self, hardware_serial: str) -> CertRecord | None: ...
    def history(self, name: str) -> list[CertRecord]: ...
    def by_serial(self, serial: str) -> CertRecord | None: ...
    def latest(self, kind: str | None = None) -> list[CertRecord]: ...
    def all(self) -> list[CertRecord]: ...
    def count(self) -> int: ...
    def revoked(self, issuer: str | None = None) -> list[CertRecord]: ...
    def get_meta(self, key: str) -> str | None: ...
    def was_applied(self, txid: str) -> bool: ...
    def set_meta(self, key: str, value: str) -> None: ...
    def mark_applied(self, txid: str) -> None: ...
    def name_states(self, names: list[str]) -> dict[str, tuple[set[str], bool]]: ...
    def insert(self, record: CertRecord) -> None: ...
    def insert_many(self, records: list[CertRecord]) -> None: ...
    def mark_revoked(
        self, name: str, *, reason: str, when: dt.datetime, kind: str | None = None
    ) -> list[CertRecord]: ...
    def publish_crl(self, issuer: str, pem: bytes, number: int) -> None: ...
    def secret(self, name: str) -> SecretRecord | None: ...
    def secret_states(self) -> dict[str, tuple[int, str]]: ...
    def put_secret(self, record: SecretRecord) -> None: ...
    def revoke_secret(self, name: str, when: dt.datetime) -> SecretRecord | None: ...
    def registration(self, name: str) -> RegistrationRecord | None: ...
    def registration_states(self) -> dict[str, str]: ...
    def put_registration(self, record: RegistrationRecord) -> None: ...
    def revoke_registration(self, name: str, when: dt.datetime) -> RegistrationRecord | None: ...


def nothing_to_revoke(name: str, kind: str | None, history: list[CertRecord]) -> UnknownDeviceError:
    """Why ``mark_revoked`` found no active certificate of ``name`` (``kind``): the one message
    of both backends."""
    other = next((r.kind for r in history if kind is not None and r.kind != kind), None)
    if other is not None:  # names are unique across kinds, so it is the other kind
        detail = f"is not a {kind} but a {other}: use 'iotauth {other} revoke {name}'"
    elif history:
        detail = "has no active certificate"
    else:
        detail = "is not in the registry"
    return UnknownDeviceError(name, kind=kind or "device", detail=detail)


class Registry:
    """A connection to ``registry.sqlite3``. Not shared between threads; open one per process."""

    shared = False

    def __init__(self, path: Path, *, create: bool = False) -> None:
        if not create and not path.exists():
            msg = f"registry {path} is missing"
            raise RegistryError(msg)
        self.path = path
        self.where = str(path)
        try:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so the write lock is taken
            # before we read the state we are about to change.
            self._db = sqlite3.connect(path, timeout=60.0, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except sqlite3.Error as exc:
            msg = f"cannot open registry {path}: {exc}"
            raise RegistryError(msg) from exc
        self._in_tx = False

    def _migrate(self) -> None:
        """Apply the migrations this file lacks; refuse a file from a newer iotauth."""
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > len(SQLITE_MIGRATIONS):
            msg = (
                f"registry {self.path} has schema version {version}, newer than this iotauth "
                f"knows ({len(SQLITE_MIGRATIONS)}); upgrade iotauth"
            )
            raise RegistryError(msg)
        if version == len(SQLITE_MIGRATIONS):
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the lock: another process may have migrated meanwhile.
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            for number in range(version + 1, len(SQLITE_MIGRATIONS) + 1):
                for statement in SQLITE_MIGRATIONS[number - 1].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the PKI-wide write lock; commit on success, roll back on any exception."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            msg = f"registry {self.path} is locked or unwritable: {exc}"
            raise RegistryError(msg) from exc
        self._in_tx = True
        try:
            yield
        except sqlite3.Error as exc:
            self._rollback()
            msg = f"registry {self.path}: {exc}"
            raise RegistryError(msg) from exc
        except BaseException:
            self._rollback()
            raise
        else:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                msg = f"cannot commit to registry {self.path}: {exc}"
                raise RegistryError(msg) from exc
        finally:
            self._in_tx = False

    def pipeline(self) -> AbstractContextManager[None]:
        """Statements that need no answer in between (a file has no round trips to save)."""
        return contextlib.nullcontext()

    def _rollback(self) -> None:
        # SQLite may already have rolled back by itself (SQLITE_FULL, SQLITE_IOERR).
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def _require_tx(self) -> None:
        if not self._in_tx:
            msg = "registry writes must happen inside Registry.transaction()"
            raise RuntimeError(msg)

    # -- reads ---------------------------------------------------------------------------------

    def active(self, name: str) -> CertRecord | None:
        row = self._db.execute(
            "SELECT * FROM certificates WHERE name = ? AND status = 'active'", (name,)
        ).fetchone()
        return CertRecord._from_row(row) if row else None

    def active_by_hardware_serial(self, hardware_serial: str) -> CertRecord | None:
        row = self._db.execute(
            "SELECT * FROM certificates WHERE hardware_serial = ? AND status = 'active'",
            (hardware_serial,),
        ).fetchone()
        return CertRecord._from_row(row) if row else None

    def history(self, name: str) -> list[CertRecord]:
        rows = self._db.execute(
            "SELECT * FROM certificates WHERE name = ? ORDER BY id", (name,)
        ).fetchall()
        return [CertRecord._from_row(r) for r in rows]

    def by_serial(self, serial: str) -> CertRecord | None:
        row = self._db.execute("SELECT * FROM certificates WHERE serial = ?", (serial,)).fetchone()
        return CertRecord._from_row(row) if row else None

    def latest(self, kind: str | None = None) -> list[CertRecord]:
        """The newest certificate of every name (of one kind, if given), ordered by name."""
        query = (
            "SELECT * FROM certificates"
            " WHERE id IN (SELECT MAX(id) FROM certificates GROUP BY name)"
        )
        params: tuple[str, ...] = ()
        if kind:
            query += " AND kind = ?"
            params = (kind,)
        rows = self._db.execute(query + " ORDER BY name", params).fetchall()
        return [CertRecord._from_row(r) for r in rows]

    def all(self) -> list[CertRecord]:
        rows = self._db.execute("SELECT * FROM certificates ORDER BY id").fetchall()
        return [CertRecord._from_row(r) for r in rows]

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM certificates").fetchone()[0])

    def revoked(self, issuer: str | None = None) -> list[CertRecord]:
        """Every revoked row (one issuing CA owns a SQLite registry, so ``issuer`` is moot)."""
        del issuer
        rows = self._db.execute(
            "SELECT * FROM certificates WHERE status = 'revoked' ORDER BY id"
        ).fetchall()
        return [CertRecord._from_row(r) for r in rows]

    def name_states(self, names: list[str]) -> dict[str, tuple[set[str], bool]]:
        """For each name that has rows: (every kind it had, whether one is active)."""
        out: dict[str, tuple[set[str], bool]] = {}
        # SQLite's bound-parameter limit (999 before 3.32): the second query binds each name twice
        for start in range(0, len(names), 400):
            chunk = names[start : start + 400]
            marks = ", ".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT name, kind, status FROM certificates WHERE name IN ({marks})",  # noqa: S608 - placeholders only
                chunk,
            ).fetchall()
            for name, kind, status in rows:
                kinds, active = out.get(name, (set(), False))
                kinds.add(kind)
                out[name] = (kinds, active or status == "active")
            # A service with a secret or a registration and no certificate has its name too
            # (never a device's).
            rows = self._db.execute(
                f"SELECT name FROM service_secrets WHERE name IN ({marks})"  # noqa: S608 - placeholders only
                f" UNION SELECT name FROM service_registrations WHERE name IN ({marks})",
                chunk + chunk,
            ).fetchall()
            for (name,) in rows:
                kinds, active = out.get(name, (set(), False))
                out[name] = (kinds | {"service"}, active)
        return out

    def secret(self, name: str) -> SecretRecord | None:
        row = self._db.execute("SELECT * FROM service_secrets WHERE name = ?", (name,)).fetchone()
        return SecretRecord._from_row(row) if row else None

    def secret_states(self) -> dict[str, tuple[int, str]]:
        """name -> (version, status) of every secret: what the broker polls to kick old ones."""
        rows = self._db.execute("SELECT name, version, status FROM service_secrets").fetchall()
        return {r["name"]: (int(r["version"]), r["status"]) for r in rows}

    def registration(self, name: str) -> RegistrationRecord | None:
        row = self._db.execute(
            "SELECT * FROM service_registrations WHERE name = ?", (name,)
        ).fetchone()
        return RegistrationRecord._from_row(row) if row else None

    def registration_states(self) -> dict[str, str]:
        """name -> status of every registration: what the broker polls to end oidc sessions."""
        rows = self._db.execute("SELECT name, status FROM service_registrations").fetchall()
        return {r["name"]: r["status"] for r in rows}

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def was_applied(self, txid: str) -> bool:
        """A local file never loses a COMMIT's answer, so nothing is ever retried."""
        del txid
        return False

    # -- writes (inside transaction()) ---------------------------------------------------------

    def mark_applied(self, txid: str) -> None:
        del txid

    def publish_crl(self, issuer: str, pem: bytes, number: int) -> None:
        """crl.pem beside the registry is the publication; nothing else to tell."""
        del issuer, pem, number

    def set_meta(self, key: str, value: str) -> None:
        self._require_tx()
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def insert(self, record: CertRecord) -> None:
        self._require_tx()
        try:
            self._db.execute(
                "INSERT INTO certificates (kind, name, hardware_serial, serial, fingerprint,"
                " public_key_sha256, key_origin, not_before, not_after, status, issued_at,"
                " issued_by, revoked_at, revocation_reason)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.kind,
                    record.name,
                    record.hardware_serial,
                    record.serial,
                    record.fingerprint,
                    record.public_key_sha256,
                    record.key_origin,
                    _ts(record.not_before),
                    _ts(record.not_after),
                    record.status,
                    _ts(record.issued_at),
                    record.issued_by,
                    _ts(record.revoked_at) if record.revoked_at else None,
                    record.revocation_reason,
                ),
            )
        except sqlite3.IntegrityError as exc:
            text = str(exc)
            if "hardware_serial" in text:
                hw = record.hardware_serial
                msg = f"hardware serial {hw!r} already belongs to an active device"
                raise RegistryError(msg) from exc
            if "certificates.name" in text:
                raise DeviceExistsError(record.name, kind=record.kind) from exc
            msg = f"registry refused {record.name!r}: {text}"
            raise RegistryError(msg) from exc

    def insert_many(self, records: list[CertRecord]) -> None:
        for record in records:
            self.insert(record)

    def put_secret(self, record: SecretRecord) -> None:
        """Create or replace a service's verifier (the caller bumped the version)."""
        self._require_tx()
        self._db.execute(
            "INSERT OR REPLACE INTO service_secrets (name, version, mechanism, salt, iterations,"
            " stored_key, server_key, status, created_at, revoked_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.name,
                record.version,
                record.mechanism,
                record.salt,
                record.iterations,
                record.stored_key,
                record.server_key,
                record.status,
                _ts(record.created_at),
                _ts(record.revoked_at) if record.revoked_at else None,
            ),
        )

    def revoke_secret(self, name: str, when: dt.datetime) -> SecretRecord | None:
        """Mark an active secret revoked; return it as it was (None: no active secret)."""
        self._require_tx()
        record = self.secret(name)
        if record is None or record.status != "active":
            return None
        self._db.execute(
            "UPDATE service_secrets SET status = 'revoked', revoked_at = ? WHERE name = ?",
            (_ts(when), name),
        )
        return record

    def put_registration(self, record: RegistrationRecord) -> None:
        """Register a service by name (a revoked registration is registered again)."""
        self._require_tx()
        self._db.execute(
            "INSERT OR REPLACE INTO service_registrations (name, status, registered_at,"
            " revoked_at) VALUES (?, ?, ?, ?)",
            (
                record.name,
                record.status,
                _ts(record.registered_at),
                _ts(record.revoked_at) if record.revoked_at else None,
            ),
        )

    def revoke_registration(self, name: str, when: dt.datetime) -> RegistrationRecord | None:
        """Mark an active registration revoked; return it as it was (None: none active)."""
        self._require_tx()
        record = self.registration(name)
        if record is None or record.status != "active":
            return None
        self._db.execute(
            "UPDATE service_registrations SET status = 'revoked', revoked_at = ? WHERE name = ?",
            (_ts(when), name),
        )
        return record

    def mark_revoked(
        self, name: str, *, reason: str, when: dt.datetime, kind: str | None = None
    ) -> list[CertRecord]:
        """Revoke every active certificate of ``name``; return the rows as they were."""
        self._require_tx()
        history = self.history(name)
        rows = [r for r in history if r.status == "active" and (kind is None or r.kind == kind)]
        if not rows:
            raise nothing_to_revoke(name, kind, history)
        self._db.execute(
            "UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ?"
            " WHERE name = ? AND status = 'active'",
            (_ts(when), reason, name),
        )
        return rows
