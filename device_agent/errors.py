"""The one exception root of ``device_agent`` and its specific failures.

Every error carries the fields a caller needs (device id, path, reason) and a one-line message, so
the CLI can print ``error: <message>`` and exit 1 without a traceback.
"""

from __future__ import annotations

__all__ = [
    "AgentConfigError",
    "AgentError",
    "CredentialError",
    "QueueError",
    "RenewalError",
    "TokenSigningError",
]


class AgentError(Exception):
    """Root of every error raised by ``device_agent``."""


class AgentConfigError(AgentError):
    """A configuration file or option that cannot work; ``path`` names the file when known."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class CredentialError(AgentError):
    """The credential directory is missing, incomplete or inconsistent."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"credential directory {path}: {reason}")


class QueueError(AgentError):
    """The offline queue cannot be opened or written."""


class RenewalError(AgentError):
    """A renewal answer that the agent will not install (wrong key, identity or chain)."""

    def __init__(self, reason: str, *, device_id: str | None = None) -> None:
        self.reason = reason
        self.device_id = device_id
        who = f" for {device_id}" if device_id else ""
        super().__init__(f"renewal{who} refused: {reason}")


class TokenSigningError(AgentError):
    """A device token (``--auth jwt``) could not be made; the message is the signer's reason."""
