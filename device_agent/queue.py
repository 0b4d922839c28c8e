"""The offline queue: QoS 1 messages wait here until the broker acknowledged them.

Every message is written before it is sent and deleted only when its PUBACK arrives, so what the
broker never acknowledged is sent again after a network cut, a broker restart or an agent restart
(at least once). The queue is bounded by message count and by bytes; when full, the *oldest*
messages are dropped (and counted), because fresh telemetry is worth more than stale.

Each message gets an id ``<epoch>-<seq>``: ``seq`` grows by one per message and ``epoch`` is random
per queue file, so ids never repeat even if the file is deleted. Consumers drop duplicates by
``(device, id)``.

:class:`SqliteQueue` (the default: one SQLite file in WAL mode, survives restarts; an agent crash
loses nothing that ``put`` returned, a power cut may lose the last second) and :class:`MemoryQueue`
(the fleet simulator) behave the same. Neither is thread-safe: one agent's loop owns it.
"""

from __future__ import annotations

import collections
import contextlib
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from device_agent.errors import QueueError

__all__ = ["MemoryQueue", "MessageQueue", "QueuedMessage", "SqliteQueue", "open_queue"]


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    seq: int
    topic: str
    payload: bytes
    qos: int


class MessageQueue(Protocol):
    epoch: str
    dropped: int

    def put(self, topic: str, build: Callable[[str], bytes], *, qos: int = 1) -> str: ...
    def pending(self, after: int, limit: int) -> list[QueuedMessage]: ...
    def ack(self, seq: int) -> None: ...
    def __len__(self) -> int: ...
    @property
    def size_bytes(self) -> int: ...
    def close(self) -> None: ...


class MemoryQueue:
    """Same contract, no disk: for simulated devices."""

    def __init__(self, *, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.epoch = secrets.token_hex(4)
        self.dropped = 0
        self._next = 1
        self._items: collections.OrderedDict[int, QueuedMessage] = collections.OrderedDict()
        self._bytes = 0

    def put(self, topic: str, build: Callable[[str], bytes], *, qos: int = 1) -> str:
        seq = self._next
        self._next += 1
        msg_id = f"{self.epoch}-{seq}"
        payload = build(msg_id)
        self._items[seq] = QueuedMessage(seq, topic, payload, qos)
        self._bytes += len(payload)
        while len(self._items) > self.max_messages or self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= len(old.payload)
            self.dropped += 1
        return msg_id

    def pending(self, after: int, limit: int) -> list[QueuedMessage]:
        out: list[QueuedMessage] = []
        for seq, item in self._items.items():
            if seq > after:
                out.append(item)
                if len(out) >= limit:
                    break
        return out

    def ack(self, seq: int) -> None:
        item = self._items.pop(seq, None)
        if item is not None:
            self._bytes -= len(item.payload)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        self._items.clear()


class SqliteQueue:
    """The disk-backed queue (WAL, ``synchronous=NORMAL``)."""

    def __init__(self, path: Path, *, max_messages: int, max_bytes: int) -> None:
        self.path = path
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.dropped = 0
        try:
            # One thread uses it at a time (the agent's loop), but not necessarily the creator.
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS messages (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL,"
                " payload BLOB NOT NULL, qos INTEGER NOT NULL)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
            if row is None:
                self.epoch = secrets.token_hex(4)
                self._db.execute("INSERT INTO meta VALUES ('epoch', ?)", (self.epoch,))
            else:
                self.epoch = str(row[0])
            row = self._db.execute("SELECT value FROM meta WHERE key='next'").fetchone()
            self._next = int(row[0]) if row else 1
            count, size = self._db.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM messages"
            ).fetchone()
        except (sqlite3.Error, OSError) as exc:
            msg = f"cannot open the offline queue {path}: {exc}"
            raise QueueError(msg) from None
        self._count = int(count)
        self._bytes = int(size)
        with contextlib.suppress(OSError):
            path.chmod(0o600)

    def put(self, topic: str, build: Callable[[str], bytes], *, qos: int = 1) -> str:
        seq = self._next
        msg_id = f"{self.epoch}-{seq}"
        payload = build(msg_id)
        try:
            with self._tx():
                self._db.execute(
                    "INSERT INTO messages VALUES (?, ?, ?, ?)", (seq, topic, payload, qos)
                )
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('next', ?)", (str(seq + 1),))
                self._count += 1
                self._bytes += len(payload)
                self._trim()
        except sqlite3.Error as exc:
            msg = f"cannot write to the offline queue {self.path}: {exc}"
            raise QueueError(msg) from None
        self._next = seq + 1
        return msg_id

    def _trim(self) -> None:
        while self._count > self.max_messages or self._bytes > self.max_bytes:
            row = self._db.execute(
                "SELECT seq, length(payload) FROM messages ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                break
            self._db.execute("DELETE FROM messages WHERE seq = ?", (row[0],))
            self._count -= 1
            self._bytes -= int(row[1])
            self.dropped += 1

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    def pending(self, after: int, limit: int) -> list[QueuedMessage]:
        rows = self._db.execute(
            "SELECT seq, topic, payload, qos FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        ).fetchall()
        return [QueuedMessage(int(s), str(t), bytes(p), int(q)) for s, t, p, q in rows]

    def ack(self, seq: int) -> None:
        try:
            cur = self._db.execute(
                "DELETE FROM messages WHERE seq = ? RETURNING length(payload)", (seq,)
            )
            row = cur.fetchone()
        except sqlite3.Error as exc:
            msg = f"cannot update the offline queue {self.path}: {exc}"
            raise QueueError(msg) from None
        if row is not None:
            self._count -= 1
            self._bytes -= int(row[0])

    def __len__(self) -> int:
        return self._count

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        self._db.close()


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")


def open_queue(location: str, *, max_messages: int, max_bytes: int) -> MessageQueue:
    """``":memory:"`` for a :class:`MemoryQueue`, else a file path for a :class:`SqliteQueue`."""
    if location == ":memory:":
        return MemoryQueue(max_messages=max_messages, max_bytes=max_bytes)
    return SqliteQueue(Path(location), max_messages=max_messages, max_bytes=max_bytes)
