"""The manufacturing ledger: an append-only, hash-chained, signed JSON-lines file.

Each line is one event (issuance, revocation, CRL, provisioning, ...)::

    {"seq": 7, "time": "...", "event": "issue", "data": {...}, "prev": "<hash of line 6>",
     "hash": "<sha256 of the canonical form of the fields above>",
     "sig": "<ECDSA signature of the hash by the issuing CA>"}

The chain detects an edited, inserted, deleted or reordered line; the signature means that
rewriting the whole chain needs the issuing CA's key; and the registry remembers the sequence
number and hash of the last line, so cutting lines off the end is detected too.

Appends happen only while the caller holds the registry's write transaction, which is what keeps
concurrent stations from forking the chain.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.errors import LedgerCorruptError, LedgerError
from provisioning.keyfiles import atomic_write

if TYPE_CHECKING:
    from provisioning.signing import Signer

__all__ = [
    "GENESIS",
    "Ledger",
    "LedgerEntry",
    "LedgerHead",
    "PublicKeyFor",
    "build_entries",
    "export_jsonl",
    "verify_chain",
]

GENESIS = "0" * 64
_TAIL_READ = 64 * 1024  # longer than any line we write


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True, slots=True)
class LedgerHead:
    seq: int
    hash: str


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    seq: int
    time: str
    event: str
    data: dict[str, Any]
    prev: str
    hash: str
    sig: str

    def to_line(self) -> bytes:
        body = {
            "seq": self.seq,
            "time": self.time,
            "event": self.event,
            "data": self.data,
            "prev": self.prev,
            "hash": self.hash,
            "sig": self.sig,
        }
        return _canonical(body) + b"\n"


def _canonical_value(value: str) -> bytes:
    return json.dumps(value, ensure_ascii=True).encode()


def _entry_hash(seq: int, time: str, event: str, data: Mapping[str, Any], prev: str) -> str:
    body = {"seq": seq, "time": time, "event": event, "data": data, "prev": prev}
    return hashlib.sha256(_canonical(body)).hexdigest()


PublicKeyFor = Callable[[LedgerEntry], ec.EllipticCurvePublicKey | None]


def build_entries(
    head: LedgerHead,
    events: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    signer: Signer,
    now: dt.datetime | None = None,
) -> list[LedgerEntry]:
    """Chain and sign ``events`` after ``head`` (the file and the PostgreSQL ledger share it)."""
    when = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).isoformat(timespec="microseconds")
    entries: list[LedgerEntry] = []
    prev, seq = head.hash, head.seq
    when_json = _canonical_value(when)
    for event, data in events:
        seq += 1
        canonical_data = _canonical(data)
        payload = json.loads(canonical_data)  # JSON-safe copy; fails early on odd types
        # _entry_hash's canonical body, assembled around the data already encoded (keys in
        # sorted order: data, event, prev, seq, time): a batch of 500 is chained under the write
        # lock, so it is made once, not three times. The verifier recomputes it the long way.
        body = b'{"data":%s,"event":%s,"prev":%s,"seq":%d,"time":%s}' % (
            canonical_data,
            _canonical_value(event),
            _canonical_value(prev),
            seq,
            when_json,
        )
        digest = hashlib.sha256(body).hexdigest()
        sig = signer.sign(bytes.fromhex(digest))  # ECDSA P-256 with SHA-256, in a file or token
        entries.append(
            LedgerEntry(seq, when, event, payload, prev, digest, base64.b64encode(sig).decode())
        )
        prev = digest
    return entries


def verify_chain(
    entries: Iterable[tuple[int, LedgerEntry]],
    *,
    key_for: PublicKeyFor,
    expected_head: LedgerHead | None = None,
) -> list[LedgerEntry]:
    """Check every entry; raise LedgerCorruptError naming the first bad one.

    ``key_for`` gives the public key an entry must be signed with (None: a signer nobody knows).
    ``expected_head`` is what the registry recorded: a ledger that ends before it was cut.
    """
    prev, seq, last_line = GENESIS, 0, 0
    out: list[LedgerEntry] = []
    for lineno, entry in entries:
        last_line = lineno
        recomputed = _entry_hash(entry.seq, entry.time, entry.event, entry.data, entry.prev)
        if recomputed != entry.hash:
            raise LedgerCorruptError(lineno, "content does not match its hash (entry edited)")
        if entry.seq != seq + 1:
            what = "a line is missing before it" if entry.seq > seq + 1 else "out of order"
            raise LedgerCorruptError(
                lineno, f"sequence number {entry.seq} where {seq + 1} was expected ({what})"
            )
        if entry.prev != prev:
            raise LedgerCorruptError(
                lineno, "does not chain to the line before it (inserted or replaced entry)"
            )
        public_key = key_for(entry)
        if public_key is None:
            signer = str(entry.data.get("signed_by", "?"))[:16]
            raise LedgerCorruptError(lineno, f"signed by an issuing CA nobody knows ({signer})")
        try:
            public_key.verify(
                base64.b64decode(entry.sig, validate=True),
                bytes.fromhex(entry.hash),
                ec.ECDSA(hashes.SHA256()),
            )
        except (InvalidSignature, binascii.Error, ValueError):
            raise LedgerCorruptError(
                lineno, "signature is not the issuing CA's (entry forged)"
            ) from None
        prev, seq = entry.hash, entry.seq
        out.append(entry)
    if expected_head is not None and expected_head.seq > seq:
        raise LedgerCorruptError(
            last_line + 1,
            f"the ledger ends at entry {seq} but the registry recorded {expected_head.seq} "
            "(entries were cut from the end)",
        )
    if expected_head is not None and expected_head.seq and expected_head.seq <= seq:
        recorded = out[expected_head.seq - 1].hash
        if recorded != expected_head.hash:
            raise LedgerCorruptError(
                expected_head.seq, "differs from the entry the registry recorded (rewritten)"
            )
    return out


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path

    # -- writing -------------------------------------------------------------------------------

    def head(self) -> LedgerHead:
        """Sequence number and hash of the last line (GENESIS for an empty ledger)."""
        try:
            with self.path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                if size == 0:
                    return LedgerHead(0, GENESIS)
                fh.seek(max(0, size - _TAIL_READ))
                tail = fh.read()
        except FileNotFoundError:
            return LedgerHead(0, GENESIS)
        lines = tail.rstrip(b"\n").rsplit(b"\n", 1)
        try:
            last = json.loads(lines[-1])
            return LedgerHead(int(last["seq"]), str(last["hash"]))
        except (ValueError, KeyError, TypeError) as exc:
            msg = f"{self.path}: the last line is not a ledger entry; run 'iotauth ledger verify'"
            raise LedgerError(msg) from exc

    def append(
        self,
        events: Sequence[tuple[str, Mapping[str, Any]]],
        *,
        signer: Signer,
        now: dt.datetime | None = None,
    ) -> tuple[list[LedgerEntry], int]:
        """Append events durably (one fsync for the batch).

        Returns the entries and the file size before the append, which :meth:`truncate` takes to
        undo it if the surrounding transaction fails. A failed write undoes itself.
        """
        entries = build_entries(self.head(), events, signer=signer, now=now)
        blob = b"".join(e.to_line() for e in entries)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            before = os.fstat(fd).st_size
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as exc:
                # Leave no partial line behind (a full disk, say): the chain stays valid.
                os.ftruncate(fd, before)
                os.fsync(fd)
                msg = f"cannot append to {self.path}: {exc.strerror or exc}"
                raise LedgerError(msg) from exc
        finally:
            os.close(fd)
        return entries, before

    def truncate(self, size: int) -> None:
        """Undo an append whose transaction failed."""
        with contextlib.suppress(FileNotFoundError):
            os.truncate(self.path, size)

    # -- reading and verifying -----------------------------------------------------------------

    def entries(self) -> Iterator[tuple[int, LedgerEntry]]:
        """(line number, entry) for each line; a malformed line raises LedgerCorruptError."""
        try:
            fh = self.path.open("rb")
        except FileNotFoundError:
            return
        with fh:
            for lineno, raw in enumerate(fh, start=1):
                yield lineno, self._parse(lineno, raw)

    @staticmethod
    def _parse(lineno: int, raw: bytes) -> LedgerEntry:
        if not raw.endswith(b"\n"):
            raise LedgerCorruptError(lineno, "incomplete last line (interrupted write or cut file)")
        try:
            obj = json.loads(raw)
            entry = LedgerEntry(
                seq=obj["seq"],
                time=obj["time"],
                event=obj["event"],
                data=obj["data"],
                prev=obj["prev"],
                hash=obj["hash"],
                sig=obj["sig"],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerCorruptError(lineno, f"not a ledger entry ({exc})") from None
        if not isinstance(entry.seq, int) or not isinstance(entry.data, dict):
            raise LedgerCorruptError(lineno, "malformed entry")
        return entry

    def verify(
        self,
        *,
        public_key: ec.EllipticCurvePublicKey | None = None,
        key_for: PublicKeyFor | None = None,
        expected_head: LedgerHead | None = None,
    ) -> list[LedgerEntry]:
        """Check every line; raise LedgerCorruptError naming the first bad one.

        One issuing CA signs a station's own file (``public_key``); an export of a shared
        registry's ledger has one signer per station (``key_for``, by ``data.signed_by``).
        """
        if key_for is None:
            if public_key is None:
                msg = "verify needs public_key or key_for"
                raise ValueError(msg)
            key = public_key

            def key_for(_entry: LedgerEntry) -> ec.EllipticCurvePublicKey:
                return key

        return verify_chain(self.entries(), key_for=key_for, expected_head=expected_head)

    def export(self, path: Path) -> int:
        """Copy the ledger, as it is, to ``path`` (the auditor's JSONL); returns the line count."""
        return export_jsonl((e for _, e in self.entries()), path)


def export_jsonl(entries: Iterable[LedgerEntry], path: Path) -> int:
    """Write entries as today's ``ledger.jsonl`` lines, atomically (fsynced, then renamed)."""
    lines = [e.to_line() for e in entries]
    atomic_write(path, b"".join(lines), mode=0o644)
    return len(lines)
