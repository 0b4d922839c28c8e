"""A recording fake of ``broker.core.Link``: drive ``BrokerCore`` with plain calls, no sockets.

It keeps every byte the core sends, every hold and release, and how it was closed, and its
backlog is whatever the test says, so backpressure, takeover, QoS and queue rules run in
milliseconds without sleeps. Packets are decoded here with a few lines written for the tests,
not with the broker's own codec. (``bench/broker_acl.py`` has a counting twin for speed.)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from broker import mqtt
from broker.audit import AuditLog
from broker.auth import Authenticated
from broker.core import BrokerCore, Session
from broker.metrics import Metrics
from broker.settings import BrokerSettings, Limits
from provisioning.identity import Identity

DOMAIN = "fleet.example"


@dataclass(frozen=True)
class Sent:
    """One packet the core sent: its type, flags and body."""

    kind: int
    flags: int
    body: bytes

    @property
    def publish(self) -> tuple[str, int, int, bytes, bool, bool]:
        """(topic, qos, packet id, payload, retain, dup) of a PUBLISH."""
        assert self.kind == 3, self.kind
        tlen = struct.unpack("!H", self.body[:2])[0]
        topic = self.body[2 : 2 + tlen].decode()
        qos = (self.flags >> 1) & 3
        at, pid = 2 + tlen, 0
        if qos:
            pid = struct.unpack("!H", self.body[at : at + 2])[0]
            at += 2
        return topic, qos, pid, self.body[at:], bool(self.flags & 1), bool(self.flags & 8)

    @property
    def packet_id(self) -> int:
        return int(struct.unpack("!H", self.body[:2])[0])


def parse(stream: bytes) -> list[Sent]:
    out: list[Sent] = []
    at = 0
    while at < len(stream):
        first = stream[at]
        length, mult, i = 0, 1, at + 1
        while True:
            byte = stream[i]
            length += (byte & 0x7F) * mult
            mult *= 128
            i += 1
            if not byte & 0x80:
                break
        out.append(Sent(first >> 4, first & 0x0F, stream[i : i + length]))
        at = i + length
    return out


class RecordingLink:
    peer = "127.0.0.1:1"
    tls_version: str | None = "TLSv1.3"

    def __init__(self, core: BrokerCore) -> None:
        self.core = core
        self.session: Session | None = None
        self.holds: set[Session] = set()
        self.unsent = 0  # what the socket has not taken: the test sets it
        self.closed: tuple[bool, str | None] | None = None  # (will, reason)
        self.log: list[tuple[str, str]] = []  # ("hold" | "release", receiver client_id)
        self._stream = b""

    # -- Link --------------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        assert self.closed is None, "the core wrote to a closed link"
        self._stream += data

    def backlog(self) -> int:
        return self.unsent

    def hold(self, receiver: Session) -> None:
        self.holds.add(receiver)
        self.log.append(("hold", receiver.client_id))

    def release(self, receiver: Session) -> None:
        self.holds.discard(receiver)
        self.log.append(("release", receiver.client_id))

    def close(self, *, will: bool, reason: str | None = None) -> None:
        if self.closed is not None:
            return
        self.closed = (will, reason)
        for receiver in self.holds:
            receiver.waiters.discard(self)
        self.holds.clear()
        if self.session is not None:
            self.core.detach(self.session, self, will=will)

    # -- for the tests -----------------------------------------------------------------------------

    def take(self) -> list[Sent]:
        """The packets sent since the last call."""
        stream, self._stream = self._stream, b""
        return parse(stream)

    def publishes(self) -> list[tuple[str, int, int, bytes, bool, bool]]:
        """The PUBLISH packets sent since the last ``take``; anything else fails the test."""
        packets = self.take()
        assert all(p.kind == 3 for p in packets), [p.kind for p in packets]
        return [p.publish for p in packets]


def make_core(limits: Limits | None = None, **settings: object) -> BrokerCore:
    """A core with the default policy and an in-memory audit log (``core.audit.events``)."""
    base = BrokerSettings(Path("/nonexistent"), limits=limits or Limits(), **settings)  # type: ignore[arg-type]
    return BrokerCore(base, audit=AuditLog(lambda _line: None), metrics=Metrics())


def connect(
    core: BrokerCore,
    name: str,
    *,
    clean: bool = True,
    service: bool = False,
    will: tuple[str, bytes, bool] | None = None,
) -> tuple[Session, RecordingLink, bool]:
    """What a valid CONNECT does to the core: checks, attach, resume. (session, link, present)"""
    identity = Identity.service(name, DOMAIN) if service else Identity.device(name, DOMAIN)
    authenticated = Authenticated(identity, "mtls", format(abs(hash(name)) % 10**6, "x"))
    packet = mqtt.Connect(4, name, clean, 60)
    if will is not None:
        packet.will_topic, packet.will_payload, packet.will_retain = will
    core.check_connect(packet, authenticated)
    link = RecordingLink(core)
    session, present = core.attach(link, packet, authenticated)
    link.session = session
    core.resume(session)
    return session, link, present


def publish(core: BrokerCore, session: Session, topic: str, payload: bytes, qos: int = 0) -> None:
    """A client's PUBLISH as the protocol hands it to the core (acknowledging is not the core's)."""
    assert (
        core.publish(session, mqtt.Publish(topic, payload, qos, False, False, 1 if qos else 0))
        is None
    )
