"""Agent configuration: one frozen dataclass, read from TOML (``/etc/iotauth/agent.toml``).

Every key is optional; unknown keys are refused with the file and the key named, so a typo never
silently falls back to a default. The file mirrors the dataclass in sections::

    broker = "broker.local:8883"       # or --broker; else identity.json's "broker"
    keepalive = 60

    [telemetry]
    interval = 60                      # seconds between samples
    source = "default"                 # an entry point name in the group iotauth.telemetry

    [backoff]
    initial = 1.0                      # first reconnect delay cap (full jitter below it)
    max = 60.0                         # the cap never grows past this
    slow_retry = 600.0                 # refusals that will not fix themselves

    [queue]
    path = "/var/lib/iotauth/queue.sqlite3"   # or ":memory:"; default: <store>/queue.sqlite3
    max_messages = 10000
    max_bytes = 5242880

    [renewal]
    at = 0.6667                        # fraction of the certificate's lifetime
    timeout = 60.0                     # wait this long for the certificate, then retry
    retry = 600.0

    [mqtt]
    version = "auto"                   # "5", "311", or "auto" (5, falling back to 3.1.1)
    session_expiry = 3600              # MQTT 5: seconds the broker keeps the session offline

    [auth]
    method = "mtls"                    # or "jwt": a token signed by the device key as password
    token_ttl = 3600                   # seconds a token lives (jwt)
    token_renew_at = 0.8               # reconnect with a fresh token at this fraction of its life
    token_audience = "mqtt.example"    # the aud claim (default: the trust domain), as the
                                       # broker's --token-audience
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.errors import AgentConfigError

__all__ = [
    "AUTH_METHODS",
    "DEFAULT_PORT",
    "MQTT_VERSIONS",
    "AgentConfig",
    "load_config",
    "parse_address",
]

DEFAULT_PORT = 8883

# TOML section -> {key in the file: dataclass field}
_SECTIONS: dict[str, dict[str, str]] = {
    "": {"broker": "broker", "keepalive": "keepalive", "check_hostname": "check_hostname"},
    "telemetry": {"interval": "telemetry_interval", "source": "telemetry_source"},
    "backoff": {
        "initial": "backoff_initial",
        "max": "backoff_max",
        "slow_retry": "slow_retry",
        "handshake_failures": "handshake_failures_before_slow",
    },
    "queue": {
        "path": "queue_path",
        "max_messages": "queue_max_messages",
        "max_bytes": "queue_max_bytes",
        "inflight": "max_inflight",
    },
    "renewal": {"at": "renew_at", "timeout": "renewal_timeout", "retry": "renewal_retry"},
    "mqtt": {"version": "mqtt_version", "session_expiry": "session_expiry"},
    "auth": {
        "method": "auth",
        "token_ttl": "token_ttl",
        "token_renew_at": "token_renew_at",
        "token_audience": "token_audience",
    },
}

MQTT_VERSIONS = ("5", "311", "auto")
AUTH_METHODS = ("mtls", "jwt")
# provisioning.tokens.MAX_TTL, repeated so that reading a config never imports the token module.
_MAX_TOKEN_TTL = 24 * 3600


def parse_address(value: str) -> tuple[str, int]:
    """``HOST[:PORT]`` or ``[V6]:PORT`` -> (host, port); the port defaults to 8883."""
    text = value.strip()
    if not text:
        msg = "empty broker address; use HOST:PORT"
        raise AgentConfigError(msg)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep or (rest and not rest.startswith(":")):
            msg = f"broker address {value!r}: use [IPV6]:PORT"
            raise AgentConfigError(msg)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        msg = f"broker address {value!r}: the port is not a number"
        raise AgentConfigError(msg) from None
    if not host or not 0 < port < 65536:
        msg = f"broker address {value!r}: use HOST:PORT with a port in 1-65535"
        raise AgentConfigError(msg)
    return host, port


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """What one agent needs. ``store`` is the credential directory (ARCHITECTURE.md, "Files")."""

    store: Path
    broker: str = ""
    keepalive: int = 60
    check_hostname: bool = True
    telemetry_interval: float = 60.0
    telemetry_source: str = "default"
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    slow_retry: float = 600.0
    # Some brokers (amqtt) close a refused connection without a TLS alert or CONNACK; after this
    # many closes in a row before CONNACK the agent treats it as a refusal that will not fix
    # itself. Ours and Mosquitto send the alert, which names the reason at the first attempt.
    handshake_failures_before_slow: int = 3
    queue_path: str | None = None
    queue_max_messages: int = 10_000
    queue_max_bytes: int = 5 * 1024 * 1024
    max_inflight: int = 20
    renew_at: float = 2 / 3
    renewal_timeout: float = 60.0
    renewal_retry: float = 600.0
    connect_timeout: float = 10.0
    # "5" (MQTT 5 only), "311" (MQTT 3.1.1 only) or "auto": MQTT 5, and 3.1.1 with a broker that
    # refuses 5 (remembered for that broker until the process ends).
    mqtt_version: str = "auto"
    # MQTT 5 Session Expiry Interval (seconds): the broker keeps the subscriptions and the
    # commands queued for the device this long after a disconnect. 0: the session ends with the
    # connection (what clean session did in 3.1.1, which the agent still uses on 3.1.1).
    session_expiry: int = 3600
    # "mtls" (present the certificate) or "jwt" (sign a device token with the device key and
    # send it as the MQTT password over server-authenticated TLS).
    auth: str = "mtls"
    token_ttl: int = 3600
    token_renew_at: float = 0.8
    # The aud claim of the device tokens; None: the trust domain (the broker's default).
    token_audience: str | None = None

    def __post_init__(self) -> None:
        positive = (
            "keepalive",
            "telemetry_interval",
            "backoff_initial",
            "backoff_max",
            "slow_retry",
            "handshake_failures_before_slow",
            "queue_max_messages",
            "queue_max_bytes",
            "max_inflight",
            "renewal_timeout",
            "renewal_retry",
            "connect_timeout",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                msg = f"{name} must be positive"
                raise AgentConfigError(msg)
        if self.backoff_max < self.backoff_initial:
            msg = "backoff max must be at least backoff initial"
            raise AgentConfigError(msg)
        if not 0 < self.renew_at < 1:
            msg = "renewal 'at' is a fraction of the lifetime, between 0 and 1"
            raise AgentConfigError(msg)
        if self.broker:
            parse_address(self.broker)
        if self.mqtt_version not in MQTT_VERSIONS:
            msg = f"mqtt version {self.mqtt_version!r}: use one of {', '.join(MQTT_VERSIONS)}"
            raise AgentConfigError(msg)
        if not 0 <= self.session_expiry <= 0xFFFFFFFF:
            msg = "session_expiry is seconds, 0 to 4294967295"
            raise AgentConfigError(msg)
        if self.auth not in AUTH_METHODS:
            msg = f"auth method {self.auth!r}: use one of {', '.join(AUTH_METHODS)}"
            raise AgentConfigError(msg)
        if not 0 < self.token_ttl <= _MAX_TOKEN_TTL:
            msg = f"token_ttl must be between 1 and {_MAX_TOKEN_TTL} seconds"
            raise AgentConfigError(msg)
        if not 0 < self.token_renew_at < 1:
            msg = "token_renew_at is a fraction of the token's lifetime, between 0 and 1"
            raise AgentConfigError(msg)
        if self.token_audience is not None and not self.token_audience.strip():
            msg = "token_audience must not be empty (leave it out for the trust domain)"
            raise AgentConfigError(msg)

    @property
    def address(self) -> tuple[str, int]:
        return parse_address(self.broker)

    @property
    def queue_location(self) -> str:
        return self.queue_path or str(self.store / "queue.sqlite3")

    def replace(self, **changes: Any) -> AgentConfig:  # noqa: ANN401 - dataclass fields
        return dataclasses.replace(self, **changes)


def load_config(path: Path | None, *, store: Path, **overrides: Any) -> AgentConfig:  # noqa: ANN401 - option values
    """Read ``path`` (if given), then apply non-None ``overrides`` (command-line options)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise AgentConfigError(exc.strerror or str(exc), path=str(path)) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise AgentConfigError(f"not valid TOML: {exc}", path=str(path)) from None
        values = _flatten(doc, str(path))
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("mqtt_version"), int):  # `version = 5` in TOML means "5"
        values["mqtt_version"] = str(values["mqtt_version"])
    fields = {f.name: f for f in dataclasses.fields(AgentConfig)}
    for name, value in values.items():
        expected = fields[name].type
        if not _type_ok(value, str(expected)):
            raise AgentConfigError(
                f"{name} has the wrong type ({type(value).__name__})",
                path=str(path) if path else None,
            )
    try:
        return AgentConfig(store=store, **values)
    except AgentConfigError as exc:
        if path is None:
            raise
        raise AgentConfigError(str(exc), path=str(path)) from None


def _flatten(doc: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            section = _SECTIONS.get(key)
            if section is None or key == "":
                raise AgentConfigError(f"unknown section [{key}]", path=where)
            for sub, sub_value in value.items():
                if sub not in section:
                    raise AgentConfigError(f"unknown key {sub!r} in [{key}]", path=where)
                out[section[sub]] = sub_value
        elif key in _SECTIONS[""]:
            out[_SECTIONS[""][key]] = value
        else:
            raise AgentConfigError(f"unknown key {key!r}", path=where)
    return out


def _type_ok(value: object, expected: str) -> bool:
    if "float" in expected:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if "int" in expected:
        return isinstance(value, int) and not isinstance(value, bool)
    if "bool" in expected:
        return isinstance(value, bool)
    if "str" in expected:
        return isinstance(value, str)
    return True
