"""Revocation that reaches a running broker: watch ``crl.pem``, swap the TLS context, kick.

``iotauth device revoke`` runs in another process and atomically replaces ``pki/crl.pem`` (a
rename, so the inode changes) with a CRL whose number is higher. The watcher stats the file every
``interval`` seconds (default 0.2 s: a stat is cheap and needs no inotify), and when it changed:

1. parses the CRL and checks its signature against ``issuing.crt``; a CRL that is unsigned,
   older (lower number) or unreadable is ignored with a warning, so a stray file can never
   *un*-revoke a device;
2. builds a fresh server context through ``provisioning.tls`` so new handshakes check the new
   CRL, and the old context's TLS 1.2 session-ID cache (which could resume a revoked session)
   is dropped with it;
3. calls ``on_change`` so the broker closes the live sessions of every revoked certificate.

Stale CRL policy (fail closed): the context checks the leaf against the CRL, and OpenSSL refuses
every handshake once the CRL is past its nextUpdate. The watcher logs a warning from
``crl_warn_hours`` (pki.toml, default 48 h) before that moment, once an hour, and an error after
it; sessions already connected are kept. ``iotauth ca crl`` (a refresh) fixes it without restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from broker.errors import ConfigError
from provisioning.config import PKIConfig
from provisioning.errors import ProvisioningError, RegistryUnavailableError
from provisioning.keyfiles import atomic_write
from provisioning.registry_pg import NOTIFY_CHANNEL, async_connect, display_url
from provisioning.registry_pg import connect as registry_connect
from provisioning.tls import ClientCertificates, server_context, server_context_for_pki

if TYPE_CHECKING:
    import psycopg

    from provisioning.pki import PKI

    _Conn = psycopg.Connection[dict[str, Any]]

__all__ = [
    "SNAPSHOT_NAME",
    "CRLState",
    "RegistryRevocationWatcher",
    "RevocationWatcher",
    "open_revocation_watcher",
    "read_crl",
]

log = logging.getLogger("iotauth.broker.revocation")

# The broker's last view of a shared registry, in its PKI directory: what it serves from when it
# starts while the database is down. Rewritten (atomically) on every sync that changed something.
SNAPSHOT_NAME = "registry-snapshot.json"
_SNAPSHOT_FORMAT = 1
_STATION_KEYS = ("name", "fingerprint", "certificate", "crl", "crl_number", "status")


@dataclass(frozen=True, slots=True)
class CRLState:
    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    revoked: frozenset[int]

    def seconds_left(self, now: dt.datetime | None = None) -> float:
        return (self.next_update - (now or dt.datetime.now(dt.UTC))).total_seconds()


def read_crl(path: Path, issuer: x509.Certificate) -> CRLState:
    """Parse and verify a CRL; raise ConfigError if it is missing, unsigned or malformed."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except OSError as exc:
        msg = f"cannot read CRL {path}: {exc.strerror or exc}"
        raise ConfigError(msg) from None
    except ValueError:  # cryptography's text is a paragraph with a URL; the file is the news
        msg = f"{path} is not a PEM CRL (cut short or edited?); run 'iotauth ca crl'"
        raise ConfigError(msg) from None
    public_key = issuer.public_key()
    if crl.issuer != issuer.subject or not crl.is_signature_valid(public_key):  # type: ignore[arg-type]
        msg = f"{path} is not signed by the issuing CA"
        raise ConfigError(msg)
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        msg = f"{path} has no CRL number"
        raise ConfigError(msg) from None
    next_update = crl.next_update_utc
    if next_update is None:
        msg = f"{path} has no nextUpdate"
        raise ConfigError(msg)
    return CRLState(
        number=number,
        this_update=crl.last_update_utc,
        next_update=next_update,
        revoked=frozenset(r.serial_number for r in crl),
    )


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class RevocationWatcher:
    """Holds the current CRL and TLS context of a PKI directory and keeps them fresh."""

    def __init__(
        self,
        pki_dir: Path,
        *,
        password: bytes | None = None,
        interval: float = 0.2,
        on_change: Callable[[CRLState], Awaitable[None]] | None = None,
    ) -> None:
        self.pki_dir = pki_dir
        self._password = password
        self.interval = interval
        self.on_change = on_change
        issuing = pki_dir / "issuing.crt"
        try:
            self._config = PKIConfig.load(pki_dir / "pki.toml")
            self._issuer = x509.load_pem_x509_certificate(issuing.read_bytes())
        except ValueError:
            msg = f"{issuing} is not a PEM certificate (cut short or edited?)"
            raise ConfigError(msg) from None
        except OSError as exc:
            msg = f"{pki_dir} is not a usable PKI directory: {exc.strerror or exc}: {exc.filename}"
            raise ConfigError(msg) from None
        except ProvisioningError as exc:
            msg = f"{pki_dir} is not a usable PKI directory: {exc}"
            raise ConfigError(msg) from None
        self._stamp = _stamp(pki_dir / "crl.pem")
        self.state = read_crl(pki_dir / "crl.pem", self._issuer)
        # One server context per client-certificate mode in use (mutual TLS, and listeners that
        # also or only take tokens); all rebuilt together when the CRL changes.
        self._contexts: dict[ClientCertificates, ssl.SSLContext] = {
            "required": self._build_context("required")
        }
        self._last_stale_warning: float | None = None

    @property
    def trust_domain(self) -> str:
        return self._config.trust_domain

    def gauges(self) -> dict[str, Callable[[], float]]:
        """Extra metrics of this revocation source (name -> read when scraped)."""
        return {}

    def close(self) -> None:
        """Release what the source holds (nothing for crl.pem)."""

    def seconds_left(self) -> float:
        return self.state.seconds_left()

    @property
    def issuer(self) -> x509.Certificate:
        """The issuing CA that signs this fleet's certificates and CRL."""
        return self._issuer

    @property
    def issuers(self) -> tuple[x509.Certificate, ...]:
        """Every issuing CA whose end-entity certificates this broker trusts (just its own)."""
        return (self._issuer,)

    @property
    def context(self) -> ssl.SSLContext:
        """The mutual-TLS server context for the CRL in force."""
        return self._contexts["required"]

    def context_for(self, client_certificates: ClientCertificates) -> ssl.SSLContext:
        """The server context for a listener's client-certificate mode, for the CRL in force."""
        if client_certificates not in self._contexts:
            self._contexts[client_certificates] = self._build_context(client_certificates)
        return self._contexts[client_certificates]

    def is_revoked(self, serial: int) -> bool:
        return serial in self.state.revoked

    def _build_context(self, client_certificates: ClientCertificates) -> ssl.SSLContext:
        try:
            return server_context_for_pki(
                self.pki_dir,
                password=self._password,
                check_crl=client_certificates != "none",
                client_certificates=client_certificates,
            )
        except ProvisioningError as exc:
            raise ConfigError(str(exc)) from None

    async def check(self) -> bool:
        """Reload if crl.pem changed; True if a newer CRL is now in force."""
        stamp = _stamp(self.pki_dir / "crl.pem")
        if stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            state = read_crl(self.pki_dir / "crl.pem", self._issuer)
        except ConfigError as exc:
            log.warning("ignoring crl.pem: %s; keeping CRL #%d", exc, self.state.number)
            return False
        if state.number <= self.state.number:
            if state.number < self.state.number:
                log.warning(
                    "ignoring crl.pem #%d: older than CRL #%d in force",
                    state.number,
                    self.state.number,
                )
            return False
        try:
            contexts = {mode: self._build_context(mode) for mode in self._contexts}
        except ConfigError as exc:
            log.warning("cannot rebuild the TLS context for CRL #%d: %s", state.number, exc)
            return False
        self.state, self._contexts = state, contexts
        log.info("CRL #%d in force: %d revoked certificate(s)", state.number, len(state.revoked))
        if self.on_change is not None:
            await self.on_change(state)
        return True

    def warn_if_stale(self, now: dt.datetime | None = None) -> str | None:
        """Log (at most hourly) when the CRL is near or past nextUpdate; return the message."""
        left = self.state.seconds_left(now)
        if left > self._config.crl_warn_hours * 3600:
            return None
        loop_time = asyncio.get_running_loop().time()
        if self._last_stale_warning is not None and loop_time - self._last_stale_warning < 3600:
            return None
        self._last_stale_warning = loop_time
        when = self.state.next_update.isoformat()
        if left <= 0:
            msg = (
                f"CRL #{self.state.number} expired at {when}: every new TLS handshake is refused "
                "until a fresh CRL is published ('iotauth ca crl --pki ...')"
            )
            log.error(msg)
        else:
            msg = (
                f"CRL #{self.state.number} goes stale at {when} ({left / 3600:.1f} h left); "
                "publish a fresh one ('iotauth ca crl --pki ...') or new handshakes will fail"
            )
            log.warning(msg)
        return msg

    async def run(self) -> None:
        """Poll until cancelled. Errors in one round are logged and the next round tries again."""
        self.warn_if_stale()
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
                self.warn_if_stale()
            except Exception:  # one bad round must never stop revocation for good
                log.exception("CRL watcher round failed")


