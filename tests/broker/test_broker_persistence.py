"""Persistence end to end (issue 15): a real ``iotauth broker run`` process killed with SIGKILL
in the middle of a storm of QoS 1/2 publishes, the same storm against Mosquitto with
``persistence true``, a disk that fills up under the broker, a revoked identity's stored session.

The clients are real paho clients over TLS; the disk is a real tmpfs; nothing is mocked. The
unit-level twins (torn and corrupt logs, expiry, the ack rule) are in test_broker_store.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.server import BrokerThread
from broker.settings import BrokerSettings
from tests.broker.broker_helpers import Fleet, Peer, stderr_line, wait_until
from tests.conftest import CLI, MOSQUITTO, assert_one_line_error, fill_disk, needs_mosquitto

CMD = "devices/{}/commands/storm"
STORM = 6000  # messages per subscriber; the kill comes long before the publisher is done
KILL_AFTER = 600  # acknowledged messages before the SIGKILL


class Proc:
    """A broker process this test started (and ends, by its pid)."""

    def __init__(self, argv: list[str], cwd: Path, port: int | None = None) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd
        )
        self.banner = ""
        if port is None:
            self.banner = stderr_line(self.proc, "listening on")
            assert self.banner, "the broker did not start"
            port = int(self.banner.split("127.0.0.1:")[1].split(" ")[0])
        self.port = port
        # Drain stderr so the broker never blocks on a full pipe.
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill9()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        if proc.proc.poll() is None:
            proc.kill9()


def _iotauth(fleet: Fleet, data: Path, procs: list[Proc]) -> Proc:
    argv = [*CLI, "broker", "run", "--pki", str(fleet.pki_dir), "--port", "0", "--no-renewal"]
    proc = Proc([*argv, "--data-dir", str(data)], fleet.root)
    procs.append(proc)
    return proc


def _mosquitto(fleet: Fleet, work: Path, port: int, procs: list[Proc]) -> Proc:
    """Mosquitto 2 with TLS, client certificates and ``persistence true`` (its other settings,
    autosave_interval 1800 s among them, are its defaults)."""
    pki = fleet.pki_dir
    conf = work / "mosquitto.conf"
    lines = [
        *(["user root"] if os.geteuid() == 0 else []),
        "persistence true",
        f"persistence_location {work}/",
        "log_dest stderr",
        "log_type error",
        "allow_anonymous false",
        f"listener {port} 127.0.0.1",
        f"cafile {pki / 'root.crt'}",
        f"certfile {pki / 'server.crt'}",
        f"keyfile {pki / 'private' / 'server.key'}",
        "require_certificate true",
        "use_identity_as_username true",
        "max_queued_messages 0",  # no cap: only the crash may lose messages here
    ]
    conf.write_text("\n".join(lines) + "\n")
    assert MOSQUITTO is not None
    proc = Proc([MOSQUITTO, "-c", str(conf)], work, port)
    procs.append(proc)
    assert wait_until(lambda: _port_open(port), 10), "mosquitto did not start"
    return proc


def _port_open(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _subscribe_offline(fleet: Fleet, port: int) -> None:
    """dev-1 (QoS 1) and dev-2 (QoS 2) make persistent sessions and go away."""
    for name, qos in (("dev-1", 1), ("dev-2", 2)):
        peer = Peer(port, fleet.creds(name), name, clean=False)
        peer.connect()
        assert peer.subscribe(CMD.format(name), qos) == [qos]
        peer.close()


def _storm_and_kill(fleet: Fleet, port: int, broker: Proc) -> dict[int, tuple[int, bytes]]:
    """Publish QoS 1 to dev-1 and QoS 2 to dev-2, alternately; SIGKILL the broker once
    KILL_AFTER are acknowledged. Returns what was acknowledged: {mid: (qos, payload)}."""
    pub = Peer(port, fleet.creds("ops", service=True), "ops")
    pub.client.max_inflight_messages_set(20)  # Mosquitto closes 3.1.1 clients past 20
    pub.connect()
    sent: dict[int, tuple[int, bytes]] = {}
    for n in range(STORM):
        qos = 1 + n % 2
        payload = b"%d" % n
        info = pub.client.publish(CMD.format(f"dev-{qos}"), payload, qos=qos)
        sent[info.mid] = (qos, payload)
    assert wait_until(lambda: len(pub.published) >= KILL_AFTER, 60), len(pub.published)
    broker.kill9()
    assert wait_until(pub.disconnected.is_set, 10)
    pub.client.loop_stop()
    acked = {mid: sent[mid] for mid in set(pub.published)}
    assert len(acked) < STORM, "the storm ended before the kill: make it longer"
    return acked


def _collect(fleet: Fleet, port: int) -> dict[int, Counter[bytes]]:
    """Reconnect both persistent sessions and read until nothing more comes."""
    got: dict[int, Counter[bytes]] = {}
    for name, qos in (("dev-1", 1), ("dev-2", 2)):
        peer = Peer(port, fleet.creds(name), name, clean=False)
        peer.connect()
        last = -1
        while len(peer.messages) != last:
            last = len(peer.messages)
            time.sleep(0.5)
        peer.close()
        got[qos] = Counter(payload for _, payload, _ in peer.messages)
    return got


def _lost(acked: dict[int, tuple[int, bytes]], got: dict[int, Counter[bytes]]) -> int:
    return sum(1 for qos, payload in acked.values() if got[qos][payload] == 0)


def test_kill_9_during_a_storm_loses_nothing_acknowledged(
    fleet: Fleet, tmp_path: Path, procs: list[Proc], record_property: Callable[..., None]
) -> None:
    """Every PUBACK (QoS 1) and PUBCOMP (QoS 2) the publisher got before the SIGKILL is
    delivered after the restart; QoS 2 messages arrive exactly once (MQTT-4.3.3)."""
    data = tmp_path / "state"
    broker = _iotauth(fleet, data, procs)
    _subscribe_offline(fleet, broker.port)
    acked = _storm_and_kill(fleet, broker.port, broker)
    broker = _iotauth(fleet, data, procs)
    assert "2 session(s)" in broker.banner, broker.banner
    got = _collect(fleet, broker.port)
    broker.stop()
    lost = _lost(acked, got)
    twice = sum(1 for n in got[2].values() if n > 1)
    record_property("acknowledged", len(acked))
    record_property("lost", lost)
    counts = f"acknowledged {len(acked)}, delivered {sum(len(c) for c in got.values())}"
    assert lost == 0, f"{lost} acknowledged messages lost ({counts})"
    assert twice == 0, f"{twice} QoS 2 messages delivered more than once ({counts})"
    assert len(acked) >= KILL_AFTER


@needs_mosquitto
def test_mosquitto_with_persistence_loses_acknowledged_messages_on_a_kill_9(
    fleet: Fleet, tmp_path: Path, procs: list[Proc], record_property: Callable[..., None]
) -> None:
    """The reference for the test above, same storm: Mosquitto writes its state every
    autosave_interval (1800 s by default), so what it acknowledged since is gone."""
    fleet.creds("ops", service=True)
    port = _free_port()
    broker = _mosquitto(fleet, tmp_path, port, procs)
    _subscribe_offline(fleet, port)
    acked = _storm_and_kill(fleet, port, broker)
    broker = _mosquitto(fleet, tmp_path, port, procs)
    got = _collect(fleet, port)
    broker.stop()
    lost = _lost(acked, got)
    record_property("acknowledged", len(acked))
    record_property("lost", lost)
    assert lost > 0, f"mosquitto lost none of {len(acked)} (did its defaults change?)"


def _thread_broker(fleet: Fleet, data: Path, **settings: Any) -> BrokerThread:
    return BrokerThread(
        BrokerSettings(fleet.pki_dir, data_dir=data, **settings), audit_sink=lambda _: None
    ).start()


def test_a_full_disk_stops_acknowledgements_then_recovers(
    fleet: Fleet, tmpfs: Callable[[str], Path]
) -> None:
    """The disk fills: a QoS 1 publish to a persistent session is not acknowledged (3.1.1: the
    publisher's connection is closed), everything else keeps working; space comes back: it is
    acknowledged, and after a restart every acknowledged message is there."""
    disk = tmpfs("2m")
    data = disk / "state"
    broker = _thread_broker(fleet, data)
    try:
        port = broker.port
        _subscribe_offline(fleet, port)
        live = Peer(port, fleet.creds("sink", service=True), "sink")  # clean session: memory
        live.connect()
        assert live.subscribe("devices/+/state", 1) == [1]
        pub = Peer(port, fleet.creds("ops", service=True), "ops")
        pub.connect()
        pub.publish(CMD.format("dev-1"), b"before", qos=1)
        assert pub.published == {1}
        filler = fill_disk(disk, 0)
        info = pub.client.publish(CMD.format("dev-1"), b"x" * 200_000, qos=1)
        assert wait_until(pub.disconnected.is_set, 10), "a publish it cannot store was kept"
        assert info.mid not in pub.published
        # Everything else is served: a device's QoS 1 state to a live clean session.
        dev = Peer(port, fleet.creds("dev-2"), "dev-2")
        dev.connect()
        dev.publish("devices/dev-2/state", b"up", qos=1)
        assert dev.published == {1}, "a message nobody needs stored was not acknowledged"
        assert wait_until(lambda: live.messages == [("devices/dev-2/state", b"up", False)])
        dev.close()
        pub.client.loop_stop()
        # Space returns: the same publisher is served again.
        filler.unlink()
        time.sleep(1.0)  # the store retries every 0.5 s
        pub = Peer(port, fleet.creds("ops", service=True), "ops")
        pub.connect()
        pub.publish(CMD.format("dev-1"), b"after", qos=1)
        assert pub.published == {1}
        pub.close()
        live.close()
    finally:
        broker.stop()
    broker = _thread_broker(fleet, data)
    try:
        got = _collect(fleet, broker.port)
    finally:
        broker.stop()
    assert got[1][b"before"] == 1
    assert got[1][b"after"] == 1


def test_a_revoked_identity_s_stored_queue_is_never_delivered(fleet: Fleet, tmp_path: Path) -> None:
    data = tmp_path / "state"
    broker = _thread_broker(fleet, data)
    try:
        _subscribe_offline(fleet, broker.port)
        pub = Peer(broker.port, fleet.creds("ops", service=True), "ops")
        pub.connect()
        pub.publish(CMD.format("dev-1"), b"for dev-1", qos=1)
        pub.publish(CMD.format("dev-2"), b"for dev-2", qos=1)
        pub.close()
    finally:
        broker.stop()
    log = (data / "state.log").read_bytes()
    assert b"for dev-1" in log
    fleet.pki.revoke("dev-1")  # while the broker is down
    broker = _thread_broker(fleet, data)
    try:
        assert broker.broker.state is not None
        assert b"for dev-1" not in (data / "state.log").read_bytes()
        got = Peer(broker.port, fleet.creds("dev-2"), "dev-2", clean=False).connect()
        assert wait_until(lambda: got.messages)
        assert got.messages == [(CMD.format("dev-2"), b"for dev-2", False)]
        got.close()
    finally:
        broker.stop()


def test_broker_run_refuses_state_written_by_another_pki(
    fleet: Fleet, tmp_path: Path, cli: Callable[..., Any]
) -> None:
    """State is bound to its PKI's trust domain and root: another one's is refused in one line
    (and left as it was)."""
    state = tmp_path / "other-state"
    state.mkdir()
    meta = '{"schema": 1, "trust_domain": "other.example", "root_sha256": "00"}\n'
    (state / "state.json").write_text(meta)
    argv = ["broker", "run", "--pki", str(fleet.pki_dir), "--port", "0", "--no-renewal"]
    result = cli(*argv, "--data-dir", str(state))
    assert_one_line_error(result, "belongs to another PKI", "other.example", "--data-dir")
    assert (state / "state.json").read_text() == meta
    assert not (state / "state.log").exists()
    both = cli(*argv, "--data-dir", str(state), "--no-persist")
    assert_one_line_error(both, "--no-persist")


def test_broker_run_keeps_state_under_the_pki_by_default(fleet: Fleet, procs: list[Proc]) -> None:
    argv = [*CLI, "broker", "run", "--pki", str(fleet.pki_dir), "--port", "0", "--no-renewal"]
    proc = Proc(argv, fleet.root)
    procs.append(proc)
    where = fleet.pki_dir / "broker-state"
    assert f"state in {where}: 0 session(s)" in proc.banner
    assert (where / "state.log").is_file()
    proc.stop()
    memory = Proc([*argv, "--no-persist"], fleet.root)
    procs.append(memory)
    assert "state in memory only (--no-persist)" in memory.banner
    memory.stop()


def test_broker_run_starts_on_a_damaged_state_file_and_says_what_it_dropped(
    fleet: Fleet, tmp_path: Path, procs: list[Proc]
) -> None:
    """Random bytes in the middle of the log: the real broker starts, keeps what came before,
    and one warning line says where the damage was; the file is kept aside, not deleted."""
    data = tmp_path / "state"
    broker = _thread_broker(fleet, data)
    try:
        _subscribe_offline(fleet, broker.port)
        pub = Peer(broker.port, fleet.creds("ops", service=True), "ops")
        pub.connect()
        pub.publish(CMD.format("dev-1"), b"kept", qos=1)
        cut = (data / "state.log").stat().st_size
        pub.publish(CMD.format("dev-1"), b"damaged", qos=1)
        pub.close()
    finally:
        broker.stop()
    log = data / "state.log"
    raw = bytearray(log.read_bytes())
    raw[cut + 2 : cut + 10] = os.urandom(8)
    log.write_bytes(bytes(raw))
    argv = [*CLI, "broker", "run", "--pki", str(fleet.pki_dir), "--port", "0", "--no-renewal"]
    proc = subprocess.Popen(
        [*argv, "--data-dir", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    assert proc.stderr is not None
    lines = []
    try:
        while not lines or "listening on" not in lines[-1]:
            line = proc.stderr.readline()
            assert line, f"the broker exited: {lines}"
            lines.append(line)
        damage = [line for line in lines if "damaged at byte" in line]
        assert len(damage) == 1, lines
        assert f"damaged at byte {cut}" in damage[0]
        assert "Traceback" not in "".join(lines)
        port = int(lines[-1].split("127.0.0.1:")[1].split(" ")[0])
        peer = Peer(port, fleet.creds("dev-1"), "dev-1", clean=False).connect()
        assert wait_until(lambda: peer.messages)
        time.sleep(0.3)
        assert [m[1] for m in peer.messages] == [b"kept"]
        peer.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    assert list(data.glob("state.log.damaged-*"))


# -- delayed wills (MQTT 5) across a kill -9 ------------------------------------------------------

WILL_DELAY = 10  # seconds
KILL_GAP = 3  # seconds between dev-1's connection ending and the SIGKILL


def _v5_session(port: int, creds: Path, name: str, *, delay: int | None = None) -> Any:
    """A paho MQTTv5 client with Session Expiry 300 s and, with ``delay``, a will on
    devices/{name}/state delayed by ``delay`` s."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from tests.broker.test_broker_mqtt5 import Peer5

    peer = Peer5(port, creds, name)
    if delay is not None:
        will_props = Properties(PacketTypes.WILLMESSAGE)
        will_props.WillDelayInterval = delay
        peer.client.will_set(f"devices/{name}/state", f"{name} gone".encode(), 1, False, will_props)
    session = Properties(PacketTypes.CONNECT)
    session.SessionExpiryInterval = 300
    peer.connect(clean=False, props=session)
    assert peer.connected.is_set(), peer.connack
    return peer


def _vanish(peer: Any) -> None:
    """The connection ends without DISCONNECT (the will is due after its delay)."""
    peer.client.socket().close()
    peer.client.loop_stop()


def test_a_delayed_will_pending_at_a_kill_9_is_published_when_due_after_restart(
    fleet: Fleet, tmp_path: Path, procs: list[Proc]
) -> None:
    """MQTT-3.1.3-9 across a SIGKILL: dev-1's will (Will Delay 10 s) was pending when the
    broker died; after the restart it reaches a real paho v5 subscriber once, not before 10 s
    after dev-1's connection ended and without the delay starting again (it counts across the
    downtime). Twins: dev-2 resumed its session before the kill (its will is never sent,
    MQTT-3.1.3-9); dev-3 was revoked while the broker was down (its will is dropped)."""
    data = tmp_path / "state"
    broker = _iotauth(fleet, data, procs)
    port = broker.port
    sink = _v5_session(port, fleet.creds("sink", service=True), "sink")
    assert sink.subscribe("devices/+/state", 1) == [1]
    sink.close()  # offline: its persistent session collects what is published meanwhile
    peers = {
        name: _v5_session(port, fleet.creds(name), name, delay=WILL_DELAY)
        for name in ("dev-1", "dev-2", "dev-3")
    }
    _vanish(peers["dev-2"])
    _vanish(peers["dev-3"])
    gone = time.time()
    _vanish(peers["dev-1"])
    again = _v5_session(port, fleet.creds("dev-2"), "dev-2")  # resumed: no will of dev-2
    again.close()
    log = data / "state.log"
    assert wait_until(lambda: log.read_bytes().count(b" gone") == 3, 5)  # the wills are on disk
    time.sleep(max(0.0, gone + KILL_GAP - time.time()))
    killed = time.time()
    broker.kill9()
    fleet.pki.revoke("dev-3")  # while the broker is down
    broker = _iotauth(fleet, data, procs)
    up = time.time()  # listening (a loaded machine may take long to start it)
    sink = _v5_session(broker.port, fleet.creds("sink", service=True), "sink")
    try:
        assert wait_until(lambda: sink.messages, WILL_DELAY + 20), "the will never came"
        arrived = time.time()
        time.sleep(1.0)  # anything else that would come
        assert [m.payload for m in sink.messages] == [b"dev-1 gone"]
        assert arrived >= gone + WILL_DELAY  # not before its delay ran out
        # The delay was not started again at the restart (that would be >= killed + 10 s, and
        # at least 10 s after the state was loaded): it came when due, or at once at start if
        # the start came later than that.
        due = max(gone + WILL_DELAY, up)
        assert arrived < due + KILL_GAP - 0.5, (arrived - gone, killed - gone, up - gone)
    finally:
        sink.close()
    broker.stop()
    broker = _iotauth(fleet, data, procs)  # published once: a clean restart does not repeat it
    sink = _v5_session(broker.port, fleet.creds("sink", service=True), "sink")
    try:
        time.sleep(1.5)
        assert sink.messages == []
    finally:
        sink.close()
    broker.stop()
