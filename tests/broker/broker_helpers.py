"""Helpers for broker tests: paho peers, raw MQTT packets over TLS, polling without sleeps."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from broker import BrokerSettings, Limits, Policy
from broker.server import BrokerThread
from provisioning.identity import IdentityKind
from provisioning.pki import PKI
from provisioning.tls import client_context_for_credentials
from tests.conftest import Result


def wait_until(predicate: Callable[[], object], timeout: float = 5.0) -> bool:
    """Poll until predicate() is truthy; False on timeout (callers assert on it)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def service_secret(cli: Callable[..., Result], fleet: Fleet, name: str) -> str:
    """A fresh secret for service ``name``, issued as a user gets one (``service secret``)."""
    result = cli("service", "secret", name, "--pki", str(fleet.pki_dir), "--json", check=True)
    return str(json.loads(result.stdout)["secret"])


class FakeClock:
    """A monotonic clock the test moves by hand (``clock.now += 31``), for backoff windows."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def mosquitto_tls_args(creds: Path, port: int, client_id: str) -> list[str]:
    """mosquitto_pub / mosquitto_sub options for a client with the credentials in ``creds``,
    against our broker on 127.0.0.1."""
    return [
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-i",
        client_id,
        "--cafile",
        str(creds / "ca.crt"),
        "--cert",
        str(creds / "device.crt"),
        "--key",
        str(creds / "device.key"),
    ]


def stderr_line(proc: subprocess.Popen[str], fragment: str, timeout: float = 30.0) -> str:
    """The first line of ``proc``'s stderr that contains ``fragment`` ("" if it exits first)."""
    assert proc.stderr is not None
    line = ""
    deadline = time.monotonic() + timeout
    while fragment not in line and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            return ""
    return line.strip()


@dataclass
class Fleet:
    pki: PKI
    root: Path

    @property
    def pki_dir(self) -> Path:
        return self.pki.path

    def creds(self, name: str, *, service: bool = False, **kwargs: Any) -> Path:
        out = self.root / "creds" / name
        if not out.exists():
            kind = IdentityKind.SERVICE if service else IdentityKind.DEVICE
            self.pki.issue(name, kind=kind, out=out, **kwargs)
        return out


class AuditedBroker:
    """A started broker that keeps its audit lines, for tests that check why it refused."""

    def __init__(self, settings: BrokerSettings, **kw: Any) -> None:
        self.audit: list[dict[str, Any]] = []
        self.thread = BrokerThread(
            settings, audit_sink=lambda line: self.audit.append(json.loads(line)), **kw
        ).start()
        self.ports = list(self.thread.broker.ports.values())

    def refusal_records(self) -> list[dict[str, Any]]:
        return [r for r in self.audit if r["event"] == "refuse"]

    def refusals(self) -> list[str]:
        """The reasons of the refusals so far, in order."""
        return [str(r.get("reason")) for r in self.refusal_records()]


@dataclass
class BrokerFactory:
    fleet: Fleet
    started: list[BrokerThread] = field(default_factory=list)

    def __call__(
        self,
        *,
        limits: Limits | None = None,
        policy: Policy | None = None,
        **settings: Any,
    ) -> BrokerThread:
        kwargs: dict[str, Any] = dict(settings)
        if limits is not None:
            kwargs["limits"] = limits
        if policy is not None:
            kwargs["policy"] = policy
        thread = BrokerThread(
            BrokerSettings(self.fleet.pki_dir, **kwargs), audit_sink=lambda _: None
        )
        self.started.append(thread.start())
        return thread


# -- paho peers ------------------------------------------------------------------------------------


