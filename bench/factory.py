"""SQLite next to PostgreSQL, in one run: a factory's issuance rate and revocation latency.

    .venv/bin/python bench/issuance.py --factory [--devices 2000] [--kicks 40]

Rows, for each registry:
  1 station     PKI.issue_many() in batches of 500 from one process
  4 stations    the same from 4 processes at once: on SQLite 4 processes share one PKI directory
                (the single-machine way); on PostgreSQL each is its own station with its own
                issuing CA. Every process starts its interpreter and opens its PKI first;
                then all start together (a line on stdin). The rate is all devices over the
                wall time from the first start to the last finish.
  revocation    a device connected to two brokers is revoked (PKI.revoke in this process); the
                time until both brokers have closed its connection, p50 and p99 over --kicks
                devices. SQLite brokers poll crl.pem (0.2 s); PostgreSQL brokers LISTEN.
PostgreSQL is a throwaway cluster (iotauth.pgcluster) on this machine, fsync on. Each rate is the
median of --reps runs with the slowest and fastest beside it, and the CPU per device (stations
and database server together) gives the CPU-bound ceiling: what the machine's CPUs could do
with nothing else running.
"""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from broker.server import BrokerThread
from broker.settings import BrokerSettings
from iotauth.pgcluster import TempPostgres, find_postgres_bin
from provisioning.pki import PKI
from provisioning.tls import client_context_for_credentials

BATCH = 500


