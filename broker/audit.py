"""One JSON line per security event: connect, refuse, deny, kick, disconnect.

Every line has ``ts`` (UTC, ISO 8601, milliseconds) and ``event``; the other fields appear when
known: ``identity`` (SPIFFE ID), ``client_id``, ``peer`` (host:port), ``reason`` (a stable token),
``detail`` (human text), ``action`` and ``topic`` for ACL denials, ``credential`` (certificate
serial, hex). Lines go to a sink (the CLI writes them to stdout) and to a bounded in-memory
history, which tests and ``RunningBroker.audit`` read.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
from collections.abc import Callable
from typing import Any

__all__ = ["AuditLog"]

log = logging.getLogger("iotauth.broker.audit")


class AuditLog:
    def __init__(self, sink: Callable[[str], None] | None = None, *, history: int = 10_000) -> None:
        self._sink = sink
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=history)

    def emit(self, event: str, **fields: object) -> dict[str, Any]:
        record: dict[str, Any] = {
            "ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "event": event,
        }
        record.update((k, v) for k, v in fields.items() if v is not None)
        self.history.append(record)
        line = json.dumps(record, separators=(",", ":"), default=str)
        if self._sink is not None:
            self._sink(line)
        else:
            log.info(line)
        return record

    def events(self, event: str | None = None, **match: object) -> list[dict[str, Any]]:
        """History filtered by event name and exact field values (newest last)."""
        return [
            r
            for r in list(self.history)
            if (event is None or r["event"] == event)
            and all(r.get(k) == v for k, v in match.items())
        ]
