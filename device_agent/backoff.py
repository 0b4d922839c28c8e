"""Reconnect timing and failure classification: pure functions, no I/O.

Theory of operation
-------------------
Every failed connection attempt is classified into a :class:`Failure` with a stable ``reason``
token and a ``permanent`` flag. Transient failures (broker down, network cut, timeout) are
retried with capped, fully jittered exponential backoff (AWS architecture blog, "Exponential
Backoff And Jitter"): the n-th delay is uniform in ``[0, min(max, initial * 2**n)]``, so a fleet
that lost its broker at the same instant spreads its reconnects instead of arriving as a herd.

A refusal that will not fix itself (the certificate is revoked, expired or from an unknown CA, the
broker's certificate is not trusted, the broker rejected the identity) is retried slowly instead:
``slow_retry`` seconds, jittered between 50 % and 100 %, and logged at error level with the reason.

The reason comes from the most specific evidence available, in this order: the server
certificate check on our side (``ssl.SSLCertVerificationError``), a TLS alert sent by the broker
(ours and mosquitto send ``certificate revoked``, ``unknown ca`` ...), the CONNACK return code,
and finally a pattern: some brokers (amqtt) close a refused connection without an alert, which a
TLS 1.3 client only sees as the connection closing before CONNACK. After
``handshake_failures_before_slow`` such closes in a row, the agent treats them as a refusal too.
"""

from __future__ import annotations

import random
import ssl
from dataclasses import dataclass

__all__ = [
    "CONNACK_REASONS",
    "V5_CONNACK_REASONS",
    "Backoff",
    "Failure",
    "classify_connack",
    "classify_exception",
    "classify_log_text",
    "classify_refusal",
    "describe_reason",
]


@dataclass(frozen=True, slots=True)
class Failure:
    reason: str
    detail: str
    permanent: bool

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


