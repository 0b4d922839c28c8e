"""Our broker against plain amqtt and mosquitto, same clients, same machine, same run.

    .venv/bin/python bench/broker_bench.py [--clients 500] [--concurrency 50] [--rounds 2]

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
             so a subscriber with 1000 messages queued loses further QoS 0 messages
             (``--mosquitto-max-queued`` changes that)

Per broker (the client is raw asyncio + ssl with hand-written MQTT 3.1.1 bytes, one
certificate per client, client id = the certificate's identity, full TLS handshakes):

  idle       broker RSS one second after start, before any client
  connect    after --concurrency untimed warm-up connects, --clients connect (TCP + mTLS +
             CONNECT/CONNACK) and disconnect, --concurrency in flight: connects/s, latency
             p50/p99 to CONNACK, broker CPU ms per connect (utime + stime from /proc over the
             timed window, children included)
  hold       broker RSS after the connect phase (a high-water mark: allocators keep what the
             handshakes used), then the same clients connect and stay connected: broker RSS
             with all of them, and the difference per client
  pubsub     ``sink`` subscribes to ``devices/+/telemetry/#``; --publishers devices each send
             --messages QoS 0 messages of --payload bytes to ``devices/<id>/telemetry/t`` as
             fast as the broker takes them: delivered msgs/s (first publish to last delivery),
             loss, broker CPU us per delivered message

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


def connect_packet(client_id: str, keepalive: int = 0) -> bytes:
    """CONNECT, protocol level 4, clean session, no will, no username or password."""
    body = _mqtt_str("MQTT") + b"\x04\x02" + keepalive.to_bytes(2, "big") + _mqtt_str(client_id)
    return b"\x10" + _varlen(len(body)) + body


def subscribe_packet(packet_id: int, topic_filter: str, qos: int) -> bytes:
    body = packet_id.to_bytes(2, "big") + _mqtt_str(topic_filter) + bytes([qos])
    return b"\x82" + _varlen(len(body)) + body


def publish_qos0_packet(topic: str, payload: bytes) -> bytes:
    body = _mqtt_str(topic) + payload
    return b"\x30" + _varlen(len(body)) + body


DISCONNECT = b"\xe0\x00"


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


def count_publishes(buf: bytearray) -> tuple[int, int]:
    """(PUBLISH packets complete in ``buf``, bytes they and other complete packets use)."""
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
        if buf[i] >> 4 == 3:
            count += 1
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


class Window:
    """A timed window: broker CPU, this process's CPU and everybody else's, and wall time."""

    def __init__(self, mon: ProcTree) -> None:
        self.mon = mon
        self.broker0, self.own0 = mon.cpu_s(), time.process_time()
        self.all0, self.t0 = machine_busy_s(), perf()
        self.broker = self.other = self.wall = 0.0

    def close(self) -> Window:
        self.wall = perf() - self.t0
        self.broker = self.mon.cpu_s() - self.broker0
        own = time.process_time() - self.own0
        self.other = max(0.0, machine_busy_s() - self.all0 - self.broker - own)
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


def start_iotauth(pki_dir: Path, workdir: Path, cpu: int | None) -> RunningBroker:
    exe = Path(sys.executable).with_name("iotauth")
    iotauth = str(exe) if exe.exists() else shutil.which("iotauth")
    if iotauth is None:
        msg = "iotauth: no 'iotauth' next to this Python or on PATH"
        raise BenchError(msg)
    port, metrics_port = free_port(), free_port()
    cmd = [
        *pin_prefix(cpu),
        iotauth,
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
    pki_dir: Path, port: int, workdir: Path, max_queued: int | None = None
) -> Path:
    acl = workdir / "mosquitto.acl"
    acl.write_text(MOSQUITTO_ACL)
    lines = [
        # as root mosquitto would switch to user 'mosquitto', which cannot read the 0600 key
        *(["user root"] if os.geteuid() == 0 else []),
        "per_listener_settings false",
        "persistence false",
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
) -> RunningBroker:
    if not Path(binary).exists():
        msg = f"mosquitto: {binary} not found (apt-get install mosquitto)"
        raise BenchError(msg)
    port = free_port()
    conf = mosquitto_config(pki_dir, port, workdir, max_queued)
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


async def mqtt_connect(port: int, ctx: ssl.SSLContext, client_id: str, timeout: float) -> Conn:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(HOST, port, ssl=ctx, ssl_handshake_timeout=timeout), timeout
    )
    writer.write(connect_packet(client_id))
    try:
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
) -> ConnectRun:
    """Every id connects once with its own certificate; ``concurrency`` at a time."""
    run = ConnectRun()
    gate = asyncio.Semaphore(concurrency)

    async def one(client_id: str) -> None:
        async with gate:
            t0 = perf()
            try:
                conn = await mqtt_connect(port, ctxs[client_id], client_id, timeout)
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
    clients: int
    concurrency: int
    publishers: int
    messages: int
    payload: int
    deadline: float
    idle: float
    op_timeout: float


@dataclass
class Measured:
    values: Values = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


async def phase_connect(
    broker: RunningBroker, mon: ProcTree, ctxs: dict[str, ssl.SSLContext], ids: list[str], p: Plan
) -> Values:
    # warm-up, not timed: the first connections pay for lazy imports and cold caches
    warm = await asyncio.wait_for(
        connect_many(
            broker.port, ctxs, ids[: p.concurrency], p.concurrency, keep=False, timeout=p.op_timeout
        ),
        p.deadline,
    )
    if warm.errors:
        raise PhaseError("warm-up", warm.errors, len(warm.latencies))
    window = Window(mon)
    run = await asyncio.wait_for(
        connect_many(broker.port, ctxs, ids, p.concurrency, keep=False, timeout=p.op_timeout),
        p.deadline,
    )
    window.close()
    wall, cpu = window.wall, window.broker
    ok = len(run.latencies)
    if run.errors:
        raise PhaseError("connect", run.errors, ok)
    p50, p99 = percentile(run.latencies, 50), percentile(run.latencies, 99)
    return {
        "connects_per_s": ok / wall,
        "connect_p50_ms": p50 * 1e3 if p50 is not None else None,
        "connect_p99_ms": p99 * 1e3 if p99 is not None else None,
        "cpu_ms_per_connect": cpu / ok * 1e3 if ok else None,
        "cpu_busy_connect": cpu / wall * 100,
        "other_connect": window.other / wall * 100,
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


class SinkCounter:
    """Reads the sink's socket and counts PUBLISH packets as they arrive."""

    def __init__(self, conn: Conn, expected: int) -> None:
        self.conn, self.expected = conn, expected
        self.received = 0
        self.last_at = 0.0
        self.done = asyncio.Event()

    async def run(self) -> None:
        buf = bytearray()
        while True:
            data = await self.conn.reader.read(65536)
            if not data:
                return
            buf += data
            count, used = count_publishes(buf)
            del buf[:used]
            if count:
                self.received += count
                self.last_at = perf()
                if self.received >= self.expected:
                    self.done.set()

    async def settle(self, started: float, deadline: float, idle: float) -> None:
        """Wait for everything, or until nothing arrived for ``idle`` seconds."""
        last_n, last_change = -1, perf()
        while not self.done.is_set() and perf() - started < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), 0.1)
            if self.received != last_n:
                last_n, last_change = self.received, perf()
            elif perf() - last_change > idle:
                return