def _worker(pki_dir: str, prefix: str, count: int) -> None:
    with PKI.open(Path(pki_dir)) as ca:
        # Ready (interpreter started, PKI open), then wait for the common start: the stations
        # issue at the same time instead of one finishing while another still imports.
        print("ready", flush=True)
        sys.stdin.readline()
        t0, c0 = time.time(), time.process_time()
        for start in range(0, count, BATCH):
            ca.issue_many([f"{prefix}-{n}" for n in range(start, min(count, start + BATCH))])
        t1, c1 = time.time(), time.process_time()
        held = getattr(ca.registry, "lock_seconds", [])  # PostgreSQL: the write lock per batch
    print(t0, t1, c1 - c0, statistics.median(held[-(count // BATCH) :]) if held else 0.0)


def _cpu_of_tree(pid: int) -> float:
    """CPU seconds of a process, its live children and its waited-for children (PostgreSQL:
    the postmaster, its auxiliary processes and every backend that has exited)."""
    tick = os.sysconf("SC_CLK_TCK")

    def fields(p: str) -> list[str]:
        text = Path(f"/proc/{p}/stat").read_text()
        return text[text.rindex(")") + 2 :].split()

    own = fields(str(pid))
    total = sum(int(v) for v in own[11:15])  # utime stime cutime cstime
    for entry in os.listdir("/proc"):
        if entry.isdigit() and entry != str(pid):
            try:
                f = fields(entry)
            except (OSError, ValueError):
                continue
            if f[1] == str(pid):
                total += int(f[11]) + int(f[12])
    return total / tick


@dataclass(frozen=True)
class Run:
    rate: float  # devices/s over the wall time (the median of the runs)
    cpu_us: float  # CPU per device, µs: the stations' processes plus the database server's
    lock_ms: float = 0.0  # PostgreSQL: how long a batch held the write lock (median)
    low: float = 0.0  # the slowest and fastest run: the spread on a shared machine
    high: float = 0.0

    @staticmethod
    def median(runs: list[Run]) -> Run:
        rates = [r.rate for r in runs]
        cpu = statistics.median(r.cpu_us for r in runs)
        lock = statistics.median(r.lock_ms for r in runs)
        return Run(statistics.median(rates), cpu, lock, min(rates), max(rates))

    def ceiling(self) -> float:
        """devices/s if every CPU of the machine did nothing else (CPU-bound ceiling)."""
        return (os.cpu_count() or 1) * 1e6 / self.cpu_us

    def cell(self) -> str:
        return f"{self.rate:,.0f} ({self.low:,.0f} to {self.high:,.0f})"


def _in_processes(
    dirs: list[Path], count_each: int, tag: str, server_cpu: Callable[[], float] | None = None
) -> Run:
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(d), f"{tag}{n}", str(count_each)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n, d in enumerate(dirs)
    ]
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            msg = f"worker failed to start ({proc.wait()})"
            raise RuntimeError(msg)
    server0 = server_cpu() if server_cpu else 0.0
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.close()
    spans, locks = [], []
    for proc in procs:
        assert proc.stdout is not None
        out = proc.stdout.read()
        proc.wait(timeout=1200)
        if proc.returncode != 0:
            msg = f"worker failed ({proc.returncode})"
            raise RuntimeError(msg)
        a, b, cpu, lock = map(float, out.split())
        spans.append((a, b, cpu))
        locks.append(lock)
    server = server_cpu() - server0 if server_cpu else 0.0
    wall = max(b for _, b, _ in spans) - min(a for a, _, _ in spans)
    devices = count_each * len(dirs)
    cpu_us = (sum(c for _, _, c in spans) + server) / devices * 1e6
    return Run(devices / wall, cpu_us, statistics.median(locks) * 1000)


def _connect(port: int, creds: Path, name: str) -> ssl.SSLSocket:
    ctx = client_context_for_credentials(creds)
    sock = ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="127.0.0.1"
    )
    client = name.encode()
    body = b"\x00\x04MQTT" + bytes([4, 0x02]) + struct.pack("!H", 60)
    body += struct.pack("!H", len(client)) + client
    sock.sendall(bytes([0x10, len(body)]) + body)
    ack = sock.recv(4)
    if len(ack) < 4 or ack[3] != 0:
        msg = f"{name} was refused: {ack!r}"
        raise RuntimeError(msg)
    return sock


def _kick_latency(
    stations: list[PKI], broker_dirs: list[Path], work: Path, kicks: int
) -> list[float]:
    """Revoke ``kicks`` devices one by one; seconds until both brokers closed each one."""
    brokers = [BrokerThread(BrokerSettings(d)).start() for d in broker_dirs]
    try:
        names = [f"kick-{n}" for n in range(kicks)]
        issuer = stations[0]
        issuer.issue_many(names, out_dirs=[work / "creds" / n for n in names])
        latencies = []
        for name in names:
            socks = [_connect(b.port, work / "creds" / name, name) for b in brokers]
            sel = selectors.DefaultSelector()
            for s in socks:
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
            open_socks = set(socks)
            t0 = time.perf_counter()
            stations[-1].revoke(name)  # another station than the issuer, where there are two
            deadline = t0 + 10
            while open_socks and time.perf_counter() < deadline:
                for key, _ in sel.select(timeout=0.5):
                    sock = key.fileobj
                    assert isinstance(sock, ssl.SSLSocket)
                    try:
                        data = sock.recv(4096)
                    except ssl.SSLWantReadError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(sock)
                        open_socks.discard(sock)
            if open_socks:
                msg = f"{name} was not kicked by every broker within 10 s"
                raise RuntimeError(msg)
            latencies.append(time.perf_counter() - t0)
            for s in socks:
                s.close()
            sel.close()
        return latencies
    finally:
        for b in brokers:
            b.stop()


def _raw_floor(work: Path, devices: int) -> float:
    """Key generation and leaf signing alone: what no registry can beat per process."""
    from issuance import bench_raw

    ca = PKI.init(work / "raw-pki", trust_domain="bench.example")
    try:
        return bench_raw(ca, devices)[2]
    finally:
        ca.close()


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _sqlite(work: Path, devices: int, reps: int, kicks: int) -> dict[str, object]:
    ca = PKI.init(work / "sqlite-pki", trust_domain="bench.example")
    try:
        one = Run.median([_in_processes([ca.path], devices, f"s1r{r}") for r in range(reps)])
        four = Run.median(
            [_in_processes([ca.path] * 4, devices // 4, f"s4r{r}p") for r in range(reps)]
        )
        lat = _kick_latency([ca], [ca.path, ca.path], work / "sqlite", kicks)
    finally:
        ca.close()
    return {"one": one, "four": four, "lat": lat}


def _postgres(work: Path, devices: int, reps: int, kicks: int) -> dict[str, object]:
    with TempPostgres() as pg:
        os.environ["PGPASSWORD"] = pg.password
        root = PKI.init(
            work / "pg-root", trust_domain="bench.example", registry=pg.create_database("bench")
        )
        dirs = [root.add_station(f"st{n}", out=work / f"pg-st{n}") for n in range(4)]
        stations = [PKI.open(d) for d in dirs]
        try:
            assert pg.pid is not None
            pid = pg.pid
            one = Run.median(
                [
                    _in_processes([dirs[0]], devices, f"p1r{r}", lambda: _cpu_of_tree(pid))
                    for r in range(reps)
                ]
            )
            four = Run.median(
                [
                    _in_processes(dirs, devices // 4, f"p4r{r}p", lambda: _cpu_of_tree(pid))
                    for r in range(reps)
                ]
            )
            lat = _kick_latency(stations[:2], dirs[:2], work / "pg", kicks)
            report = root.verify_ledger()  # the figures describe a valid, unforked ledger
        finally:
            for ca in stations:
                ca.close()
            root.close()
    return {"one": one, "four": four, "lat": lat, "entries": report.entries}


def run_factory(*, devices: int, reps: int, kicks: int, base: Path | None) -> int:
    if find_postgres_bin() is None:
        print("PostgreSQL server binaries not found (apt-get install postgresql)", file=sys.stderr)
        return 1
    root = base or Path(__file__).resolve().parent / "results"
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="factory-", dir=root))
    try:
        floor = _raw_floor(work, devices)
        lite = _sqlite(work, devices, reps, kicks)
        pg = _postgres(work, devices, reps, kicks)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"Factory benchmark: batches of {BATCH}, {devices} devices per measured run "
        f"(4 stations: {devices // 4} each), median of {reps}; {kicks} revocations timed; "
        f"{os.cpu_count()} CPUs, shared"
    )
    print()
    print("| registry | 1 station devices/s | 4 stations at once devices/s "
          "| CPU per device, 4 stations | CPU-bound ceiling, 4 stations "
          "| revocation to kick on 2 brokers p50 | p99 |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in (("SQLite (one directory, crl.pem)", lite), ("PostgreSQL (LISTEN/NOTIFY)", pg)):
        lat, one, four = r["lat"], r["one"], r["four"]
        assert isinstance(lat, list)
        assert isinstance(one, Run)
        assert isinstance(four, Run)
        print(
            f"| {label} | {one.cell()} | {four.cell()} | {four.cpu_us:,.0f} µs "
            f"| {four.ceiling():,.0f}/s | {_pct(lat, 50) * 1000:.0f} ms "
            f"| {_pct(lat, 99) * 1000:.0f} ms |"
        )
    print()
    print(
        f"Rates: median (slowest to fastest) of {reps} runs. CPU per device: user + system time of"
        " the station processes (and, on PostgreSQL, of the server's processes) over the devices;"
        f" the ceiling is {os.cpu_count()} CPUs' worth of it."
    )
    print(
        f"Crypto floor in the same run (key + leaf + no disk, one process): {floor:,.0f} "
        f"devices/s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs."
    )
    one_pg, four_pg = pg["one"], pg["four"]
    assert isinstance(one_pg, Run)
    assert isinstance(four_pg, Run)
    print(
        f"PostgreSQL write lock held per batch of {BATCH} (median, COMMIT included): "
        f"{one_pg.lock_ms:.0f} ms with 1 station, {four_pg.lock_ms:.0f} ms with 4 at once "
        "(every other station waits that long)."
    )
    print(f"PostgreSQL ledger verified afterwards: {pg['entries']} entries, one chain.")
    lat = pg["lat"]
    assert isinstance(lat, list)
    four = pg["four"]
    assert isinstance(four, Run)
    rate_ok, p99 = four.rate >= 2000, _pct(lat, 99)
    print()
    print(
        f"Verdict: 4 stations together ≥ 2,000 devices/s: {'**met**' if rate_ok else '**not met**'}"
        f" ({four.rate:,.0f}/s on PostgreSQL); p99 revocation to kick on every broker under"
        f" 1 s: {'**met**' if p99 < 1 else '**not met**'} ({p99 * 1000:.0f} ms)."
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        print("run through bench/issuance.py --factory", file=sys.stderr)
        sys.exit(2)
