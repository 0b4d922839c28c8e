"""CPU per message on the broker's whole connection path, in one process, with no sockets.

    .venv/bin/python bench/broker_path.py [--messages 100000] [--rounds 5] [--runs qos0,qos1]
        [--publishers 20|1] [--against DIR] [--store | --persistent] [--instructions]
        [--profile FILE]

``bench/broker_bench.py`` measures the broker as a process, next to Mosquitto, through real
sockets; on a shared machine its per-message CPU moves by 20-40 % between runs, more than the
differences a change to the engine makes. This benchmark takes the scheduler, the sockets and the
other processes out and keeps everything of the broker that a message passes through: the real
``broker.connection.MQTTConnection`` (TLS 1.3 in ``ssl`` memory BIOs, the event loop's
``call_soon`` flushes), the protocol object, the core and the codec. The clients are ``ssl``
objects in the same process; their side is not timed. Only the broker's calls are
(``time.process_time`` around each ``data_received`` and each turn of the event loop).

Runs, 20 publishers (``devices/<id>/telemetry/t``, 100 B) and one sink on
``devices/+/telemetry/#``, as in broker_bench.py: ``qos0`` and ``qos1`` (MQTT 3.1.1), ``qos0v5``
and ``qos1v5`` (level 5, an empty property set on every PUBLISH), ``qos0alias`` (level 5, each
publisher has set Topic Alias 1 before the timed part and then sends only the alias, as
broker_bench.py's ``qos0alias``). A QoS 1 publisher sends 10
PUBLISHes per TLS write and waits for their PUBACKs; the sink PUBACKs each read in one write.

``--against DIR``: the same runs on another checkout of this repository (e.g. ``git worktree
add /tmp/before <commit>``), alternated with this one round by round in child processes, and
the ratio within each round: how a change moved the cost, with the machine's drift cancelled.
``--store``: with a persistence store attached to the core (no disk: the sessions here are
clean, so it records nothing, and what is measured is what its hooks cost).
``--persistent``: the store attached and the sink's session persistent (clean session 0), so
every QoS 1 delivery makes its records (message, in flight, done); they are committed on the
broker's loop as the real group commit does (``Store.take``, one ``LogFile.append`` of the
batch into a temporary file, ``durable``, ``release_acks``), but in the loop's thread rather
than a worker, so the commit's CPU is counted (the fsync's wait is not CPU).
``--instructions``: instead of CPU time, the instructions executed inside the broker's calls,
counted by callgrind (needs valgrind and cc; one round, ~1 minute per run and tree): exact and
repeatable on a busy machine. ``--publishers 1``: one publisher sending 100 PUBLISHes per write.
``--profile FILE``: cProfile of the broker's calls only, written to FILE (pstats).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import ctypes
import datetime as dt
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported in the run itself, from the tree under test (--against)
    from broker.auth import ConnectionFacts
    from broker.connection import MQTTConnection

HERE = Path(__file__).resolve().parent
RUNS = ("qos0", "qos1", "qos0v5", "qos1v5", "qos0alias")
PUBLISHERS = 20  # --publishers; 1 sends BATCH_ONE per write instead of BATCH
BATCH = 10  # PUBLISHes per client write (and the QoS 1 window)
BATCH_ONE = 100  # a lone publisher's, as broker_bench.py's window of 100
ALIAS_1 = b"\x03\x23\x00\x01"  # a property set of Topic Alias 1 alone
DOMAIN = "bench.example"


def _make_tls(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed server certificate; the client is not asked for one (identity comes from
    the stub authenticator: certificate checks are not what this benchmark measures)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker.bench.example")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    (tmp / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(tmp / "server.crt", tmp / "server.key")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return server, client


class Transport(asyncio.Transport):
    """What MQTTConnection writes to: the client reads it from ``written``."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.written = bytearray()
        self.port = port

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def get_write_buffer_size(self) -> int:
        return 0  # the client reads everything at once

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", self.port) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class Listener:
    def opened(self, conn: object) -> None:
        pass

    def handshake_done(self, conn: object) -> None:
        pass

    def handshake_failed(self, conn: object, exc: BaseException) -> None:
        pass

    def closed(self, conn: object) -> None:
        pass