async def publish_burst(conn: Conn, topic: str, payload: bytes, count: int) -> None:
    """QoS 0 as fast as the broker reads: write, and wait for the socket every 64 packets."""
    packet = publish_qos0_packet(topic, payload)
    for k in range(count):
        conn.writer.write(packet)
        if k & 63 == 63:
            await conn.writer.drain()
    await conn.writer.drain()


async def subscribe_sink(conn: Conn, timeout: float) -> None:
    conn.writer.write(subscribe_packet(1, SINK_FILTER, 0))
    kind, body = await asyncio.wait_for(read_packet(conn.reader), timeout)
    if kind >> 4 != 9 or body[2] != 0:
        msg = f"pubsub: SUBSCRIBE {SINK_FILTER} answered {kind:#x} {body.hex()}"
        raise BenchError(msg)


async def phase_pubsub(
    broker: RunningBroker,
    mon: ProcTree,
    ctxs: dict[str, ssl.SSLContext],
    sink_ctx: ssl.SSLContext,
    ids: list[str],
    p: Plan,
) -> Values:
    expected = p.publishers * p.messages
    payload = (b"0123456789abcdef" * (p.payload // 16 + 1))[: p.payload]
    sink = await mqtt_connect(broker.port, sink_ctx, SINK, p.op_timeout)
    publishers: list[tuple[str, Conn]] = []
    try:
        await subscribe_sink(sink, p.op_timeout)
        for device in ids[: p.publishers]:
            conn = await mqtt_connect(broker.port, ctxs[device], device, p.op_timeout)
            publishers.append((device, conn))
        counter = SinkCounter(sink, expected)
        reader_task = asyncio.ensure_future(counter.run())
        await asyncio.sleep(0.3)
        window = Window(mon)
        t0 = window.t0
        try:
            bursts = (
                publish_burst(c, f"devices/{d}/telemetry/t", payload, p.messages)
                for d, c in publishers
            )
            await asyncio.wait_for(asyncio.gather(*bursts), p.deadline)
            await counter.settle(t0, p.deadline, p.idle)
        finally:
            reader_task.cancel()
        window.close()
        cpu = window.broker
        received = counter.received
        span = (counter.last_at or perf()) - t0
        return {
            "msgs_per_s": received / span if received else 0.0,
            "loss": float(expected - received),
            "cpu_us_per_msg": cpu / received * 1e6 if received else None,
            "cpu_busy_pubsub": cpu / span * 100 if span > 0 else None,
            "other_pubsub": window.other / window.wall * 100,
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


async def measure(
    broker: RunningBroker,
    ctxs: dict[str, ssl.SSLContext],
    sink_ctx: ssl.SSLContext,
    ids: list[str],
    plan: Plan,
) -> Measured:
    mon = ProcTree(broker.pid)
    result = Measured()
    await asyncio.sleep(1.0)
    result.values["rss_idle_mb"] = mon.rss_kib() / 1024
    phases: list[tuple[str, Callable[[], Coroutine[None, None, Values]]]] = [
        ("connect", lambda: phase_connect(broker, mon, ctxs, ids, plan)),
        ("hold", lambda: phase_hold(broker, mon, ctxs, ids, plan)),
        ("pubsub", lambda: phase_pubsub(broker, mon, ctxs, sink_ctx, ids, plan)),
    ]
    for phase, run in phases:
        if broker.proc.poll() is not None:
            result.notes.append(f"{phase}: broker exited with status {broker.proc.returncode}")
            break
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
            result.notes.append(
                "metrics: " + ", ".join(f"{k} {v:g}" for k, v in sorted(interesting.items()))
            )
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
    return [
        Metric("connects_per_s", f"mTLS connects/s ({n} clients, {c} in flight)", "higher", 0),
        Metric("connect_p50_ms", "connect latency p50 (ms, to CONNACK)", "lower", 1),
        Metric("connect_p99_ms", "connect latency p99 (ms)", "lower", 1),
        Metric("cpu_ms_per_connect", "broker CPU per connect (ms)", "lower", 2),
        Metric("cpu_busy_connect", "broker CPU busy during connects (%)", "", 0, ratio=False),
        Metric("other_connect", "other processes' CPU during connects (%)", "", 0, ratio=False),
        Metric("rss_idle_mb", "broker RSS idle, fresh (MB)", "lower", 1),
        Metric("rss_after_connect_mb", f"broker RSS after the {n} connects (MB)", "lower", 1),
        Metric("rss_held_mb", f"broker RSS with {n} clients connected (MB)", "lower", 1),
        Metric("kib_per_client", "RSS per connected client (KiB, held - after)", "lower", 1),
        Metric(
            "msgs_per_s",
            f"QoS 0 delivered msgs/s ({p.publishers} pub x {p.messages}, {p.payload} B, 1 sub)",
            "higher",
            0,
        ),
        Metric("loss", f"messages lost (of {p.publishers * p.messages})", "lower", 0, ratio=False),
        Metric("cpu_us_per_msg", "broker CPU per delivered message (us)", "lower", 1),
        Metric("cpu_busy_pubsub", "broker CPU busy during pub/sub (%)", "", 0, ratio=False),
        Metric("other_pubsub", "other processes' CPU during pub/sub (%)", "", 0, ratio=False),
    ]


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


def explain(brokers: list[str], results: dict[str, list[Measured]], info: RunInfo) -> list[str]:
    """Say what limits a figure when the table alone would mislead."""
    notes = []
    for b in brokers:
        for busy_key, other_key, what, per in (
            ("cpu_busy_connect", "other_connect", "connects", "CPU per connect"),
            ("cpu_busy_pubsub", "other_pubsub", "pub/sub", "CPU per message"),
        ):
            for k, r in enumerate(results[b]):
                busy, other = r.values.get(busy_key), r.values.get(other_key) or 0.0
                if busy is None or busy >= 80:
                    continue
                why = (
                    f"other processes on the machine used {other:.0f} % of a core"
                    if other >= 20
                    else "the load generator (one core) was the limit"
                )
                notes.append(
                    f"- {NAMES[b]}, round {k + 1}: the broker was only {busy:.0f} % busy during "
                    f"{what} ({why}), so that round's wall-clock figures understate it; "
                    f"{per} is not affected."
                )
        lost = [r.values.get("loss") for r in results[b]]
        if not any(lost):
            continue
        if b == "mosquitto":
            queued = info.mosquitto_max_queued
            notes.append(
                "- mosquitto lost QoS 0 messages: it drops them for a subscriber that already has "
                f"max_queued_messages ({'1000, the default' if queued is None else queued}) "
                "queued, and the sink (one asyncio loop on CPU 1, next to the publishers) reads "
                "slower than mosquitto sends. `--mosquitto-max-queued 0` removes the cap."
            )
        elif b == "iotauth":
            notes.append(
                "- iotauth lost messages: see iotauth_broker_outbound_dropped_total in the notes "
                "(the per-session outbound cap, outbound_max_messages)."
            )
        else:
            notes.append(f"- {NAMES[b]} lost messages (amqtt has no cap; see the notes).")
    return ["", *notes] if notes else []


def command_line() -> str:
    """This run's command, with the interpreter relative to the current directory if inside."""
    argv = list(sys.orig_argv)
    with contextlib.suppress(ValueError):
        argv[0] = str(Path(argv[0]).absolute().relative_to(Path.cwd()))
    return shlex.join(argv)


def report(
    plan: Plan, brokers: list[str], results: dict[str, list[Measured]], info: RunInfo
) -> str:
    refs = [b for b in ("amqtt", "mosquitto") if b in brokers and "iotauth" in brokers]
    queued = info.mosquitto_max_queued
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
        f"/proc/<pid>/stat ({os.sysconf('SC_CLK_TCK')} ticks/s). Each broker runs with its "
        "defaults apart from the settings in bench/broker_bench.py (mosquitto: "
        + (
            "max_queued_messages 1000 by default"
            if queued is None
            else f"max_queued_messages {queued}"
        )
        + "; iotauth: outbound_max_messages 1000 per session, inbound backpressure). "
        f"Total time {info.elapsed:.0f} s.",
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
    out += explain(brokers, results, info)
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=500, help="devices that connect")
    parser.add_argument("--concurrency", type=int, default=50, help="connects in flight")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--publishers", type=int, default=20)
    parser.add_argument("--messages", type=int, default=2000, help="per publisher")
    parser.add_argument("--payload", type=int, default=100, help="bytes per message")
    parser.add_argument(
        "--brokers",
        default=",".join(BROKERS),
        help="comma-separated subset of " + ",".join(BROKERS),
    )
    parser.add_argument("--mosquitto", default="/usr/sbin/mosquitto", help="mosquitto binary")
    parser.add_argument(
        "--mosquitto-max-queued",
        type=int,
        help="set mosquitto's max_queued_messages (default: not set, i.e. 1000; 0: no limit)",
    )
    parser.add_argument("--deadline", type=float, default=90.0, help="seconds per phase")
    parser.add_argument(
        "--idle", type=float, default=3.0, help="pub/sub: give up after this long without delivery"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin to CPUs")
    parser.add_argument("--keep", type=Path, help="keep the PKI, configs and logs in this dir")
    args = parser.parse_args(argv)
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = sorted(set(brokers) - set(BROKERS))
    if unknown or not brokers:
        parser.error(f"--brokers: unknown {unknown}; choose from {','.join(BROKERS)}")
    if args.clients < 1 or args.concurrency < 1 or args.rounds < 1 or args.messages < 1:
        parser.error("--clients, --concurrency, --rounds and --messages must be at least 1")
    if not 1 <= args.publishers <= args.clients:
        parser.error("--publishers must be between 1 and --clients")
    args.broker_list = brokers
    return args


Starter = Callable[[Path, Path, int | None], RunningBroker]


@dataclass(frozen=True)
class Fleet:
    pki_dir: Path
    ids: list[str]
    ctxs: dict[str, ssl.SSLContext]
    sink_ctx: ssl.SSLContext


def run_one(
    name: str, start: Starter, fleet: Fleet, workdir: Path, cpu: int | None, plan: Plan
) -> Measured:
    """Start one broker, measure it, stop it (also on an error or an interrupt)."""
    t0 = perf()
    try:
        broker = start(fleet.pki_dir, workdir, cpu)
    except BenchError as exc:
        log(f"  could not start: {exc}")
        return Measured(notes=[f"start: {exc}"])
    try:
        measured = asyncio.run(measure(broker, fleet.ctxs, fleet.sink_ctx, fleet.ids, plan))
    finally:
        broker.stop()
    if broker.audit_path is not None:
        measured.notes.append("audit: " + audit_summary(broker.audit_path))
    shown = ", ".join(f"{k}={v:.4g}" for k, v in measured.values.items() if v is not None)
    log(f"  {name}: {perf() - t0:.1f} s: {shown}")
    for note in measured.notes:
        log(f"  note: {note}")
    return measured


def make_fleet(work: Path, clients: int) -> Fleet:
    t0 = perf()
    pki_dir, ids, dirs, sink_dir = build_fleet(work, clients)
    log(f"PKI with {len(ids)} devices + '{SINK}' in {perf() - t0:.1f} s: {pki_dir}")
    ctxs = {name: client_context(dirs[name]) for name in ids}
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
        clients=args.clients,
        concurrency=args.concurrency,
        publishers=args.publishers,
        messages=args.messages,
        payload=args.payload,
        deadline=args.deadline,
        idle=args.idle,
        op_timeout=15.0,
    )
    starters: dict[str, Starter] = {
        "iotauth": start_iotauth,
        "amqtt": start_amqtt,
        "mosquitto": lambda pki, wd, cpu: start_mosquitto(
            pki, wd, cpu, args.mosquitto, args.mosquitto_max_queued
        ),
    }
    brokers: list[str] = args.broker_list
    results: dict[str, list[Measured]] = {b: [] for b in brokers}
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="broker-bench-", dir=args.keep))
    started = perf()
    try:
        fleet = make_fleet(work, args.clients)
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
    versions = tool_versions(args.mosquitto)
    info = RunInfo(args.rounds, pinned, versions, perf() - started, args.mosquitto_max_queued)
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
