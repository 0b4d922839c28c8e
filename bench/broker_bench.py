"""Our broker against plain amqtt and mosquitto, same clients, same machine, same run.

    .venv/bin/python bench/broker_bench.py [--rounds 2] [--brokers iotauth,amqtt,mosquitto]
        [--phases connect,connect5,hold,qos0,qos1,qos0v5,qos1v5,qos0alias,idle]
        [--publishers 20,1] [--idle-clients 10000]

Builds a throw-away PKI (trust domain ``bench.example``) with one credential directory per
device (``device.crt`` = leaf + issuing CA, ``device.key``, ``ca.crt`` = root) and a service
identity ``sink``. Then, in each round, starts each broker in turn on a free 127.0.0.1 port,
pinned to CPU 0 with ``taskset -c 0`` (this process, the load generator, runs on CPU 1), measures
it and stops it:

  iotauth    ``iotauth broker run --pki DIR --host 127.0.0.1 --port P`` (audit lines to a file)
  amqtt      plain amqtt 0.12.1, TLS with CERT_REQUIRED, no CRL, no ACL, no identity binding
             (``bench/_plain_amqtt_broker.py``): what amqtt gives you
  mosquitto  mosquitto 2.x: require_certificate, use_identity_as_username, crlfile,
             set_tcp_nodelay, ACL ``pattern readwrite devices/%u/#`` + ``user sink`` /
             ``topic read devices/+/telemetry/#``; every other setting is mosquitto's default,
             so a subscriber with 1000 messages queued loses further messages, QoS 0 and QoS 1
             (``--mosquitto-max-queued`` changes that), and at most 20 QoS 1 messages are in
             flight to one subscriber (max_inflight_messages)

This process raises its RLIMIT_NOFILE to the hard limit before it starts any broker, so the
brokers (which inherit it) and the clients have file descriptors enough for ``--idle-clients``.

Per broker (the client is raw asyncio + ssl with hand-written MQTT 3.1.1 bytes, one
certificate per client, client id = the certificate's identity, full TLS handshakes), the phases
of ``--phases`` in this order:

  (always)   broker RSS one second after start, before any client
  connect    after --concurrency untimed warm-up connects, --clients connect (TCP + mTLS +
             CONNECT/CONNACK) and disconnect, --concurrency in flight: connects/s, latency
             p50/p99 to CONNACK, broker CPU ms per connect (utime + stime from /proc over the
             timed window, children included)
  hold       broker RSS after the connect phase (a high-water mark: allocators keep what the
             handshakes used), then the same clients connect and stay connected: broker RSS
             with all of them, and the difference per client
  qos0       once per entry of --publishers (default 20 and 1): ``sink`` subscribes to
             ``devices/+/telemetry/#`` with QoS 0; that many devices share --messages QoS 0
             messages of --payload bytes, sent to ``devices/<id>/telemetry/t`` as fast as the
             broker takes them: delivered msgs/s (first publish to last delivery), loss, broker
             CPU us per delivered message
  qos1       the same with QoS 1 end to end: the sink subscribes with QoS 1 and PUBACKs every
             delivered PUBLISH (one write per read); each publisher keeps at most --qos1-window
             PUBLISHes unacknowledged and waits for the broker's PUBACKs
  connect5, qos0v5, qos1v5, qos0alias
             the same in MQTT 5.0 (CONNECT level 5, no properties; PUBLISH with an empty
             property set), and QoS 0 where each publisher sets Topic Alias 1 with its first
             PUBLISH and then sends an empty topic: the MQTT 5 rows beside the 3.1.1 ones.
             Plain amqtt speaks no MQTT 5 and skips them
  idle       only with --idle-clients N: a fresh broker, then N devices connect with mTLS
             (--concurrency in flight) and stay connected, sending nothing: broker RSS before
             and with the N clients, the difference per client, and broker CPU while they idle.
             N is the issue's "10,000 connected devices"; iotauth's max_connections (10,000 by
             default, and its renewal service holds one connection) is raised with
             ``--max-connections`` when N does not fit; mosquitto and plain amqtt have no limit

Every pub/sub and connect figure comes with the load generator's own CPU (this process, one
core); near 100 % means the client, not the broker, may have set the pace.

The broker order rotates between rounds. The report (Markdown, on stdout) gives the median of
each figure over the rounds and, for the ratios, the median of the ratios taken within each
round. Progress goes to stderr. Every phase has a deadline and every broker is stopped on the
way out, also after an error or Ctrl-C. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import functools
import importlib
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from provisioning.identity import IdentityKind
from provisioning.pki import PKI

HOST = "127.0.0.1"
TRUST_DOMAIN = "bench.example"
SINK = "sink"
SINK_FILTER = "devices/+/telemetry/#"
HERE = Path(__file__).resolve().parent
BROKERS = ("iotauth", "amqtt", "mosquitto")
PHASES = ("connect", "connect5", "hold", "qos0", "qos1", "qos0v5", "qos1v5", "qos0alias", "idle")
# The MQTT 5 runs: (phase, QoS, topic alias); amqtt speaks no MQTT 5 and skips them.
V5_RUNS = (("qos0v5", 0, False), ("qos1v5", 1, False), ("qos0alias", 0, True))

MOSQUITTO_ACL = """\
# every device may read and write below its own id only (username = certificate CN)
pattern readwrite devices/%u/#

