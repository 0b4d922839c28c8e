"""The one exception root of ``broker`` and its specific failures.

Errors carry the fields a caller needs (identity, topic, reason) and a one-line message, so the CLI
can print ``error: <message>`` and exit 1 without a traceback.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "ConfigError",
    "PolicyError",
    "Refused",
    "TopicError",
]


class BrokerError(Exception):
    """Root of every error raised by ``broker``."""


class ConfigError(BrokerError):
    """Broker settings that cannot work (bad port, missing PKI file, stale setup)."""


class PolicyError(BrokerError):
    """A policy file that cannot be loaded; ``path`` and ``rule`` say where."""

    def __init__(self, message: str, *, path: str | None = None, rule: str | None = None) -> None:
        self.path = path
        self.rule = rule
        where = f"{path}: " if path else ""
        in_rule = f"rule {rule!r}: " if rule else ""
        super().__init__(f"{where}{in_rule}{message}")


class TopicError(BrokerError, ValueError):
    """A topic name or filter that breaks MQTT 3.1.1 section 4.7."""

    def __init__(self, value: str, reason: str, *, what: str = "topic") -> None:
        self.value = value
        self.reason = reason
        self.what = what
        shown = value if len(value) <= 80 else value[:77] + "..."
        super().__init__(f"invalid {what} {shown.encode('unicode_escape').decode()!r}: {reason}")


class Refused(BrokerError):  # noqa: N818 - reads as the outcome: `raise Refused(...)`
    """A connection the broker will not serve.

    ``reason`` is a short stable token for audit lines and metrics (``no-certificate``,
    ``revoked``, ``client-id-mismatch`` ...); ``connack`` is the MQTT 3.1.1 return code sent when
    the refusal happens after CONNECT was read (2 = identifier rejected, 5 = not authorized).
    ``method`` is the authentication method the client presented, when one did (the listener's
    authenticator fills it in), so the audit line of a refusal names it as a connect's does.
    """

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        connack: int = 5,
        identity: str | None = None,
        method: str | None = None,
    ) -> None:
        self.reason = reason
        self.detail = detail
        self.connack = connack
        self.identity = identity
        self.method = method
        super().__init__(f"{reason}: {detail}" if detail else reason)
