"""The broker's state on disk: an append-only log with group commit and compaction.

What is kept (issue 15): retained messages (set and cleared) and every *persistent* session
(clean session 0; MQTT 5 session expiry > 0): its fields, subscriptions with their options, the
queue of QoS 1/2 messages waiting for it, the messages in flight to it (packet id, and whether
PUBREC came: the PUBREL state), the QoS 2 packet ids it sent us that wait for PUBREL, and when it
went away (so its expiry keeps counting across a restart). Non-persistent sessions and QoS 0
traffic never touch the disk.

How (docs/BROKER.md, "Persistence", has the measurement behind the choice):

- :class:`Store` is sans-IO. ``BrokerCore`` calls its hooks (``session_saved``, ``queued``,
  ``sent``, ``completed`` ...) as its state changes; each appends one small binary record to an
  in-memory batch and bumps :attr:`Store.seq`. Memory stays the truth while running; the log is
  how that truth comes back.
- :class:`LogFile` does the I/O: it appends a batch as one frame (magic, length, CRC-32) and
  fsyncs, or replaces the whole file by a snapshot (write, fsync, rename, fsync the directory).
- :class:`Committer` is the asyncio glue, the group commit: whatever the event loop produced in
  one turn goes to disk in one write and one fsync (in a thread, so the next batch fills while
  the disk works). Acknowledgements that promise durability (PUBACK, PUBREC, PUBCOMP) wait in
  :meth:`Store.ack` until :attr:`Store.durable` reaches the records they depend on; they leave
  in the order they were made (MQTT-4.6.0-2/3).
- A frame that is cut short (a crash during the write) or whose CRC fails (damage) ends the
  replay: everything before it is kept, the rest is moved aside to ``*.damaged-<time>`` (never
  deleted) and reported in one line. Nothing after a torn frame was ever acknowledged: its
  fsync never returned.
- Compaction: when the log is large and mostly history, the live state is written as a fresh
  log (the same records) that replaces the old one atomically.
- The disk full: the failed batch stays in memory and is retried; meanwhile the core refuses QoS
  1/2 publishes it would have to store (3.1.1: the publisher's connection is closed) and the
  acknowledgements waiting for that batch are never sent (their publishers are closed and will
  send again). Everything else keeps working.

Records carry fields generically, which is how MQTT 5 fits in schema 1 unchanged: a session is
a JSON object (``v5``, and its Session Expiry Interval ``expiry``, used on replay instead of the
broker-wide one), a subscription a JSON object of options (:func:`subscription_fields`: QoS,
no-local, retain-as-published, retain handling, identifier; a ``$share/...`` filter joins its
group again), a message has a JSON ``extra`` when it carries anything MQTT 5 (its encoded
properties, its expiry as an absolute wall-clock time, subscription identifiers, the shared
subscription it went through); a 3.1.1 message's ``extra`` stays empty. An MQTT 5 will waiting
for its Will Delay Interval is a ``_WILL`` record (its due time as wall-clock time, and the
message as a ``_MSG`` record inside); ``_WILL_DONE`` ends it (published, or the session resumed).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import operator
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker import mqtt
from broker.auth import Authenticated
from broker.errors import BrokerError, ConfigError
from provisioning.errors import ProvisioningError
from provisioning.identity import parse_spiffe_id

if TYPE_CHECKING:
    from broker.core import BrokerCore, Link, Message, Session, SubscriptionState

__all__ = ["SCHEMA", "Committer", "LoadReport", "LogFile", "Store", "StoreError", "open_store"]

log = logging.getLogger("iotauth.broker.store")

SCHEMA = 1
_FILE_MAGIC = b"IOTAUTH-BROKER-STATE\n"
_FILE_HEADER = _FILE_MAGIC + struct.pack(">I", SCHEMA)
_FRAME = struct.Struct(">4sII")  # magic, body length, CRC-32 of the body
_FRAME_MAGIC = b"BTCH"
_LOG_NAME = "state.log"
_META_NAME = "state.json"
_LOCK_NAME = "lock"
# Compaction: when the log passes this size and is more than twice its last snapshot.
COMPACT_MIN_BYTES = 32 * 1024 * 1024

# Record kinds. A record is (kind: u8, length: u32, body); hot ones have a fixed struct body.
_SESSION = 1  # sid u32 + JSON fields
_FORGET = 2  # sid
_DETACH = 3  # sid, wall-clock seconds (f64)
_SUB = 4  # sid + JSON {"filter", "qos", ...options}
_UNSUB = 5  # sid + filter (UTF-8)
_MSG = 6  # mid u64, qos, retain, topic length u16, extra length u32, topic, extra, payload
_QUEUE = 7  # sid, mid, qos: appended to the session's queue
_SENT = 8  # sid, pid, mid, qos: in flight (taken from the queue if it was there)
_UNQUEUE = 9  # sid, mid: left the queue unsent (the receiver's grants changed)
_PUBREC = 10  # sid, pid: the receiver sent PUBREC (we owe PUBREL)
_DONE = 11  # sid, pid: PUBACK or PUBCOMP came, the message is delivered
_RETAIN = 12  # mid: the retained message of its topic
_UNRETAIN = 13  # topic (UTF-8): retained message cleared
_QOS2_IN = 14  # sid, pid, on (u8): a QoS 2 packet id from the client, waiting for PUBREL
_WILL = 15  # sid, due (wall-clock f64), then the will as a _MSG record (mid 0)
_WILL_DONE = 16  # sid: the pending will was published or cancelled

_H = struct.Struct(">BI")
_SID = struct.Struct(">BII")
_DETACH_S = struct.Struct(">BIId")
_MSG_S = struct.Struct(">BIQBBHI")
_LINK = operator.itemgetter(1)  # an entry of Store._acks: (seq, link, data)
_QUEUE_S = struct.Struct(">BIIQB")
_SENT_S = struct.Struct(">BIIHQB")
_UNQUEUE_S = struct.Struct(">BIIQ")
_PID_S = struct.Struct(">BIIH")
_RETAIN_S = struct.Struct(">BIQ")
_QOS2_S = struct.Struct(">BIIHB")
_WILL_S = struct.Struct(">BIId")


class StoreError(BrokerError):
    """The state directory cannot be used (another trust domain, locked, unreadable)."""


@dataclass(slots=True)
class LoadReport:
    sessions: int = 0
    queued: int = 0
    inflight: int = 0
    retained: int = 0
    expired: int = 0
    damage: str | None = None  # one line: where the log was damaged and what was dropped
    seconds: float = 0.0

    def line(self) -> str:
        text = (
            f"broker state: {self.sessions} persistent session(s), {self.queued} queued and "
            f"{self.inflight} in-flight message(s), {self.retained} retained message(s) "
            f"loaded in {self.seconds:.2f} s"
        )
        if self.expired:
            text += f"; {self.expired} session(s) expired while the broker was down"
        return text


class Store:
    """Sans-IO: the core's hooks in, record batches out; acknowledgements held until durable."""

    def __init__(self) -> None:
        self._buf: list[bytes] = []
        self.seq = 0  # records appended
        self.durable = 0  # records known to be on disk
        self.failed: str | None = None  # why the last write failed (disk full ...), until it works
        self._sids: dict[str, int] = {}
        self._next_sid = 1
        # A message's record number and references are on it (Message.store_mid, store_refs).
        self._next_mid = 1
        self._retained: dict[str, Message] = {}
        # Acknowledgements waiting for durability: (seq they need, link, bytes), in order made.
        self._acks: collections.deque[tuple[int, Link, bytes]] = collections.deque()
        self._waiting: dict[Link, int] = {}  # links with answers in _acks: the last one's seq
        # The Committer's wake-ups: ``on_dirty`` at the first record of a batch that must go to
        # disk now, ``on_lazy`` at the first record of a batch that may wait for company (see
        # :meth:`completed`). ``urgent``: the waiting batch holds a record of the first kind.
        self.on_dirty: Callable[[], None] | None = None
        self.on_lazy: Callable[[], None] | None = None
        self.urgent = False

    # -- acknowledgements ------------------------------------------------------------------------

    def ack(self, link: Link, data: bytes, since: int | None = None) -> None:
        """Send ``data`` (PUBACK/PUBREC/PUBCOMP) once every record so far is durable; at once
        if the packet it answers wrote nothing (``since`` is still :attr:`seq`) and no earlier
        answer to this link waits (their order is kept)."""
        seq = self.seq
        waiting = self._waiting
        if self.durable >= seq or (since == seq and link not in waiting):
            link.send(data)
        else:
            self._acks.append((seq, link, data))
            waiting[link] = seq  # its last answer that waits
            if not self.urgent and self._buf:
                self._urge()  # someone waits: the batch goes now, lazy records or not

    def release_acks(self) -> None:
        acks = self._acks
        durable = self.durable
        waiting = self._waiting
        if acks and acks[-1][0] <= durable:
            # The common case (a commit covers everything asked before it): all of them go,
            # in order, without the per-link counting; the consecutive ones to one link (a
            # publisher's PUBLISHes read together) in one send.
            ready = list(acks)
            acks.clear()
            waiting.clear()
            for link, group in itertools.groupby(ready, _LINK):
                link.send(b"".join([data for _, _, data in group]))
            return
        while acks and acks[0][0] <= durable:
            _, link, data = acks.popleft()
            last = waiting.get(link)
            if last is not None and last <= durable:
                del waiting[link]  # that was its last one waiting
            link.send(data)

    def refuse_acks(self) -> list[Link]:
        """The batch they wait for could not be written: their links, to be closed."""
        links = list(self._waiting)
        self._acks.clear()
        self._waiting.clear()
        return links

    # -- writing ---------------------------------------------------------------------------------

    def _urge(self) -> None:
        self.urgent = True
        if self.on_dirty is not None:
            self.on_dirty()

    def _put(self, record: bytes) -> None:
        if not self.urgent:
            self._urge()
        self._buf.append(record)
        self.seq += 1

    def _put_lazy(self, record: bytes) -> None:
        """A record whose loss in a crash costs a re-send MQTT allows and nothing else: it
        waits for the next batch that must go to disk anyway (or the Committer's DEFER)."""
        if not self._buf and self.on_lazy is not None:
            self.on_lazy()
        self._buf.append(record)
        self.seq += 1

    def take(self) -> tuple[bytes, int]:
        """The waiting records as one frame body, and the seq they bring the log to."""
        body = b"".join(self._buf)
        self._buf.clear()
        self.urgent = False
        return body, self.seq

    def give_back(self, body: bytes) -> None:
        """A batch that could not be written goes back in front, to be retried."""
        if body:
            self._buf.insert(0, body)
            self.urgent = True

    @property
    def dirty(self) -> bool:
        return bool(self._buf)

    def is_persistent(self, session: Session) -> bool:
        return session.client_id in self._sids

    def _sid(self, session: Session) -> int | None:
        return self._sids.get(session.client_id)

    def _mid(self, message: Message) -> int:
        mid = message.store_mid
        if not mid:
            mid = message.store_mid = self._next_mid
            self._next_mid += 1
            self._put(_encode_message(mid, message))
        message.store_refs += 1
        return mid

    def _unref(self, message: Message) -> None:
        if message.store_mid:
            message.store_refs -= 1
            if message.store_refs <= 0:
                message.store_mid = message.store_refs = 0

    # -- hooks the core calls ------------------------------------------------------------------

    def session_saved(self, session: Session) -> None:
        """A persistent session was created or resumed (its credential may have changed)."""
        sid = self._sids.get(session.client_id)
        new = sid is None
        if sid is None:
            sid = self._sids[session.client_id] = self._next_sid
            self._next_sid += 1
        session.stored = True  # the core calls the per-message hooks for it from now on
        self._put(_json_record(_SESSION, sid, _session_fields(session)))
        if new:  # a session that becomes persistent brings what it already holds
            for topic_filter, options in _subscription_options(session):
                self.subscribed(session, topic_filter, options)
            for message, qos in session.queue:
                self.queued(session, message, qos)
            for pid, (message, qos, released) in session.inflight.items():
                self.sent(session, pid, message, qos, queued=False)
                if released:
                    self.pubrec(session, pid)
            for pid in session.incoming_qos2:
                self.qos2_incoming(session, pid, waiting=True)

    def session_forgotten(self, session: Session) -> None:
        """Called before the core clears the session's queue and in-flight messages, or when an
        MQTT 5 client resumes it with Session Expiry 0 (it is no longer kept)."""
        sid = self._sids.pop(session.client_id, None)
        session.stored = False
        if sid is None:
            return
        for message, _qos in session.queue:
            self._unref(message)
        for message, _qos, _released in session.inflight.values():
            self._unref(message)
        self._put(_SID.pack(_FORGET, 4, sid))

    def session_detached(self, session: Session, wall: float) -> None:
        sid = self._sid(session)
        if sid is not None:
            self._put(_DETACH_S.pack(_DETACH, 12, sid, wall))

    def subscribed(self, session: Session, topic_filter: str, options: dict[str, Any]) -> None:
        sid = self._sid(session)
        if sid is not None:
            self._put(_json_record(_SUB, sid, {"filter": topic_filter, **options}))

    def unsubscribed(self, session: Session, topic_filter: str) -> None:
        sid = self._sid(session)
        if sid is not None:
            body = topic_filter.encode()
            self._put(_SID.pack(_UNSUB, 4 + len(body), sid) + body)

    def queued(self, session: Session, message: Message, qos: int) -> None:
        # A hot path (a QoS 1/2 message that waits for the window): _mid and _put written out.
        sid = self._sids.get(session.client_id)
        if sid is None:
            return
        buf = self._buf
        if not self.urgent:
            self._urge()
        mid = message.store_mid
        if not mid:
            mid = message.store_mid = self._next_mid
            self._next_mid = mid + 1
            message.store_refs = 1
            _append_message(buf, mid, message)  # the record's parts: joined in take()
            self.seq += 1
        else:
            message.store_refs += 1
        buf.append(_QUEUE_S.pack(_QUEUE, 13, sid, mid, qos))
        self.seq += 1

    def sent(self, session: Session, pid: int, message: Message, qos: int, *, queued: bool) -> None:
        # The hot path (one per QoS 1/2 delivery): _mid and _put written out.
        sid = self._sids.get(session.client_id)
        if sid is None:
            return
        buf = self._buf
        if not self.urgent:
            self._urge()
        mid = message.store_mid
        if not mid:
            mid = message.store_mid = self._next_mid
            self._next_mid = mid + 1
            message.store_refs = 1
            _append_message(buf, mid, message)
            self.seq += 1
        elif not queued:  # from the queue it moves; otherwise one more reference
            message.store_refs += 1
        buf.append(_SENT_S.pack(_SENT, 15, sid, pid, mid, qos))
        self.seq += 1

    def unqueued(self, session: Session, message: Message) -> None:
        sid = self._sids.get(session.client_id)
        if sid is None:
            return
        if message.store_mid:
            self._put(_UNQUEUE_S.pack(_UNQUEUE, 12, sid, message.store_mid))
            self._unref(message)

    def pubrec(self, session: Session, pid: int) -> None:
        sid = self._sids.get(session.client_id)
        if sid is not None:
            # Not lazy: the PUBREL waits for it (BrokerCore.acked).
            self._put(_PID_S.pack(_PUBREC, 6, sid, pid))

    def completed(self, session: Session, pid: int, message: Message) -> None:
        """The receiver's PUBACK / PUBCOMP (or a PUBREC with an error) ended an exchange. The
        record is lazy (:meth:`_put_lazy`): nobody's acknowledgement waits for it, and if a
        crash loses it the message is sent again with DUP (QoS 1 is at least once; a PUBREC
        with an error is given again) or the PUBREL again (answered by PUBCOMP, 4.3.3: the
        message is not delivered again). Committing it at once would put an fsync nobody
        waits for in front of the next one somebody does."""
        sid = self._sids.get(session.client_id)
        if sid is None:
            return
        buf = self._buf
        if not buf and self.on_lazy is not None:
            self.on_lazy()
        buf.append(_PID_S.pack(_DONE, 6, sid, pid))
        self.seq += 1
        if message.store_mid:
            refs = message.store_refs
            if refs <= 1:
                message.store_mid = message.store_refs = 0
            else:
                message.store_refs = refs - 1

    def qos2_incoming(self, session: Session, pid: int, *, waiting: bool) -> None:
        sid = self._sids.get(session.client_id)
        if sid is not None:
            self._put(_QOS2_S.pack(_QOS2_IN, 7, sid, pid, int(waiting)))

    def retained_set(self, message: Message) -> None:
        old = self._retained.pop(message.topic, None)
        if old is not None:
            self._unref(old)
        self._retained[message.topic] = message
        self._put(_RETAIN_S.pack(_RETAIN, 8, self._mid(message)))

    def retained_cleared(self, topic: str) -> None:
        old = self._retained.pop(topic, None)
        if old is not None:
            self._unref(old)
        body = topic.encode()
        self._put(_H.pack(_UNRETAIN, len(body)) + body)

    def will_pending(self, session: Session, message: Message, due: float) -> None:
        """An MQTT 5 will waits for its Will Delay Interval until ``due`` (wall-clock time)."""
        sid = self._sids.get(session.client_id)
        if sid is not None:
            inner = _encode_message(0, message)
            self._put(_WILL_S.pack(_WILL, 12 + len(inner), sid, due) + inner)

    def will_done(self, session: Session) -> None:
        """The pending will was published, or the session resumed before it was due."""
        sid = self._sids.get(session.client_id)
        if sid is not None:
            self._put(_SID.pack(_WILL_DONE, 4, sid))

    # -- snapshot --------------------------------------------------------------------------------

    def snapshot(self, core: BrokerCore) -> tuple[bytes, int]:
        """The live state as one frame body (replaces the log), and the seq it covers. The
        waiting records are dropped: their effect is in the state written here."""
        self._buf.clear()
        # The record numbers start again: forget the old ones wherever a message may hold one.
        for session in core.sessions.values():
            for message, _qos in session.queue:
                message.store_mid = message.store_refs = 0
            for message, _qos, _released in session.inflight.values():
                message.store_mid = message.store_refs = 0
        for message in self._retained.values():
            message.store_mid = message.store_refs = 0
        self._sids.clear()
        self._next_sid = 1
        self._next_mid = 1
        self._retained.clear()
        wall = time.time()
        mono = time.monotonic()
        for session in core.sessions.values():
            if not session.persistent:
                continue
            self.session_saved(session)
            if session.link is None and session.disconnected_at is not None:
                self.session_detached(session, wall - (mono - session.disconnected_at))
            pending = core.pending_wills.get(session.client_id)
            if pending is not None and pending[1] is session and session.will is not None:
                self.will_pending(session, session.will, wall + pending[0] - mono)
        for _topic, message in core.retained.matching("#"):
            self.retained_set(message)
        return self.take()


