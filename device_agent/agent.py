"""The device agent: one MQTT-over-mutual-TLS connection that keeps itself alive.

Theory of operation
-------------------
An :class:`Agent` lives on a :class:`~device_agent.reactor.Reactor` (its own, or one shared with
other simulated devices) and is driven only by reactor callbacks, so it needs no locks. Its
connection and its renewal are two state machines, each a table in ``device_agent/states.py``::

    idle --attempt--> connecting --CONNACK 0--> connected --lost--> idle (backoff timer)
                          |  refused / closed before CONNACK          |
                          +-------> idle (backoff, or slow retry) <---+
    connected --stop()--> stopping (publish "offline", DISCONNECT) --> stopped

Every attempt builds a fresh paho client (client_id = device id, will = retained ``offline`` on
``devices/<id>/state``) and a fresh TLS context from the credential directory, so a renewed
certificate is used from the next attempt on and paho never resends messages on its own: the
offline queue (``device_agent.queue``) is the one source of truth for what still needs a PUBACK.
After CONNACK the agent publishes a retained ``online`` state, subscribes to its commands and to
``certs/issued``, and drains the queue with at most ``queue.inflight`` unacknowledged messages.

Protocol version (``mqtt_version``): MQTT 5 by default, with Clean Start 0 and a Session Expiry
Interval (``session_expiry``) so the broker keeps the device's subscriptions and queued commands
while it sleeps; MQTT 3.1.1 with clean session as before. With ``auto`` a broker that refuses 5
(CONNACK 0x84, or the 3.1.1 return code 1, or a close before CONNACK right after a level-5
CONNECT with no TLS alert to explain it) is remembered in :data:`PROTOCOL_MEMORY` for the life
of the process, logged once, and spoken to in 3.1.1 at once; a restarted agent tries 5 again.
On MQTT 5 the renewal request carries a Response Topic (the device's own ``certs/issued``) and
Correlation Data (the request id), and a command that carries a Response Topic inside the
device's subtree is answered there with its Correlation Data (MQTT 5 section 4.10).

Authentication (``auth``): ``mtls`` presents the certificate; ``jwt`` sends a device token signed
by the device key (``device_agent.token``, in a child process) as the MQTT password over
server-authenticated TLS, and reconnects with a fresh token at ``token_renew_at`` of its life.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.client import ConnectFlags, DisconnectFlags
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from device_agent.backoff import (
    Backoff,
    Failure,
    classify_exception,
    classify_log_text,
    classify_refusal,
    describe_reason,
)
from device_agent.commands import Command, CommandRegistry
from device_agent.config import AgentConfig, parse_address
from device_agent.credentials import Credentials, load_credentials
from device_agent.errors import AgentConfigError, AgentError, RenewalError
from device_agent.queue import MessageQueue, open_queue
from device_agent.reactor import Reactor, Timer
from device_agent.renewal import RenewalState, RenewalStore
from device_agent.states import (
    CONNECTION,
    RENEWAL,
    Conn,
    ConnEvent,
    Machine,
    Renewal,
    RenewalEvent,
    renewal_state_for_phase,
)
from device_agent.telemetry import TelemetrySource, load_source
from device_agent.token import DeviceToken, TokenSigningError, make_token
from provisioning.renewal_protocol import (
    CertificateAnswer,
    CsrRequest,
    InstalledReport,
    MalformedMessageError,
    RecordedAnswer,
    RefusedAnswer,
    answer_topic,
    decode_answer,
    encode,
    request_topic,
)

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike

__all__ = ["PROTOCOL_MEMORY", "Agent", "AgentStats", "ProtocolMemory", "default_commands"]

log = logging.getLogger("iotauth.agent")

ONLINE = b'{"state":"online"}'
OFFLINE = b'{"state":"offline"}'

V5 = "5"
V311 = "3.1.1"


class ProtocolMemory:
    """The brokers (host, port) that refused MQTT 5, for the life of the process.

    One instance (:data:`PROTOCOL_MEMORY`) is shared by every agent of the process, so a
    simulated fleet learns it once; a restarted agent starts empty and tries 5 again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._v311_only: set[tuple[str, int]] = set()

    def refused_v5(self, host: str, port: int) -> bool:
        with self._lock:
            return (host, port) in self._v311_only

    def remember(self, host: str, port: int) -> bool:
        """Note that the broker refused MQTT 5; True the first time (log it once)."""
        with self._lock:
            new = (host, port) not in self._v311_only
            self._v311_only.add((host, port))
            return new

    def forget(self) -> None:
        with self._lock:
            self._v311_only.clear()


PROTOCOL_MEMORY = ProtocolMemory()


def _reason_string(props: Properties | None) -> str | None:
    value = getattr(props, "ReasonString", None) if props is not None else None
    return str(value) if value else None


