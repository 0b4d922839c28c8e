"""Helpers for device-agent tests: a sink service, a TCP gate in front of a broker, polling."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from provisioning.tls import client_context_for_credentials


def start_agent(
    store: Path,
    port: int,
    *extra: str,
    stdout: int = subprocess.PIPE,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """``python -m device_agent run`` for ``store`` against 127.0.0.1:``port``, as its own
    process (stderr piped, for the caller's assertions)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "device_agent",
            "run",
            "--store",
            str(store),
            "--broker",
            f"127.0.0.1:{port}",
            *extra,
        ],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


class RenewalPeer:
    """A raw device client speaking the renewal protocol by hand (JSON on certs/csr)."""

    def __init__(self, store: Path, port: int, *, inflight: int = 20) -> None:
        ident = json.loads((store / "identity.json").read_text())
        self.device = ident["device_id"]
        self.answers: list[dict[str, Any]] = []
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device)
        self.client.max_inflight_messages_set(inflight)
        self.client.tls_set_context(client_context_for_credentials(store))
        self.client.on_connect = lambda c, *_: c.subscribe(f"devices/{self.device}/certs/issued", 1)
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = lambda _c, _u, m: self.answers.append(json.loads(m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)

    def send(self, doc: dict[str, Any] | bytes) -> mqtt.MQTTMessageInfo:
        payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        return self.client.publish(f"devices/{self.device}/certs/csr", payload, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


class Sink:
    """A backend service: subscribes to the fleet's telemetry, state and replies; sends commands."""

    def __init__(self, creds: Path, port: int, name: str = "sink", *, clean: bool = True) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, clean_session=clean)
        self.client.tls_set_context(client_context_for_credentials(creds))
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_disconnect = lambda *a: self.subscribed.clear()
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self.subscribed.wait(10), "sink did not subscribe"

    def _on_connect(self, c: Any, *_: Any) -> None:
        c.subscribe(
            [
                ("devices/+/telemetry/#", 1),
                ("devices/+/state", 1),
                ("devices/+/replies/#", 1),
            ]
        )

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def on(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic]

    def json_on(self, topic: str) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self.on(topic)]

    def telemetry_ids(self, device: str) -> list[str]:
        return [d["id"] for d in self.json_on(f"devices/{device}/telemetry")]

    def command(self, device: str, name: str, doc: dict[str, Any] | bytes) -> None:
        payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self.client.publish(f"devices/{device}/commands/{name}", payload, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Gate:
    """A TCP forwarder on 127.0.0.1: ``down()`` cuts every connection and refuses new ones.

    Our broker keeps no state across a restart (docs/BROKER.md), so a test that restarts it opens
    the gate to the device only after the consumer has subscribed again.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.is_up = True
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            if not self.is_up:
                conn.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._pairs.append((conn, upstream))
            threading.Thread(target=self._pump, args=(conn, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        socks = [a, b]
        try:
            while True:
                readable, _, _ = select.select(socks, [], [], 0.5)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            return
        finally:
            for s in socks:
                s.close()

    def down(self) -> None:
        self.is_up = False
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def up(self, target_port: int | None = None) -> None:
        if target_port is not None:
            self.target_port = target_port
        self.is_up = True

    def close(self) -> None:
        self._closing = True
        self.down()
        self._server.close()


def run_mixed_fleet(backend: Any, workdir: Path, *, mqtt5_share: float | None = None) -> Any:
    """20 devices, one revoked and one expired: 18 online, both refusals named, telemetry flows."""
    from device_agent.fleet import FleetSpec, run_fleet

    spec = FleetSpec(
        devices=20,
        duration=4,
        scenarios=("steady", "revoked"),
        telemetry_interval=0.5,
        reactors=2,
        bad_fraction=0.05,
        mqtt5_share=mqtt5_share,
    )
    try:
        report = run_fleet(spec, backend, workdir=workdir)
    finally:
        backend.close()
    text = "\n".join(report.lines())
    assert report.online_at_end == report.expected_online == 18, text
    assert report.refusals.get("revoked") == 1, text  # mosquitto names the TLS alert
    assert report.refusals.get("expired") == 1, text
    assert report.messages_unique > 0, text
    return report