def subscription_fields(qos: int, state: SubscriptionState | None) -> dict[str, Any]:
    """A subscription's record fields: its QoS, and MQTT 5's options and identifier."""
    if state is None:
        return {"qos": qos}
    options = state.options
    return {
        "qos": qos,
        "nl": options.no_local,
        "rap": options.retain_as_published,
        "rh": options.retain_handling,
        "id": state.identifier,
    }


def _subscription_options(session: Session) -> Iterator[tuple[str, dict[str, Any]]]:
    options, shared = session.options, session.shared
    for topic_filter, qos in session.subscriptions.items():
        state = options.get(topic_filter) or shared.get(topic_filter)
        yield topic_filter, subscription_fields(qos, state)


def _session_fields(session: Session) -> dict[str, Any]:
    auth = session.authenticated
    return {
        "client_id": session.client_id,
        "identity": str(auth.identity),
        "method": auth.method,
        "credential": auth.credential,
        "not_after": auth.not_after.timestamp() if auth.not_after is not None else None,
        "next_id": session.next_id,
        "v5": session.v5,
        "expiry": session.expiry,  # MQTT 5: seconds (None: never); 3.1.1: the broker's at the time
    }


def _json_record(kind: int, sid: int, fields: dict[str, Any]) -> bytes:
    body = json.dumps(fields, separators=(",", ":")).encode()
    return _SID.pack(kind, 4 + len(body), sid) + body