# the sink service may read every device's telemetry
user sink
topic read devices/+/telemetry/#
"""

perf = time.perf_counter
Values = dict[str, float | None]


class BenchError(Exception):
    """A broker would not start, or a phase could not run at all."""


# -- MQTT 3.1.1 bytes ----------------------------------------------------------------------------


def _varlen(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_str(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def connect_packet(
    client_id: str, keepalive: int = 0, level: int = 4, *, clean: bool = True
) -> bytes:
    """CONNECT, protocol level 4 (or 5, with no properties), clean session (unless ``clean`` is
    False: a persistent session), no will, no username or password."""
    props = b"\x00" if level == 5 else b""
    body = (
        _mqtt_str("MQTT")
        + bytes((level, 2 if clean else 0))
        + keepalive.to_bytes(2, "big")
        + props
        + _mqtt_str(client_id)
    )
    return b"\x10" + _varlen(len(body)) + body


def subscribe_packet(packet_id: int, topic_filter: str, qos: int, level: int = 4) -> bytes:
    props = b"\x00" if level == 5 else b""
    body = packet_id.to_bytes(2, "big") + props + _mqtt_str(topic_filter) + bytes([qos])
    return b"\x82" + _varlen(len(body)) + body


def v5_publish_parts(topic: str, alias: bool) -> tuple[str, bytes, bytes]:
    """MQTT 5: (the topic of later PUBLISHes, the first one's properties, the later ones'):
    with a Topic Alias the first sets alias 1 and the others send an empty topic."""
    if not alias:
        return topic, b"\x00", b"\x00"
    return "", b"\x03\x23\x00\x01", b"\x03\x23\x00\x01"


def publish_qos0_packet(topic: str, payload: bytes) -> bytes:
    body = _mqtt_str(topic) + payload
    return b"\x30" + _varlen(len(body)) + body


def publish_qos1_head(topic: str, payload_len: int) -> bytes:
    """A QoS 1 PUBLISH up to its packet id: ``head + packet_id (2 bytes) + payload``."""
    topic_bytes = _mqtt_str(topic)
    return b"\x32" + _varlen(len(topic_bytes) + 2 + payload_len) + topic_bytes


DISCONNECT = b"\xe0\x00"
PUBLISH, PUBACK = 3, 4


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, multiplier = 0, 1
    while True:
        byte = (await reader.readexactly(1))[0]
        length += (byte & 0x7F) * multiplier
        multiplier *= 128
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length)


def count_packets(buf: bytearray, kind: int, acks: bytearray | None = None) -> tuple[int, int]:
    """(packets of type ``kind`` complete in ``buf``, bytes they and other complete packets use).

    With ``acks``, a PUBACK is appended to it for each QoS 1 PUBLISH counted (the sink answers a
    whole read with one write).
    """
    i, size, count = 0, len(buf), 0
    while size - i >= 2:
        j, length, multiplier = i + 1, 0, 1
        while j < size:
            byte = buf[j]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            j += 1
            if not byte & 0x80:
                break
        else:
            break
        if j + length > size:
            break
        first = buf[i]
        if first >> 4 == kind:
            count += 1
            if acks is not None and first & 0x06 == 0x02:  # QoS 1: the id follows the topic
                k = j + 2 + (buf[j] << 8 | buf[j + 1])
                acks += b"\x40\x02"
                acks += buf[k : k + 2]
        i = j + length
    return count, i


# -- processes -----------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        kids[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry))
    return kids


class ProcTree:
    """CPU time and RSS of a broker process and any children it has, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.ticks = os.sysconf("SC_CLK_TCK")

    def pids(self) -> list[int]:
        kids, out, todo = _children(), [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += kids.get(pid, [])
        return out

    def cpu_s(self) -> float:
        """utime + stime of the tree, plus what reaped children used (cutime + cstime)."""
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += sum(int(fields[k]) for k in (11, 12, 13, 14))
        return total / self.ticks

    def rss_kib(self) -> int:
        total = 0
        for pid in self.pids():
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue
            total += next((int(x.split()[1]) for x in lines if x.startswith("VmRSS:")), 0)
        return total


def machine_busy_s() -> float:
    """CPU seconds that all CPUs together spent busy so far (first line of /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


Snapshot = tuple[float, float, float, float]  # wall, broker CPU, own CPU, machine busy


class Window:
    """A timed window: broker CPU, this process's CPU and everybody else's, and wall time."""

    def __init__(self, mon: ProcTree) -> None:
        self.mon = mon
        self.t0, self.broker0, self.own0, self.all0 = self.snapshot()
        self.broker = self.own = self.other = self.wall = 0.0

    def snapshot(self) -> Snapshot:
        return perf(), self.mon.cpu_s(), time.process_time(), machine_busy_s()

    def close(self, at: Snapshot | None = None) -> Window:
        """End the window now, or at an earlier ``snapshot()``."""
        now, broker, own, busy = at or self.snapshot()
        self.wall = now - self.t0
        self.broker = broker - self.broker0
        self.own = own - self.own0
        self.other = max(0.0, busy - self.all0 - self.broker - self.own)
        return self


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def pin_prefix(cpu: int | None) -> list[str]:
    if cpu is None:
        return []
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(cpu)] if taskset else []


def _tail(path: Path, chars: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


@dataclass
class RunningBroker:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    stderr_path: Path
    metrics_port: int | None = None
    audit_path: Path | None = None
    _files: list[IO[bytes]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid  # taskset exec()s the broker, so this is the broker's pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for handle in self._files:
            handle.close()


def _wait_until(check: Callable[[], bool], proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = perf() + 30
    while perf() < deadline:
        if proc.poll() is not None:
            msg = f"{what}: exited with status {proc.returncode}"
            raise BenchError(msg)
        if check():
            return
        time.sleep(0.05)
    msg = f"{what}: not ready after 30 s"
    raise BenchError(msg)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _spawn(
    name: str, cmd: list[str], workdir: Path, stdout: Path | None
) -> tuple[subprocess.Popen[bytes], Path, list[IO[bytes]]]:
    stderr_path = workdir / f"{name}.stderr.log"
    files: list[IO[bytes]] = [stderr_path.open("wb")]
    if stdout is not None:
        files.append(stdout.open("wb"))
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=files[1] if stdout is not None else subprocess.PIPE,
        stderr=files[0],
    )
    return proc, stderr_path, files


# The limits of ``broker.settings.Limits`` the report names, when the broker has them.
IOTAUTH_LIMITS = ("outbound_max_messages", "max_inflight", "max_connections")


def iotauth_limits() -> dict[str, int]:
    """Our broker's default limits (``broker.settings.Limits``), as far as it has them.

    Imported by name: the bench otherwise needs nothing of ``broker`` (nor mypy to check it).
    """
    try:
        limits = importlib.import_module("broker.settings").Limits()
    except Exception as exc:  # noqa: BLE001 - the broker's own start will say what is wrong
        log(f"iotauth: cannot read broker.settings.Limits: {type(exc).__name__}: {exc}")
        return {}
    return {k: int(getattr(limits, k)) for k in IOTAUTH_LIMITS if hasattr(limits, k)}


def start_iotauth(
    pki_dir: Path,
    workdir: Path,
    cpu: int | None,
    max_connections: int | None = None,
    extra: Sequence[str] = (),
) -> RunningBroker:
    """``max_connections``: run with this connection limit instead of the default; ``extra``:
    more ``broker run`` options (``--no-persist``, ``--data-dir``)."""
    exe = Path(sys.executable).with_name("iotauth")
    found = str(exe) if exe.exists() else shutil.which("iotauth")
    if found is None:
        msg = "iotauth: no 'iotauth' next to this Python or on PATH"
        raise BenchError(msg)
    limit = [] if max_connections is None else ["--max-connections", str(max_connections)]
    port, metrics_port = free_port(), free_port()
    cmd = [
        *pin_prefix(cpu),
        found,
        "broker",
        "run",
        "--pki",
        str(pki_dir),
        "--host",
        HOST,
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        *limit,
        *extra,
    ]
    audit = workdir / "iotauth.audit.jsonl"
    proc, stderr_path, files = _spawn("iotauth", cmd, workdir, audit)
    broker = RunningBroker("iotauth", proc, port, workdir, stderr_path, metrics_port, audit, files)
    try:
        _wait_until(
            lambda: "iotauth broker listening on" in _tail(stderr_path, 4000), proc, "iotauth"
        )
    except BenchError as exc:
        broker.stop()
        raise BenchError(f"{exc}; stderr: {_tail(stderr_path)}") from None
    return broker


def start_amqtt(pki_dir: Path, workdir: Path, cpu: int | None) -> RunningBroker:
    port = free_port()
    cmd = [
        *pin_prefix(cpu),
        sys.executable,
        str(HERE / "_plain_amqtt_broker.py"),
        "--pki",
        str(pki_dir),
        "--host",
        HOST,
        "--port",
        str(port),
    ]
    proc, stderr_path, files = _spawn("amqtt", cmd, workdir, None)
    broker = RunningBroker("amqtt", proc, port, workdir, stderr_path, _files=files)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode(errors="replace")  # READY, or EOF if it died
        if not line.startswith("READY"):
            msg = f"amqtt: no READY line (got {line!r})"
            raise BenchError(msg)
        _wait_until(lambda: _port_open(port), proc, "amqtt")
    except BenchError as exc:
        broker.stop()
        raise BenchError(f"{exc}; stderr: {_tail(stderr_path)}") from None
    return broker


def mosquitto_config(
    pki_dir: Path,
    port: int,
    workdir: Path,
    max_queued: int | None = None,
    *,
    persistence: bool = False,
) -> Path:
    acl = workdir / "mosquitto.acl"
    acl.write_text(MOSQUITTO_ACL)
    lines = [
        # as root mosquitto would switch to user 'mosquitto', which cannot read the 0600 key
        *(["user root"] if os.geteuid() == 0 else []),
        "per_listener_settings false",
        *(
            [f"persistence true\npersistence_location {workdir}/"]
            if persistence
            else ["persistence false"]
        ),
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "connection_messages false",
        # the default (false) makes every CONNACK wait ~40 ms behind the TLS 1.3 session
        # tickets for the client's delayed ACK (research/perf.md); asyncio sets it anyway
        "set_tcp_nodelay true",
        "allow_anonymous false",
        f"listener {port} {HOST}",
        f"cafile {pki_dir / 'root.crt'}",
        f"certfile {pki_dir / 'server.crt'}",
        f"keyfile {pki_dir / 'private' / 'server.key'}",
        f"crlfile {pki_dir / 'crl.pem'}",
        "require_certificate true",
        "use_identity_as_username true",
        f"acl_file {acl}",
        # default 1000: a subscriber with that many messages queued loses further QoS 0 ones
        *([f"max_queued_messages {max_queued}"] if max_queued is not None else []),
    ]
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def start_mosquitto(
    pki_dir: Path,
    workdir: Path,
    cpu: int | None,
    binary: str = "/usr/sbin/mosquitto",
    max_queued: int | None = None,
    *,
    persistence: bool = False,
) -> RunningBroker:
    if not Path(binary).exists():
        msg = f"mosquitto: {binary} not found (apt-get install mosquitto)"
        raise BenchError(msg)
    port = free_port()
    conf = mosquitto_config(pki_dir, port, workdir, max_queued, persistence=persistence)
    log = workdir / "mosquitto.stdout.log"
    proc, stderr_path, files = _spawn(
        "mosquitto", [*pin_prefix(cpu), binary, "-c", str(conf)], workdir, log
    )
    broker = RunningBroker("mosquitto", proc, port, workdir, stderr_path, _files=files)
    try:
        _wait_until(lambda: _port_open(port), proc, "mosquitto")
    except BenchError as exc:
        broker.stop()
        raise BenchError(f"{exc}; stderr: {_tail(stderr_path)}") from None
    return broker


# -- the client ----------------------------------------------------------------------------------


class ConnectRefusedError(Exception):
    """The broker answered CONNECT with a non-zero return code."""


@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def close(self, timeout: float = 2.0) -> None:
        try:
            self.writer.write(DISCONNECT)
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), timeout)
        except (OSError, TimeoutError, ssl.SSLError):  # the peer may have closed first
            self.writer.transport.abort()


def describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectRefusedError):
        return str(exc)
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed before the expected packet"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    return f"{type(exc).__name__}: {exc}"[:120]


async def mqtt_connect(
    port: int,
    ctx: ssl.SSLContext,
    client_id: str,
    timeout: float,
    level: int = 4,
    *,
    clean: bool = True,
) -> Conn:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(HOST, port, ssl=ctx, ssl_handshake_timeout=timeout), timeout
    )
    writer.write(connect_packet(client_id, level=level, clean=clean))
    try:
        if level == 5:  # a level-5 CONNACK carries properties: read the whole packet
            first, body = await asyncio.wait_for(read_packet(reader), timeout)
            connack = bytes((first, len(body))) + body[:2]
        else:
            connack = await asyncio.wait_for(reader.readexactly(4), timeout)
    except BaseException:
        writer.transport.abort()
        raise
    if connack[0] != 0x20 or connack[3] != 0:
        writer.transport.abort()
        msg = f"CONNACK {connack.hex()} (return code {connack[3]})"
        raise ConnectRefusedError(msg)
    return Conn(reader, writer)


@dataclass
class ConnectRun:
    latencies: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    conns: list[Conn] = field(default_factory=list)


async def connect_many(
    port: int,
    ctxs: dict[str, ssl.SSLContext],
    ids: Sequence[str],
    concurrency: int,
    *,
    keep: bool,
    timeout: float,
    level: int = 4,
) -> ConnectRun:
    """Every id connects once with its own certificate; ``concurrency`` at a time."""
    run = ConnectRun()
    gate = asyncio.Semaphore(concurrency)

    async def one(client_id: str) -> None:
        async with gate:
            t0 = perf()
            try:
                conn = await mqtt_connect(port, ctxs[client_id], client_id, timeout, level)
            except (OSError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
                run.errors[describe(exc)] += 1
                return
            except ConnectRefusedError as exc:
                run.errors[describe(exc)] += 1
                return
            run.latencies.append(perf() - t0)
            if keep:
                run.conns.append(conn)
            else:
                await conn.close()

    await asyncio.gather(*(one(client_id) for client_id in ids))
    return run


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# -- one broker ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    phases: tuple[str, ...]
    clients: int
    concurrency: int
    publishers: tuple[int, ...]
    messages: int  # per pub/sub run, shared by its publishers
    payload: int
    qos1_window: int
    idle_clients: int
    deadline: float
    stall: float
    op_timeout: float

    @property
    def main_phases(self) -> tuple[str, ...]:
        """The phases run on the first broker of a round (all but idle)."""
        return tuple(ph for ph in self.phases if ph != "idle")

    def runs(self) -> list[PubSubRun]:
        """The pub/sub runs of this plan, in the order they are measured."""
        out = [
            PubSubRun(qos, pubs, self.messages // pubs)
            for qos in (0, 1)
            if f"qos{qos}" in self.phases
            for pubs in self.publishers
        ]
        out += [
            PubSubRun(qos, pubs, self.messages // pubs, level=5, alias=alias)
            for phase, qos, alias in V5_RUNS
            if phase in self.phases
            for pubs in self.publishers
        ]
        return out


@dataclass(frozen=True)
class PubSubRun:
    qos: int
    publishers: int
    per_publisher: int
    persistent_sink: bool = False  # the sink has a persistent session (bench/broker_persist.py)
    level: int = 4  # MQTT 3.1.1; 5: MQTT 5.0 end to end
    alias: bool = False  # MQTT 5: the publishers use a Topic Alias after their first PUBLISH

    @property
    def key(self) -> str:
        """Prefix of this run's figures, e.g. ``q1_20p`` (``q0_20p_v5``, ``q0_20p_alias``)."""
        tail = "_alias" if self.alias else "_v5" if self.level == 5 else ""
        return f"q{self.qos}_{self.publishers}p{tail}"

    @property
    def expected(self) -> int:
        return self.publishers * self.per_publisher

    @property
    def title(self) -> str:
        what = ", MQTT 5 + topic alias" if self.alias else ", MQTT 5" if self.level == 5 else ""
        return f"QoS {self.qos}, {self.publishers} pub → 1 sub{what}"


@dataclass
class Measured:
    values: Values = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def cpu_percent(seconds: float, wall: float) -> float | None:
    return seconds / wall * 100 if wall > 0 else None


async def phase_connect(
    broker: RunningBroker,
    mon: ProcTree,
    ctxs: dict[str, ssl.SSLContext],
    ids: list[str],
    p: Plan,
    level: int = 4,
) -> Values:
    # warm-up, not timed: the first connections pay for lazy imports and cold caches
    warm = await asyncio.wait_for(
        connect_many(
            broker.port,
            ctxs,
            ids[: p.concurrency],
            p.concurrency,
            keep=False,
            timeout=p.op_timeout,
            level=level,
        ),
        p.deadline,
    )
    if warm.errors:
        raise PhaseError("warm-up", warm.errors, len(warm.latencies))
    window = Window(mon)
    run = await asyncio.wait_for(
        connect_many(
            broker.port, ctxs, ids, p.concurrency, keep=False, timeout=p.op_timeout, level=level
        ),
        p.deadline,
    )
    window.close()
    wall, cpu = window.wall, window.broker
    ok = len(run.latencies)
    if run.errors:
        raise PhaseError("connect", run.errors, ok)
    p50, p99 = percentile(run.latencies, 50), percentile(run.latencies, 99)
    suffix = "_v5" if level == 5 else ""
    return {
        f"connects_per_s{suffix}": ok / wall,
        f"connect_p50_ms{suffix}": p50 * 1e3 if p50 is not None else None,
        f"connect_p99_ms{suffix}": p99 * 1e3 if p99 is not None else None,
        f"cpu_ms_per_connect{suffix}": cpu / ok * 1e3 if ok else None,
        f"cpu_busy_connect{suffix}": cpu_percent(cpu, wall),
        f"other_connect{suffix}": cpu_percent(window.other, wall),
        f"loadgen_connect{suffix}": cpu_percent(window.own, wall),
    }


class PhaseError(Exception):
    """Some clients failed; the figures of that phase are not comparable."""

    def __init__(self, phase: str, errors: collections.Counter[str], ok: int) -> None:
        self.phase, self.errors, self.ok = phase, errors, ok
        detail = "; ".join(f"{n}x {what}" for what, n in errors.most_common(4))
        super().__init__(f"{phase}: {sum(errors.values())} failed, {ok} ok: {detail}")


async def phase_hold(
    broker: RunningBroker, mon: ProcTree, ctxs: dict[str, ssl.SSLContext], ids: list[str], p: Plan
) -> Values:
    await asyncio.sleep(1.0)  # let the broker finish the disconnects of the connect phase
    before = mon.rss_kib()
    run = await asyncio.wait_for(
        connect_many(broker.port, ctxs, ids, p.concurrency, keep=True, timeout=p.op_timeout),
        p.deadline,
    )
    try:
        await asyncio.sleep(1.0)
        held = mon.rss_kib()
    finally:
        await asyncio.wait_for(
            asyncio.gather(*(c.close() for c in run.conns), return_exceptions=True), p.deadline
        )
    if run.errors:
        raise PhaseError("hold", run.errors, len(run.conns))
    return {
        "rss_after_connect_mb": before / 1024,
        "rss_held_mb": held / 1024,
        "kib_per_client": (held - before) / len(run.conns) if run.conns else None,
    }


def idle_deadline(p: Plan) -> float:
    """Connecting --idle-clients takes a while: allow 20 ms per client beyond the deadline."""
    return p.deadline + 0.02 * p.idle_clients


async def phase_idle(
    broker: RunningBroker, mon: ProcTree, ctxs: dict[str, ssl.SSLContext], ids: list[str], p: Plan
) -> Values:
    """On a fresh broker: --idle-clients connect and stay; RSS with them, CPU while they idle."""
    before = mon.rss_kib()
    connecting = Window(mon)
    run = await asyncio.wait_for(
        connect_many(
            broker.port,
            ctxs,
            ids[: p.idle_clients],
            p.concurrency,
            keep=True,
            timeout=p.op_timeout,
        ),
        idle_deadline(p),
    )
    connecting.close()
    ok = len(run.conns)
    try:
        if run.errors:
            raise PhaseError("idle", run.errors, ok)
        log(f"    {ok} idle clients connected in {connecting.wall:.1f} s")
        await asyncio.sleep(2.0)  # the last handshakes' garbage is gone, the sessions are set up
        window = Window(mon)
        await asyncio.sleep(5.0)
        window.close()
        held = mon.rss_kib()
    finally:
        for conn in run.conns:  # the broker is stopped next: no need for a graceful goodbye
            conn.writer.transport.abort()
    return {
        "idle_connects_per_s": ok / connecting.wall,
        "idle_cpu_ms_per_connect": connecting.broker / ok * 1e3,
        "idle_loadgen_connect": cpu_percent(connecting.own, connecting.wall),
        "idle_busy_connect": cpu_percent(connecting.broker, connecting.wall),  # for the notes
        "idle_other_connect": cpu_percent(connecting.other, connecting.wall),
        "idle_rss_before_mb": before / 1024,
        "idle_rss_held_mb": held / 1024,
        "idle_kib_per_client": (held - before) / ok,
        "idle_cpu_busy": cpu_percent(window.broker, window.wall),
    }


class SinkCounter:
    """Reads the sink's socket and counts PUBLISH packets as they arrive.

    With ``ack``, every QoS 1 PUBLISH is acknowledged: the PUBACKs of one read go out in one write.
    """

    def __init__(self, conn: Conn, expected: int, *, ack: bool = False) -> None:
        self.conn, self.expected, self.ack = conn, expected, ack
        self.received = 0
        self.last_at = 0.0
        self.done = asyncio.Event()

    async def run(self) -> None:
        buf = bytearray()
        reader, writer = self.conn.reader, self.conn.writer
        while True:
            data = await reader.read(65536)
            if not data:
                return
            buf += data
            if self.ack:
                acks = bytearray()
                count, used = count_packets(buf, PUBLISH, acks)
                if acks:
                    writer.write(acks)
            else:
                count, used = count_packets(buf, PUBLISH)
            del buf[:used]
            if count:
                self.received += count
                self.last_at = perf()
                if self.received >= self.expected:
                    self.done.set()

    async def settle(self, window: Window, deadline: float, stall: float) -> Snapshot | None:
        """Wait for everything, or until nothing arrived for ``stall`` seconds.

        Returns None if everything arrived, else a snapshot of ``window`` taken within 0.1 s
        after the last delivery: the end of the measurement, without the ``stall`` wait.
        """
        last_n, last_change, last_snap = -1, perf(), None
        while not self.done.is_set() and perf() - window.t0 < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), 0.1)
            if self.received != last_n:
                last_n, last_change, last_snap = self.received, perf(), window.snapshot()
            elif perf() - last_change > stall:
                break
        return None if self.done.is_set() else last_snap