class Backoff:
    """Capped, fully jittered exponential backoff; ``reset()`` after a successful connection."""

    def __init__(
        self,
        *,
        initial: float,
        maximum: float,
        slow: float,
        rng: random.Random | None = None,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.slow = slow
        self.attempts = 0
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    def reset(self) -> None:
        self.attempts = 0

    def cap(self) -> float:
        return float(min(self.maximum, self.initial * 2.0 ** min(self.attempts, 62)))

    def next_delay(self, failure: Failure | None = None) -> float:
        if failure is not None and failure.permanent:
            return float(self.slow * self._rng.uniform(0.5, 1.0))
        delay = float(self._rng.uniform(0, self.cap()))
        self.attempts += 1
        return delay


# MQTT 3.1.1 CONNACK return codes (section 3.2.2.3).
CONNACK_REASONS: dict[int, tuple[str, bool]] = {
    1: ("protocol-version", True),
    2: ("identifier-rejected", True),
    3: ("server-unavailable", False),
    4: ("bad-credentials", True),
    5: ("not-authorized", True),
}
# MQTT 5 CONNACK reason codes (section 3.2.2.2, table 3-1) -> (token, permanent). The five that
# 3.1.1 also has keep its tokens, so a fleet's counters mean the same on both versions.
# Anything else at or above 0x80 is a refusal that will not fix itself (MQTT-3.2.2-7: the server
# closes after it), except the ones that say "later" or "elsewhere".
V5_CONNACK_REASONS: dict[int, tuple[str, bool]] = {
    0x80: ("unspecified-error", False),
    0x81: ("malformed-packet", True),
    0x82: ("protocol-error", True),
    0x83: ("implementation-specific", True),
    0x84: ("protocol-version", True),
    0x85: ("identifier-rejected", True),
    0x86: ("bad-credentials", True),
    0x87: ("not-authorized", True),
    0x88: ("server-unavailable", False),
    0x89: ("server-busy", False),
    0x8A: ("banned", True),
    0x8C: ("bad-authentication-method", True),
    0x90: ("topic-name-invalid", True),
    0x95: ("packet-too-large", True),
    0x97: ("quota-exceeded", False),
    0x99: ("payload-format-invalid", True),
    0x9A: ("retain-not-supported", True),
    0x9B: ("qos-not-supported", True),
    0x9C: ("use-another-server", False),
    0x9D: ("server-moved", False),
    0x9F: ("connection-rate-exceeded", False),
}
# paho reports a 3.1.1 CONNACK return code as the MQTT 5 reason code of the same meaning.
V5_TO_311: dict[int, int] = {0x84: 1, 0x85: 2, 0x88: 3, 0x86: 4, 0x87: 5}

# TLS alerts as OpenSSL names them in the error text, most specific first.
_ALERTS: tuple[tuple[str, str, bool], ...] = (
    ("certificate revoked", "revoked", True),
    ("certificate_revoked", "revoked", True),
    ("certificate expired", "expired", True),
    ("certificate_expired", "expired", True),
    ("unknown ca", "unknown-ca", True),
    ("unknown_ca", "unknown-ca", True),
    ("certificate required", "no-certificate", True),
    ("certificate_required", "no-certificate", True),
    ("bad certificate", "bad-certificate", True),
    ("bad_certificate", "bad-certificate", True),
    ("unsupported certificate", "bad-certificate", True),
    ("handshake failure", "handshake-failure", False),
    ("protocol version", "protocol-version", True),
)


def classify_log_text(text: str) -> Failure | None:
    """A TLS alert named in an error text (paho logs read errors), or None."""
    lowered = text.lower()
    for needle, reason, permanent in _ALERTS:
        if needle in lowered:
            return Failure(
                reason, f"the broker sent the TLS alert '{needle.replace('_', ' ')}'", permanent
            )
    return None


def classify_connack(code: int) -> Failure:
    reason, permanent = CONNACK_REASONS.get(code, (f"connack-{code}", True))
    return Failure(reason, f"the broker answered CONNACK {code} ({reason})", permanent)


def _named_revoked(reason_string: str | None) -> bool:
    return reason_string is not None and "revoked" in reason_string.lower()


def describe_reason(code: int, name: str, reason_string: str | None = None) -> str:
    """``0x87 not authorized (revoked)``: the code, its name, and the broker's reason string."""
    text = f"0x{code:02x} {name.lower()}"
    return f"{text} ({reason_string})" if reason_string else text


def classify_refusal(
    code: int, name: str, *, v5: bool, reason_string: str | None = None
) -> Failure:
    """A refused CONNECT, from paho's reason code (an MQTT 5 code on both versions).

    The detail reads ``refused by the broker: 0x87 not authorized (revoked)`` on MQTT 5 and
    ``refused by the broker: CONNACK 5 not authorized`` on 3.1.1. A reason string that says the
    credential is revoked makes the token ``revoked``, as the TLS alert does.
    """
    token, permanent = V5_CONNACK_REASONS.get(code, (f"connack-0x{code:02x}", True))
    if v5:
        detail = f"refused by the broker: {describe_reason(code, name, reason_string)}"
    else:
        detail = f"refused by the broker: CONNACK {V5_TO_311.get(code, code)} {name.lower()}"
    if _named_revoked(reason_string):
        token, permanent = "revoked", True
    return Failure(token, detail, permanent)


def classify_exception(  # noqa: PLR0911 - one per kind
    exc: BaseException, broker: str = "the broker address"
) -> Failure:
    """What a failed TCP connect or TLS handshake to ``broker`` (HOST:PORT) means."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or str(exc)
        if "hostname" in detail.lower() or "ip address mismatch" in detail.lower():
            return Failure("wrong-broker-name", f"the broker's certificate {detail}", True)
        return Failure(
            "untrusted-broker",
            f"the broker's certificate failed verification against ca.crt: {detail}",
            True,
        )
    if isinstance(exc, ssl.SSLError):
        found = classify_log_text(str(exc))
        if found is not None:
            return found
        return Failure("tls-error", str(exc.reason or exc), False)
    if isinstance(exc, ConnectionRefusedError):
        return Failure("connection-refused", f"nothing listens at {broker}", False)
    if isinstance(exc, TimeoutError):
        return Failure("timeout", f"the broker at {broker} did not answer in time", False)
    if isinstance(exc, OSError):
        return Failure("network", f"{exc.strerror or exc} (broker {broker})", False)
    return Failure("error", f"{type(exc).__name__}: {exc}", False)