class Peer:
    """A paho client with its callbacks turned into lists and events; never reconnects."""

    def __init__(
        self,
        port: int,
        creds: Path | None,
        client_id: str,
        *,
        clean: bool = True,
        keepalive: int = 60,
        will: tuple[str, bytes, bool] | None = None,
        username: str | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.port = port
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean,
            reconnect_on_failure=False,
        )
        if context is None:
            assert creds is not None
            context = client_context_for_credentials(creds)
        self.client.tls_set_context(context)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=0, retain=will[2])
        if username is not None:
            self.client.username_pw_set(username, "hunter2")
        self.keepalive = keepalive
        self.messages: list[tuple[str, bytes, bool]] = []
        self.connack: Any = None
        self.session_present: bool | None = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.subacks: dict[int, list[int]] = {}
        self.published: set[int] = set()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connack = rc
        self.session_present = bool(flags.session_present)
        if not rc.is_failure:
            self.connected.set()

    def _on_disconnect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        self.disconnected.set()

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_subscribe(self, c: Any, u: Any, mid: int, codes: Any, props: Any) -> None:
        self.subacks[mid] = [int(getattr(rc, "value", rc)) for rc in codes]

    def _on_publish(self, c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        self.published.add(mid)

    def connect(self, *, expect_ok: bool = True) -> Peer:
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=self.keepalive)
        except (OSError, ssl.SSLError):
            self.disconnected.set()
            if expect_ok:
                raise
            return self
        self.client.loop_start()
        wait_until(lambda: self.connack is not None or self.disconnected.is_set())
        if expect_ok:
            assert self.connected.is_set(), f"CONNACK {self.connack}"
        return self

    @property
    def refused(self) -> bool:
        return not self.connected.is_set()

    def subscribe(self, topic_filter: str, qos: int = 0) -> list[int]:
        _, mid = self.client.subscribe(topic_filter, qos)
        assert mid is not None
        assert wait_until(lambda: mid in self.subacks or self.disconnected.is_set())
        return self.subacks.get(mid, [])

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            wait_until(lambda: info.mid in self.published or self.disconnected.is_set())

    def close(self) -> None:
        if self.connected.is_set() and not self.disconnected.is_set():
            self.client.disconnect()
            wait_until(self.disconnected.is_set, 2)
        self.client.loop_stop()

    def drop(self) -> None:
        """Vanish without DISCONNECT (power cut): the broker should publish the will."""
        sock = self.client.socket()
        if sock is not None:
            sock.close()
        self.client.loop_stop()


# -- raw MQTT over TLS, for clients paho will not imitate ------------------------------------------


def _utf8(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!H", len(data)) + data


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(
    client_id: str,
    *,
    keepalive: int = 60,
    clean: bool = True,
    will: tuple[str, bytes] | None = None,
) -> bytes:
    """A 3.1.1 CONNECT; ``will`` is (topic, payload), QoS 0, not retained."""
    flags = (0x02 if clean else 0) | (0x04 if will is not None else 0)
    body = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
    body += _utf8(client_id)
    if will is not None:
        body += _utf8(will[0]) + struct.pack("!H", len(will[1])) + will[1]
    return bytes([0x10]) + _remaining(len(body)) + body


def subscribe_packet(topic_filter: str, *, packet_id: int = 1, qos: int = 0) -> bytes:
    body = struct.pack("!H", packet_id) + _utf8(topic_filter) + bytes([qos])
    return bytes([0x82]) + _remaining(len(body)) + body


def publish_header(topic: str, payload_len: int) -> bytes:
    var = _utf8(topic)
    return bytes([0x30]) + _remaining(len(var) + payload_len) + var


def publish_packet(topic: str, payload: bytes) -> bytes:
    return publish_header(topic, len(payload)) + payload


def client_ctx(
    creds: Path | None, *, root: Path, maximum: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(root)
    if creds is not None:
        ctx.load_cert_chain(creds / "device.crt", creds / "device.key")
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


def tls_socket(
    port: int,
    creds: Path | None,
    *,
    root: Path,
    maximum: ssl.TLSVersion | None = None,
    session: ssl.SSLSession | None = None,
    context: ssl.SSLContext | None = None,
    timeout: float = 5,
) -> ssl.SSLSocket:
    ctx = context or client_ctx(creds, root=root, maximum=maximum)
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session)
    except BaseException:
        raw.close()
        raise


def read_connack(sock: ssl.SSLSocket) -> int | None:
    """The CONNACK return code, or None if the broker closed the connection first."""
    try:
        data = b""
        while len(data) < 4:
            chunk = sock.recv(4 - len(data))
            if not chunk:
                return None
            data += chunk
    except (OSError, ssl.SSLError):
        return None
    assert data[0] == 0x20, data
    return data[3]


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closes within ``timeout`` (data that arrives first is discarded)."""
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except (OSError, ssl.SSLError):
            return True
    return False


def copy_creds(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