class Clock:
    """CPU seconds spent inside the broker's calls (and cProfile, if on, around only those;
    under callgrind, its instruction count too: see --instructions)."""

    def __init__(self, profile: cProfile.Profile | None, toggle: Callable[[], None] | None) -> None:
        self.spent = 0.0
        self.profile = profile
        self.toggle = toggle

    def _on(self) -> None:
        if self.profile is not None:
            self.profile.enable()
        if self.toggle is not None:
            self.toggle()

    def _off(self) -> None:
        if self.toggle is not None:
            self.toggle()
        if self.profile is not None:
            self.profile.disable()

    def call(self, fn: Callable[..., object], *args: object) -> None:
        self._on()
        t0 = time.process_time()
        fn(*args)
        self.spent += time.process_time() - t0
        self._off()

    async def loop_turn(self) -> None:
        """Let the broker's scheduled flushes run (nothing else is on this loop)."""
        self._on()
        t0 = time.process_time()
        await asyncio.sleep(0)
        self.spent += time.process_time() - t0
        self._off()


class Client:
    """One MQTT client's TLS end, in memory, wired to one broker connection."""

    def __init__(self, conn: MQTTConnection, transport: Transport, context: ssl.SSLContext) -> None:
        self.conn = conn
        self.transport = transport
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_side=False)
        self.received = bytearray()

    def pump(self) -> None:
        """Bring what the broker wrote into ``received`` (decrypted)."""
        if self.transport.written:
            self._in.write(bytes(self.transport.written))
            self.transport.written.clear()
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                return
            if not chunk:
                return
            self.received += chunk

    def encrypt(self, data: bytes) -> bytes:
        self.tls.write(data)
        return self._out.read()


async def _connect(
    make_conn: Callable[[Transport], MQTTConnection],
    context: ssl.SSLContext,
    port: int,
    connect: bytes,
) -> Client:
    transport = Transport(port)
    conn = make_conn(transport)
    conn.connection_made(transport)
    client = Client(conn, transport, context)
    for _ in range(10):
        try:
            client.tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            conn.data_received(client._out.read())
            client._in.write(bytes(transport.written))
            transport.written.clear()
    else:
        raise RuntimeError("TLS handshake did not finish")
    conn.data_received(client.encrypt(connect))
    for _ in range(50):  # the authenticator runs as a task
        await asyncio.sleep(0)
        client.pump()
        if client.received:
            break
    if client.received[:1] != b"\x20" or client.received[3] != 0:
        raise RuntimeError(f"CONNECT refused: {bytes(client.received)!r}")
    client.received.clear()
    return client


def _callgrind_toggle() -> Callable[[], None] | None:
    """CALLGRIND_TOGGLE_COLLECT from the helper library --instructions builds, if loaded."""
    lib = os.environ.get("BROKER_PATH_CALLGRIND_LIB")
    if not lib:
        return None
    fn: Callable[[], None] = ctypes.CDLL(lib).cg_toggle
    return fn


