"""Broker settings: frozen dataclasses with the defaults of docs/ARCHITECTURE.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from broker.errors import ConfigError
from broker.policy import Policy, default_policy

if TYPE_CHECKING:
    from broker.auth_oidc import OIDCSettings
    from broker.renewal import RenewalSettings

__all__ = [
    "AVAILABLE_METHODS",
    "DEFAULT_METHODS_BY_KIND",
    "METHODS",
    "BrokerSettings",
    "Limits",
    "ListenerSpec",
]

# Every way in that the broker knows (docs/BROKER.md, "Authentication methods").
METHODS = ("mtls", "jwt", "oidc", "scram", "password")
# The methods this version implements; a listener that names another is refused at start.
AVAILABLE_METHODS = frozenset({"mtls", "jwt", "password", "oidc", "scram"})
# Which methods each kind of identity may use, wherever a listener accepts them: a device proves
# itself with its own key (certificate or signed token); services may also use the company's
# identity provider or a shared secret.
DEFAULT_METHODS_BY_KIND: dict[str, frozenset[str]] = {
    "device": frozenset({"mtls", "jwt"}),
    "service": frozenset({"mtls", "oidc", "scram", "password"}),
}


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """One TLS listener and the methods it accepts: ``8883:mtls``, ``8884:jwt,password``.

    There is never a plaintext listener: one that takes only ``mtls`` demands a client certificate
    in the handshake; one that takes other methods is server-authenticated TLS (the client checks
    the broker's certificate, the broker checks the client's token or secret inside MQTT), and asks
    for a certificate optionally when it also lists ``mtls``.
    """

    port: int
    methods: frozenset[str]

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            msg = f"listener port {self.port} is out of range (0-65535)"
            raise ConfigError(msg)
        if not self.methods:
            msg = f"listener {self.port} names no method (one or more of {', '.join(METHODS)})"
            raise ConfigError(msg)
        unknown = sorted(self.methods - set(METHODS))
        if unknown:
            msg = (
                f"listener {self.port}: unknown method {', '.join(unknown)} "
                f"(methods: {', '.join(METHODS)})"
            )
            raise ConfigError(msg)
        missing = sorted(self.methods - AVAILABLE_METHODS)
        if missing:
            msg = (
                f"listener {self.port}: method {', '.join(missing)} is not available in this "
                f"version (available: {', '.join(sorted(AVAILABLE_METHODS))})"
            )
            raise ConfigError(msg)

    @classmethod
    def parse(cls, text: str) -> ListenerSpec:
        """``PORT:METHOD[,METHOD...]`` as given to ``--listen``."""
        port_text, sep, methods_text = text.partition(":")
        if not sep or not port_text.strip().isdigit():
            msg = f"--listen {text!r}: expected PORT:METHOD[,METHOD...], e.g. 8883:mtls"
            raise ConfigError(msg)
        methods = frozenset(m.strip() for m in methods_text.split(",") if m.strip())
        return cls(int(port_text), methods)

    @property
    def client_certificates(self) -> Literal["required", "optional", "none"]:
        if self.methods == {"mtls"}:
            return "required"
        return "optional" if "mtls" in self.methods else "none"

    def __str__(self) -> str:
        return f"{self.port}:{','.join(m for m in METHODS if m in self.methods)}"


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
    # QoS 1/2 messages (and payload bytes) kept for a disconnected persistent session; beyond,
    # new ones are dropped, counted per reason and audited (docs/BROKER.md, "Full queues").
    # Sized for a disk-backed store: Mosquitto's max_queued_messages is 1000.
    offline_queue_max: int = 10_000
    offline_queue_max_bytes: int = 16 * MiB
    # MQTT 5: our Receive Maximum (QoS 2 PUBLISH from one client awaiting PUBREL; one more is
    # DISCONNECT 0x93) and Topic Alias Maximum (aliases a client may set; 0: none).
    receive_maximum: int = 100
    topic_alias_maximum: int = 64

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
            "offline_queue_max_bytes",
            "receive_maximum",
        ):
            if getattr(self, name) <= 0:
                msg = f"limit {name} must be positive"
                raise ConfigError(msg)
        if self.keepalive_factor < 1:
            msg = "keepalive_factor must be at least 1"
            raise ConfigError(msg)
        for name in ("receive_maximum", "topic_alias_maximum"):
            if not 0 <= getattr(self, name) <= 0xFFFF:
                msg = f"limit {name} must be between 0 and 65535"
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
    # Disconnected persistent sessions are forgotten after this many seconds (None: never); for
    # MQTT 5 clients the longest Session Expiry Interval granted (a longer one is lowered and
    # the CONNACK says so, 3.2.2.3.2).
    session_expiry: int | None = 24 * 3600
    # The certificate renewal service (broker/renewal.py) in this process; None: not started.
    renewal: RenewalSettings | None = None
    # The listeners; none given: one mutual-TLS listener on ``port`` (the default of every
    # earlier version).
    listeners: tuple[ListenerSpec, ...] = ()
    # Which methods each kind of identity may use (DEFAULT_METHODS_BY_KIND).
    methods_by_kind: dict[str, frozenset[str]] = field(
        default_factory=lambda: dict(DEFAULT_METHODS_BY_KIND)
    )
    # Device tokens (the jwt method): the longest lifetime accepted (at most 24 h), the audience
    # (None: the trust domain) and the clock skew allowed.
    token_max_ttl: int = 3600
    token_audience: str | None = None
    token_leeway: int = 60
    # Persistence (broker/store.py): sessions, queues and retained messages in this directory;
    # None keeps them in memory only (tests, the simulator; `broker run --no-persist`).
    data_dir: Path | None = None
    # Identity-provider access tokens (the oidc method): issuer, audience, JWKS and the claim
    # naming the service. Required when a listener lists oidc.
    oidc: OIDCSettings | None = None

    @property
    def listener_specs(self) -> tuple[ListenerSpec, ...]:
        return self.listeners or (ListenerSpec(self.port, frozenset({"mtls"})),)

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
        ports = [spec.port for spec in self.listeners if spec.port != 0]
        if len(ports) != len(set(ports)):
            msg = f"two listeners on one port: {', '.join(str(s) for s in self.listeners)}"
            raise ConfigError(msg)
        if not 0 < self.token_max_ttl <= 24 * 3600:
            msg = f"token_max_ttl must be between 1 and 86400 seconds (got {self.token_max_ttl})"
            raise ConfigError(msg)