def _encode_message(mid: int, message: Message) -> bytes:
    return b"".join(_message_parts(mid, message))


def _message_parts(mid: int, message: Message) -> tuple[bytes, ...]:
    """A ``_MSG`` record in pieces (head, topic, [extra,] payload), so that the hot hooks add
    them to the batch as they are, without a copy of the payload per record."""
    topic = message.topic_bytes
    payload = message.payload
    if message.properties_wire == b"\x00" and message.expires_at is None and not message.share:
        # 3.1.1, and MQTT 5 without properties: no extra
        size = 16 + len(topic) + len(payload)
        return (
            _MSG_S.pack(_MSG, size, mid, message.qos, message.retain, len(topic), 0),
            topic,
            payload,
        )
    extra = _message_extra(message)
    size = 16 + len(topic) + len(extra) + len(payload)
    head = _MSG_S.pack(_MSG, size, mid, message.qos, message.retain, len(topic), len(extra))
    return head, topic, extra, payload


def _append_message(buf: list[bytes], mid: int, message: Message) -> None:
    """:func:`_message_parts` onto the batch, for the hot hooks: the common case (no extra)
    without building a tuple to extend ``buf`` with."""
    topic = message.topic_bytes
    payload = message.payload
    if message.properties_wire == b"\x00" and message.expires_at is None and not message.share:
        size = 16 + len(topic) + len(payload)
        buf.append(_MSG_S.pack(_MSG, size, mid, message.qos, message.retain, len(topic), 0))
        buf.append(topic)
        buf.append(payload)
    else:
        buf.extend(_message_parts(mid, message))