async def run_one(  # noqa: PLR0912, PLR0915 - one scenario, set up and driven in order
    kind: str,
    messages: int,
    *,
    store: bool,
    profile: cProfile.Profile | None,
    persistent: bool = False,
) -> float:
    """CPU microseconds the broker spends per delivered message."""
    from broker_bench import (
        connect_packet,
        count_packets,
        publish_qos0_packet,
        publish_qos1_head,
        subscribe_packet,
    )

    from broker import connection
    from broker.audit import AuditLog
    from broker.auth import Authenticated
    from broker.core import BrokerCore
    from broker.metrics import Metrics
    from broker.settings import BrokerSettings
    from provisioning.identity import Identity

    level = 5 if kind.endswith(("v5", "alias")) else 4
    alias = kind.endswith("alias")
    qos = 1 if kind.startswith("qos1") else 0
    with tempfile.TemporaryDirectory() as tmp:
        server_ctx, client_ctx = _make_tls(Path(tmp))
    core = BrokerCore(
        BrokerSettings(Path("/nonexistent")), audit=AuditLog(lambda _: None), metrics=Metrics()
    )
    state = tempfile.TemporaryDirectory()
    if store or persistent:
        from broker.store import LogFile, Store

        the_store = core.store = Store()
    if persistent:
        loop = asyncio.get_running_loop()
        logfile = LogFile(Path(state.name))
        logfile.path.write_bytes(b"")
        logfile.open_append()
        committing = False

        def commit() -> None:  # Committer._start and _done, in this thread
            nonlocal committing
            committing = False
            body, seq = the_store.take()
            logfile.append(body)
            the_store.durable = seq
            the_store.release_acks()

        def wake() -> None:
            nonlocal committing
            if not committing:
                committing = True
                loop.call_soon(commit)

        # Lazy records (the sink's PUBACKs) ride with the next urgent batch, as in steady state.
        the_store.on_dirty = wake

    identities = {
        f"dev-{n:03d}": Identity.device(f"dev-{n:03d}", DOMAIN) for n in range(PUBLISHERS)
    }
    identities["sink"] = Identity.service("sink", DOMAIN)

    class Auth:
        async def authenticate(self, facts: ConnectionFacts) -> Authenticated:
            return Authenticated(identities[facts.client_id], "mtls", "1")

    auth = Auth()
    ports = iter(range(40000, 50000))

    def make_conn(transport: Transport) -> MQTTConnection:
        return connection.MQTTConnection(Listener(), core, auth, server_ctx)

    sink_connect = connect_packet("sink", level=level, clean=not persistent)
    sink = await _connect(make_conn, client_ctx, next(ports), sink_connect)
    sink.conn.data_received(sink.encrypt(subscribe_packet(1, "devices/+/telemetry/#", qos, level)))
    await asyncio.sleep(0)
    sink.pump()
    sink.received.clear()
    pubs = [
        await _connect(make_conn, client_ctx, next(ports), connect_packet(name, level=level))
        for name in identities
        if name != "sink"
    ]
    payload = b"x" * 100
    props = b"\x00" if level == 5 else b""
    batches: list[bytes] = []
    primed = 0
    for n, pub in enumerate(pubs):
        topic = f"devices/dev-{n:03d}/telemetry/t"
        if alias:  # Topic Alias 1 = topic, set once (untimed); then the alias alone
            pub.conn.data_received(pub.encrypt(publish_qos0_packet(topic, ALIAS_1 + payload)))
            batches.append(publish_qos0_packet("", ALIAS_1 + payload) * BATCH)
            primed += 1
        elif qos:
            head = publish_qos1_head(topic, len(payload) + len(props))
            batches.append(
                b"".join(head + (k + 1).to_bytes(2, "big") + props + payload for k in range(BATCH))
            )
        else:
            body = publish_qos0_packet(topic, props + payload)
            batches.append(body * BATCH)
    while primed:
        await asyncio.sleep(0)
        sink.pump()
        count, used = count_packets(sink.received, 3)
        del sink.received[:used]
        primed -= count
    start_out = core.messages_out
    clock = Clock(profile, _callgrind_toggle())
    cycles = max(1, messages // (PUBLISHERS * BATCH))
    delivered = 0
    for _ in range(cycles):
        for pub, batch in zip(pubs, batches, strict=True):
            clock.call(pub.conn.data_received, pub.encrypt(batch))
        await clock.loop_turn()
        # The sink reads and acknowledges until everything of this cycle is in.
        want = delivered + PUBLISHERS * BATCH
        while delivered < want:
            sink.pump()
            acks = bytearray() if qos else None
            count, used = count_packets(sink.received, 3, acks)
            del sink.received[:used]
            delivered += count
            if acks:
                clock.call(sink.conn.data_received, sink.encrypt(bytes(acks)))
                await clock.loop_turn()
            elif not count:
                await clock.loop_turn()
        if persistent:  # the last commit's PUBACKs
            await clock.loop_turn()
            await clock.loop_turn()
        for pub in pubs:
            pub.pump()
            if qos:
                acked, used = count_packets(pub.received, 4)
                del pub.received[:used]
                if acked != BATCH:
                    raise RuntimeError(f"{acked} PUBACKs for {BATCH} PUBLISHes")
    if core.messages_out - start_out != delivered:
        raise RuntimeError(f"the core counted {core.messages_out}, the sink {delivered}")
    kept = core.store is not None and core.store.is_persistent(core.sessions["sink"])
    if persistent and qos and not (kept and logfile.size):
        raise RuntimeError("the sink's session is not persistent, or nothing was written")
    state.cleanup()
    return clock.spent / delivered * 1e6


def child(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(HERE))
    profile = cProfile.Profile() if args.profile else None
    counting = bool(os.environ.get("BROKER_PATH_CALLGRIND_LIB"))
    out: dict[str, float] = {}
    for kind in args.runs:
        if not counting:
            # a short untimed run first: imports, first-call caches, the allocator's arenas
            asyncio.run(
                run_one(kind, 2000, store=args.store, profile=None, persistent=args.persistent)
            )
        out[kind] = asyncio.run(
            run_one(
                kind, args.messages, store=args.store, profile=profile, persistent=args.persistent
            )
        )
    if profile is not None:
        profile.dump_stats(args.profile)
    print(json.dumps(out))
    return 0


def delivered_count(messages: int) -> int:
    """What ``run_one`` delivers for ``messages``: whole cycles of every publisher's batch."""
    per_cycle = PUBLISHERS * BATCH
    return max(1, messages // per_cycle) * per_cycle


def _child_cmd(args: argparse.Namespace, run: str, store: bool) -> list[str]:
    cmd = [
        sys.executable,
        str(HERE / "broker_path.py"),
        "--child",
        "--messages",
        str(args.messages),
    ]
    cmd += ["--runs", run, "--publishers", str(PUBLISHERS)]
    if store and args.persistent:
        return [*cmd, "--persistent"]
    return [*cmd, "--store"] if store else cmd


def _spawn(tree: Path, args: argparse.Namespace, run: str, store: bool) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run(
        _child_cmd(args, run, store), env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"broker_path.py: the run on {tree} failed: {done.stderr.strip()[-800:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result[run]


_TOGGLE_C = "#include <valgrind/callgrind.h>\nvoid cg_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }\n"


def _count_instructions(
    jobs: list[tuple[str, Path, str, bool]], args: argparse.Namespace, tmp: Path
) -> dict[tuple[str, str], float]:
    """Instructions the broker's calls execute per delivered message, from callgrind (only
    between the toggles around them): exact and repeatable, whatever else the machine runs."""
    source = tmp / "toggle.c"
    source.write_text(_TOGGLE_C)
    lib = tmp / "libtoggle.so"
    cc = subprocess.run(
        ["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    if cc.returncode != 0:
        raise SystemExit(
            "broker_path.py: --instructions needs cc and valgrind's headers: "
            + cc.stderr.strip()[-400:]
        )
    out: dict[tuple[str, str], float] = {}
    running: list[tuple[tuple[str, str], subprocess.Popen[str], Path]] = []
    todo = list(jobs)
    while todo or running:
        while todo and len(running) < (os.cpu_count() or 1):
            name, tree, run, store = todo.pop(0)
            result = tmp / f"callgrind.{len(jobs) - len(todo)}.{run}.out"  # one per job
            env = dict(
                os.environ,
                PYTHONPATH=str(tree),
                PYTHONHASHSEED="0",
                BROKER_PATH_CALLGRIND_LIB=str(lib),
            )
            cmd = [
                "valgrind",
                "--tool=callgrind",
                "--collect-atstart=no",
                f"--callgrind-out-file={result}",
                *_child_cmd(args, run, store),
            ]
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            running.append(((name, run), proc, result))
        key, proc, result = running.pop(0)
        _, err = proc.communicate()
        if proc.returncode != 0 or not result.exists():
            raise SystemExit(f"broker_path.py: callgrind run {key} failed: {err.strip()[-800:]}")
        totals = [line for line in result.read_text().splitlines() if line.startswith("totals:")]
        out[key] = int(totals[0].split()[1]) / delivered_count(args.messages)
        print(f"{key[0]} {key[1]}: {out[key]:,.0f} instructions per message", file=sys.stderr)
    return out


def main() -> int:  # noqa: PLR0912, PLR0915 - options
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", default="qos0,qos1", help=f"of {','.join(RUNS)}")
    parser.add_argument("--against", type=Path, help="another checkout to compare with")
    parser.add_argument("--store", action="store_true", help="attach a persistence store")
    parser.add_argument(
        "--persistent",
        action="store_true",
        help="attach a store and make the sink's session persistent (its records are made)",
    )
    parser.add_argument("--profile", help="write a cProfile of the broker's calls here")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions under callgrind instead of timing (one round; slow)",
    )
    parser.add_argument(
        "--publishers", type=int, choices=(1, 20), default=20, help="20 (10 per write) or 1 (100)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global PUBLISHERS, BATCH
    if args.publishers == 1:
        PUBLISHERS, BATCH = 1, BATCH_ONE
    args.runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        parser.error(f"--runs: unknown {', '.join(unknown)} (choose from {', '.join(RUNS)})")
    if args.child or args.profile:
        return child(args)
    here = HERE.parent
    trees = [("this tree", here)]
    if args.against is not None:
        if not (args.against / "broker" / "connection.py").is_file():
            parser.error(f"--against {args.against}: not a checkout of this repository")
        trees.append((f"{args.against}", args.against.resolve()))

    def jobs_of(name: str, tree: Path) -> list[tuple[str, Path, str, bool]]:
        # A tree from before MQTT 5 runs the 3.1.1 runs only; one from before persistence
        # runs without a store (which is what it shipped).
        level5 = (tree / "broker" / "protocol.py").is_file()
        store = (args.store or args.persistent) and (tree / "broker" / "store.py").is_file()
        return [
            (name, tree, r, store) for r in args.runs if level5 or not r.endswith(("v5", "alias"))
        ]

    results: dict[str, dict[str, list[float]]] = {
        name: {r: [] for r in args.runs} for name, _ in trees
    }
    started = time.monotonic()
    if args.instructions:
        with tempfile.TemporaryDirectory() as tmp:
            jobs = [job for name, tree in trees for job in jobs_of(name, tree)]
            for (name, run), count in _count_instructions(jobs, args, Path(tmp)).items():
                results[name][run].append(count)
        unit = "instructions"
    else:
        for round_no in range(args.rounds):
            order = trees if round_no % 2 == 0 else trees[::-1]
            for name, tree in order:
                for _, _, run, store in jobs_of(name, tree):
                    results[name][run].append(_spawn(tree, args, run, store))
            print(
                f"round {round_no + 1}/{args.rounds} done ({time.monotonic() - started:.0f} s)",
                file=sys.stderr,
            )
        unit = "CPU us"
    rounds = "callgrind" if args.instructions else f"{args.rounds} rounds, median (min-max)"
    print(
        f"broker {unit} per delivered message, {delivered_count(args.messages)} messages per "
        f"run, {rounds}{', store attached' if args.store else ''}"
        f"{', persistent sink' if args.persistent else ''}"
    )
    for run in args.runs:
        line = f"  {run:7s}"
        for name, _ in trees:
            values = results[name][run]
            if values:
                median = statistics.median(values)
                line += f"  {name}: {median:,.2f}"
                if len(values) > 1:
                    line += f" ({min(values):.2f}-{max(values):.2f})"
        if len(trees) == 2 and results[trees[1][0]][run]:
            ratios = [
                a / b
                for a, b in zip(results[trees[0][0]][run], results[trees[1][0]][run], strict=True)
            ]
            line += f"  ratio {statistics.median(ratios):.3f}x"
            if len(ratios) > 1:
                line += " (" + ", ".join(f"{r:.2f}" for r in ratios) + ")"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
