"""The shared registry: PostgreSQL, for several stations and brokers on different machines.

Same interface as the SQLite registry (:class:`provisioning.registry.RegistryBackend`), plus what
only a shared registry has: the stations (each one's issuing CA and CRL), the ledger as a table,
the revocation feed that brokers follow (LISTEN/NOTIFY), and the ids of committed transactions
(so a station that lost its connection during COMMIT can tell whether to retry).

The one lock: every write transaction starts with ``SELECT ... FROM chain_head FOR UPDATE``, so
writes from every station serialize on the ledger's head row, exactly as ``BEGIN IMMEDIATE``
serializes them on one SQLite file: checks made under the lock hold until COMMIT, the ledger
never forks, and ``revocations.id`` commits in order (brokers read it as a cursor).

Credentials never appear in the URL (``pki.toml`` refuses one with a password): libpq reads
``PGPASSWORD``, ``PGPASSFILE`` or ``~/.pgpass``. Errors name the URL without a password.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from provisioning.errors import (
    DeviceExistsError,
    RegistryError,
    RegistryUnavailableError,
)
from provisioning.ledger import (
    GENESIS,
    LedgerEntry,
    LedgerHead,
    PublicKeyFor,
    build_entries,
    verify_chain,
)
from provisioning.registry import (
    CertRecord,
    RegistrationRecord,
    SecretRecord,
    nothing_to_revoke,
)

if TYPE_CHECKING:
    import psycopg

    from provisioning.signing import Signer

__all__ = [
    "MIGRATIONS",
    "NOTIFY_CHANNEL",
    "PgLedger",
    "PostgresRegistry",
    "StationRecord",
    "async_connect",
    "check_registry_url",
    "connect",
    "display_url",
]

log = logging.getLogger("iotauth.registry")

NOTIFY_CHANNEL = "iotauth_revocations"
_MIGRATION_LOCK = 0x696F7461  # pg_advisory_xact_lock key ("iota"): one migrator at a time

# Versioned schema. Append a migration; never edit one that has shipped.
MIGRATIONS: tuple[str, ...] = (
    # 1: certificates, meta, stations, ledger, chain head, revocation feed, applied transactions
    """
    CREATE TABLE certificates (
        id                bigserial PRIMARY KEY,
        kind              text NOT NULL CHECK (kind IN ('device', 'service')),
        name              text NOT NULL,
        hardware_serial   text,
        serial            text NOT NULL UNIQUE,
        fingerprint       text NOT NULL UNIQUE,
        public_key_sha256 text NOT NULL,
        key_origin        text NOT NULL,
        not_before        timestamptz NOT NULL,
        not_after         timestamptz NOT NULL,
        status            text NOT NULL CHECK (status IN ('active', 'revoked')),
        issued_at         timestamptz NOT NULL,
        issued_by         text NOT NULL,
        revoked_at        timestamptz,
        revocation_reason text,
        issuer            text NOT NULL
    );
    CREATE UNIQUE INDEX one_active_name ON certificates (name) WHERE status = 'active';
    CREATE UNIQUE INDEX one_active_hardware ON certificates (hardware_serial)
        WHERE status = 'active' AND hardware_serial IS NOT NULL;
    CREATE INDEX by_name ON certificates (name, id);
    CREATE INDEX by_issuer ON certificates (issuer);
    CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
    CREATE TABLE stations (
        name        text PRIMARY KEY,
        fingerprint text NOT NULL UNIQUE,
        certificate text NOT NULL,
        crl         text,
        crl_number  bigint NOT NULL DEFAULT 0,
        status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
        added_at    timestamptz NOT NULL DEFAULT now(),
        revoked_at  timestamptz
    );
    CREATE TABLE ledger (
        seq   bigint PRIMARY KEY,
        time  text NOT NULL,
        event text NOT NULL,
        data  text NOT NULL,
        prev  text NOT NULL,
        hash  text NOT NULL UNIQUE,
        sig   text NOT NULL
    );
    CREATE TABLE chain_head (
        id   integer PRIMARY KEY CHECK (id = 1),
        seq  bigint NOT NULL,
        hash text NOT NULL
    );
    INSERT INTO chain_head (id, seq, hash) VALUES (1, 0, repeat('0', 64));
    CREATE TABLE revocations (
        id     bigserial PRIMARY KEY,
        serial text NOT NULL,
        issuer text NOT NULL,
        at     timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE applied_transactions (
        id text PRIMARY KEY,
        at timestamptz NOT NULL DEFAULT now()
    );
    """,
    # 2: a service's shared secret, as its SCRAM-SHA-256 verifier only (provisioning/registry.py)
    """
    CREATE TABLE service_secrets (
        name        text PRIMARY KEY,
        version     integer NOT NULL CHECK (version >= 1),
        mechanism   text NOT NULL,
        salt        text NOT NULL,
        iterations  integer NOT NULL CHECK (iterations >= 4096),
        stored_key  text NOT NULL,
        server_key  text NOT NULL,
        status      text NOT NULL CHECK (status IN ('active', 'revoked')),
        created_at  timestamptz NOT NULL,
        revoked_at  timestamptz
    );
    """,
    # 3: every write asks how many of its station's certificates are revoked (is its CRL
    # behind?): an index on the revoked rows only keeps that from scanning the whole fleet
    """
    CREATE INDEX revoked_by_issuer ON certificates (issuer) WHERE status = 'revoked';
    """,
    # 4: a service registered by name alone, for the oidc method (provisioning/registry.py)
    """
    CREATE TABLE service_registrations (
        name          text PRIMARY KEY,
        status        text NOT NULL CHECK (status IN ('active', 'revoked')),
        registered_at timestamptz NOT NULL,
        revoked_at    timestamptz
    );
    """,
)

_PASSWORD_IN_URL = re.compile(r"^[a-z]+://[^/@]*:[^/@]*@")


def display_url(url: str) -> str:
    """The URL as error messages show it: never a password, even if one slipped in."""
    return re.sub(r"^([a-z]+://[^/@:]*):[^/@]*@", r"\1:***@", url)


def check_registry_url(url: str) -> None:
    """Refuse what pki.toml must not hold: another scheme, or a password in the URL."""
    if not url.startswith(("postgresql://", "postgres://")):
        msg = f"registry {display_url(url)!r} is not a postgresql:// URL"
        raise RegistryError(msg)
    if _PASSWORD_IN_URL.match(url):
        msg = (
            f"registry URL {display_url(url)} contains a password; remove it and use PGPASSWORD "
            "or ~/.pgpass"
        )
        raise RegistryError(msg)


def _connect_error(url: str, exc: Exception) -> RegistryError:
    """One line naming the URL (without password) and what to fix."""
    text = " ".join(str(exc).split())
    shown = display_url(url)
    low = text.lower()
    if "password authentication failed" in low or "no password supplied" in low:
        user = re.search(r'for user "([^"]+)"', text)
        who = f" for user {user.group(1)}" if user else ""
        msg = (
            f"registry {shown}: password authentication failed{who} (check PGPASSWORD or ~/.pgpass)"
        )
        return RegistryUnavailableError(msg, permanent=True)
    if "database" in low and "does not exist" in low:
        name = re.search(r'database "([^"]+)" does not exist', text)
        what = f"database {name.group(1)!r}" if name else "the database"
        msg = f"registry {shown}: {what} does not exist (create it: createdb)"
        return RegistryUnavailableError(msg, permanent=True)
    if "role" in low and "does not exist" in low:
        msg = f"registry {shown}: {text.split('FATAL:')[-1].strip()}"
        return RegistryUnavailableError(msg, permanent=True)
    reason = text.split("failed:")[-1].strip() or "no answer"
    msg = f"registry {shown}: cannot reach the database server ({reason})"
    return RegistryUnavailableError(msg)


def _connect_options(timeout: float) -> dict[str, Any]:
    return {
        "autocommit": True,
        "connect_timeout": max(1, int(timeout)),
        "application_name": "iotauth",
        # A database that vanished without closing the socket is noticed within seconds.
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 2,
    }


def _require_driver() -> None:
    try:
        import psycopg  # noqa: F401 - only whether it is there
    except ImportError:
        msg = "a postgresql:// registry needs psycopg: pip install 'iotauth[factory]'"
        raise RegistryError(msg) from None


def connect(url: str, *, timeout: float = 5.0) -> psycopg.Connection[dict[str, Any]]:
    """An autocommit connection (writes use explicit transactions), rows as dicts."""
    check_registry_url(url)
    _require_driver()
    import psycopg
    from psycopg.rows import dict_row

    try:
        return psycopg.connect(url, row_factory=dict_row, **_connect_options(timeout))
    except psycopg.Error as exc:
        raise _connect_error(url, exc) from None


async def async_connect(url: str, *, timeout: float = 5.0) -> psycopg.AsyncConnection[Any]:
    """An asyncio connection (the broker LISTENs on one); errors as :func:`connect`'s."""
    check_registry_url(url)
    _require_driver()
    import psycopg

    try:
        return await psycopg.AsyncConnection.connect(url, **_connect_options(timeout))
    except psycopg.Error as exc:
        raise _connect_error(url, exc) from None


def migrate(conn: psycopg.Connection[dict[str, Any]], url: str) -> int:
    """Bring the schema to the newest version; idempotent and safe from several processes."""
    import psycopg

    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            row = conn.execute("SELECT max(version) AS v FROM schema_migrations").fetchone()
            current = int(row["v"] or 0) if row else 0
            if current > len(MIGRATIONS):
                msg = (
                    f"registry {display_url(url)} has schema version {current}, newer than this "
                    f"iotauth knows ({len(MIGRATIONS)}); upgrade iotauth"
                )
                raise RegistryError(msg)
            for version in range(current + 1, len(MIGRATIONS) + 1):
                conn.execute(MIGRATIONS[version - 1].encode())
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            return len(MIGRATIONS)
    except psycopg.OperationalError as exc:
        raise _connect_error(url, exc) from None
    except psycopg.Error as exc:
        msg = f"registry {display_url(url)}: cannot apply the schema: {exc}"
        raise RegistryError(msg) from None


@dataclass(frozen=True, slots=True)
class StationRecord:
    """A station (or broker) CA known to the shared registry."""

    name: str
    fingerprint: str
    certificate_pem: bytes
    crl_pem: bytes | None
    crl_number: int
    status: str
    added_at: dt.datetime
    revoked_at: dt.datetime | None


_CERT_COLUMNS = (
    "kind, name, hardware_serial, serial, fingerprint, public_key_sha256, key_origin, not_before,"
    " not_after, status, issued_at, issued_by, revoked_at, revocation_reason, issuer"
)


# A batch goes in as one statement whose one parameter is the rows as JSON: one round trip, one
# plan, and cheap on both sides (the client's json encoder is C; psycopg's array dumper, tried
# first, cost more client time than the round trips it saved). Unlike COPY it can travel in a
# pipeline with the rest of a change's bookkeeping.
_CERT_NAMES = tuple(c.strip() for c in _CERT_COLUMNS.split(","))
_CERT_TYPES = (
    "text", "text", "text", "text", "text", "text", "text", "timestamptz", "timestamptz", "text",
    "timestamptz", "text", "timestamptz", "text", "text",
)  # fmt: skip
_INSERT_CERTS = (
    f"INSERT INTO certificates ({_CERT_COLUMNS}) SELECT {_CERT_COLUMNS}"  # noqa: S608 - constants
    " FROM json_to_recordset(%s::json) AS r("
    + ", ".join(f"{c} {t}" for c, t in zip(_CERT_NAMES, _CERT_TYPES, strict=True))
    + ")"
).encode()
_INSERT_LEDGER = (
    b"INSERT INTO ledger (seq, time, event, data, prev, hash, sig)"
    b" SELECT seq, time, event, data::text, prev, hash, sig"
    b" FROM json_to_recordset(%s::json) AS r(seq bigint, time text, event text, data json,"
    b" prev text, hash text, sig text)"
)


def _json_value(value: object) -> object:
    return value.isoformat() if isinstance(value, dt.datetime) else value


class PostgresRegistry:
    """A connection to the shared registry. Like the SQLite one: one per process and thread."""

    shared = True

    def __init__(self, url: str, *, retry_seconds: float = 60.0) -> None:
        self.url = url
        # How long a read waits for a restarting database (the PKI retries writes as long).
        self.retry_seconds = retry_seconds
        self.where = display_url(url)
        self._conn = connect(url)
        migrate(self._conn, url)
        self._in_tx = False
        self._head: LedgerHead | None = None  # the chain head, as locked by transaction()
        self._inserted: list[CertRecord] = []  # this transaction's rows (to name a refusal)
        # How long each transaction of this connection held the lock, COMMIT included: what
        # every other station waited (bench/factory.py reports it).
        self.lock_seconds: list[float] = []
        # The issuing CA of the station writing through this connection (set by the PKI): its
        # status is read with the lock, in the same round trip.
        self.station_fingerprint: str | None = None
        self._station_status: str | None = None

    def close(self) -> None:
        self._conn.close()

    def reconnect(self) -> None:
        """Open a new connection (after the database restarted); raises if it is still down."""
        with contextlib.suppress(Exception):
            self._conn.close()
        self._conn = connect(self.url)

    @property
    def connection(self) -> psycopg.Connection[dict[str, Any]]:
        return self._conn

    def _op_error(self, exc: Exception) -> RegistryError:
        return _connect_error(self.url, exc)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Turn a lost connection into RegistryUnavailableError (the caller may retry)."""
        import psycopg

        try:
            yield
        except psycopg.OperationalError as exc:
            raise self._op_error(exc) from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the registry-wide write lock (the chain head row); commit or roll back."""
        import psycopg

        locked_at: float | None = None
        try:
            with self._conn.transaction():
                row = self._conn.execute(
                    "SELECT seq, hash, (SELECT status FROM stations WHERE fingerprint = %s)"
                    " AS station FROM chain_head WHERE id = 1 FOR UPDATE",
                    (self.station_fingerprint,),
                ).fetchone()
                locked_at = time.perf_counter()
                self._head = LedgerHead(int(row["seq"]), str(row["hash"])) if row else None
                self._station_status = row["station"] if row else None
                self._in_tx = True
                try:
                    yield
                finally:
                    self._in_tx = False
                    self._head = None
                    self._inserted = []
        except psycopg.OperationalError as exc:
            raise self._op_error(exc) from None
        except psycopg.Error as exc:
            msg = f"registry {self.where}: {' '.join(str(exc).split())}"
            raise RegistryError(msg) from None
        finally:
            if locked_at is not None:
                self.lock_seconds.append(time.perf_counter() - locked_at)

    @contextlib.contextmanager
    def pipeline(self) -> Iterator[None]:
        """Send the statements inside without waiting for each answer: one round trip.

        A write transaction's bookkeeping (transaction id, ledger lines, chain head, meta) goes
        this way: every round trip under the lock is time that every other station waits,
        longer still when the stations share CPUs with each other and the server.
        """
        import psycopg

        try:
            with self._conn.pipeline():
                yield
        except psycopg.OperationalError as exc:
            raise self._op_error(exc) from None
        except psycopg.errors.UniqueViolation as exc:  # a queued insert_many, refused
            raise self._refused(exc) from None

    def _require_tx(self) -> None:
        if not self._in_tx:
            msg = "registry writes must happen inside PostgresRegistry.transaction()"
            raise RuntimeError(msg)

    def locked_head(self) -> LedgerHead | None:
        """The chain head read with the lock by the current transaction (None outside one)."""
        return self._head if self._in_tx else None

    def _rows(self, query: str, params: Sequence[object] = ()) -> list[dict[str, Any]]:
        """Run a read. Outside a transaction a lost connection is reopened and the read repeated
        (reads are idempotent) for up to ``retry_seconds``; inside one the caller retries."""
        import psycopg

        deadline = time.monotonic() + self.retry_seconds
        delay = 0.1
        while True:
            try:
                return self._conn.execute(query.encode(), params).fetchall()
            except psycopg.OperationalError as exc:
                error = self._op_error(exc)
                if self._in_tx or time.monotonic() + delay > deadline:
                    raise error from None
                log.warning("%s; reconnecting", error)
            while True:
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                try:
                    self.reconnect()
                    break
                except RegistryUnavailableError as exc:
                    if exc.permanent or time.monotonic() + delay > deadline:
                        raise

    def _records(
        self, where: str, params: Sequence[object] = (), order: str = "id"
    ) -> list[CertRecord]:
        # ``where`` and ``order`` are literals of this class; values travel as parameters.
        query = f"SELECT * FROM certificates {where} ORDER BY {order}"  # noqa: S608
        rows = self._rows(query, params)
        return [CertRecord._from_row(r) for r in rows]

    # -- reads ---------------------------------------------------------------------------------

    def active(self, name: str) -> CertRecord | None:
        rows = self._records("WHERE name = %s AND status = 'active'", (name,))
        return rows[0] if rows else None

    def active_by_hardware_serial(self, hardware_serial: str) -> CertRecord | None:
        rows = self._records("WHERE hardware_serial = %s AND status = 'active'", (hardware_serial,))
        return rows[0] if rows else None

    def history(self, name: str) -> list[CertRecord]:
        return self._records("WHERE name = %s", (name,))

    def by_serial(self, serial: str) -> CertRecord | None:
        rows = self._records("WHERE serial = %s", (serial,))
        return rows[0] if rows else None

    def latest(self, kind: str | None = None) -> list[CertRecord]:
        where = "WHERE id IN (SELECT max(id) FROM certificates GROUP BY name)"
        params: tuple[str, ...] = ()
        if kind:
            where += " AND kind = %s"
            params = (kind,)
        return self._records(where, params, order="name")

    def all(self) -> list[CertRecord]:
        return self._records("")

    def count(self) -> int:
        return int(self._rows("SELECT count(*) AS n FROM certificates")[0]["n"])

    def revoked(self, issuer: str | None = None) -> list[CertRecord]:
        if issuer is None:
            return self._records("WHERE status = 'revoked'")
        return self._records("WHERE status = 'revoked' AND issuer = %s", (issuer,))

    def station_status(self, fingerprint: str) -> str | None:
        """'active' or 'revoked' for a station's issuing CA; None if the registry lacks it."""
        if self._in_tx and fingerprint == self.station_fingerprint:
            return self._station_status  # read with the lock
        rows = self._rows("SELECT status FROM stations WHERE fingerprint = %s", (fingerprint,))
        return str(rows[0]["status"]) if rows else None

    def crl_behind(self, issuer: str) -> Callable[[], bool]:
        """Whether the CRL ``issuer`` last signed lists fewer revocations than the registry
        holds (another station revoked one of its certificates since).

        Sent now, read when the returned function is called: inside :meth:`pipeline`, the
        question travels with the other statements and its answer is read after the sync.
        """
        with self._guard():
            cursor = self._conn.execute(
                b"SELECT (SELECT count(*) FROM certificates WHERE status = 'revoked'"
                b" AND issuer = %s) AS n, (SELECT value FROM meta WHERE key = %s) AS recorded",
                (issuer, f"crl_revoked:{issuer}"),
            )

        def answer() -> bool:
            with self._guard():
                row = cursor.fetchone()
            return row is not None and str(row["n"]) != (row["recorded"] or "0")

        return answer

    def revoked_count(self, issuer: str) -> int:
        rows = self._rows(
            "SELECT count(*) AS n FROM certificates WHERE status = 'revoked' AND issuer = %s",
            (issuer,),
        )
        return int(rows[0]["n"])

    def name_states(self, names: list[str]) -> dict[str, tuple[set[str], bool]]:
        """For each name that has rows: (every kind it had, whether one is active)."""
        # One query (one round trip under the lock): a service with a secret or a
        # registration and no certificate has its name too (never a device's).
        rows = self._rows(
            "SELECT name, array_agg(DISTINCT kind) AS kinds, bool_or(active) AS active FROM ("
            " SELECT name, kind, status = 'active' AS active FROM certificates"
            " WHERE name = ANY(%s)"
            " UNION ALL SELECT name, 'service', false FROM service_secrets WHERE name = ANY(%s)"
            " UNION ALL SELECT name, 'service', false FROM service_registrations"
            " WHERE name = ANY(%s)"
            ") AS n GROUP BY name",
            (names, names, names),
        )
        return {r["name"]: (set(r["kinds"]), bool(r["active"])) for r in rows}

    def secret(self, name: str) -> SecretRecord | None:
        rows = self._rows("SELECT * FROM service_secrets WHERE name = %s", (name,))
        return SecretRecord._from_row(rows[0]) if rows else None

    def secret_states(self) -> dict[str, tuple[int, str]]:
        rows = self._rows("SELECT name, version, status FROM service_secrets")
        return {r["name"]: (int(r["version"]), r["status"]) for r in rows}

    def registration(self, name: str) -> RegistrationRecord | None:
        rows = self._rows("SELECT * FROM service_registrations WHERE name = %s", (name,))
        return RegistrationRecord._from_row(rows[0]) if rows else None

    def registration_states(self) -> dict[str, str]:
        rows = self._rows("SELECT name, status FROM service_registrations")
        return {r["name"]: r["status"] for r in rows}

    def get_meta(self, key: str) -> str | None:
        rows = self._rows("SELECT value FROM meta WHERE key = %s", (key,))
        return str(rows[0]["value"]) if rows else None

    def was_applied(self, txid: str) -> bool:
        return bool(self._rows("SELECT 1 AS one FROM applied_transactions WHERE id = %s", (txid,)))

    def stations(self) -> list[StationRecord]:
        rows = self._rows("SELECT * FROM stations ORDER BY added_at, name")
        return [
            StationRecord(
                name=r["name"],
                fingerprint=r["fingerprint"],
                certificate_pem=r["certificate"].encode(),
                crl_pem=r["crl"].encode() if r["crl"] else None,
                crl_number=int(r["crl_number"]),
                status=r["status"],
                added_at=r["added_at"],
                revoked_at=r["revoked_at"],
            )
            for r in rows
        ]

    def revocations_since(self, last_id: int) -> list[tuple[int, str]]:
        """(feed id, serial hex) of every revocation committed after ``last_id``."""
        rows = self._rows(
            "SELECT id, serial FROM revocations WHERE id > %s ORDER BY id", (last_id,)
        )
        return [(int(r["id"]), str(r["serial"])) for r in rows]

    # -- writes (inside transaction()) ---------------------------------------------------------

    def _exec(self, query: str, params: Sequence[object] = ()) -> None:
        self._require_tx()
        self._conn.execute(query.encode(), params)

    def notify(self) -> None:
        """Wake every broker that LISTENs; delivered when (and only if) the transaction commits."""
        self._exec("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))

    def set_meta(self, key: str, value: str) -> None:
        self._exec(
            "INSERT INTO meta (key, value) VALUES (%s, %s)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def mark_applied(self, txid: str) -> None:
        self._exec("INSERT INTO applied_transactions (id) VALUES (%s)", (txid,))

    def insert(self, record: CertRecord) -> None:
        self.insert_many([record])

    def insert_many(self, records: list[CertRecord]) -> None:
        """Insert in one statement (a batch of 500 is one round trip)."""
        import psycopg

        self._require_tx()
        if not records:
            return
        if any(r.issuer is None for r in records):
            msg = "a shared registry needs the issuing CA of every certificate"
            raise RegistryError(msg)
        values = [
            (
                r.kind,
                r.name,
                r.hardware_serial,
                r.serial,
                r.fingerprint,
                r.public_key_sha256,
                r.key_origin,
                r.not_before,
                r.not_after,
                r.status,
                r.issued_at,
                r.issued_by,
                r.revoked_at,
                r.revocation_reason,
                r.issuer,
            )
            for r in records
        ]
        rows = [
            {c: _json_value(v) for c, v in zip(_CERT_NAMES, row, strict=True)} for row in values
        ]
        # No savepoint: a refused row aborts the whole change, which the caller rolls back. In a
        # pipeline (a PKI write) the statement is only queued: the server inserts while this
        # process chains and signs the ledger lines, and a refusal surfaces at the pipeline's
        # sync, where pipeline() names it as here.
        self._inserted.extend(records)
        try:
            self._conn.execute(_INSERT_CERTS, (json.dumps(rows),))
        except psycopg.errors.UniqueViolation as exc:
            raise self._refused(exc) from None
        revoked = [r for r in records if r.status == "revoked"]
        if revoked:
            self._feed(revoked)

    def _refused(self, exc: psycopg.errors.UniqueViolation) -> RegistryError:
        """The one line for a certificate row the unique indexes refused."""
        constraint = exc.diag.constraint_name or ""
        detail = exc.diag.message_detail or ""
        found = re.search(r"\)=\((.*)\) already exists", detail)
        value = found.group(1) if found else "?"
        if constraint == "one_active_hardware":
            msg = f"hardware serial {value!r} already belongs to an active device"
            return RegistryError(msg)
        if constraint == "one_active_name":
            kind = next((r.kind for r in self._inserted if r.name == value), "device")
            return DeviceExistsError(value, kind=kind)
        msg = f"registry refused {value!r}: {exc.diag.message_primary}"
        return RegistryError(msg)

    def _feed(self, records: Sequence[CertRecord]) -> None:
        for r in records:
            self._exec(
                "INSERT INTO revocations (serial, issuer) VALUES (%s, %s)",
                (r.serial, r.issuer or ""),
            )
        self.notify()

    def mark_revoked(
        self, name: str, *, reason: str, when: dt.datetime, kind: str | None = None
    ) -> list[CertRecord]:
        """Revoke every active certificate of ``name``; return the rows as they were."""
        self._require_tx()
        history = self.history(name)
        rows = [r for r in history if r.status == "active" and (kind is None or r.kind == kind)]
        if not rows:
            raise nothing_to_revoke(name, kind, history)
        self._exec(
            "UPDATE certificates SET status = 'revoked', revoked_at = %s, revocation_reason = %s"
            " WHERE name = %s AND status = 'active'",
            (when, reason, name),
        )
        self._feed(rows)
        return rows

    def put_secret(self, record: SecretRecord) -> None:
        self._exec(
            "INSERT INTO service_secrets (name, version, mechanism, salt, iterations, stored_key,"
            " server_key, status, created_at, revoked_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (name) DO UPDATE SET version = excluded.version,"
            " mechanism = excluded.mechanism, salt = excluded.salt,"
            " iterations = excluded.iterations, stored_key = excluded.stored_key,"
            " server_key = excluded.server_key, status = excluded.status,"
            " created_at = excluded.created_at, revoked_at = excluded.revoked_at",
            (
                record.name,
                record.version,
                record.mechanism,
                record.salt,
                record.iterations,
                record.stored_key,
                record.server_key,
                record.status,
                record.created_at,
                record.revoked_at,
            ),
        )

    def revoke_secret(self, name: str, when: dt.datetime) -> SecretRecord | None:
        self._require_tx()
        record = self.secret(name)
        if record is None or record.status != "active":
            return None
        self._exec(
            "UPDATE service_secrets SET status = 'revoked', revoked_at = %s WHERE name = %s",
            (when, name),
        )
        return record

    def put_registration(self, record: RegistrationRecord) -> None:
        self._exec(
            "INSERT INTO service_registrations (name, status, registered_at, revoked_at)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET status = excluded.status,"
            " registered_at = excluded.registered_at, revoked_at = excluded.revoked_at",
            (record.name, record.status, record.registered_at, record.revoked_at),
        )

    def revoke_registration(self, name: str, when: dt.datetime) -> RegistrationRecord | None:
        self._require_tx()
        record = self.registration(name)
        if record is None or record.status != "active":
            return None
        self._exec(
            "UPDATE service_registrations SET status = 'revoked', revoked_at = %s WHERE name = %s",
            (when, name),
        )
        return record

    def publish_crl(self, issuer: str, pem: bytes, number: int) -> None:
        """Make a station's newest CRL known to every broker."""
        self._exec(
            "UPDATE stations SET crl = %s, crl_number = %s WHERE fingerprint = %s",
            (pem.decode(), number, issuer),
        )
        self.notify()

    def add_station(self, name: str, fingerprint: str, certificate_pem: bytes) -> None:
        import psycopg

        self._require_tx()
        try:
            with self._conn.transaction():
                self._conn.execute(
                    "INSERT INTO stations (name, fingerprint, certificate) VALUES (%s, %s, %s)",
                    (name, fingerprint, certificate_pem.decode()),
                )
        except psycopg.errors.UniqueViolation:
            msg = f"the registry {self.where} already has a station named {name!r}"
            raise RegistryError(msg) from None
        self.notify()

    def revoke_station(self, name: str, when: dt.datetime) -> StationRecord:
        self._require_tx()
        found = [s for s in self.stations() if s.name == name]
        if not found:
            msg = f"station {name!r} is not in the registry {self.where}"
            raise RegistryError(msg)
        if found[0].status == "revoked":
            msg = f"station {name!r} is already revoked"
            raise RegistryError(msg)
        self._exec(
            "UPDATE stations SET status = 'revoked', revoked_at = %s WHERE name = %s", (when, name)
        )
        self.notify()
        return found[0]


class PgLedger:
    """The ledger as a table of the shared registry; same entries, same hashes as the file.

    Every line names the issuing CA that signed it (``data.signed_by``, its SHA-256
    fingerprint), so a verifier knows which station's key to check it with.
    """

    path = None

    def __init__(self, registry: PostgresRegistry, *, signer_id: str) -> None:
        self._registry = registry
        self.signer_id = signer_id

    def head(self) -> LedgerHead:
        locked = self._registry.locked_head()
        if locked is not None:  # read with the lock: no second round trip
            return locked
        rows = self._registry._rows("SELECT seq, hash FROM chain_head WHERE id = 1")
        return (
            LedgerHead(int(rows[0]["seq"]), str(rows[0]["hash"]))
            if rows
            else LedgerHead(0, GENESIS)
        )

    def append(
        self,
        events: Sequence[tuple[str, Mapping[str, Any]]],
        *,
        signer: Signer,
        now: dt.datetime | None = None,
    ) -> tuple[list[LedgerEntry], int]:
        """Append inside the caller's transaction (whose lock is the chain head)."""
        self._registry._require_tx()
        signed = [(event, {**data, "signed_by": self.signer_id}) for event, data in events]
        entries = build_entries(self.head(), signed, signer=signer, now=now)
        conn = self._registry.connection
        rows = [
            {
                "seq": e.seq,
                "time": e.time,
                "event": e.event,
                "data": e.data,  # stays JSON inside the JSON: encoded once, below
                "prev": e.prev,
                "hash": e.hash,
                "sig": e.sig,
            }
            for e in entries
        ]
        conn.execute(_INSERT_LEDGER, (json.dumps(rows, sort_keys=True),))
        last = entries[-1]
        conn.execute(
            "UPDATE chain_head SET seq = %s, hash = %s WHERE id = 1", (last.seq, last.hash)
        )
        # What the next read of the head in this transaction sees.
        self._registry._head = LedgerHead(last.seq, last.hash)
        return entries, 0

    def truncate(self, size: int) -> None:
        """Nothing to undo: the append rolls back with its transaction."""

    def entries(self) -> Iterator[tuple[int, LedgerEntry]]:
        offset = 0  # keyset pages: a long ledger never sits in memory at once
        while True:
            rows = self._registry._rows(
                "SELECT * FROM ledger WHERE seq > %s ORDER BY seq LIMIT 5000", (offset,)
            )
            if not rows:
                return
            for r in rows:
                entry = LedgerEntry(
                    seq=int(r["seq"]),
                    time=r["time"],
                    event=r["event"],
                    data=json.loads(r["data"]),
                    prev=r["prev"],
                    hash=r["hash"],
                    sig=r["sig"],
                )
                yield entry.seq, entry
            offset = int(rows[-1]["seq"])

    def verify(
        self, *, key_for: PublicKeyFor, expected_head: LedgerHead | None = None
    ) -> list[LedgerEntry]:
        return verify_chain(self.entries(), key_for=key_for, expected_head=expected_head)
