"""The device registry: one SQLite file (WAL) holding every certificate the station issued.

A row is a certificate, not a device: a device that was rotated has one active row and older
revoked ones. SQLite's ``BEGIN IMMEDIATE`` is the one lock of a PKI directory: every change to the
registry, the ledger and the CRL happens inside such a transaction, so several processes can issue
into the same directory at once without duplicates or a forked ledger.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from provisioning.errors import DeviceExistsError, RegistryError, UnknownDeviceError

__all__ = ["CertRecord", "Registry", "Status"]

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

Status = str  # 'active' | 'revoked'


def _ts(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="seconds")


def _parse_ts(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


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
            out[key] = _ts(value) if isinstance(value, dt.datetime) else value
        out["state"] = self.state()
        return out

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> CertRecord:
        return cls(
            kind=row["kind"],
            name=row["name"],
            serial=row["serial"],
            fingerprint=row["fingerprint"],
            public_key_sha256=row["public_key_sha256"],
            key_origin=row["key_origin"],
            not_before=dt.datetime.fromisoformat(row["not_before"]),
            not_after=dt.datetime.fromisoformat(row["not_after"]),
            status=row["status"],
            issued_at=dt.datetime.fromisoformat(row["issued_at"]),
            issued_by=row["issued_by"],
            hardware_serial=row["hardware_serial"],
            revoked_at=_parse_ts(row["revoked_at"]),
            revocation_reason=row["revocation_reason"],
        )


class Registry:
    """A connection to ``registry.sqlite3``. Not shared between threads; open one per process."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        if not create and not path.exists():
            msg = f"registry {path} is missing"
            raise RegistryError(msg)
        self.path = path
        try:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so the write lock is taken
            # before we read the state we are about to change.
            self._db = sqlite3.connect(path, timeout=60.0, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            if create:
                self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            msg = f"cannot open registry {path}: {exc}"
            raise RegistryError(msg) from exc
        self._in_tx = False

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

    def revoked(self) -> list[CertRecord]:
        rows = self._db.execute(
            "SELECT * FROM certificates WHERE status = 'revoked' ORDER BY id"
        ).fetchall()
        return [CertRecord._from_row(r) for r in rows]

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    # -- writes (inside transaction()) ---------------------------------------------------------

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

    def mark_revoked(
        self, name: str, *, reason: str, when: dt.datetime, kind: str | None = None
    ) -> list[CertRecord]:
        """Revoke every active certificate of ``name``; return the rows as they were."""
        self._require_tx()
        history = self.history(name)
        rows = [r for r in history if r.status == "active" and (kind is None or r.kind == kind)]
        if not rows:
            other = next((r.kind for r in history if kind is not None and r.kind != kind), None)
            if other is not None:  # names are unique across kinds, so it is the other kind
                detail = f"is not a {kind} but a {other}: use 'iotauth {other} revoke {name}'"
            elif history:
                detail = "has no active certificate"
            else:
                detail = "is not in the registry"
            raise UnknownDeviceError(name, kind=kind or "device", detail=detail)
        self._db.execute(
            "UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ?"
            " WHERE name = ? AND status = 'active'",
            (_ts(when), reason, name),
        )
        return rows