def _message_extra(message: Message) -> bytes:
    fields: dict[str, Any] = {"p": message.properties_wire.hex()}
    if message.expires_at is not None:  # the core's clock is monotonic: kept as wall-clock time
        fields["x"] = message.expires_at - time.monotonic() + time.time()
    if message.subscription_ids:
        fields["i"] = list(message.subscription_ids)
    if message.share:
        fields["s"] = message.share
    return json.dumps(fields, separators=(",", ":")).encode()


# -- reading -------------------------------------------------------------------------------------


def _frames(data: bytes) -> tuple[list[tuple[int, bytes]], int, str | None]:
    """The intact frames after the header (offset, body), the offset where they end, and
    what was wrong after them."""
    frames: list[tuple[int, bytes]] = []
    offset = len(_FILE_HEADER)
    size = len(data)
    while offset < size:
        if size - offset < _FRAME.size:
            return frames, offset, "a frame header cut short (torn write)"
        magic, length, crc = _FRAME.unpack_from(data, offset)
        if magic != _FRAME_MAGIC:
            return frames, offset, "bytes that are not a frame"
        start = offset + _FRAME.size
        if start + length > size:
            return frames, offset, "a frame cut short (torn write)"
        body = data[start : start + length]
        if zlib.crc32(body) != crc:
            return frames, offset, "a frame whose checksum fails"
        frames.append((offset, body))
        offset = start + length
    return frames, offset, None


