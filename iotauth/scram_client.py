"""A small MQTT 5 client for services that use SCRAM-SHA-256 (the broker's ``scram`` method).

paho-mqtt 2 cannot answer an AUTH packet, so SCRAM over MQTT 5 enhanced authentication (4.12)
needs a client of its own. This one is deliberately small: one blocking TLS socket, the project's
own codec (``broker.mqtt``) for every packet, scramp's ``ScramClient`` for every SCRAM message, and
no thread. It connects, subscribes, receives, and publishes at QoS 0 and 1::

    from iotauth.scram_client import ScramMQTTClient
    from provisioning.tls import client_context

    with ScramMQTTClient("broker.example", 8884, context=client_context(trust=Path("root.crt")),
                         user="dash", secret=os.environ["DASH_SECRET"]) as client:
        client.subscribe([("devices/+/telemetry/#", 1)])
        client.publish("devices/dev-1/commands/reboot", b"now", qos=1)
        message = client.receive(timeout=10.0)  # a broker.mqtt.Publish, or None

The exchange (docs/BROKER.md, "SCRAM"): CONNECT carries the client-first, the broker's AUTH 0x18
the server-first, our AUTH 0x18 the client-final, and the CONNACK the server-final. The broker
must prove it holds the secret's verifier: a CONNACK without a server-final, or with a server
signature that does not match, makes :meth:`ScramMQTTClient.connect` abort: the socket is closed
and nothing more is sent (no DISCONNECT, no SUBSCRIBE, no PUBLISH), and :class:`ClientError` says
why. The broker is always verified against the ``context``'s root (server-authenticated TLS).

Not here: QoS 2, Topic Aliases, re-authentication, reconnects. Incoming QoS 1 messages are
acknowledged as they are read, so a subscriber that stops reading stops acknowledging.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, NoReturn

from broker import mqtt

if TYPE_CHECKING:
    from scramp import ScramClient

__all__ = ["MECHANISM", "ClientError", "ScramMQTTClient"]

MECHANISM = "SCRAM-SHA-256"
_MAX_PACKET = 1024 * 1024
_PINGREQ = b"\xc0\x00"


class ClientError(Exception):
    """One line for the user: what went wrong and, where there is one, the fix."""


def describe_code(code: int) -> str:
    """``0x87 not authorized``."""
    try:
        name = mqtt.Reason(code).name.lower().replace("_", " ")
    except ValueError:
        name = "unknown reason"
    return f"0x{code:02x} {name}"


class ScramMQTTClient:
    """One MQTT 5 connection authenticated by SCRAM-SHA-256; see the module docstring."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        context: ssl.SSLContext,
        user: str,
        secret: str,
        client_id: str | None = None,
        keepalive: int = 30,
        timeout: float = 15.0,
    ) -> None:
        self.host, self.port = host, port
        self.client_id = client_id or user
        self._context = context
        self._user = user
        self._secret = secret
        self.keepalive = keepalive
        self.timeout = timeout
        self._sock: ssl.SSLSocket | None = None
        self._reader = mqtt.ClientPacketReader(_MAX_PACKET, 5)
        self._ready: collections.deque[mqtt.Packet] = collections.deque()  # decoded, unread
        self._packets: collections.deque[mqtt.Packet] = collections.deque()  # read, unclaimed
        self._pinging = False
        self._messages: collections.deque[mqtt.Publish] = collections.deque()
        self._next_id = 0
        self._last_sent = 0.0

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    # -- connect -----------------------------------------------------------------------------

    def connect(self) -> None:
        """TLS, then the SCRAM exchange; returns once the broker has proved itself too."""
        from scramp import ScramClient, ScramException

        try:
            scram = ScramClient([MECHANISM], self._user, self._secret)
            client_first = scram.get_client_first()
        except ScramException as exc:
            msg = f"cannot use this user name or secret for SCRAM: {exc}"
            raise ClientError(msg) from None
        self._open()
        props = mqtt.Properties(
            authentication_method=MECHANISM, authentication_data=client_first.encode()
        )
        connect = mqtt.Connect(5, self.client_id, True, self.keepalive, properties=props)
        self._send(mqtt.encode_connect(connect))
        deadline = time.monotonic() + self.timeout
        server_first = False
        while True:
            packet = self._next(deadline, "CONNACK")
            if isinstance(packet, mqtt.Auth) and not server_first:
                # MQTT-4.12.0-2 / -5: the server's next step is AUTH 0x18 with our method.
                data = self._auth_data(packet.properties, "AUTH")
                if packet.reason_code != mqtt.Reason.CONTINUE_AUTHENTICATION:
                    self._abort(f"AUTH with {describe_code(packet.reason_code)} before CONNACK")
                try:
                    scram.set_server_first(data)
                    client_final = scram.get_client_final()
                except ScramException as exc:
                    self._abort(f"its SCRAM server-first is not acceptable ({exc})")
                server_first = True
                answer = mqtt.Properties(
                    authentication_method=MECHANISM, authentication_data=client_final.encode()
                )
                # MQTT-4.12.0-3: the client answers with AUTH 0x18.
                self._send(
                    mqtt.auth5(mqtt.Reason.CONTINUE_AUTHENTICATION, answer, from_client=True)
                )
            elif isinstance(packet, mqtt.Connack):
                self._connack(packet, scram, server_first=server_first)
                return
            elif isinstance(packet, mqtt.Disconnect):
                self._abort(f"it sent DISCONNECT {describe_code(packet.reason_code)}")
            else:
                # MQTT-3.1.2-30 is the client's rule; before CONNACK only AUTH or CONNACK come.
                self._abort(f"it sent {type(packet).__name__} before CONNACK")

    def _connack(self, packet: mqtt.Connack, scram: ScramClient, *, server_first: bool) -> None:
        from scramp import ScramException

        if packet.reason_code != 0:
            why = packet.properties.reason_string
            self._close_socket()
            msg = f"refused by the broker: {describe_code(packet.reason_code)}"
            raise ClientError(msg + (f" ({why})" if why else ""))
        if not server_first:
            self._abort("it accepted without a SCRAM server-first (it never proved itself)")
        data = self._auth_data(packet.properties, "CONNACK")
        try:
            scram.set_server_final(data)
        except ScramException:
            self._abort(
                "its SCRAM server signature does not match: it does not hold this secret's "
                "verifier (a broker that is not ours?)"
            )

    def _auth_data(self, props: mqtt.Properties, where: str) -> str:
        # MQTT-4.12.0-5: every AUTH and the successful CONNACK carry the CONNECT's method.
        if props.authentication_method != MECHANISM:
            self._abort(f"its {where} names method {props.authentication_method!r}")
        if not props.authentication_data:
            self._abort(f"its {where} has no SCRAM message (Authentication Data)")
        try:
            return bytes(props.authentication_data).decode("utf-8")
        except UnicodeDecodeError:
            self._abort(f"its {where}'s SCRAM message is not UTF-8")

    def _abort(self, why: str) -> NoReturn:
        """End at once, sending nothing more: the broker is not trusted."""
        self._close_socket()
        msg = f"aborted the connection to {self.where}: {why}"
        raise ClientError(msg)

    # -- a live connection -------------------------------------------------------------------

    def subscribe(self, filters: list[tuple[str, int]]) -> list[int]:
        """SUBSCRIBE and wait for the SUBACK: one reason code per filter (>= 0x80 refused)."""
        for _, qos in filters:
            if qos not in (0, 1):
                msg = "this client subscribes at QoS 0 or 1"
                raise ClientError(msg)
        pid = self._packet_id()
        packet = mqtt.Subscribe(pid, list(filters))
        self._send(mqtt.encode_subscribe(packet, 5))
        suback = self._wait(lambda p: isinstance(p, mqtt.Suback) and p.packet_id == pid, "SUBACK")
        assert isinstance(suback, mqtt.Suback)  # noqa: S101 - what the predicate chose
        return suback.reason_codes

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> int:
        """PUBLISH; at QoS 1 wait for the PUBACK and return its reason code (0x87: refused)."""
        if qos not in (0, 1):
            msg = "this client publishes at QoS 0 or 1"
            raise ClientError(msg)
        pid = self._packet_id() if qos else 0
        self._send(mqtt.encode_publish5(topic.encode(), payload, qos, retain, pid))
        if not qos:
            return 0
        ack = self._wait(
            lambda p: isinstance(p, mqtt.Ack) and p.kind == mqtt.PUBACK and p.packet_id == pid,
            "PUBACK",
        )
        assert isinstance(ack, mqtt.Ack)  # noqa: S101 - what the predicate chose
        return ack.reason_code

    def ping(self) -> None:
        """PINGREQ and wait for the PINGRESP: the broker has read everything sent before."""
        self._pinging = True
        try:
            self._send(_PINGREQ)
            self._wait(lambda p: p == (mqtt.PINGRESP, 0), "PINGRESP")
        finally:
            self._pinging = False

    def receive(self, timeout: float | None = None) -> mqtt.Publish | None:
        """The next message (QoS 1 ones acknowledged), or None after ``timeout`` seconds."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self._messages:
            if end is not None and time.monotonic() >= end:
                return None
            packet = self._read(end, None)
            if packet is not None:
                self._packets.append(packet)
                self._take_messages()
        return self._messages.popleft()

    def close(self) -> None:
        """DISCONNECT 0x00 (no will) and close."""
        if self._sock is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self._sock.sendall(mqtt.disconnect5(from_client=True))
        self._close_socket()

    def __enter__(self) -> ScramMQTTClient:
        self.connect()
        return self

    def __exit__(
        self,
        _t: type[BaseException] | None,
        _e: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- wire --------------------------------------------------------------------------------

    def _open(self) -> None:
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            msg = f"cannot connect to {self.where}: {exc.strerror or exc}"
            raise ClientError(msg) from None
        try:
            self._sock = self._context.wrap_socket(raw, server_hostname=self.host)
        except ssl.SSLCertVerificationError as exc:
            raw.close()
            msg = f"the broker at {self.where} failed verification: {exc.verify_message}"
            raise ClientError(msg) from None
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            msg = f"TLS with {self.where} failed: {getattr(exc, 'reason', None) or exc}"
            raise ClientError(msg) from None

    def _close_socket(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _send(self, data: bytes) -> None:
        if self._sock is None:
            msg = f"not connected to {self.where}"
            raise ClientError(msg)
        try:
            self._sock.sendall(data)
        except OSError as exc:
            self._close_socket()
            msg = f"the broker closed the connection ({exc.strerror or exc})"
            raise ClientError(msg) from None
        self._last_sent = time.monotonic()

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 0xFFFF + 1
        return self._next_id

    def _wait(self, wanted: Callable[[mqtt.Packet], bool], what: str) -> mqtt.Packet:
        """Read until a packet ``wanted(packet)``; messages that arrive meanwhile are kept."""
        deadline = time.monotonic() + self.timeout
        while True:
            for packet in list(self._packets):
                if wanted(packet):
                    self._packets.remove(packet)
                    return packet
            self._packets.append(self._next(deadline, what))
            self._take_messages()

    def _take_messages(self) -> None:
        for packet in list(self._packets):
            if isinstance(packet, mqtt.Publish):
                self._packets.remove(packet)
                if packet.qos == 1:
                    self._send(mqtt.ack5(mqtt.PUBACK, packet.packet_id))
                self._messages.append(packet)
            elif isinstance(packet, mqtt.Disconnect):
                self._close_socket()
                why = describe_code(packet.reason_code)
                reason = packet.properties.reason_string
                msg = f"the broker closed the connection: {why}"
                raise ClientError(msg + (f" ({reason})" if reason else ""))
            elif packet == (mqtt.PINGRESP, 0) and not self._pinging:
                self._packets.remove(packet)  # the answer to a keep-alive PINGREQ

    def _next(self, deadline: float, what: str) -> mqtt.Packet:
        """The next packet from the broker, or a ClientError naming ``what`` at ``deadline``."""
        packet = self._read(deadline, what)
        assert packet is not None  # noqa: S101 - _read returns None only when what is None
        return packet

    def _read(self, deadline: float | None, what: str | None) -> mqtt.Packet | None:
        """The next packet from the broker; None once ``deadline`` passes when ``what`` is None
        (receive), a ClientError naming ``what`` otherwise. Sends PINGREQ to keep alive."""
        while not self._ready:
            sock = self._sock
            if sock is None:
                msg = f"not connected to {self.where}"
                raise ClientError(msg)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                if what is None:
                    return None
                msg = f"no {what} from {self.where} within {self.timeout:.0f} s"
                raise ClientError(msg)
            if self.keepalive and now - self._last_sent >= self.keepalive / 2:
                self._send(_PINGREQ)
            wait = self.keepalive / 2 if self.keepalive else 1.0
            if deadline is not None:
                wait = min(wait, deadline - now)
            sock.settimeout(max(wait, 0.001))
            try:
                data = sock.recv(64 * 1024)
            except TimeoutError:
                continue
            except (ssl.SSLError, OSError) as exc:
                self._close_socket()
                msg = f"the broker closed the connection ({exc})"
                raise ClientError(msg) from None
            if not data:
                self._close_socket()
                msg = f"the broker at {self.where} closed the connection"
                raise ClientError(msg + (f" before {what}" if what else ""))
            try:
                self._ready.extend(self._reader.feed(data))
            except mqtt.ProtocolViolation as exc:
                self._abort(f"it sent a malformed packet ({exc})")
        return self._ready.popleft()
