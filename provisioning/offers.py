"""Renewal offers: certificates that left the CA and are neither recorded nor voided yet.

A renewal is two-phase issuance that outlives a process: the renewal service signs a certificate
and sends it to the device (an **offer**); only when the device has connected with it is it
recorded in the registry, and if it is never used it is voided (recorded as revoked, so the CRL
covers it). Between the two, the certificate exists only here, in ``<pki>/renewals.sqlite3``.

The book belongs to the PKI, not to the service, because revoking a device must reach every
certificate of it that exists: ``PKI.revoke`` voids the device's open offers in the same locked
change that revokes its registered certificate, whichever process runs the renewal service.
Every write to the book happens under the registry's write lock (``PKI._change``), so the service
and ``iotauth device revoke`` never race on an offer.

An offer's life is one table (:data:`TRANSITIONS`)::

    offered --confirm--> recorded      (the device connected with it; PKI.record)
    offered --void-----> voided        (unused within the offer time, device revoked, replaced)

``recorded`` and ``voided`` are final. The file's schema is the one the renewal service has
always written, so an existing ``renewals.sqlite3`` opens unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioning.errors import PKIError

__all__ = [
    "OFFERS_FILE",
    "TRANSITIONS",
    "Offer",
    "OfferBook",
    "OfferEvent",
    "OfferState",
    "next_state",
]

OFFERS_FILE = "renewals.sqlite3"


class OfferState(enum.StrEnum):
    OFFERED = "offered"
    RECORDED = "recorded"
    VOIDED = "voided"


class OfferEvent(enum.StrEnum):
    CONFIRM = "confirm"  # the device connected with the offered certificate
    VOID = "void"  # unused in time, the device was revoked, or its certificate changed


TRANSITIONS: dict[tuple[OfferState, OfferEvent], OfferState] = {
    (OfferState.OFFERED, OfferEvent.CONFIRM): OfferState.RECORDED,
    (OfferState.OFFERED, OfferEvent.VOID): OfferState.VOIDED,
}


def next_state(state: OfferState, event: OfferEvent) -> OfferState:
    """The state after ``event``; PKIError for a move the table does not allow."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        msg = f"a renewal offer that is {state.value} cannot {event.value}"
        raise PKIError(msg) from None


@dataclass(frozen=True, slots=True)
class Offer:
    request_id: str
    device_id: str
    old_serial: str  # the certificate it replaces, active when the offer was made
    new_serial: str
    cert_pem: bytes  # the leaf only
    created: float  # Unix time
    state: OfferState

    @classmethod
    def _from_row(cls, row: sqlite3.Row | tuple[Any, ...]) -> Offer:
        rid, dev, old, new, pem, created, state = row
        return cls(
            str(rid), str(dev), str(old), str(new), bytes(pem), float(created), OfferState(state)
        )


_SCHEMA = """
CREATE TABLE IF NOT EXISTS offers (request_id TEXT PRIMARY KEY, device_id TEXT NOT NULL,
    old_serial TEXT NOT NULL, new_serial TEXT NOT NULL, cert_pem BLOB NOT NULL,
    created REAL NOT NULL, state TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS offers_device ON offers(device_id, state);
CREATE INDEX IF NOT EXISTS offers_created ON offers(device_id, created);
"""


class OfferBook:
    """A connection to ``renewals.sqlite3``; one per PKI instance (not shared between threads).

    Reads may happen anywhere; writes only inside ``PKI._change`` (the PKI-wide lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._db = sqlite3.connect(path, timeout=60.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            msg = f"cannot open renewal offers {path}: {exc}"
            raise PKIError(msg) from None

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    # -- reads ---------------------------------------------------------------------------------

    def get(self, request_id: str) -> Offer | None:
        row = self._db.execute(
            "SELECT * FROM offers WHERE request_id = ?", (request_id,)
        ).fetchone()
        return Offer._from_row(row) if row else None

    def by_serial(self, device_id: str, serial: str) -> Offer | None:
        row = self._db.execute(
            "SELECT * FROM offers WHERE device_id = ? AND new_serial = ?", (device_id, serial)
        ).fetchone()
        return Offer._from_row(row) if row else None

    def open_offers(self, device_id: str | None = None) -> list[Offer]:
        """Offers still ``offered``: of one device, or of all."""
        if device_id is None:
            rows = self._db.execute("SELECT * FROM offers WHERE state = 'offered'").fetchall()
        else:
            rows = self._db.execute(
                "SELECT * FROM offers WHERE device_id = ? AND state = 'offered'", (device_id,)
            ).fetchall()
        return [Offer._from_row(r) for r in rows]

    def signed_since(self, device_id: str, since: float) -> list[float]:
        """The signing times of the offers made to ``device_id`` since ``since``, oldest first."""
        rows = self._db.execute(
            "SELECT created FROM offers WHERE device_id = ? AND created >= ? ORDER BY created",
            (device_id, since),
        ).fetchall()
        return [float(r[0]) for r in rows]

    # -- writes (inside PKI._change) -------------------------------------------------------------

    def insert(self, offer: Offer) -> None:
        self._db.execute(
            "INSERT INTO offers VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                offer.request_id,
                offer.device_id,
                offer.old_serial,
                offer.new_serial,
                offer.cert_pem,
                offer.created,
                offer.state.value,
            ),
        )

    def move(self, offer: Offer, event: OfferEvent) -> Offer:
        """Apply ``event`` (checked against the table) and return the offer in its new state."""
        state = next_state(offer.state, event)
        self._db.execute(
            "UPDATE offers SET state = ? WHERE request_id = ?", (state.value, offer.request_id)
        )
        return dataclasses.replace(offer, state=state)

    # -- taking a write back (its registry change did not commit; PKI._write) --------------------

    def remove(self, offer: Offer) -> None:
        self._db.execute("DELETE FROM offers WHERE request_id = ?", (offer.request_id,))

    def reset(self, offer: Offer) -> None:
        """Put ``offer`` back in the state it has (before a move)."""
        self._db.execute(
            "UPDATE offers SET state = ? WHERE request_id = ?",
            (offer.state.value, offer.request_id),
        )