class _Replay:
    """Applies records to a core's tables (sessions, index, retained)."""

    def __init__(self, core: BrokerCore) -> None:
        from broker.core import Message, Session, SubscriptionState

        self._message_type = Message
        self._session_type = Session
        self._state_type = SubscriptionState
        self.core = core
        self.sessions: dict[int, Session] = {}
        self.messages: dict[int, Message] = {}
        self.detached: dict[int, float] = {}
        self.wills: dict[int, tuple[float, Message]] = {}  # sid -> (due, wall-clock; the will)

    def _message(self, body: bytes, view: memoryview, start: int, end: int) -> tuple[int, Message]:
        """A _MSG record's body (``start``: after its header; ``end``: where it ends)."""
        mid, qos, retain, tlen, xlen = struct.unpack_from(">QBBHI", body, start)
        p = start + 16
        topic = bytes(view[p : p + tlen])
        payload = bytes(view[p + tlen + xlen : end])
        message = self._message_type(topic.decode(), topic, payload, qos, bool(retain))
        if xlen:
            _apply_extra(message, json.loads(bytes(view[p + tlen : p + tlen + xlen])))
        return mid, message

    def apply(self, body: bytes) -> None:  # noqa: PLR0912, PLR0915 - one branch per kind
        view = memoryview(body)
        offset = 0
        end = len(body)
        sessions = self.sessions
        messages = self.messages
        while offset < end:
            kind, length = _H.unpack_from(body, offset)
            start = offset + _H.size
            offset = start + length
            if offset > end:
                msg = "record runs past its frame"
                raise ValueError(msg)
            if kind == _MSG:
                mid, message = self._message(body, view, start, offset)
                messages[mid] = message
                continue
            if kind == _RETAIN:
                (mid,) = struct.unpack_from(">Q", body, start)
                message = messages[mid]
                self.core.retained.set(message.topic, message)
                continue
            if kind == _UNRETAIN:
                self.core.retained.delete(bytes(view[start:offset]).decode())
                continue
            (sid,) = struct.unpack_from(">I", body, start)
            if kind == _SESSION:
                self._session(sid, json.loads(bytes(view[start + 4 : offset])))
                continue
            session = sessions.get(sid)
            if session is None:
                continue  # a record of a session forgotten or never kept: harmless
            if kind == _QUEUE:
                _, mid, qos = struct.unpack_from(">IQB", body, start)
                message = messages[mid]
                session.queue.append((message, qos))
                session.queued_bytes += len(message.payload)
            elif kind == _SENT:
                _, pid, mid, qos = struct.unpack_from(">IHQB", body, start)
                message = messages[mid]
                _take_from_queue(session, message)
                session.inflight[pid] = (message, qos, False)
            elif kind == _PUBREC:
                _, pid = struct.unpack_from(">IH", body, start)
                entry = session.inflight.get(pid)
                if entry is not None:
                    session.inflight[pid] = (entry[0], entry[1], True)
            elif kind == _DONE:
                _, pid = struct.unpack_from(">IH", body, start)
                session.inflight.pop(pid, None)
            elif kind == _UNQUEUE:
                _, mid = struct.unpack_from(">IQ", body, start)
                _take_from_queue(session, messages[mid])
            elif kind == _QOS2_IN:
                _, pid, on = struct.unpack_from(">IHB", body, start)
                if on:
                    session.incoming_qos2.add(pid)
                else:
                    session.incoming_qos2.discard(pid)
            elif kind == _SUB:
                self._subscribe(session, json.loads(bytes(view[start + 4 : offset])))
            elif kind == _UNSUB:
                topic_filter = bytes(view[start + 4 : offset]).decode()
                session.options.pop(topic_filter, None)
                if session.subscriptions.pop(topic_filter, None) is not None:
                    self._unindex(session, topic_filter)
            elif kind == _DETACH:
                (_, wall) = struct.unpack_from(">Id", body, start)
                self.detached[sid] = wall
            elif kind == _WILL:
                (_, due) = struct.unpack_from(">Id", body, start)
                inner = start + 12 + _H.size
                _, will = self._message(body, view, inner, offset)
                self.wills[sid] = (due, will)
            elif kind == _WILL_DONE:
                self.wills.pop(sid, None)
            elif kind == _FORGET:
                self._drop(sid)
            else:
                msg = f"unknown record kind {kind}"
                raise ValueError(msg)

    def _subscribe(self, session: Session, options: dict[str, Any]) -> None:
        topic_filter = options["filter"]
        qos = int(options.get("qos", 0))
        if "rh" not in options:  # 3.1.1
            session.subscriptions[topic_filter] = qos
            self.core.index.add(topic_filter, session, qos)
            return
        state = self._state_type(
            mqtt.SubscriptionOptions(bool(options["nl"]), bool(options["rap"]), int(options["rh"])),
            int(options.get("id", 0)),
        )
        if topic_filter.startswith("$share/"):
            # The group is joined again through the core (the policy judges it again).
            self.core._share(session, topic_filter, qos, state.options, state.identifier)
            return
        session.subscriptions[topic_filter] = qos
        session.options[topic_filter] = state
        self.core.index.add(topic_filter, session, qos)

    def _unindex(self, session: Session, topic_filter: str) -> None:
        if topic_filter in session.shared:
            self.core._unshare(session, topic_filter)
        else:
            self.core.index.remove(topic_filter, session)

    def _drop(self, sid: int) -> None:
        session = self.sessions.pop(sid)
        self.detached.pop(sid, None)
        self.wills.pop(sid, None)
        for topic_filter in session.subscriptions:
            self._unindex(session, topic_filter)
        if self.core.sessions.get(session.client_id) is session:
            del self.core.sessions[session.client_id]

    def _session(self, sid: int, fields: dict[str, Any]) -> None:
        session = self.sessions.get(sid)
        not_after = fields.get("not_after")
        identity = parse_spiffe_id(fields["identity"])
        authenticated = Authenticated(
            identity,
            fields["method"],
            fields["credential"],
            dt.datetime.fromtimestamp(not_after, dt.UTC) if not_after is not None else None,
        )
        if session is None:
            client_id = fields["client_id"]
            session = self._session_type(
                client_id, authenticated, self.core.policy.for_identity(identity)
            )
            session.persistent = True
            self.sessions[sid] = session
            self.core.sessions[client_id] = session
        else:
            session.authenticated = authenticated
        self.detached.pop(sid, None)  # connected again (its detach record follows if it left)
        session.next_id = int(fields.get("next_id", 1))
        session.v5 = bool(fields.get("v5", False))
        if session.v5:  # its own Session Expiry Interval, within today's maximum
            expiry = fields.get("expiry")
            session.expiry = self.core.session_expiry_for(
                0xFFFFFFFF if expiry is None else int(expiry)
            )
        else:
            session.expiry = self.core.settings.session_expiry