async def publish_burst(
    conn: Conn, topic: str, payload: bytes, count: int, level: int = 4, alias: bool = False
) -> None:
    """QoS 0 as fast as the broker reads: write, and wait for the socket every 64 packets."""
    packet = publish_qos0_packet(topic, payload)
    if level == 5:
        later_topic, first_props, props = v5_publish_parts(topic, alias)
        conn.writer.write(publish_qos0_packet(topic, first_props + payload))
        count -= 1
        packet = publish_qos0_packet(later_topic, props + payload)
    for k in range(count):
        conn.writer.write(packet)
        if k & 63 == 63:
            await conn.writer.drain()
    await conn.writer.drain()


async def publish_window(conn: Conn, topic: str, payload: bytes, count: int, window: int) -> None:
    """QoS 1 with at most ``window`` PUBLISHes unacknowledged; returns once all are PUBACKed."""
    head = publish_qos1_head(topic, len(payload))
    sent = acked = 0
    more = asyncio.Event()

    async def read_acks() -> None:
        nonlocal acked
        buf = bytearray()
        try:
            while acked < count:
                data = await conn.reader.read(65536)
                if not data:
                    raise asyncio.IncompleteReadError(bytes(buf), None)
                buf += data
                n, used = count_packets(buf, PUBACK)
                del buf[:used]
                if n:
                    acked += n
                    more.set()
        finally:
            more.set()  # the writer must not wait for a reader that is gone

    reader = asyncio.ensure_future(read_acks())
    try:
        while sent < count:
            room = min(window - (sent - acked), count - sent)
            if room <= 0:
                if reader.done():
                    reader.result()  # raises what ended it
                    msg = f"{acked} PUBACKs for {sent} QoS 1 PUBLISHes"
                    raise BenchError(msg)
                more.clear()
                await more.wait()
                continue
            # packet ids 1..65535, unique among the (at most window < 65535) unacknowledged
            conn.writer.write(
                b"".join(
                    head + ((sent + k) % 65535 + 1).to_bytes(2, "big") + payload
                    for k in range(room)
                )
            )
            sent += room
            await conn.writer.drain()
        await reader
    finally:
        reader.cancel()


