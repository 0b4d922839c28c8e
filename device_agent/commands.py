"""Commands: ``devices/<id>/commands/<name>`` in, ``devices/<id>/replies/<name>`` out.

A handler takes a :class:`Command` and returns a JSON-able result. The request payload is JSON
``{"request_id": "...", "args": {...}}`` (both optional; a non-JSON payload arrives as ``raw``).
The reply is always JSON::

    {"request_id": "...", "command": "<name>", "ok": true, "result": ...}
    {"request_id": "...", "command": "<name>", "ok": false, "error": "unknown command 'x'"}

Unknown commands, bad payloads and handlers that raise are answered with ``ok: false``; the agent
never crashes on a command. Handlers run on the agent's loop: keep them short.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Command", "CommandHandler", "CommandRegistry", "Reply"]

log = logging.getLogger("iotauth.agent")


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    args: dict[str, Any]
    request_id: str | None
    raw: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    command: str
    request_id: str | None
    ok: bool
    result: Any = None
    error: str | None = None

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "request_id": self.request_id,
            "command": self.command,
            "ok": self.ok,
        }
        if self.ok:
            doc["result"] = self.result
        else:
            doc["error"] = self.error
        return json.dumps(doc, separators=(",", ":"), default=str).encode()


CommandHandler = Callable[[Command], Any]


@dataclass
class CommandRegistry:
    """Name -> handler. ``registry.register("reboot", fn)`` or ``@registry.command("reboot")``."""

    handlers: dict[str, CommandHandler] = field(default_factory=dict)

    def register(self, name: str, handler: CommandHandler) -> None:
        if not name or "/" in name or "+" in name or "#" in name:
            msg = f"invalid command name {name!r}"
            raise ValueError(msg)
        self.handlers[name] = handler

    def command(self, name: str) -> Callable[[CommandHandler], CommandHandler]:
        def wrap(fn: CommandHandler) -> CommandHandler:
            self.register(name, fn)
            return fn

        return wrap

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.handlers))

    def dispatch(self, name: str, payload: bytes) -> Reply:
        """Run the handler for ``name``; every failure becomes an error reply."""
        args: dict[str, Any] = {}
        request_id: str | None = None
        if payload:
            try:
                doc = json.loads(payload)
            except (ValueError, UnicodeDecodeError):
                doc = None
            if isinstance(doc, dict):
                rid = doc.get("request_id")
                request_id = str(rid) if rid is not None else None
                raw_args = doc.get("args", {})
                if not isinstance(raw_args, dict):
                    return Reply(name, request_id, ok=False, error="'args' must be a JSON object")
                args = raw_args
        handler = self.handlers.get(name)
        if handler is None:
            known = ", ".join(self) or "none"
            return Reply(
                name, request_id, ok=False, error=f"unknown command {name!r} (known: {known})"
            )
        try:
            result = handler(Command(name, args, request_id, payload))
            json.dumps(result, default=str)
        except Exception as exc:  # noqa: BLE001 - a handler's bug must not stop the agent
            log.warning("command %s failed: %s: %s", name, type(exc).__name__, exc)
            return Reply(name, request_id, ok=False, error=f"{type(exc).__name__}: {exc}")
        return Reply(name, request_id, ok=True, result=result)