def _apply_extra(message: Message, fields: dict[str, Any]) -> None:
    """A kept message's MQTT 5 part (see :func:`_message_extra`)."""
    wire = bytes.fromhex(fields["p"])
    message.properties_wire = wire
    message.properties = mqtt.decode_properties(wire, mqtt.PUBLISH)
    wall = fields.get("x")
    if wall is not None:
        message.expires_at = wall - time.time() + time.monotonic()
    message.subscription_ids = tuple(fields.get("i", ()))
    message.share = fields.get("s", "")


def _take_from_queue(session: Session, message: Message) -> None:
    queue = session.queue
    if queue and queue[0][0] is message:
        queue.popleft()
    else:
        for index, (queued, _qos) in enumerate(queue):
            if queued is message:
                del queue[index]
                break
        else:
            return
    session.queued_bytes -= len(message.payload)


# -- the files -----------------------------------------------------------------------------------


class LogFile:
    """The I/O: append a frame and fsync; replace the file by a snapshot."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / _LOG_NAME
        self._fd = -1
        self.size = 0
        self.snapshot_size = 0

    def open_append(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = os.fstat(self._fd).st_size

    def append(self, body: bytes) -> None:
        """One frame, fsynced. On failure the file is cut back to where it was (no torn frame
        stays behind to end the next replay early) and the OSError is raised."""
        frame = _FRAME.pack(_FRAME_MAGIC, len(body), zlib.crc32(body)) + body
        try:
            written = os.write(self._fd, frame)
            if written != len(frame):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.size)
            raise
        self.size += len(frame)

    def replace(self, body: bytes) -> None:
        """The whole log becomes this one frame: a new file, fsynced, renamed over the old one."""
        tmp = self.path.with_suffix(".tmp")
        frame = _FILE_HEADER + _FRAME.pack(_FRAME_MAGIC, len(body), zlib.crc32(body)) + body
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(frame)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(self.directory)
        if self._fd >= 0:
            os.close(self._fd)
        self.open_append()
        self.snapshot_size = self.size

    def wants_compaction(self) -> bool:
        return self.size > COMPACT_MIN_BYTES and self.size > 2 * self.snapshot_size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _binding(pki_dir: Path, trust_domain: str) -> dict[str, Any]:
    """What ties a state directory to one PKI: its trust domain and its root certificate."""
    root = pki_dir / "root.crt"
    try:
        digest = hashlib.sha256(root.read_bytes()).hexdigest()
    except OSError:
        digest = None
    return {"trust_domain": trust_domain, "root_sha256": digest}


@dataclass(slots=True)
class Opened:
    store: Store
    log: LogFile
    report: LoadReport
    lock_fd: int

    def close(self) -> None:
        self.log.close()
        os.close(self.lock_fd)


def open_store(directory: Path, *, pki_dir: Path, trust_domain: str, core: BrokerCore) -> Opened:
    """Lock the state directory, check it belongs to this PKI, replay it into ``core`` and
    write it back compacted. Raises :class:`ConfigError` with one line when it cannot."""
    started = time.monotonic()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = os.open(directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        msg = f"broker state directory {directory}: {exc.strerror or exc} (--data-dir)"
        raise ConfigError(msg) from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock_fd)
        msg = f"broker state directory {directory} is in use by another broker (--data-dir)"
        raise ConfigError(msg) from None
    try:
        return _open_locked(directory, pki_dir, trust_domain, core, lock_fd, started)
    except OSError as exc:
        os.close(lock_fd)
        where = exc.filename or directory
        msg = f"cannot use broker state in {directory}: {exc.strerror or exc}: {where}"
        raise ConfigError(msg) from None
    except BaseException:
        os.close(lock_fd)
        raise


def _open_locked(
    directory: Path,
    pki_dir: Path,
    trust_domain: str,
    core: BrokerCore,
    lock_fd: int,
    started: float,
) -> Opened:
    _check_binding(directory, _binding(pki_dir, trust_domain), trust_domain, pki_dir)
    log_file = LogFile(directory)
    report = LoadReport()
    store = Store()
    if log_file.path.exists():
        _replay_log(log_file, core, report)
    log_file.path.touch()
    body, seq = store.snapshot(core)
    log_file.replace(body)
    store.durable = seq
    report.seconds = time.monotonic() - started
    return Opened(store, log_file, report, lock_fd)


def _check_binding(
    directory: Path, binding: dict[str, Any], trust_domain: str, pki_dir: Path
) -> None:
    meta_path = directory / _META_NAME
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    except (OSError, ValueError) as exc:
        msg = f"broker state {meta_path} is unreadable ({exc}); move the directory away"
        raise ConfigError(msg) from None
    if meta is None:
        tmp = meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"schema": SCHEMA, **binding}, indent=1) + "\n")
        os.replace(tmp, meta_path)
        return
    if meta.get("schema") != SCHEMA:
        msg = (
            f"broker state in {directory} has schema {meta.get('schema')!r}; this version "
            f"reads schema {SCHEMA}"
        )
        raise ConfigError(msg)
    theirs = {k: meta.get(k) for k in binding}
    if theirs != binding:
        msg = (
            f"broker state in {directory} belongs to another PKI (trust domain "
            f"{theirs['trust_domain']!r}), not {trust_domain!r} of {pki_dir}: "
            "use another --data-dir, or move that one away"
        )
        raise ConfigError(msg)


def _replay_log(log_file: LogFile, core: BrokerCore, report: LoadReport) -> None:
    """Apply every intact frame; at the first damage stop, keep a copy, say so in one line."""
    data = log_file.path.read_bytes()
    frames: list[tuple[int, bytes]] = []
    end, problem = 0, None
    if data and not data.startswith(_FILE_HEADER):
        if data.startswith(_FILE_MAGIC):
            msg = f"broker state {log_file.path} has another schema than {SCHEMA}"
            raise ConfigError(msg)
        problem = "no state header"
    elif data:
        frames, end, problem = _frames(data)
    replay = _Replay(core)
    kept = 0
    for offset, body in frames:
        try:
            replay.apply(body)
        except (ValueError, KeyError, struct.error, ProvisioningError, UnicodeError) as exc:
            problem = f"a record that does not decode ({type(exc).__name__})"
            end = offset
            break
        kept += 1
    if problem is not None:
        aside = log_file.path.with_name(
            f"{_LOG_NAME}.damaged-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}"
        )
        aside.write_bytes(data)
        report.damage = (
            f"broker state {log_file.path} damaged at byte {end} of {len(data)}: "
            f"{problem}; kept the {kept} batch(es) before it, dropped {len(data) - end} "
            f"byte(s) from there (the whole file is kept as {aside.name})"
        )
    _finish_replay(core, replay, log_file, report)


def _finish_replay(
    core: BrokerCore, replay: _Replay, log_file: LogFile, report: LoadReport
) -> None:
    """Wall-clock detach times become the core's monotonic ones; sessions that were connected
    when the broker stopped count as gone since the log was last written; the expired go."""
    wall_now = time.time()
    mono_now = time.monotonic()
    try:
        stopped = log_file.path.stat().st_mtime
    except OSError:
        stopped = wall_now
    kept_for_will = 0
    for sid, session in list(replay.sessions.items()):
        gone = replay.detached.get(sid, stopped)
        session.disconnected_at = mono_now - max(0.0, wall_now - gone)
        will = replay.wills.get(sid)
        if will is not None:
            # Due on the core's clock; a will due while the broker was down is due now. The
            # core publishes it at its first tick, after the CRL has dropped revoked sessions
            # (a revoked identity's will is never published).
            due, message = will
            session.will = message
            core.pending_wills[session.client_id] = (mono_now + (due - wall_now), session)
        ttl = session.expiry  # MQTT 5: the session's own interval; 3.1.1: the broker's
        if ttl is not None and wall_now - gone >= ttl:
            report.expired += 1
            if will is None:
                replay._drop(sid)
                continue
            # Expired while down, with its will due (at the latest when the session ended):
            # kept until the core's first tick publishes the will and expire_sessions ends it.
            kept_for_will += 1
            continue
        # Packet ids in use stay in use: the next one starts past the largest in flight.
        report.queued += len(session.queue)
        report.inflight += len(session.inflight)
    report.sessions = len(replay.sessions) - kept_for_will
    report.retained = sum(1 for _ in core.retained.matching("#"))


# -- the asyncio side ----------------------------------------------------------------------------


class Committer:
    """Group commit on an event loop: one write + fsync per batch, in a worker thread."""

    RETRY = 0.5  # seconds between attempts while the disk refuses
    DEFER = 0.05  # seconds a batch of lazy records (Store._put_lazy) may wait for company

    def __init__(self, core: BrokerCore, opened: Opened) -> None:
        self.core = core
        self.store = opened.store
        self.log = opened.log
        self._loop = asyncio.get_running_loop()
        self._running = False
        self._retry: asyncio.TimerHandle | None = None
        self.commits = 0
        self.failures = 0
        self._resnapshot = False  # a failed compaction dropped the batch: rebuild from memory
        self._deferred: asyncio.TimerHandle | None = None
        self.store.on_dirty = self._wake
        self.store.on_lazy = self._later

    def _wake(self) -> None:
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        if not self._running and self._retry is None:
            self._running = True
            self._loop.call_soon(self._start)

    def _later(self) -> None:
        """Only lazy records wait: commit them within DEFER unless something urgent comes."""
        if self._deferred is None and not self._running and self._retry is None:
            self._deferred = self._loop.call_later(self.DEFER, self._wake)

    def _start(self) -> None:
        self._retry = None
        store = self.store
        if not store.dirty and not self._resnapshot:
            self._running = False
            return
        self._running = True
        compact = self._resnapshot or (store.failed is None and self.log.wants_compaction())
        if compact:
            self._resnapshot = False
            body, seq = store.snapshot(self.core)
        else:
            body, seq = store.take()
        job = self.log.replace if compact else self.log.append
        task = self._loop.run_in_executor(None, job, body)
        task.add_done_callback(lambda fut: self._done(fut, body, seq, compact=compact))

    def _done(self, fut: asyncio.Future[None], body: bytes, seq: int, *, compact: bool) -> None:
        store = self.store
        exc = fut.exception()
        if exc is None:
            self.commits += 1
            if store.failed is not None:
                log.warning("broker state: writing again (%s)", self.log.path)
            store.failed = None
            store.durable = seq
            store.release_acks()
            self._running = False
            if store.urgent:
                self._wake()
            elif store.dirty:
                self._later()
            return
        self.failures += 1
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if store.failed is None:
            log.error(
                "broker state: cannot write %s (%s): QoS 1/2 publishes to persistent sessions "
                "are refused until it can",
                self.log.path,
                reason,
            )
        store.failed = reason
        if not compact:
            store.give_back(body)
        else:
            self._resnapshot = True
        for link in store.refuse_acks():
            link.close(will=True, reason="storage-failed")
        self._running = False
        self._retry = self._loop.call_later(self.RETRY, self._start)

    def compact_soon(self) -> None:
        """Write the live state as a fresh log at the next commit (forgotten data leaves)."""
        self._resnapshot = True
        self._wake()

    async def close(self) -> None:
        """Write what waits (a clean shutdown), best effort."""
        for _ in range(100):
            if not self._running and not self.store.dirty:
                return
            if not self._running and self._retry is None:
                self._wake()
            await asyncio.sleep(0.01)
            if self.store.failed is not None:
                return