async def subscribe_sink(conn: Conn, qos: int, timeout: float, level: int = 4) -> None:
    conn.writer.write(subscribe_packet(1, SINK_FILTER, qos, level))
    kind, body = await asyncio.wait_for(read_packet(conn.reader), timeout)
    if kind >> 4 != 9 or body[-1] != qos:
        msg = f"SUBSCRIBE {SINK_FILTER} QoS {qos} answered {kind:#x} {body.hex()}"
        raise BenchError(msg)


async def phase_pubsub(
    broker: RunningBroker,
    mon: ProcTree,
    ctxs: dict[str, ssl.SSLContext],
    sink_ctx: ssl.SSLContext,
    ids: list[str],
    p: Plan,
    run: PubSubRun,
) -> Values:
    payload = (b"0123456789abcdef" * (p.payload // 16 + 1))[: p.payload]
    await asyncio.sleep(0.5)  # the previous phase's disconnects are done
    level = run.level
    sink = await mqtt_connect(
        broker.port, sink_ctx, SINK, p.op_timeout, level, clean=not run.persistent_sink
    )
    publishers: list[tuple[str, Conn]] = []
    try:
        await subscribe_sink(sink, run.qos, p.op_timeout, level)
        for device in ids[: run.publishers]:
            conn = await mqtt_connect(broker.port, ctxs[device], device, p.op_timeout, level)
            publishers.append((device, conn))
        counter = SinkCounter(sink, run.expected, ack=run.qos == 1)
        reader_task = asyncio.ensure_future(counter.run())
        await asyncio.sleep(0.3)
        window = Window(mon)
        try:
            if run.qos == 0:
                sends = [
                    publish_burst(
                        c,
                        f"devices/{d}/telemetry/t",
                        payload,
                        run.per_publisher,
                        level,
                        run.alias,
                    )
                    for d, c in publishers
                ]
            else:
                # MQTT 5 without properties: the property length (0) leads the payload
                body = b"\x00" + payload if level == 5 else payload
                sends = [
                    publish_window(
                        c, f"devices/{d}/telemetry/t", body, run.per_publisher, p.qos1_window
                    )
                    for d, c in publishers
                ]
            await asyncio.wait_for(asyncio.gather(*sends), p.deadline)
            window.close(await counter.settle(window, p.deadline, p.stall))
        finally:
            reader_task.cancel()
        cpu = window.broker
        received = counter.received
        span = (counter.last_at or perf()) - window.t0
        k = run.key
        return {
            f"{k}_msgs_per_s": received / span if received else 0.0,
            f"{k}_loss": float(run.expected - received),
            f"{k}_cpu_us_per_msg": cpu / received * 1e6 if received else None,
            f"{k}_cpu_busy": cpu_percent(cpu, span),
            f"{k}_other": cpu_percent(window.other, window.wall),
            f"{k}_loadgen": cpu_percent(window.own, window.wall),
        }
    finally:
        await asyncio.gather(
            sink.close(), *(c.close() for _, c in publishers), return_exceptions=True
        )


async def scrape_metrics(port: int, timeout: float = 5.0) -> dict[str, float]:
    """Our broker's Prometheus counters (GET /metrics over a plain socket)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    text = (await asyncio.wait_for(reader.read(), timeout)).decode(errors="replace")
    writer.close()
    out: dict[str, float] = {}
    for line in text.split("\r\n\r\n", 1)[-1].splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def audit_summary(path: Path) -> str:
    events: collections.Counter[str] = collections.Counter()
    with contextlib.suppress(OSError), path.open() as handle:
        for line in handle:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            key = event.get("event", "?")
            if key in ("refuse", "kick", "deny"):
                key = f"{key}:{event.get('reason') or event.get('action')}"
            events[key] += 1
    return ", ".join(f"{k} {n}" for k, n in sorted(events.items())) or "no audit lines"


PhaseRun = Callable[[], Coroutine[None, None, Values]]


async def run_phases(
    broker: RunningBroker, mon: ProcTree, phases: list[tuple[str, PhaseRun]], result: Measured
) -> None:
    """Run ``phases`` in order; a failed one leaves a note and the next one still runs."""
    for phase, run in phases:
        if broker.proc.poll() is not None:
            result.notes.append(f"{phase}: broker exited with status {broker.proc.returncode}")
            break
        log(f"    {phase} ...")
        try:
            result.values.update(await run())
        except PhaseError as exc:
            result.notes.append(str(exc))
        except (
            BenchError,
            OSError,
            TimeoutError,
            ssl.SSLError,
            ConnectRefusedError,
            asyncio.IncompleteReadError,
        ) as exc:
            result.notes.append(f"{phase}: {describe(exc)}")
    if broker.metrics_port is not None and broker.proc.poll() is None:
        try:
            counters = await scrape_metrics(broker.metrics_port)
        except (OSError, TimeoutError) as exc:
            result.notes.append(f"metrics: {describe(exc)}")
        else:
            interesting = {
                k: v
                for k, v in counters.items()
                if v
                and k.startswith(
                    (
                        "iotauth_broker_refusals_total",
                        "iotauth_broker_kicks_total",
                        "iotauth_broker_acl_denials_total",
                        "iotauth_broker_outbound_dropped_total",
                        "iotauth_broker_messages_",
                    )
                )
            }
            if interesting:
                result.notes.append(
                    "metrics: " + ", ".join(f"{k} {v:g}" for k, v in sorted(interesting.items()))
                )


async def measure(broker: RunningBroker, fleet: Fleet, plan: Plan) -> Measured:
    """The phases of ``plan`` but idle, on one broker."""
    mon = ProcTree(broker.pid)
    ctxs, ids = fleet.ctxs, fleet.ids
    result = Measured()
    await asyncio.sleep(1.0)
    result.values["rss_idle_mb"] = mon.rss_kib() / 1024
    phases: list[tuple[str, PhaseRun]] = []
    if "connect" in plan.phases:
        phases.append(
            ("connect", lambda: phase_connect(broker, mon, ctxs, ids[: plan.clients], plan))
        )
    v5 = broker.name != "amqtt"  # amqtt 0.12.1 speaks no MQTT 5
    if "connect5" in plan.phases and v5:
        phases.append(
            (
                "connect (MQTT 5)",
                lambda: phase_connect(broker, mon, ctxs, ids[: plan.clients], plan, level=5),
            )
        )
    if "hold" in plan.phases:
        phases.append(("hold", lambda: phase_hold(broker, mon, ctxs, ids[: plan.clients], plan)))
    for run in plan.runs():
        if run.level == 5 and not v5:
            continue
        phases.append(
            (
                run.title,
                functools.partial(phase_pubsub, broker, mon, ctxs, fleet.sink_ctx, ids, plan, run),
            )
        )
    await run_phases(broker, mon, phases, result)
    return result


async def measure_idle(broker: RunningBroker, fleet: Fleet, plan: Plan) -> Measured:
    """The idle phase, on a broker of its own."""
    mon = ProcTree(broker.pid)
    result = Measured()
    await asyncio.sleep(1.0)
    phases: list[tuple[str, PhaseRun]] = [
        ("idle", lambda: phase_idle(broker, mon, fleet.ctxs, fleet.ids, plan))
    ]
    await run_phases(broker, mon, phases, result)
    return result


# -- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: str  # "higher", "lower" or "" (context only)
    digits: int
    ratio: bool = True


def metrics_for(p: Plan) -> list[Metric]:
    n, c = p.clients, p.concurrency
    out: list[Metric] = []
    if "connect" in p.phases:
        out += [
            Metric("connects_per_s", f"mTLS connects/s ({n} clients, {c} in flight)", "higher", 0),
            Metric("connect_p50_ms", "connect latency p50 (ms, to CONNACK)", "lower", 1),
            Metric("connect_p99_ms", "connect latency p99 (ms)", "lower", 1),
            Metric("cpu_ms_per_connect", "broker CPU per connect (ms)", "lower", 2),
            Metric("cpu_busy_connect", "broker CPU busy during connects (%)", "", 0, ratio=False),
            Metric("other_connect", "other processes' CPU during connects (%)", "", 0, ratio=False),
            Metric("loadgen_connect", "load generator CPU during connects (%)", "", 0, ratio=False),
        ]
    if "connect5" in p.phases:
        out += [
            Metric(
                "connects_per_s_v5", f"MQTT 5: mTLS connects/s ({n}, {c} in flight)", "higher", 0
            ),
            Metric("connect_p50_ms_v5", "MQTT 5: connect latency p50 (ms)", "lower", 1),
            Metric("connect_p99_ms_v5", "MQTT 5: connect latency p99 (ms)", "lower", 1),
            Metric("cpu_ms_per_connect_v5", "MQTT 5: broker CPU per connect (ms)", "lower", 2),
        ]
    if p.main_phases:
        out.append(Metric("rss_idle_mb", "broker RSS idle, fresh (MB)", "lower", 1))
    if "hold" in p.phases:
        before = f"after the {n} connects" if "connect" in p.phases else "before the hold phase"
        out += [
            Metric("rss_after_connect_mb", f"broker RSS {before} (MB)", "lower", 1),
            Metric("rss_held_mb", f"broker RSS with {n} clients connected (MB)", "lower", 1),
            Metric("kib_per_client", "RSS per connected client (KiB, held - before)", "lower", 1),
        ]
    for run in p.runs():
        k, t = run.key, run.title
        how = f"{run.publishers} x {run.per_publisher}, {p.payload} B"
        if run.qos == 1:
            how += f", window {p.qos1_window}"
        out += [
            Metric(f"{k}_msgs_per_s", f"{t}: delivered msgs/s ({how})", "higher", 0),
            Metric(f"{k}_loss", f"{t}: messages lost (of {run.expected})", "lower", 0, ratio=False),
            Metric(f"{k}_cpu_us_per_msg", f"{t}: broker CPU per delivered msg (us)", "lower", 1),
            Metric(f"{k}_cpu_busy", f"{t}: broker CPU busy (%)", "", 0, ratio=False),
            Metric(f"{k}_other", f"{t}: other processes' CPU (%)", "", 0, ratio=False),
            Metric(f"{k}_loadgen", f"{t}: load generator CPU (%)", "", 0, ratio=False),
        ]
    if "idle" in p.phases:
        m = p.idle_clients
        out += [
            Metric("idle_connects_per_s", f"idle: mTLS connects/s while {m} connect", "higher", 0),
            Metric("idle_cpu_ms_per_connect", "idle: broker CPU per connect (ms)", "lower", 2),
            Metric(
                "idle_loadgen_connect",
                "idle: load generator CPU while they connect (%)",
                "",
                0,
                ratio=False,
            ),
            Metric("idle_rss_before_mb", "idle: fresh broker RSS before them (MB)", "lower", 1),
            Metric(
                "idle_rss_held_mb", f"idle: broker RSS with {m} clients connected (MB)", "lower", 1
            ),
            Metric("idle_kib_per_client", "idle: RSS per connected client (KiB)", "lower", 1),
            Metric(
                "idle_cpu_busy",
                f"idle: broker CPU while {m} clients idle (%)",
                "lower",
                1,
                ratio=False,
            ),
        ]
    return out


def fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(ours: Sequence[float | None], ref: Sequence[float | None]) -> float | None:
    """Median of the ratios taken within each round."""
    per_round = [a / b for a, b in zip(ours, ref, strict=True) if a is not None and b]
    return statistics.median(per_round) if per_round else None


def tool_versions(mosquitto: str) -> str:
    parts = [f"Python {platform.python_version()}", ssl.OPENSSL_VERSION]
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        parts.append(f"amqtt {version('amqtt')}")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [mosquitto, "-h"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        parts.append(out.splitlines()[0].strip() if out else "mosquitto ?")
    return ", ".join(parts)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


NAMES = {"iotauth": "iotauth", "amqtt": "plain amqtt", "mosquitto": "mosquitto"}


@dataclass(frozen=True)
class RunInfo:
    rounds: int
    pinned: bool
    versions: str
    elapsed: float
    mosquitto_max_queued: int | None
    nofile: int  # RLIMIT_NOFILE of this process and the brokers
    iotauth_limits: dict[str, int]  # the defaults
    iotauth_idle_max_connections: int | None  # raised for the idle phase; None: the default


def _cpu_notes(b: str, results: list[Measured], plan: Plan) -> list[str]:
    # (figures: broker busy, other processes, load generator; what; unaffected figure; QoS 1)
    checks: list[tuple[tuple[str, str, str], str, str, bool]] = []
    if "connect" in plan.phases:
        keys = ("cpu_busy_connect", "other_connect", "loadgen_connect")
        checks.append((keys, "connects", "CPU per connect", False))
    for run in plan.runs():
        keys = (f"{run.key}_cpu_busy", f"{run.key}_other", f"{run.key}_loadgen")
        checks.append((keys, run.title, "CPU per message", run.qos == 1))
    if "idle" in plan.phases:
        keys = ("idle_busy_connect", "idle_other_connect", "idle_loadgen_connect")
        checks.append((keys, "idle phase connects", "CPU per connect", False))
    notes = []
    for keys, what, per, qos1 in checks:
        for k, r in enumerate(results):
            busy = r.values.get(keys[0])
            other, gen = r.values.get(keys[1]) or 0.0, r.values.get(keys[2]) or 0.0
            if busy is None:
                continue
            where = f"- {NAMES[b]}, round {k + 1}, {what}:"
            if busy < 80:
                if other >= 20:
                    why = f"other processes on the machine used {other:.0f} % of a core"
                elif gen >= 85:
                    why = f"the load generator (one core) was {gen:.0f} % busy and the limit"
                elif qos1:
                    why = (
                        f"nor was the load generator ({gen:.0f} %): the QoS 1 round trips "
                        "(PUBACKs to the publishers' window, and from the sink) set the pace"
                    )
                else:
                    why = f"nor was the load generator ({gen:.0f} %): round trips set the pace"
                notes.append(
                    f"{where} the broker was only {busy:.0f} % busy ({why}), so that round's "
                    f"wall-clock figures understate it; {per} is not affected."
                )
            elif gen >= 85:
                notes.append(
                    f"{where} the load generator (one core) was {gen:.0f} % busy next to the "
                    f"broker's {busy:.0f} %: the rate is about what this client can drive, so "
                    f"the broker may do more; {per} is not affected."
                )
    return notes


def explain(
    brokers: list[str], results: dict[str, list[Measured]], info: RunInfo, plan: Plan
) -> list[str]:
    """Say what limits a figure when the table alone would mislead."""
    notes = []
    for b in brokers:
        notes += _cpu_notes(b, results[b], plan)
        lossy = [
            run for run in plan.runs() if any(r.values.get(f"{run.key}_loss") for r in results[b])
        ]
        if not lossy:
            continue
        lost_in = ", ".join(run.title for run in lossy)
        qos1 = [run for run in lossy if run.qos == 1]
        offered = (
            " QoS 1: the broker acknowledges a PUBLISH as soon as it has it, so the publishers' "
            "windows do not hold them back; when they offer more than the broker delivers to "
            "the one subscriber, that subscriber's queue fills."
            if qos1
            else ""
        )
        if b == "mosquitto":
            queued = info.mosquitto_max_queued
            notes.append(
                f"- mosquitto lost messages ({lost_in}): it drops QoS 0 and QoS 1 messages for a "
                "subscriber that already has max_queued_messages "
                f"({'1000, the default' if queued is None else queued}) queued."
                + (
                    " QoS 0: the sink (one asyncio loop on CPU 1, next to the publishers) reads "
                    "slower than mosquitto sends."
                    if len(qos1) < len(lossy)
                    else ""
                )
                + (
                    " QoS 1: mosquitto PUBACKs a publisher as soon as it has the message, so the "
                    "publishers' windows do not bound that queue, while it sends the sink at most "
                    "20 unacknowledged messages (max_inflight_messages), one round trip per 20."
                    if qos1
                    else ""
                )
                + " `--mosquitto-max-queued 0` removes the cap."
            )
        elif b == "iotauth":
            notes.append(
                f"- iotauth lost messages ({lost_in}): see iotauth_broker_outbound_dropped_total "
                "in the notes: what does not fit a subscriber's queue (max_inflight "
                "unacknowledged, then outbound_max_messages) is dropped, QoS 1 too." + offered
            )
        else:
            notes.append(f"- {NAMES[b]} lost messages ({lost_in}; amqtt has no cap).")
    return ["", *notes] if notes else []


def command_line() -> str:
    """This run's command, with the interpreter relative to the current directory if inside."""
    argv = list(sys.orig_argv)
    with contextlib.suppress(ValueError):
        argv[0] = str(Path(argv[0]).absolute().relative_to(Path.cwd()))
    return shlex.join(argv)


def settings_text(plan: Plan, brokers: list[str], info: RunInfo) -> str:
    queued = info.mosquitto_max_queued
    parts = {
        "mosquitto": "mosquitto: "
        + (
            "max_queued_messages 1000 by default"
            if queued is None
            else f"max_queued_messages {queued}"
        )
        + ", max_inflight_messages 20 by default, max_connections -1 (no limit)",
        "amqtt": "plain amqtt: max_connections -1 (no limit)",
        "iotauth": "iotauth: "
        + ", ".join(f"{k} {v:,}" for k, v in info.iotauth_limits.items())
        + " (its defaults)",
    }
    raised = info.iotauth_idle_max_connections
    if "idle" in plan.phases and raised is not None:
        parts["iotauth"] += (
            f", max_connections {raised:,} in the idle phase (the default does not leave room "
            f"for {plan.idle_clients:,} devices and the renewal service's own connection; "
            "`iotauth broker run` has no option for it, the bench replaces the default Limits)"
        )
    text = "; ".join(parts[b] for b in brokers)
    text += f". RLIMIT_NOFILE {info.nofile:,} for the clients and the brokers."
    if "qos1" in plan.phases:
        text += (
            f" QoS 1: each publisher keeps at most {plan.qos1_window} PUBLISHes unacknowledged; "
            "the sink PUBACKs every delivery, all of one read in one write."
        )
    return text


def report(
    plan: Plan, brokers: list[str], results: dict[str, list[Measured]], info: RunInfo
) -> str:
    refs = [b for b in ("amqtt", "mosquitto") if b in brokers and "iotauth" in brokers]
    out = [
        "Command: `" + command_line() + "`",
        "",
        f"Run on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} x {cpu_model()}; "
        f"{info.versions}. "
        + (
            "Brokers pinned to CPU 0 (`taskset -c 0`), load generator on CPU 1. "
            if info.pinned
            else "Not pinned (no taskset or fewer than 2 CPUs). "
        )
        + f"Median over {info.rounds} round(s), broker order rotated per round; a ratio is the "
        "median of the ratios within each round. Broker CPU is utime + stime from "
        f"/proc/<pid>/stat ({os.sysconf('SC_CLK_TCK')} ticks/s); the load generator's is this "
        "process's own (one core: 100 % is its limit). Each broker runs with its defaults apart "
        "from the settings in bench/broker_bench.py ("
        + settings_text(plan, brokers, info)
        + f") Total time {info.elapsed:.0f} s.",
        "",
        "| metric | better | "
        + " | ".join(NAMES[b] for b in brokers)
        + "".join(f" | iotauth / {NAMES[r]}" for r in refs)
        + " |",
        "|---|---|" + "---:|" * (len(brokers) + len(refs)),
    ]
    for m in metrics_for(plan):
        series = {b: [r.values.get(m.key) for r in results[b]] for b in brokers}
        cells = [fmt(median(series[b]), m.digits) for b in brokers]
        for ref in refs:
            value = ratio(series["iotauth"], series[ref]) if m.ratio else None
            cells.append(f"{value:.2f}x" if value is not None else "-")
        out.append(f"| {m.label} | {m.better or '-'} | " + " | ".join(cells) + " |")
    out += explain(brokers, results, info, plan)
    out += ["", "Per round (broker, metric: median [round 1, round 2, ...]):", ""]
    out += ["| broker | metric | median | rounds |", "|---|---|---:|---|"]
    for b in brokers:
        for m in metrics_for(plan):
            values = [r.values.get(m.key) for r in results[b]]
            rounds_text = ", ".join(fmt(v, m.digits) for v in values)
            out.append(
                f"| {NAMES[b]} | {m.label} | {fmt(median(values), m.digits)} | {rounds_text} |"
            )
    notes = [
        f"- {NAMES[b]}, round {k + 1}: {note}"
        for b in brokers
        for k, r in enumerate(results[b])
        for note in r.notes
    ]
    if notes:
        out += ["", "Notes:", "", *notes]
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------------------


def build_fleet(work: Path, clients: int) -> tuple[Path, list[str], dict[str, Path], Path]:
    pki_dir, creds = work / "pki", work / "creds"
    creds.mkdir()
    ids = [f"bench-{n:05d}" for n in range(clients)]
    with PKI.init(pki_dir, trust_domain=TRUST_DOMAIN) as pki:
        dirs = {name: creds / name for name in ids}
        for start in range(0, clients, 500):
            batch = ids[start : start + 500]
            pki.issue_many(batch, out_dirs=[dirs[name] for name in batch])
        pki.issue(SINK, kind=IdentityKind.SERVICE, out=creds / SINK)
    return pki_dir, ids, dirs, creds / SINK


def client_context(cred: Path) -> ssl.SSLContext:
    from provisioning.tls import client_context_for_credentials

    return client_context_for_credentials(cred)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        msg = f"not a comma-separated list of integers: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not values:
        msg = "empty list"
        raise argparse.ArgumentTypeError(msg)
    return values


def _names(
    parser: argparse.ArgumentParser, option: str, text: str, known: Sequence[str]
) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        parser.error(f"{option}: unknown {unknown}; choose from {','.join(known)}")
    # phases run in their fixed order; brokers in the order given (rotated per round)
    return [x for x in known if x in names] if option == "--phases" else list(dict.fromkeys(names))


# file descriptors for everything but the client connections (listeners, logs, pipes, /proc)
FD_MARGIN = 200


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=500, help="devices that connect")
    parser.add_argument("--concurrency", type=int, default=50, help="connects in flight")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--brokers",
        default=",".join(BROKERS),
        help="comma-separated subset of " + ",".join(BROKERS) + " (default: all, in this order)",
    )
    parser.add_argument(
        "--phases",
        default=",".join(p for p in PHASES if p != "idle"),
        help="comma-separated subset of "
        + ",".join(PHASES)
        + " (default: all but idle; --idle-clients adds idle); they run in this order",
    )
    parser.add_argument(
        "--publishers",
        type=_int_list,
        default=(20, 1),
        help="pub/sub runs: comma-separated publisher counts, one run each (default: 20,1)",
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=40000,
        help="messages per pub/sub run, shared by its publishers (default: 40000)",
    )
    parser.add_argument("--payload", type=int, default=100, help="bytes per message")
    parser.add_argument(
        "--qos1-window",
        type=int,
        default=100,
        help="QoS 1: PUBLISHes a publisher keeps unacknowledged at most (default: 100)",
    )
    parser.add_argument(
        "--idle-clients",
        type=int,
        default=0,
        help="idle phase: devices that connect and stay connected on a fresh broker (default: "
        "0, no idle phase; the issue's figure is 10000)",
    )
    parser.add_argument("--mosquitto", default="/usr/sbin/mosquitto", help="mosquitto binary")
    parser.add_argument(
        "--mosquitto-max-queued",
        type=int,
        help="set mosquitto's max_queued_messages (default: not set, i.e. 1000; 0: no limit)",
    )
    parser.add_argument("--deadline", type=float, default=90.0, help="seconds per phase")
    parser.add_argument(
        "--stall",
        type=float,
        default=3.0,
        help="pub/sub: give up after this long without a delivery",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin to CPUs")
    parser.add_argument("--keep", type=Path, help="keep the PKI, configs and logs in this dir")
    args = parser.parse_args(argv)
    args.broker_list = _names(parser, "--brokers", args.brokers, BROKERS)
    args.publishers = tuple(dict.fromkeys(args.publishers))  # one run per distinct count
    phases = _names(parser, "--phases", args.phases, PHASES)
    if args.idle_clients < 0:
        parser.error("--idle-clients must not be negative")
    if args.idle_clients and "idle" not in phases:
        phases.append("idle")
    if "idle" in phases and not args.idle_clients:
        parser.error("the idle phase needs --idle-clients N")
    args.phase_list = phases
    if args.clients < 1 or args.concurrency < 1 or args.rounds < 1 or args.qos1_window < 1:
        parser.error("--clients, --concurrency, --rounds and --qos1-window must be at least 1")
    if args.qos1_window >= 65535:
        parser.error("--qos1-window must be below 65535 (MQTT packet ids)")
    if any(not 1 <= n <= args.clients for n in args.publishers):
        parser.error("every --publishers count must be between 1 and --clients")
    if any(args.messages < n for n in args.publishers):
        parser.error("--messages must be at least the largest --publishers count")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max(args.clients, args.idle_clients) + FD_MARGIN
    if hard != resource.RLIM_INFINITY and needed > hard:
        parser.error(
            f"{needed} file descriptors needed, the hard RLIMIT_NOFILE is {hard}: raise it "
            "(ulimit -Hn, limits.conf) or use fewer clients"
        )
    return args


Starter = Callable[[Path, Path, int | None], RunningBroker]


@dataclass(frozen=True)
class Fleet:
    pki_dir: Path
    ids: list[str]
    ctxs: dict[str, ssl.SSLContext]
    sink_ctx: ssl.SSLContext


def run_broker(
    name: str,
    start: Starter,
    fleet: Fleet,
    workdir: Path,
    cpu: int | None,
    measure_with: Callable[[RunningBroker], Coroutine[None, None, Measured]],
) -> Measured:
    """Start one broker, measure it, stop it (also on an error or an interrupt)."""
    t0 = perf()
    try:
        broker = start(fleet.pki_dir, workdir, cpu)
    except BenchError as exc:
        log(f"  could not start: {exc}")
        return Measured(notes=[f"start: {exc}"])
    try:
        measured = asyncio.run(measure_with(broker))
    finally:
        broker.stop()
    if broker.audit_path is not None:
        measured.notes.append("audit: " + audit_summary(broker.audit_path))
    shown = ", ".join(f"{k}={v:.4g}" for k, v in measured.values.items() if v is not None)
    log(f"  {name}: {perf() - t0:.1f} s: {shown}")
    for note in measured.notes:
        log(f"  note: {note}")
    return measured


def run_one(
    name: str,
    starters: tuple[Starter, Starter],
    fleet: Fleet,
    workdir: Path,
    cpu: int | None,
    plan: Plan,
) -> Measured:
    """The phases of ``plan`` on one broker; the idle phase on a second, fresh one."""
    result = Measured()
    if plan.main_phases:
        main_dir = workdir / "main"
        main_dir.mkdir()
        result = run_broker(
            name, starters[0], fleet, main_dir, cpu, lambda b: measure(b, fleet, plan)
        )
    if "idle" in plan.phases:
        idle_dir = workdir / "idle"
        idle_dir.mkdir()
        idle = run_broker(
            f"{name} (idle)",
            starters[1],
            fleet,
            idle_dir,
            cpu,
            lambda b: measure_idle(b, fleet, plan),
        )
        result.values.update(idle.values)
        result.notes += [f"idle broker: {note}" for note in idle.notes]
    return result


def make_fleet(work: Path, clients: int) -> Fleet:
    t0 = perf()
    pki_dir, ids, dirs, sink_dir = build_fleet(work, clients)
    log(f"PKI with {len(ids)} devices + '{SINK}' in {perf() - t0:.1f} s: {pki_dir}")
    t0 = perf()
    ctxs = {name: client_context(dirs[name]) for name in ids}
    log(f"{len(ctxs)} client TLS contexts in {perf() - t0:.1f} s")
    return Fleet(pki_dir, ids, ctxs, client_context(sink_dir))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the brokers inherit it
    pinned = (
        not args.no_pin
        and (os.cpu_count() or 1) >= 2
        and shutil.which("taskset") is not None
        and hasattr(os, "sched_setaffinity")
    )
    if pinned:
        os.sched_setaffinity(0, {1})
    plan = Plan(
        phases=tuple(args.phase_list),
        clients=args.clients,
        concurrency=args.concurrency,
        publishers=args.publishers,
        messages=args.messages,
        payload=args.payload,
        qos1_window=args.qos1_window,
        idle_clients=args.idle_clients,
        deadline=args.deadline,
        stall=args.stall,
        op_timeout=15.0,
    )
    limits = iotauth_limits() if "iotauth" in args.broker_list else {}
    # + 1: the renewal service in the broker process holds a connection of its own
    raised = (
        "iotauth" in args.broker_list
        and "idle" in plan.phases
        and args.idle_clients + 1 > limits.get("max_connections", 0)
    )
    idle_limit = args.idle_clients + FD_MARGIN if raised else None

    def mosquitto(pki: Path, wd: Path, cpu: int | None) -> RunningBroker:
        return start_mosquitto(pki, wd, cpu, args.mosquitto, args.mosquitto_max_queued)

    def iotauth_idle(pki: Path, wd: Path, cpu: int | None) -> RunningBroker:
        return start_iotauth(pki, wd, cpu, idle_limit)

    starters: dict[str, tuple[Starter, Starter]] = {
        "iotauth": (start_iotauth, iotauth_idle),
        "amqtt": (start_amqtt, start_amqtt),
        "mosquitto": (mosquitto, mosquitto),
    }
    brokers: list[str] = args.broker_list
    results: dict[str, list[Measured]] = {b: [] for b in brokers}
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="broker-bench-", dir=args.keep))
    started = perf()
    try:
        fleet = make_fleet(work, max(args.clients, args.idle_clients))
        for rnd in range(args.rounds):
            shift = rnd % len(brokers)
            for name in brokers[shift:] + brokers[:shift]:
                log(f"round {rnd + 1}/{args.rounds}: {name} ...")
                workdir = work / f"round{rnd + 1}-{name}"
                workdir.mkdir()
                cpu = 0 if pinned else None
                results[name].append(run_one(name, starters[name], fleet, workdir, cpu, plan))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if args.keep:
            log(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    info = RunInfo(
        rounds=args.rounds,
        pinned=pinned,
        versions=tool_versions(args.mosquitto),
        elapsed=perf() - started,
        mosquitto_max_queued=args.mosquitto_max_queued,
        nofile=hard,
        iotauth_limits=limits,
        iotauth_idle_max_connections=idle_limit,
    )
    print(report(plan, brokers, results, info))
    missing = [
        f"{b} round {k + 1}: {m.key}"
        for b in brokers
        for k, r in enumerate(results[b])
        for m in metrics_for(plan)
        if r.values.get(m.key) is None
    ]
    if missing:
        log(f"incomplete, {len(missing)} figure(s) missing (see the notes): {missing[:5]}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