@dataclass
class AgentStats:
    """Counters for logs, tests and the fleet report."""

    attempts: int = 0
    connects: int = 0
    # Seconds from starting the TCP connect to CONNACK, one per successful connect.
    connect_latency: list[float] = field(default_factory=list)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    enqueued: int = 0
    acked: int = 0
    commands: int = 0
    renewals: int = 0
    renewal_refusals: collections.Counter[str] = field(default_factory=collections.Counter)
    last_failure: Failure | None = None
    connected_since: float | None = None
    # The MQTT version of the current (or last) connection: "5" or "3.1.1".
    protocol: str | None = None
    fallbacks: int = 0  # times a broker refused MQTT 5 and the agent went on in 3.1.1
    token_renewals: int = 0  # jwt: reconnects with a fresh token


def default_commands(agent: Agent) -> CommandRegistry:
    """``ping``, ``info`` and ``renew`` (start a renewal now)."""
    registry = CommandRegistry()
    registry.register("ping", lambda cmd: {"pong": True, "args": cmd.args})

    def info(_: Command) -> dict[str, Any]:
        creds = agent.credentials
        return {
            "device_id": agent.device_id,
            "serial": creds.serial,
            "not_after": creds.not_after.isoformat(),
            "queue": len(agent.queue),
            "python": platform.python_version(),
            "pid": os.getpid(),
        }

    def renew(_: Command) -> dict[str, Any]:
        agent.request_renewal()
        return {"renewal": "started"}

    registry.register("info", info)
    registry.register("renew", renew)
    return registry