class RegistryRevocationWatcher(RevocationWatcher):
    """Revocation from the shared registry (PostgreSQL): every station's CRL, every broker.

    At start it reads, synchronously, every station's issuing CA and CRL and every revoked
    serial, and saves that view as ``registry-snapshot.json`` in the PKI directory (again after
    every sync that changed it). If the database cannot be reached at start, the broker serves
    from that snapshot (said once in the log, ``iotauth_broker_registry_up 0``) and catches up
    when the database answers; without a snapshot it does not start (fail closed: it would not
    know which stations to trust nor what they revoked). A wrong password or a missing database
    is not "down": it stops the start with its one line. Then it LISTENs on the registry's
    notification channel: a revocation committed by any station wakes it within milliseconds; it
    reads the revocation feed past the last id it saw (ids commit in order: every write holds
    the chain head lock), adds the serials, rebuilds the TLS context when a station's CRL or
    status changed, and calls ``on_change`` so the broker closes the revoked sessions. Every
    ``safety_poll`` seconds it catches up even without a notification.

    A lost database: it keeps serving with what it knows (nothing it trusted is withdrawn,
    nothing revoked is forgotten), logs it once, shows ``iotauth_broker_registry_up 0``,
    reconnects every ``reconnect_interval`` seconds and, once back, catches up on everything it
    missed before sleeping on notifications again.

    The TLS context trusts the root and checks the leaf against the CRL of every *active*
    station; a revoked station's CRL is left out, so OpenSSL refuses each of its devices at the
    handshake ("unable to get certificate CRL"), and its serials are in the revoked set for the
    live sessions. A device revoked by another station than its own is refused at CONNECT (the
    revoked set) at once; its own station's CRL, which only that station's key can sign, is
    re-signed by whichever broker runs from that station's directory (this class, when the
    revocation feed moves and the directory's station CRL is behind), and published through the
    registry to every broker; otherwise on that station's next write.
    """

    def __init__(
        self,
        pki_dir: Path,
        *,
        registry_url: str,
        password: bytes | None = None,
        interval: float = 0.2,
        on_change: Callable[[CRLState], Awaitable[None]] | None = None,
        reconnect_interval: float = 1.0,
        safety_poll: float = 5.0,
    ) -> None:
        self._url = registry_url
        self.reconnect_interval = reconnect_interval
        self.safety_poll = safety_poll
        self.registry_up = False
        self._last_id = 0
        self._revoked: set[int] = set()
        self._stations: dict[str, tuple[int, str]] = {}  # fingerprint -> (crl number, status)
        self._issuers: tuple[x509.Certificate, ...] = ()  # the active stations' CAs
        self._crl_dir = Path(tempfile.mkdtemp(prefix="iotauth-broker-crls-"))
        self._lock = asyncio.Lock()
        self._crl_file = self._crl_dir / "stations-crl.pem"
        self._station_rows: list[dict[str, Any]] = []
        self._synced_at = time.time()  # when the view last matched the registry
        self._down_since: float | None = None  # monotonic; None while the registry answers
        self._snapshot_warned = False
        self._station_pki: PKI | None = None  # this directory's PKI, to re-sign its CRL
        self._resign_failed = False
        self._resign_task: asyncio.Task[None] | None = None
        self._resign_again = False
        try:
            self._root = x509.load_pem_x509_certificate((pki_dir / "root.crt").read_bytes())
        except (OSError, ValueError) as exc:
            msg = f"{pki_dir} is not a usable PKI directory: {exc}"
            raise ConfigError(msg) from None
        super().__init__(pki_dir, password=password, interval=interval, on_change=on_change)
        try:
            conn = registry_connect(registry_url)
        except RegistryUnavailableError as exc:
            if exc.permanent:  # a wrong password or a missing database is not an outage
                msg = f"the broker needs its registry at start: {exc}"
                raise ConfigError(msg) from None
            self._start_from_snapshot(exc)
            return
        except ProvisioningError as exc:
            msg = f"the broker needs its registry at start: {exc}"
            raise ConfigError(msg) from None
        try:
            self._apply(self._full_load(conn), force_context=True)
        finally:
            conn.close()
        self.registry_up = True
        self._save_snapshot()

    # -- the snapshot: serving while the database is down -----------------------------------------

    @property
    def snapshot_path(self) -> Path:
        return self.pki_dir / SNAPSHOT_NAME

    def _start_from_snapshot(self, exc: RegistryUnavailableError) -> None:
        """The database is down at start: serve from the last view saved, or refuse to start."""
        path = self.snapshot_path
        try:
            data = json.loads(path.read_bytes())
            if data.get("format") != _SNAPSHOT_FORMAT:
                raise ValueError("unknown format")
            snapshot = _Snapshot(
                stations=[{k: row[k] for k in _STATION_KEYS} for row in data["stations"]],
                serials={int(s, 16) for s in data["revoked"]},
                last_id=int(data["last_id"]),
            )
            saved_at = float(data["saved_at"])
        except FileNotFoundError:
            msg = (
                f"the broker needs its registry at start: {exc}; and it has no snapshot of it "
                f"({path}, saved on every sync), so it cannot know which devices to trust: "
                "start it once the database answers"
            )
            raise ConfigError(msg) from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            msg = (
                f"the broker needs its registry at start: {exc}; and its snapshot {path} is "
                f"unusable ({err}): start it once the database answers"
            )
            raise ConfigError(msg) from None
        self._apply(snapshot, force_context=True)
        self.registry_up = False
        self._synced_at = saved_at
        self._down_since = time.monotonic()
        when = dt.datetime.fromtimestamp(saved_at, dt.UTC).isoformat(timespec="seconds")
        log.warning(
            "registry %s unreachable at start: serving from its snapshot of %s (%d revoked "
            "serial(s), %d station(s)); reconnecting every %.0f s",
            display_url(self._url),
            when,
            len(self._revoked),
            len(self._stations),
            self.reconnect_interval,
        )

    def _snapshot_bytes(self) -> bytes:
        return json.dumps(
            {
                "format": _SNAPSHOT_FORMAT,
                "registry": display_url(self._url),
                "saved_at": self._synced_at,
                "last_id": self._last_id,
                "stations": [{k: row[k] for k in _STATION_KEYS} for row in self._station_rows],
                "revoked": sorted(format(s, "x") for s in self._revoked),
            },
            indent=1,
        ).encode()

    def _save_snapshot(self, data: bytes | None = None) -> None:
        """Write the view just synced; a directory the broker cannot write is said once."""
        try:
            atomic_write(self.snapshot_path, data if data is not None else self._snapshot_bytes())
        except OSError as exc:
            if not self._snapshot_warned:
                self._snapshot_warned = True
                log.warning(
                    "cannot save the registry snapshot %s (%s): this broker will not be able to "
                    "start while the database is down",
                    self.snapshot_path,
                    exc.strerror or exc,
                )

    @property
    def issuers(self) -> tuple[x509.Certificate, ...]:
        """Every active station's issuing CA (signed by the root, with a valid CRL of its own):
        a device of any station is trusted, as in the TLS context; until the registry is read,
        the directory's own."""
        return self._issuers or (self._issuer,)

    def gauges(self) -> dict[str, Callable[[], float]]:
        return {
            "iotauth_broker_registry_up": lambda: 1.0 if self.registry_up else 0.0,
            "iotauth_broker_revoked_serials": lambda: float(len(self._revoked)),
            # How old the view served from is: 0 while the registry answers.
            "iotauth_broker_registry_view_age_seconds": lambda: (
                0.0 if self.registry_up else max(0.0, time.time() - self._synced_at)
            ),
        }

    def close(self) -> None:
        shutil.rmtree(self._crl_dir, ignore_errors=True)
        busy = self._resign_task is not None and not self._resign_task.done()
        if self._station_pki is not None and not busy:  # a running re-sign closes nothing twice
            with contextlib.suppress(Exception):
                self._station_pki.close()

    def _build_context(self, client_certificates: ClientCertificates) -> ssl.SSLContext:
        """Trust the root, check leaves against every active station's CRL.

        Until the registry has been read (the base class's start), the directory's own crl.pem.
        """
        if not self._crl_file.exists():
            return super()._build_context(client_certificates)
        try:
            return server_context(
                cert_chain=self.pki_dir / "server.crt",
                key=self.pki_dir / "private" / "server.key",
                trust=self.pki_dir / "root.crt",
                crl=self._crl_file if client_certificates != "none" else None,
                password=self._password,
                client_certificates=client_certificates,
            )
        except ProvisioningError as exc:
            raise ConfigError(str(exc)) from None

    # -- reading the registry (sync queries; run in a thread from the loop) ---------------------

    def _full_load(self, conn: _Conn) -> _Snapshot:
        row = conn.execute("SELECT coalesce(max(id), 0) AS id FROM revocations").fetchone()
        last = row["id"] if row else 0
        snapshot = self._stations_snapshot(conn)
        rows = conn.execute(
            "SELECT serial FROM certificates WHERE status = 'revoked'"
            " OR issuer IN (SELECT fingerprint FROM stations WHERE status = 'revoked')"
        ).fetchall()
        snapshot.serials = {int(r["serial"], 16) for r in rows}
        snapshot.last_id = int(last)
        return snapshot

    def _stations_snapshot(self, conn: _Conn) -> _Snapshot:
        rows = conn.execute(
            "SELECT name, fingerprint, certificate, crl, crl_number, status FROM stations"
        ).fetchall()
        return _Snapshot(stations=rows)

    def _delta(self, conn: _Conn) -> _Snapshot:
        rows = conn.execute(
            "SELECT id, serial FROM revocations WHERE id > %s ORDER BY id", (self._last_id,)
        ).fetchall()
        snapshot = self._stations_snapshot(conn)
        snapshot.serials = {int(r["serial"], 16) for r in rows}
        snapshot.last_id = int(rows[-1]["id"]) if rows else self._last_id
        revoked_now = {
            r["fingerprint"]
            for r in snapshot.stations
            if r["status"] == "revoked"
            and self._stations.get(r["fingerprint"], (0, "active"))[1] != "revoked"
        }
        if revoked_now:
            more = conn.execute(
                "SELECT serial FROM certificates WHERE issuer = ANY(%s)", (list(revoked_now),)
            ).fetchall()
            snapshot.serials |= {int(r["serial"], 16) for r in more}
        return snapshot

    # -- applying what was read -----------------------------------------------------------------

    def _apply(self, snapshot: _Snapshot, *, force_context: bool = False) -> bool:
        """Fold a snapshot into the state; True if anything that matters changed."""
        stations = {
            r["fingerprint"]: (int(r["crl_number"]), r["status"]) for r in snapshot.stations
        }
        new_serials = snapshot.serials - self._revoked
        stations_changed = stations != self._stations
        if not (new_serials or stations_changed or force_context):
            self._last_id = max(self._last_id, snapshot.last_id)
            return False
        crls: list[bytes] = []
        issuers: list[x509.Certificate] = []
        next_updates: list[dt.datetime] = []
        this_updates: list[dt.datetime] = []
        for row in snapshot.stations:
            if row["status"] != "active" or not row["crl"]:
                continue
            state = self._station_crl(row)
            if state is None:
                continue
            crls.append(row["crl"].encode())
            issuers.append(x509.load_pem_x509_certificate(row["certificate"].encode()))
            next_updates.append(state.next_update)
            this_updates.append(state.this_update)
        if stations_changed or force_context:
            if not crls:
                msg = "the registry holds no valid CRL of an active station"
                raise ConfigError(msg)
            atomic_write(self._crl_file, b"".join(crls), mode=0o600)
            # Every listener's mode, rebuilt together (as the base class does for crl.pem).
            self._contexts = {mode: self._build_context(mode) for mode in self._contexts}
        self._revoked |= snapshot.serials
        self._stations = stations
        self._station_rows = list(snapshot.stations)
        self._issuers = tuple(issuers)
        self._last_id = max(self._last_id, snapshot.last_id)
        self.state = CRLState(
            number=self._last_id,
            this_update=max(this_updates) if this_updates else self.state.this_update,
            next_update=min(next_updates) if next_updates else self.state.next_update,
            revoked=frozenset(self._revoked),
        )
        return True

    def _station_crl(self, row: dict[str, Any]) -> CRLState | None:
        """A station's CRL, if its certificate is the root's and the CRL is that station's."""
        try:
            cert = x509.load_pem_x509_certificate(row["certificate"].encode())
            cert.verify_directly_issued_by(self._root)
            crl = x509.load_pem_x509_crl(row["crl"].encode())
        except (ValueError, TypeError, InvalidSignature):
            log.warning("ignoring station %s: its certificate is not the root's", row["name"])
            return None
        if crl.issuer != cert.subject or not crl.is_signature_valid(cert.public_key()):  # type: ignore[arg-type]
            log.warning("ignoring the CRL of station %s: not signed by its CA", row["name"])
            return None
        next_update = crl.next_update_utc or crl.last_update_utc
        return CRLState(0, crl.last_update_utc, next_update, frozenset())

    # -- the loop --------------------------------------------------------------------------------

    async def _catch_up(self, conn: _Conn) -> bool:
        async with self._lock:
            snapshot = await asyncio.to_thread(self._delta, conn)
            changed = self._apply(snapshot)
            self._synced_at = time.time()
            saved = self._snapshot_bytes() if changed else None
        if changed:
            log.info(
                "registry: %d revoked serial(s), %d station(s); revocation feed at #%d",
                len(self._revoked),
                len(self._stations),
                self._last_id,
            )
            if self.on_change is not None:  # the kick first: nothing below may delay it
                await self.on_change(self.state)
            await asyncio.to_thread(self._save_snapshot, saved)
            self._schedule_resign()
        return changed

    def _schedule_resign(self) -> None:
        """Re-sign this station's CRL in the background: a slow or failing write (the database
        going away again) must never hold up the watcher's next catch-up or kick."""
        if self._resign_task is None or self._resign_task.done():
            self._resign_task = asyncio.create_task(asyncio.to_thread(self._resign_own_crl))
        else:
            self._resign_again = True  # the running one goes round once more

    def _resign_own_crl(self) -> None:
        """Another station revoked a certificate of this directory's station: re-sign its CRL
        (only this station's key can) and publish it, so every broker's handshakes (and every
        exported Mosquitto or EMQX) refuse it too, not only CONNECT here. In a thread."""
        if (
            self._resign_failed
            or self._stations.get(self.issuer_fingerprint, (0, ""))[1] != "active"
        ):
            return
        import psycopg

        from provisioning.errors import PKIError
        from provisioning.pki import PKI, passphrase_from_env

        try:
            if self._station_pki is None:
                self._station_pki = PKI.open(self.pki_dir, passphrase=passphrase_from_env())
            info = self._station_pki.catch_up_crl()
            while self._resign_again:
                self._resign_again = False
                info = self._station_pki.catch_up_crl() or info
        except PKIError as exc:
            self._resign_failed = True  # e.g. the issuing key is elsewhere: say it once
            log.warning(
                "cannot re-sign the CRL of this directory's station (%s): revocations by other "
                "stations reach its CRL on the station's next write; this broker refuses them at "
                "CONNECT meanwhile",
                exc,
            )
            return
        except (ProvisioningError, OSError, psycopg.Error) as exc:  # the next change retries
            log.warning("could not re-sign this station's CRL now: %s", exc)
            if self._station_pki is not None:
                with contextlib.suppress(Exception):
                    self._station_pki.close()
            self._station_pki = None
            return
        if info is not None:
            log.info(
                "re-signed this station's CRL #%d: %d revoked certificate(s), published to every "
                "broker",
                info.number,
                info.revoked,
            )

    @property
    def issuer_fingerprint(self) -> str:
        from provisioning.certificates import fingerprint

        return fingerprint(self._issuer)

    async def check(self) -> bool:
        """Catch up now (a fresh connection) instead of waiting for a notification."""
        try:
            conn = await asyncio.to_thread(registry_connect, self._url)
        except ProvisioningError as exc:
            log.warning("%s", exc)
            return False
        try:
            return await self._catch_up(conn)
        finally:
            await asyncio.to_thread(conn.close)

    async def run(self) -> None:
        """LISTEN and catch up until cancelled; survive the database going away."""
        import psycopg

        self.warn_if_stale()
        while True:
            listen: psycopg.AsyncConnection[Any] | None = None
            query: _Conn | None = None
            try:
                listen = await async_connect(self._url)
                await listen.execute(f"LISTEN {NOTIFY_CHANNEL}")
                query = await asyncio.to_thread(registry_connect, self._url)
                await self._catch_up(query)  # everything committed while we were away
                if not self.registry_up:
                    down = time.monotonic() - (self._down_since or time.monotonic())
                    log.warning(
                        "registry %s is back after %.1f s; caught up to revocation #%d",
                        display_url(self._url),
                        down,
                        self._last_id,
                    )
                self.registry_up = True
                self._down_since = None
                while True:
                    # A notification, or the safety poll's timeout, ends this wait.
                    async for _ in listen.notifies(timeout=self.safety_poll, stop_after=1):
                        pass
                    await self._catch_up(query)
                    self.warn_if_stale()
            except (psycopg.Error, ProvisioningError, OSError) as exc:
                if self.registry_up:
                    self._down_since = time.monotonic()
                    log.error(
                        "registry %s lost (%s): keeping %d revoked serial(s) and the CRLs of %d "
                        "station(s); reconnecting every %.0f s",
                        display_url(self._url),
                        " ".join(str(exc).split())[:200],
                        len(self._revoked),
                        len(self._stations),
                        self.reconnect_interval,
                    )
                self.registry_up = False
            except Exception:  # one bad round must never stop revocation for good
                log.exception("registry watcher round failed")
            finally:
                if listen is not None:
                    with contextlib.suppress(Exception):
                        await listen.close()
                if query is not None:
                    with contextlib.suppress(Exception):
                        query.close()
            await asyncio.sleep(self.reconnect_interval)


@dataclass(slots=True)
class _Snapshot:
    stations: list[dict[str, Any]]
    serials: set[int] = field(default_factory=set)
    last_id: int = 0


def open_revocation_watcher(
    pki_dir: Path, *, password: bytes | None = None, interval: float = 0.2
) -> RevocationWatcher:
    """The broker's revocation source: crl.pem of the directory, or the shared registry."""
    try:
        config = PKIConfig.load(pki_dir / "pki.toml")
    except (OSError, ProvisioningError) as exc:
        msg = f"{pki_dir} is not a usable PKI directory: {exc}"
        raise ConfigError(msg) from None
    if config.registry:
        return RegistryRevocationWatcher(
            pki_dir, registry_url=config.registry, password=password, interval=interval
        )
    return RevocationWatcher(pki_dir, password=password, interval=interval)
