"""Broker settings: frozen dataclasses with the DESIGN.md defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from broker.errors import ConfigError
from broker.policy import Policy, default_policy

if TYPE_CHECKING:
    from broker.renewal import RenewalSettings

__all__ = ["BrokerSettings", "Limits"]

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits amqtt 0.12.1 lacks. Enforced in broker/_listener.py, protocol.py and core.py."""

    # Accept -> TLS handshake -> CONNECT must all happen within this many seconds.
    connect_timeout: float = 10.0
    # No packet for keepalive * factor seconds closes the connection (MQTT-3.1.2-24).
    keepalive_factor: float = 1.5
    # A client asking for keep-alive 0 ("never") or longer gets this one, so dead links end.
    max_keepalive: int = 300
    # Bigger packets (fixed header + remaining length) close the connection before the body is read.
    max_packet_bytes: int = 256 * KiB
    # Once a packet has started, each further read must arrive within this many seconds.
    packet_timeout: float = 30.0
    # Established + handshaking connections; above it, new sockets are closed at accept.
    max_connections: int = 10_000
    # TLS handshakes in flight; above it, the *oldest* one is dropped (a flood cannot lock out).
    max_handshakes: int = 256
    # QoS 1/2 messages sent to one session and not yet acknowledged; more wait in its queue.
    max_inflight: int = 100
    # Messages (and bytes) waiting to be written to one subscriber; beyond, new ones are dropped.
    outbound_max_messages: int = 1000
    outbound_max_bytes: int = 8 * MiB
    # A publisher is not read while a receiver of its messages is above half of the two limits
    # above; after this many seconds that receiver counts as stuck and its excess is dropped.
    backpressure_timeout: float = 2.0
    # QoS 1/2 messages kept for a disconnected persistent session; beyond, new ones are dropped.
    offline_queue_max: int = 1000

    def __post_init__(self) -> None:
        for name in (
            "connect_timeout",
            "keepalive_factor",
            "max_keepalive",
            "max_packet_bytes",
            "packet_timeout",
            "max_connections",
            "max_handshakes",
            "max_inflight",
            "outbound_max_messages",
            "outbound_max_bytes",
            "backpressure_timeout",
            "offline_queue_max",
        ):
            if getattr(self, name) <= 0:
                msg = f"limit {name} must be positive"
                raise ConfigError(msg)
        if self.keepalive_factor < 1:
            msg = "keepalive_factor must be at least 1"
            raise ConfigError(msg)


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Everything a broker needs; ``port=0`` binds an ephemeral port (tests, demo, simulator)."""

    pki_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    policy: Policy = field(default_factory=default_policy)
    limits: Limits = field(default_factory=Limits)
    # Server key passphrase when the PKI keys are encrypted (IOTAUTH_CA_PASSPHRASE).
    key_password: bytes | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    crl_poll_interval: float = 0.2
    # MQTT-3.3.5-2: a refused PUBLISH is either acknowledged or the connection is closed.
    # "disconnect" gives a misbehaving device a signal; "drop" acknowledges and discards.
    denied_publish: Literal["disconnect", "drop"] = "disconnect"
    # Disconnected persistent sessions are forgotten after this many seconds (None: never).
    session_expiry: int | None = 24 * 3600
    # The certificate renewal service (broker/renewal.py) in this process; None: not started.
    renewal: RenewalSettings | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            msg = f"port {self.port} is out of range"
            raise ConfigError(msg)
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            msg = f"metrics port {self.metrics_port} is out of range"
            raise ConfigError(msg)
        if self.denied_publish not in ("disconnect", "drop"):
            msg = "denied_publish must be 'disconnect' or 'drop'"
            raise ConfigError(msg)
        if self.crl_poll_interval <= 0:
            msg = "crl_poll_interval must be positive"
            raise ConfigError(msg)