class Agent:
    """One device's connection, telemetry, commands, offline queue and renewal."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        reactor: Reactor | None = None,
        commands: CommandRegistry | None = None,
        telemetry: TelemetrySource | None = None,
        queue: MessageQueue | None = None,
        telemetry_enabled: bool = True,
        on_event: Callable[[Agent, str, object], None] | None = None,
    ) -> None:
        self.config = config
        self.credentials = load_credentials(config.store)
        self.device_id = self.credentials.device_id
        address = config.broker or self.credentials.broker
        if not address:
            msg = "no broker address: pass --broker HOST:PORT (or set 'broker' in the config)"
            raise AgentConfigError(msg)
        self.host, self.port = parse_address(address)
        self.reactor = reactor or Reactor()
        self.queue = queue or open_queue(
            config.queue_location,
            max_messages=config.queue_max_messages,
            max_bytes=config.queue_max_bytes,
        )
        self.commands = commands or default_commands(self)
        self.telemetry = telemetry or load_source(config.telemetry_source)
        self.telemetry_enabled = telemetry_enabled
        self.renewal = RenewalStore(config.store)
        self.backoff = Backoff(
            initial=config.backoff_initial, maximum=config.backoff_max, slow=config.slow_retry
        )
        self.stats = AgentStats()
        self.on_event = on_event
        self.base = f"devices/{self.device_id}/"
        # The two state machines (device_agent/states.py): connection and renewal.
        self._conn: Machine[Conn, ConnEvent] = Machine("connection", CONNECTION, Conn.IDLE)
        stored = self.renewal.load()
        self._renew: Machine[Renewal, RenewalEvent] = Machine(
            "renewal", RENEWAL, renewal_state_for_phase(stored.phase if stored else None)
        )
        self._client: mqtt.Client | None = None
        self._sock: SocketLike | None = None
        self._attempt_started = 0.0
        self._candidate_failures = 0
        self._error_text: str | None = None
        self._closes_before_connack = 0
        self._inflight: dict[int, int] = {}
        self._sent_upto = 0
        self._timers: dict[str, Timer] = {}
        self._running = False
        self._stopped_callbacks: list[Callable[[], None]] = []
        self._renewal_sent_at = 0.0
        self._attempt_protocol = V5
        self._token: DeviceToken | None = None  # signed, not yet used
        self._session_token: DeviceToken | None = None  # the one the connection was made with
        self._token_cert: Path | None = None  # the certificate file _token was signed for
        self._token_making = False
        self._token_switch = False

    # -- public, thread-safe ------------------------------------------------------------------

    def start(self) -> None:
        self.reactor.call_soon_threadsafe(self._start)

    def stop(self, on_stopped: Callable[[], None] | None = None) -> None:
        """Publish ``offline``, disconnect cleanly, then call ``on_stopped`` (on the loop)."""

        def go() -> None:
            if on_stopped is not None:
                self._stopped_callbacks.append(on_stopped)
            self._stop()

        self.reactor.call_soon_threadsafe(go)

    def enqueue(self, data: Mapping[str, Any], *, subtopic: str = "telemetry") -> None:
        """Queue one QoS 1 message on ``devices/<id>/<subtopic>`` (from any thread)."""
        self.reactor.call_soon_threadsafe(lambda: self._enqueue(dict(data), subtopic))

    def drop_connection(self) -> None:
        """Lose the connection as a network cut would (no DISCONNECT; the broker sends the will)."""

        def go() -> None:
            if self._client is not None and self._conn.state is Conn.CONNECTED:
                self._teardown()
                self._emit("disconnected", "dropped")
                self._failed(Failure("connection-lost", "dropped (simulated network cut)", False))

        self.reactor.call_soon_threadsafe(go)

    def request_renewal(self) -> None:
        self.reactor.call_soon_threadsafe(lambda: self._check_renewal(force=True))

    def run(self) -> None:
        """Run on the calling thread until stopped (the CLI's main loop)."""
        self._start()
        self.reactor.run()

    @property
    def state(self) -> str:
        """The connection's state: idle, connecting, connected, stopping or stopped."""
        return self._conn.state.value

    @property
    def renewal_state(self) -> str:
        return self._renew.state.value

    @property
    def connected(self) -> bool:
        return self._conn.state is Conn.CONNECTED

    # -- lifecycle ------------------------------------------------------------------------------

    def _emit(self, event: str, detail: object = None) -> None:
        if self.on_event is not None:
            self.on_event(self, event, detail)

    def _timer(self, name: str, delay: float, callback: Callable[[], object]) -> None:
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        self._timers[name] = self.reactor.call_later(delay, callback)

    def _cancel(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _start(self) -> None:
        if self._running:
            return
        self._running = True
        if self.telemetry_enabled:
            self._timer("telemetry", self.config.telemetry_interval, self._telemetry_tick)
        self._timer("connect", 0, self._attempt)

    def _stop(self) -> None:
        self._running = False
        for name in list(self._timers):
            self._cancel(name)
        client = self._client
        if client is None or self._conn.state is not Conn.CONNECTED:
            self._teardown()
            self._finish_stop()
            return
        self._conn.fire(ConnEvent.STOP)
        info = client.publish(self.base + "state", OFFLINE, qos=1, retain=True)
        deadline = time.monotonic() + 3

        def wait_offline() -> None:
            if self._client is client and not info.is_published() and time.monotonic() < deadline:
                self.reactor.call_later(0.02, wait_offline)
                return
            if self._client is client:
                client.disconnect()
            self.reactor.call_later(0.5, self._finish_stop)

        wait_offline()

    def _finish_stop(self) -> None:
        if self._conn.state is not Conn.STOPPED:
            self._teardown()
            self._conn.fire(ConnEvent.STOPPED)
            self._emit("stopped")
        # A stop() of a stopped agent still calls its callback (once).
        callbacks, self._stopped_callbacks = self._stopped_callbacks, []
        for cb in callbacks:
            cb()

    # -- connecting -----------------------------------------------------------------------------

    def _choose_credentials(self) -> tuple[Credentials, bool]:
        if self._renew.state in (Renewal.CANDIDATE_NEXT, Renewal.SWITCHING):
            state = self.renewal.load()
            if state is not None and state.phase == "received":
                try:
                    return self.renewal.candidate(self.credentials), True
                except RenewalError as exc:
                    log.warning("%s: %s", self.device_id, exc)
                    self.renewal.clear()
            self._renew.fire(RenewalEvent.CANDIDATE_UNUSABLE)
        return self.credentials, False

    def _attempt(self) -> None:
        if not self._running or self._client is not None:
            return
        creds, candidate = self._choose_credentials()
        self.stats.attempts += 1
        if creds.expired():
            when = creds.not_after.strftime("%Y-%m-%d %H:%M UTC")
            self._failed(
                Failure(
                    "expired",
                    f"the certificate expired at {when}; renewal needs a valid certificate, "
                    "so the device must be provisioned again",
                    True,
                )
            )
            return
        jwt = self.config.auth == "jwt"
        if jwt and not self._token_fresh(creds):
            self.stats.attempts -= 1  # not an attempt yet: the token comes first
            self._make_token(creds)
            return
        try:
            context = creds.context(
                check_hostname=self.config.check_hostname, present_certificate=not jwt
            )
        except AgentError as exc:
            self._failed(Failure("credentials", str(exc), True))
            return
        self._attempt_protocol = self._protocol_for_attempt()
        client = self._make_client(context)
        if jwt and self._token is not None:
            # MQTT-3.1.2-22 (3.1.1): a password needs a user name; ours is the device id. A
            # token is good for one CONNECT (the broker keeps a replay cache of its jti), so
            # it moves to _session_token and the next attempt signs a fresh one.
            client.username_pw_set(self.device_id, self._token.value)
            self._session_token, self._token = self._token, None
        self._client = client
        if candidate:
            self._renew.fire(RenewalEvent.ATTEMPT_CANDIDATE)
        self._error_text = None
        self._conn.fire(ConnEvent.ATTEMPT)
        self._attempt_started = time.monotonic()
        try:
            if self._attempt_protocol == V5:
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                # MQTT 5 section 3.1.2.11.2: the session outlives the connection this long.
                props.SessionExpiryInterval = self.config.session_expiry
                client.connect(
                    self.host,
                    self.port,
                    keepalive=self.config.keepalive,
                    clean_start=False,
                    properties=props,
                )
            else:
                client.connect(self.host, self.port, keepalive=self.config.keepalive)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self._teardown()
            self._failed(classify_exception(exc, f"{self.host}:{self.port}"))
            return
        self._timer("connack", self.config.connect_timeout, self._connack_timeout)
        self._timer("misc", 1.0, self._misc)

    def _protocol_for_attempt(self) -> str:
        wanted = self.config.mqtt_version
        if wanted == "311":
            return V311
        if wanted == "auto" and PROTOCOL_MEMORY.refused_v5(self.host, self.port):
            return V311
        return V5

    def _make_client(self, context: ssl.SSLContext) -> mqtt.Client:
        if self._attempt_protocol == V5:
            # Clean Start and Session Expiry go with CONNECT (see _attempt), not the client.
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self.device_id,
                protocol=mqtt.MQTTv5,
                reconnect_on_failure=False,
            )
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self.device_id,
                clean_session=True,
                protocol=mqtt.MQTTv311,
                reconnect_on_failure=False,
            )
        client.tls_set_context(context)
        client.connect_timeout = self.config.connect_timeout
        client.max_inflight_messages_set(self.config.max_inflight)
        client.max_queued_messages_set(0)
        client.will_set(self.base + "state", OFFLINE, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_log = self._on_log
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return client

    def _fall_back(self, why: str) -> bool:
        """``auto``: the broker refused MQTT 5; go on in 3.1.1 at once. False if not ``auto``."""
        if self.config.mqtt_version != "auto":
            return False
        self.stats.fallbacks += 1
        if PROTOCOL_MEMORY.remember(self.host, self.port):
            log.warning(
                "%s: %s:%d refused MQTT 5 (%s); using MQTT 3.1.1 with this broker until the "
                "agent restarts",
                self.device_id,
                self.host,
                self.port,
                why,
            )
        self._conn.fire(ConnEvent.DOWN)
        self._timer("connect", 0, self._attempt)
        return True

    # -- device tokens (auth = "jwt") ----------------------------------------------------------

    def _token_fresh(self, creds: Credentials) -> bool:
        """An unused token, signed for ``creds``'s certificate, not yet due for renewal."""
        token = self._token
        return (
            token is not None
            and self._token_cert == creds.cert_file
            and time.time() < token.renew_at(self.config.token_renew_at)
        )

    def _make_token(self, creds: Credentials) -> None:
        """Sign a fresh token off the loop (a child process, see device_agent.token), then
        attempt the connection with it. A renewal candidate's token is signed with the
        candidate's key and names its certificate, so the broker sees the new serial (and the
        renewal is confirmed by that connection) before anything is installed."""
        if self._token_making:
            return
        self._token_making = True
        store, device_id = self.config.store, self.device_id
        ttl, audience = self.config.token_ttl, self.config.token_audience
        tcti = getattr(creds.keystore, "tcti", None)
        pair = (creds.cert_file, creds.key_file)

        def work() -> None:
            try:
                token: DeviceToken | None = make_token(
                    store, device_id, ttl=ttl, tcti=tcti, pair=pair, audience=audience
                )
                error: Exception | None = None
            except TokenSigningError as exc:
                token, error = None, exc
            except Exception as exc:  # noqa: BLE001 - the loop must hear back, whatever failed
                token, error = None, TokenSigningError(f"{type(exc).__name__}: {exc}")
            self.reactor.call_soon_threadsafe(lambda: self._token_made(token, pair[0], error))

        threading.Thread(target=work, name=f"{device_id}-token", daemon=True).start()

    def _token_made(
        self, token: DeviceToken | None, cert_file: Path, error: Exception | None
    ) -> None:
        self._token_making = False
        if token is None:
            self.stats.attempts += 1
            self._failed(Failure("token", str(error), True))
            return
        # Set together: until the new token lands, _token_fresh still judges the old one.
        self._token, self._token_cert = token, cert_file
        if self._client is None:
            self._timer("connect", 0, self._attempt)
        elif self._conn.state is Conn.CONNECTED:
            # Make before break: the fresh token is ready; reconnect with it now.
            log.info("%s: reconnecting with a fresh device token", self.device_id)
            self.stats.token_renewals += 1
            self._token_switch = True
            self._client.disconnect()

    def _renew_token(self) -> None:
        if self._running and self._conn.state is Conn.CONNECTED:
            self._make_token(self.credentials)

    # paho's external-loop hooks: the socket joins and leaves this agent's reactor.

    def _on_socket_open(self, client: mqtt.Client, _: object, sock: SocketLike) -> None:
        self._sock = sock
        self.reactor.add_socket(sock, lambda r, w: self._io(client, r, w))

    def _on_socket_close(self, client: mqtt.Client, _: object, sock: SocketLike) -> None:
        self.reactor.remove_socket(sock)
        if self._sock is sock:
            self._sock = None

    def _on_register_write(self, client: mqtt.Client, _: object, sock: SocketLike) -> None:
        self.reactor.want_write(sock, True)

    def _on_unregister_write(self, client: mqtt.Client, _: object, sock: SocketLike) -> None:
        self.reactor.want_write(sock, False)

    def _on_log(self, client: mqtt.Client, _: object, level: int, text: str) -> None:
        # paho reports read errors (and with them the broker's TLS alert) only through its log.
        if level in (mqtt.MQTT_LOG_ERR, mqtt.MQTT_LOG_WARNING) and client is self._client:
            self._error_text = text

    def _io(self, client: mqtt.Client, readable: bool, writable: bool) -> None:
        if client is not self._client:
            return
        if readable:
            client.loop_read()
        if writable and client is self._client:
            client.loop_write()

    def _misc(self) -> None:
        client = self._client
        if client is None:
            return
        client.loop_misc()
        if self._client is client:
            self._timer("misc", 1.0, self._misc)

    def _connack_timeout(self) -> None:
        if self._conn.state is Conn.CONNECTING:
            self._teardown()
            self._failed(Failure("connack-timeout", "no CONNACK in time", False))

    def _teardown(self) -> None:
        """Forget the current client and close its socket (no DISCONNECT, no callbacks)."""
        client, self._client = self._client, None
        for name in ("connack", "misc", "renewal-wait", "token"):
            self._cancel(name)
        if self._sock is not None:
            self.reactor.remove_socket(self._sock)
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        if client is not None:
            client.on_disconnect = None
            client.on_socket_close = None
        self._inflight.clear()
        if self._conn.state in (Conn.CONNECTING, Conn.CONNECTED):
            self._conn.fire(ConnEvent.DOWN)

    def _failed(self, failure: Failure) -> None:
        """An attempt failed (or a connection ended): decide what to try next, and when."""
        self.stats.failures[failure.reason] += 1
        self.stats.last_failure = failure
        self._conn.fire(ConnEvent.DOWN)
        self._emit("failure", failure)
        if not self._running:
            self._finish_stop()
            return
        if self._renew.state is Renewal.TRYING:
            self._candidate_failures += 1
            log.warning(
                "%s: the renewed certificate was refused (%s); back to the current one",
                self.device_id,
                failure,
            )
            if failure.permanent or self._candidate_failures >= 3:
                self.renewal.clear()
                self._renew.fire(RenewalEvent.GIVE_UP)
                self._candidate_failures = 0
                self._timer("renewal", self.config.renewal_retry, self._check_renewal)
            else:
                self._renew.fire(RenewalEvent.CANDIDATE_REFUSED)
            self._timer("connect", self.backoff.next_delay(), self._attempt)
            return
        if failure.permanent:
            waiting = self._renew.state in (Renewal.RECEIVED, Renewal.CANDIDATE_NEXT)
            state = self.renewal.load()
            if (
                waiting
                and state is not None
                and state.phase == "received"
                and (self._candidate_failures < 3)
            ):
                log.warning(
                    "%s: %s; trying the renewed certificate waiting in %s",
                    self.device_id,
                    failure,
                    self.renewal.path,
                )
                self._renew.fire(RenewalEvent.USE_CANDIDATE)
                self._timer("connect", self.backoff.next_delay(), self._attempt)
                return
            delay = self.backoff.next_delay(failure)
            log.error(
                "%s: refused, %s. This will not fix itself; retrying slowly, next in %.0f s",
                self.device_id,
                failure,
                delay,
            )
        else:
            delay = self.backoff.next_delay()
            log.info("%s: %s; reconnecting in %.1f s", self.device_id, failure, delay)
        self._timer("connect", delay, self._attempt)

    # -- paho callbacks (all on the reactor thread) ---------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        _: object,
        flags: ConnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        if client is not self._client:
            return
        self._cancel("connack")
        v5 = self._attempt_protocol == V5
        if reason.is_failure:
            self._teardown()
            # paho reads a 3.1.1 return code 1 after a level-5 CONNECT as 0x84 too.
            if (
                v5
                and int(reason.value) == 0x84
                and self._fall_back(describe_reason(0x84, reason.getName(), _reason_string(props)))
            ):
                return
            self._failed(
                classify_refusal(
                    int(reason.value),
                    reason.getName(),
                    v5=v5,
                    reason_string=_reason_string(props) if v5 else None,
                )
            )
            return
        self._conn.fire(ConnEvent.CONNACK)
        self.stats.protocol = self._attempt_protocol
        self.stats.connects += 1
        self.stats.connect_latency.append(time.monotonic() - self._attempt_started)
        self.stats.connected_since = time.monotonic()
        self.backoff.reset()
        self._closes_before_connack = 0
        client.publish(self.base + "state", ONLINE, qos=1, retain=True)
        client.subscribe([(self.base + "commands/#", 1), (answer_topic(self.device_id), 1)])
        self._sent_upto = 0
        self._inflight.clear()
        log.info(
            "%s: connected to %s:%d (MQTT %s%s)",
            self.device_id,
            self.host,
            self.port,
            self._attempt_protocol,
            ", session present" if v5 and flags.session_present else "",
        )
        if self.config.auth == "jwt" and self._session_token is not None:
            wait = self._session_token.renew_at(self.config.token_renew_at) - time.time()
            self._timer("token", max(wait, 1.0), self._renew_token)
        self._emit("connected")
        if self._renew.state is Renewal.TRYING:
            self._candidate_connected()
        else:
            self._check_renewal(fresh=True)
        self._pump()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        _: object,
        flags: DisconnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        if client is not self._client:
            return
        was = self._conn.state
        self._teardown()
        if was is Conn.STOPPING or not self._running:
            self._finish_stop()
            return
        if was is Conn.CONNECTING:
            failure = classify_log_text(self._error_text or "")
            if (
                failure is None
                and self._attempt_protocol == V5
                and self._fall_back("closed the connection before CONNACK")
            ):
                return
            if failure is None:
                self._closes_before_connack += 1
                permanent = (
                    self._closes_before_connack >= self.config.handshake_failures_before_slow
                )
                failure = Failure(
                    "closed-in-handshake",
                    f"the broker closed the connection before CONNACK "
                    f"({self._closes_before_connack} time(s) in a row)"
                    + (
                        "; the certificate is most likely revoked, expired or from a CA the "
                        "broker does not trust"
                        if permanent
                        else ""
                    ),
                    permanent,
                )
            self._failed(failure)
            return
        if self._renew.state is Renewal.SWITCHING:
            self._renew.fire(RenewalEvent.SWITCHED)
            self._emit("disconnected", "switching")
            self._timer("connect", 0, self._attempt)
            return
        if self._token_switch:
            self._token_switch = False
            self._emit("disconnected", "token")
            self._timer("connect", 0, self._attempt)
            return
        self._emit("disconnected", None)
        detail = self._error_text or "the connection closed"
        if self._attempt_protocol == V5 and reason.is_failure:
            # A server-sent DISCONNECT names why (MQTT 5 section 3.14.2.1): takeover 0x8e,
            # keep-alive timeout 0x8d, an administrative action (a revocation kick) 0x98 ...
            detail = "the broker disconnected: " + describe_reason(
                int(reason.value), reason.getName(), _reason_string(props)
            )
            log.warning("%s: %s", self.device_id, detail)
        self._failed(Failure("connection-lost", detail, False))

    def _on_publish(
        self, client: mqtt.Client, _: object, mid: int, reason: ReasonCode, props: Properties
    ) -> None:
        if client is not self._client:
            return
        seq = self._inflight.pop(mid, None)
        if seq is not None:
            self.queue.ack(seq)
            self.stats.acked += 1
            self._pump()

    def _on_message(self, client: mqtt.Client, _: object, msg: mqtt.MQTTMessage) -> None:
        if client is not self._client:
            return
        topic = msg.topic
        props = getattr(msg, "properties", None)
        correlation = getattr(props, "CorrelationData", None)
        if topic == answer_topic(self.device_id):
            self._renewal_answer(bytes(msg.payload), correlation)
            return
        prefix = self.base + "commands/"
        if topic.startswith(prefix):
            name = topic[len(prefix) :]
            self.stats.commands += 1
            if "/" in name or not name:
                reply_topic = self.base + "replies/invalid"
                payload = json.dumps(
                    {"command": name, "ok": False, "error": "a command name is one topic level"}
                ).encode()
            else:
                reply = self.commands.dispatch(name, bytes(msg.payload))
                reply_topic, payload = self.base + "replies/" + name, reply.to_json()
            reply_props = None
            response_topic = getattr(props, "ResponseTopic", None)
            if self._attempt_protocol == V5 and response_topic:
                if self._own_topic(response_topic):
                    # MQTT 5 section 4.10.1: reply on the Response Topic with the Correlation Data.
                    reply_topic = response_topic
                else:
                    log.warning(
                        "%s: command %s asked for a reply on %r, outside the device's topics; "
                        "replying on %s",
                        self.device_id,
                        name,
                        response_topic,
                        reply_topic,
                    )
            if self._attempt_protocol == V5 and correlation is not None:
                # Echoed with or without a Response Topic: it costs nothing and lets a caller
                # that listens on replies/<name> match the reply to its command.
                reply_props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                reply_props.CorrelationData = bytes(correlation)
            client.publish(reply_topic, payload, qos=1, properties=reply_props)

    def _own_topic(self, topic: str) -> bool:
        """A topic name the device may publish to: inside ``devices/<id>/``, no wildcards."""
        return (
            topic.startswith(self.base)
            and len(topic) > len(self.base)
            and not any(c in topic for c in "+#\0")
        )

    # -- telemetry and the queue ----------------------------------------------------------------

    def _telemetry_tick(self) -> None:
        if not self._running:
            return
        self._timer("telemetry", self.config.telemetry_interval, self._telemetry_tick)
        try:
            reading = dict(self.telemetry())
        except Exception as exc:  # noqa: BLE001 - a broken sensor must not stop the agent
            log.warning(
                "%s: telemetry source failed: %s: %s", self.device_id, type(exc).__name__, exc
            )
            return
        self._enqueue(reading, "telemetry")

    def _enqueue(self, data: dict[str, Any], subtopic: str) -> None:
        def build(msg_id: str) -> bytes:
            doc = {"id": msg_id, "ts": round(time.time(), 3), "data": data}
            return json.dumps(doc, separators=(",", ":"), default=str).encode()

        try:
            self.queue.put(self.base + subtopic, build, qos=1)
        except AgentError as exc:
            log.error("%s: %s", self.device_id, exc)
            return
        self.stats.enqueued += 1
        self._pump()

    def _pump(self) -> None:
        client = self._client
        if client is None or self._conn.state is not Conn.CONNECTED:
            return
        room = self.config.max_inflight - len(self._inflight)
        if room <= 0:
            return
        for item in self.queue.pending(self._sent_upto, room):
            info = client.publish(item.topic, item.payload, qos=item.qos)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            self._inflight[info.mid] = item.seq
            self._sent_upto = item.seq

    # -- renewal (device_agent/states.py: RENEWAL) ------------------------------------------------

    def _check_renewal(self, *, force: bool = False, fresh: bool = False) -> None:
        """Start, resend or finish a renewal as its state requires (on the loop)."""
        if not self._running:
            return
        due = self.credentials.renew_due(self.config.renew_at)
        now = dt.datetime.now(dt.UTC)
        if not force:
            wait = (due - now).total_seconds()
            self._timer("renewal", min(max(wait, 1.0), 3600.0), self._check_renewal)
        client = self._client
        if client is None or self._conn.state is not Conn.CONNECTED:
            return
        if self._renew.state in (Renewal.MAKING_KEY, Renewal.SWITCHING):
            return  # the key is on its way; or a reconnect that checks again is
        state = self.renewal.load()
        if state is None:
            if self._renew.state is not Renewal.IDLE:
                self._renew.fire(RenewalEvent.FORGOTTEN)  # damaged or removed on disk
            if not force and now < due:
                return
            self._begin_renewal()
        elif self._renew.state is Renewal.REQUESTED:
            waited = time.monotonic() - self._renewal_sent_at
            # On a fresh connection the last CSR may have been lost with the old one: resend.
            if waited < self.config.renewal_timeout and not (force or fresh):
                return
            self._send_renewal(CsrRequest(state.request_id, self.renewal.csr().decode()))
        elif self._renew.state in (Renewal.RECEIVED, Renewal.CANDIDATE_NEXT):
            self._switch_to_candidate()
        elif self._renew.state is Renewal.INSTALLED:
            self._send_renewal(InstalledReport(state.request_id, state.serial or ""))

    def _begin_renewal(self) -> None:
        """Make the key and CSR on a worker thread: a device's key generation (a child process
        on a real agent, see device_agent.keygen) takes long enough that keep-alive, telemetry
        and commands must not wait for it. The result comes back on the loop."""
        self._renew.fire(RenewalEvent.BEGIN)
        creds = self.credentials

        def work() -> None:
            try:
                state, csr = self.renewal.begin(creds)
            except (OSError, RenewalError) as exc:
                failure = exc
                self.reactor.call_soon_threadsafe(lambda: self._renewal_begun(None, failure))
                return
            self.reactor.call_soon_threadsafe(lambda: self._renewal_begun((state, csr), None))

        threading.Thread(target=work, name=f"{self.device_id}-renewal-key", daemon=True).start()

    def _renewal_begun(
        self, made: tuple[RenewalState, bytes] | None, error: Exception | None
    ) -> None:
        if made is None:
            self._renew.fire(RenewalEvent.KEY_FAILED)
            # e.g. the key generator failed: say why once a minute, not once a second.
            log.error("%s: cannot start renewal: %s", self.device_id, error)
            if self._running:
                self._timer("renewal", 60.0, self._check_renewal)
            return
        self._renew.fire(RenewalEvent.KEY_MADE)
        state, csr = made
        log.info("%s: renewing the certificate (request %s)", self.device_id, state.request_id)
        # Not connected any more: the CSR goes out on the next connection (state "requested").
        self._send_renewal(CsrRequest(state.request_id, csr.decode()))

    def _send_renewal(self, message: CsrRequest | InstalledReport) -> None:
        if self._client is None:
            return
        self._renewal_sent_at = time.monotonic()
        props = None
        if self._attempt_protocol == V5:
            # MQTT 5 section 4.10: request/response. The answer comes back on our own answer
            # topic (inside the device's subtree, which it may subscribe to) with the request id.
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = answer_topic(self.device_id)
            props.CorrelationData = message.request_id.encode()
        self._client.publish(
            request_topic(self.device_id), encode(message), qos=1, properties=props
        )
        self._timer("renewal-wait", self.config.renewal_timeout, self._check_renewal)

    def _renewal_answer(self, payload: bytes, correlation: bytes | None = None) -> None:
        try:
            answer = decode_answer(payload)
        except MalformedMessageError as exc:
            if exc.request_id is None:
                log.warning("%s: unreadable message on certs/issued", self.device_id)
            return  # else a type this agent does not know: not for it
        state = self.renewal.load()
        if state is None or state.request_id != answer.request_id:
            return  # an answer to an older request
        if correlation is not None and bytes(correlation) != state.request_id.encode():
            return  # the payload and its Correlation Data disagree: not our answer
        if isinstance(answer, CertificateAnswer) and self._renew.state is Renewal.REQUESTED:
            self._cancel("renewal-wait")
            try:
                self.renewal.accept(answer.certificate.encode(), self.credentials)
            except (RenewalError, OSError) as exc:
                log.error("%s: %s", self.device_id, exc)
                self.stats.renewal_refusals["bad-answer"] += 1
                self.renewal.clear()
                self._renew.fire(RenewalEvent.BAD_ANSWER)
                self._timer("renewal", self.config.renewal_retry, self._check_renewal)
                return
            self._renew.fire(RenewalEvent.CERTIFICATE)
            self._switch_to_candidate()
        elif isinstance(answer, RefusedAnswer):
            self._cancel("renewal-wait")
            self.stats.renewal_refusals[answer.reason] += 1
            log.error(
                "%s: the renewal service refused request %s: %s (%s)",
                self.device_id,
                answer.request_id,
                answer.reason,
                answer.detail,
            )
            self.renewal.clear()
            if self._renew.can(RenewalEvent.REFUSED):
                self._renew.fire(RenewalEvent.REFUSED)
            self._timer("renewal", self.config.renewal_retry, self._check_renewal)
        elif isinstance(answer, RecordedAnswer) and self._renew.state is Renewal.INSTALLED:
            self._cancel("renewal-wait")
            self.renewal.clear()
            self._renew.fire(RenewalEvent.RECORDED)
            self.stats.renewals += 1
            log.info("%s: renewal complete, serial %s", self.device_id, state.serial)
            self._emit("renewed", state.serial)

    def _switch_to_candidate(self) -> None:
        """Make before break: reconnect with the candidate; the old files stay until it works."""
        client = self._client
        if client is None or self._conn.state is not Conn.CONNECTED:
            return
        log.info("%s: switching to the renewed certificate", self.device_id)
        self._renew.fire(RenewalEvent.SWITCH)
        client.disconnect()

    def _candidate_connected(self) -> None:
        try:
            self.renewal.install(self.credentials)
            self.credentials = load_credentials(self.config.store)
        except (RenewalError, AgentError) as exc:
            log.error("%s: %s", self.device_id, exc)
            self._renew.fire(RenewalEvent.INSTALL_FAILED)
            return
        self._renew.fire(RenewalEvent.CANDIDATE_CONNECTED)
        self._candidate_failures = 0
        log.info("%s: now using certificate %s", self.device_id, self.credentials.serial)
        self._check_renewal(fresh=True)
