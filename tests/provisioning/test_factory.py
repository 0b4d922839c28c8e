"""A factory on one PostgreSQL registry: stations with their own issuing CAs, one ledger, faults.

Every test here runs against a real PostgreSQL cluster that the ``postgres`` fixture starts in a
temporary directory (tests/conftest.py); under CI a missing PostgreSQL fails them.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hardware import VirtualDevice
from iotauth.pgcluster import TempPostgres
from provisioning.errors import DeviceExistsError, LedgerCorruptError, PKIError, RegistryError
from provisioning.pki import PKI
from provisioning.registry import SQLITE_MIGRATIONS, Registry
from provisioning.registry_pg import MIGRATIONS, PostgresRegistry
from provisioning.station import StationSettings, provision_many
from tests.conftest import (
    Result,
    SoftHSM,
    assert_one_line_error,
    needs_softhsm,
    openssl,
    openssl_verify,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def root(tmp_path: Path, pg_url: str) -> PKI:
    ca = PKI.init(tmp_path / "root-ca", trust_domain="fleet.example", registry=pg_url)
    yield ca  # type: ignore[misc]
    ca.close()


def _station_dir(root: PKI, tmp_path: Path, name: str) -> Path:
    """A new station's directory, not opened (opening one connects to PostgreSQL)."""
    return root.add_station(name, out=tmp_path / name)


def _station(root: PKI, tmp_path: Path, name: str) -> PKI:
    return PKI.open(_station_dir(root, tmp_path, name))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- connecting: one line naming the URL, never the password -----------------------------------


def test_bad_connections_are_one_line_naming_the_url_without_password(
    cli: Callable[..., Result], postgres: TempPostgres, pg_url: str, tmp_path: Path
) -> None:
    def init(url: str, password: str) -> Result:
        return cli(
            "ca", "init", "--pki", "root", "--trust-domain", "fleet.example", "--registry", url,
            env={"PGPASSWORD": password},
        )  # fmt: skip

    wrong = init(pg_url, "not-the-password")
    assert_one_line_error(wrong, pg_url, "password authentication failed")
    assert "not-the-password" not in wrong.stderr

    unreachable = init(f"postgresql://iotauth@127.0.0.1:{_closed_port()}/x", postgres.password)
    assert_one_line_error(unreachable, "cannot reach the database server", "127.0.0.1")

    missing = postgres.url("no_such_db")
    assert_one_line_error(init(missing, postgres.password), missing, "does not exist")

    secret_url = pg_url.replace("iotauth@", "iotauth:hunter2@")
    in_url = init(secret_url, postgres.password)
    assert_one_line_error(in_url, "contains a password", "PGPASSWORD")
    assert "hunter2" not in in_url.stderr
    assert not (tmp_path / "root").exists()  # nothing half-made

    # The positive twin: the same command with the right password makes the PKI.
    ok = init(pg_url, postgres.password)
    assert ok.returncode == 0, ok.stderr
    assert f'registry = "{pg_url}"' in (tmp_path / "root" / "pki.toml").read_text()
    assert not (tmp_path / "root" / "registry.sqlite3").exists()
    assert not (tmp_path / "root" / "ledger.jsonl").exists()


def test_a_database_that_holds_a_pki_is_not_taken_over(
    root: PKI, pg_url: str, tmp_path: Path
) -> None:
    with pytest.raises(PKIError, match="already holds a PKI"):
        PKI.init(tmp_path / "other", trust_domain="fleet.example", registry=pg_url)
    assert not (tmp_path / "other").exists()


# -- migrations ----------------------------------------------------------------------------------


def test_migrations_apply_once_and_a_newer_schema_is_refused(root: PKI, pg_url: str) -> None:
    for _ in range(2):  # opening again applies nothing and changes nothing
        PostgresRegistry(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
        assert versions == list(range(1, len(MIGRATIONS) + 1))
        conn.execute("INSERT INTO schema_migrations (version) VALUES (99)")
    with pytest.raises(RegistryError, match="schema version 99, newer than this iotauth"):
        PKI.open(root.path)


def test_sqlite_registry_is_versioned_too(tmp_path: Path) -> None:
    ca = PKI.init(tmp_path / "pki", trust_domain="fleet.example")
    ca.close()
    import sqlite3

    db = sqlite3.connect(tmp_path / "pki" / "registry.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(SQLITE_MIGRATIONS)
    # A registry of the first version (no service secrets, no registrations by name) is
    # migrated when opened, and opening it again changes nothing.
    db.execute("DROP TABLE service_secrets")
    db.execute("DROP TABLE service_registrations")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    for _ in range(2):
        Registry(tmp_path / "pki" / "registry.sqlite3").close()
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(SQLITE_MIGRATIONS) == 3
        assert db.execute("SELECT count(*) FROM service_secrets").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM service_registrations").fetchone()[0] == 0
    db.execute("PRAGMA user_version = 7")
    db.commit()
    db.close()
    with pytest.raises(RegistryError, match="schema version 7, newer than this iotauth"):
        Registry(tmp_path / "pki" / "registry.sqlite3")


# -- stations and the shared ledger ------------------------------------------------------------


def test_stations_share_one_chain_each_line_signed_by_its_own_ca(root: PKI, tmp_path: Path) -> None:
    st1, st3 = _station(root, tmp_path, "line1-bench1"), _station(root, tmp_path, "line1-bench3")
    st1.issue("dev-a")
    st3.issue("dev-b")
    root.issue("dev-c")
    st1.revoke("dev-b")  # a station may revoke another station's device
    report = st3.verify_ledger()
    assert report.warnings == []
    entries = [e for _, e in st3.ledger.entries()]
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    signers = {e.data["name"]: e.data["signed_by"] for e in entries if e.event == "issue"}
    assert signers == {
        "dev-a": st1.issuer_fingerprint,
        "dev-b": st3.issuer_fingerprint,
        "dev-c": root.issuer_fingerprint,
    }
    # Each station's CA is distinct, signed by the one root, and absent from the others' dirs.
    subjects = {st.issuing.subject.rfc4514_string() for st in (root, st1, st3)}
    assert len(subjects) == 3
    assert not (tmp_path / "line1-bench3" / "private" / "root.key").exists()
    # The owner's CRL lists dev-b from its next write on (another station cannot sign it).
    st3.refresh_crl()
    crl = x509.load_pem_x509_crl((tmp_path / "line1-bench3" / "crl.pem").read_bytes())
    assert {format(r.serial_number, "x") for r in crl} == {st3.registry.history("dev-b")[0].serial}


def test_a_forged_line_or_an_unknown_signer_fails_verification(
    root: PKI, pg_url: str, tmp_path: Path
) -> None:
    st = _station(root, tmp_path, "bench")
    st.issue("dev-a")
    st.issue("dev-b")
    root.verify_ledger()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        # Line 4's signature on line 3: the hash still matches, the signature does not.
        conn.execute("UPDATE ledger SET sig = (SELECT sig FROM ledger WHERE seq = 4) WHERE seq = 3")
    with pytest.raises(LedgerCorruptError, match="line 3: signature is not the issuing CA's"):
        root.verify_ledger()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        # A station row swapped for another certificate: the lines it signed have no known key.
        other = root.issuing.public_bytes(serialization.Encoding.PEM).decode()
        conn.execute("UPDATE stations SET certificate = %s WHERE name = 'bench'", (other,))
    with pytest.raises(LedgerCorruptError, match="line 3: signed by an issuing CA nobody knows"):
        root.verify_ledger()


def test_an_edited_ledger_row_is_named(root: PKI, pg_url: str, tmp_path: Path) -> None:
    st = _station(root, tmp_path, "bench")
    st.issue("dev-a")
    st.issue("dev-b")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT seq, data FROM ledger WHERE event = 'issue' ORDER BY seq"
        ).fetchone()
        assert row is not None
        conn.execute(
            "UPDATE ledger SET data = %s WHERE seq = %s",
            (row[1].replace("dev-a", "dev-z"), row[0]),
        )
    with pytest.raises(LedgerCorruptError, match=f"line {row[0]}: content does not match its hash"):
        st.verify_ledger()


def test_export_is_todays_jsonl_and_verifies_on_its_own(
    root: PKI, tmp_path: Path, cli: Callable[..., Result]
) -> None:
    st = _station(root, tmp_path, "bench")
    st.issue("dev-a")
    root.issue("dev-b")
    verify = cli("ledger", "verify", "--pki", "bench", "--export", "audit.jsonl", check=True)
    assert "every station's issuing CA" in verify.stdout
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 4  # ca-init, station-add, two issues
    for line in lines:
        assert sorted(json.loads(line)) == ["data", "event", "hash", "prev", "seq", "sig", "time"]
    cli("ledger", "verify", "--pki", "root-ca", "--file", "audit.jsonl", check=True)
    cli("ledger", "export", "--pki", "root-ca", "--out", "again.jsonl", check=True)
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "audit.jsonl").read_text()
    # Negative twin: an edited copy is refused, naming the line.
    lines[2] = lines[2].replace("dev-a", "dev-x")
    (tmp_path / "audit.jsonl").write_text("\n".join(lines) + "\n")
    bad = cli("ledger", "verify", "--pki", "root-ca", "--file", "audit.jsonl")
    assert_one_line_error(bad, "ledger line 3")


def test_cli_add_station_then_issue_and_revoke_from_another_station(
    root: PKI, tmp_path: Path, cli: Callable[..., Result]
) -> None:
    made = cli("ca", "add-station", "line1-bench3", "--pki", "root-ca", "--out", "station-3",
               "--json", check=True)  # fmt: skip
    assert json.loads(made.stdout)["station"] == "line1-bench3"
    cli("device", "issue", "dev-0042", "--pki", "station-3", "--out", "creds", check=True)
    again = cli("ca", "add-station", "line1-bench3", "--pki", "root-ca", "--out", "station-x")
    assert_one_line_error(again, "already has a station named 'line1-bench3'")
    # openssl: the leaf chains to the one root through station-3's issuing CA and its CRL.
    station = tmp_path / "station-3"
    ok = openssl("verify", "-purpose", "sslclient", "-CAfile", tmp_path / "root-ca" / "root.crt",
                 "-untrusted", station / "issuing.crt", "-crl_check", "-CRLfile",
                 station / "crl.pem", tmp_path / "creds" / "device.crt")  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # Negative twin: the root's own issuing CA is not the chain of a station-3 certificate.
    wrong = openssl("verify", "-purpose", "sslclient", "-CAfile", tmp_path / "root-ca" / "root.crt",
                    "-untrusted", tmp_path / "root-ca" / "issuing.crt",
                    tmp_path / "creds" / "device.crt")  # fmt: skip
    assert wrong.returncode != 0
    revoked = cli("device", "revoke", "dev-0042", "--pki", "root-ca", check=True)
    assert "Issued by station line1-bench3: brokers refuse it now" in revoked.stdout
    listed = cli("device", "list", "--pki", "station-3", "--json", check=True)
    assert [r["state"] for r in json.loads(listed.stdout)] == ["revoked"]
    stations = json.loads(cli("ca", "stations", "--pki", "root-ca", "--json", check=True).stdout)
    assert [s["name"] for s in stations] == ["main", "line1-bench3"]
    # A station whose CA is revoked can issue nothing more.
    cli("ca", "revoke-station", "line1-bench3", "--pki", "root-ca", check=True)
    refused = cli("device", "issue", "dev-0043", "--pki", "station-3", "--out", "c2")
    assert_one_line_error(refused, "line1-bench3", "was revoked")
    offline = cli("ca", "add-station", "s4", "--pki", "station-3", "--out", "s4")
    assert_one_line_error(offline, "root.key is offline")


def test_a_sqlite_pki_has_no_stations(pki_dir: Path, pki: PKI, cli: Callable[..., Result]) -> None:
    result = cli("ca", "add-station", "s1", "--pki", str(pki_dir), "--out", "s1")
    assert_one_line_error(result, "needs a shared registry", "--registry")


# -- concurrency ------------------------------------------------------------------------------

WORKER = """
import sys
from pathlib import Path
from provisioning.errors import DeviceExistsError
from provisioning.pki import PKI

pki_dir, prefix, count, batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
issued = refused = 0
reasons = set()
with PKI.open(pki_dir) as ca:
    for n in range(0, count, batch):
        names = [f"{prefix}-{i}" for i in range(n, min(count, n + batch))]
        try:
            issued += len(ca.issue_many(names))
        except DeviceExistsError as exc:
            refused += len(names)
            reasons.add(str(exc).splitlines()[0])
print(issued, refused, len(reasons))
"""


def _workers(jobs: list[tuple[Path, str, int, int]]) -> list[tuple[int, int, int]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(d), prefix, str(count), str(batch)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for d, prefix, count, batch in jobs
    ]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr
        a, b, c = map(int, stdout.split())
        out.append((a, b, c))
    return out


def test_four_stations_append_at_once_without_fork_or_gap(root: PKI, tmp_path: Path) -> None:
    dirs = [_station_dir(root, tmp_path, f"s{n}") for n in range(4)]
    results = _workers([(d, f"p{n}", 120, 20) for n, d in enumerate(dirs)])
    assert [r[0] for r in results] == [120] * 4
    entries = [e for _, e in root.ledger.entries()]
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert root.verify_ledger().entries == 1 + 4 + 480  # ca-init, 4 station-add, issues
    assert root.registry.count() == 480
    by_signer = {e.data["signed_by"] for e in entries if e.event == "issue"}
    assert len(by_signer) == 4


def test_two_stations_racing_for_the_same_ids_one_wins_each(root: PKI, tmp_path: Path) -> None:
    a, b = _station_dir(root, tmp_path, "a"), _station_dir(root, tmp_path, "b")
    results = _workers([(a, "same", 100, 1), (b, "same", 100, 1)])
    assert sum(r[0] for r in results) == 100
    assert sum(r[1] for r in results) == 100
    assert all(r[2] <= 100 for r in results)
    assert root.registry.count() == 100
    root.verify_ledger()
    with pytest.raises(DeviceExistsError, match="'same-0' already has an active certificate"):
        PKI.open(a).issue("same-0")


def test_two_stations_racing_on_the_command_line_one_wins_the_other_gets_one_line(
    root: PKI, tmp_path: Path, cli: Callable[..., Result]
) -> None:
    for name in ("st-a", "st-b"):
        root.add_station(name, out=tmp_path / name)
    for n in range(2):
        device = f"race-{n}"
        with ThreadPoolExecutor(max_workers=2) as pool:
            runs = list(
                pool.map(
                    lambda st, d=device: cli(
                        "device", "issue", d, "--pki", st, "--out", f"{st}-{d}"
                    ),
                    ("st-a", "st-b"),
                )
            )
        won = [r for r in runs if r.returncode == 0]
        lost = [r for r in runs if r.returncode != 0]
        assert len(won) == 1, [r.stderr for r in runs]
        assert len(lost) == 1
        assert_one_line_error(lost[0], f"'{device}' already has an active certificate", "--rotate")
        assert len(root.registry.history(device)) == 1
        # The loser wrote no credential directory.
        loser = "st-b" if runs[0].returncode == 0 else "st-a"
        assert not (tmp_path / f"{loser}-{device}").exists()
    root.verify_ledger()


def test_a_station_and_a_broker_with_a_bad_database_say_one_line(
    root: PKI, postgres: TempPostgres, pg_url: str, tmp_path: Path, cli: Callable[..., Result]
) -> None:
    station = root.add_station("st-1", out=tmp_path / "st-1")
    wrong = {"PGPASSWORD": "not-the-password"}
    issued = cli("device", "issue", "d1", "--pki", "st-1", "--out", "c1", env=wrong)
    assert_one_line_error(issued, pg_url, "password authentication failed")
    broker = cli("broker", "run", "--pki", "st-1", "--port", "0", "--no-renewal", env=wrong)
    assert_one_line_error(broker, pg_url, "password authentication failed")
    for result in (issued, broker):
        assert "not-the-password" not in result.stdout + result.stderr
    # The same station directory pointed at a missing database, then at a closed port.
    toml = station / "pki.toml"
    text = toml.read_text()
    missing = postgres.url("no_such_db")
    toml.write_text(text.replace(pg_url, missing))
    gone = cli("device", "issue", "d1", "--pki", "st-1", "--out", "c1")
    assert_one_line_error(gone, missing, "does not exist")
    closed = f"postgresql://iotauth@127.0.0.1:{_closed_port()}/x"
    toml.write_text(text.replace(pg_url, closed))
    down = cli("device", "issue", "d1", "--pki", "st-1", "--out", "c1")
    assert_one_line_error(down, closed, "cannot reach the database server")
    assert not (tmp_path / "c1").exists()
    # The positive twin: the right URL and password issue.
    toml.write_text(text)
    cli("device", "issue", "d1", "--pki", "st-1", "--out", "c1", check=True)


# -- faults: the database restarts in the middle of a gang run ----------------------------------


def test_database_restart_mid_gang_run_loses_nothing_and_records_nothing_twice(
    root: PKI, postgres: TempPostgres, pg_url: str, tmp_path: Path
) -> None:
    station = _station_dir(root, tmp_path, "gang")
    devices = [
        VirtualDevice(tmp_path / "stores" / f"u{n}", "pty", baudrate=19200 + 9600 * n).start()
        for n in range(5)
    ]
    restarted = threading.Event()

    def restart_when_the_first_is_recorded() -> None:
        deadline = time.monotonic() + 60
        with psycopg.connect(pg_url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                if conn.execute("SELECT count(*) FROM certificates").fetchone()[0] >= 1:  # type: ignore[index]
                    break
                time.sleep(0.02)
        postgres.restart(down_for=1.5)
        restarted.set()

    chaos = threading.Thread(target=restart_when_the_first_is_recorded)
    chaos.start()
    try:
        results = provision_many(
            station,
            [d.address for d in devices],
            settings=StationSettings(timeout=0.3, retries=8, reconnects=3, reconnect_delay=0.2),
        )
    finally:
        chaos.join()
        for d in devices:
            d.stop()
    assert restarted.is_set()
    assert [r.ok for r in results] == [True] * 5, [r.reason for r in results]
    with PKI.open(station) as ca:
        rows = ca.registry.all()
        assert len(rows) == 5
        report = ca.verify_ledger()
        issues = [e for _, e in ca.ledger.entries() if e.event == "issue"]
    assert sorted(e.data["name"] for e in issues) == sorted(r.name for r in rows)
    assert report.warnings == []


class _CommitCutter:
    """A TCP proxy to PostgreSQL that, once armed, cuts the next connection that sends COMMIT.

    ``after=True``: COMMIT reaches the server (it commits) and the answer is dropped, the
    ambiguous case; ``after=False``: the connection is cut before COMMIT leaves (it rolls back).
    """

    def __init__(self, upstream: int, *, after: bool) -> None:
        self.after = after
        self.armed = threading.Event()
        self.fired = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._upstream = upstream
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self._upstream))
            self._socks += [client, server]
            cut = threading.Event()
            threading.Thread(target=self._up, args=(client, server, cut), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, cut), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, cut: threading.Event) -> None:
        try:
            while data := client.recv(65536):
                if self.armed.is_set() and b"COMMIT" in data:
                    self.armed.clear()
                    cut.set()
                    if self.after:
                        server.sendall(data)  # the server commits; _down drops its answer
                    else:
                        _cut(client, server)
                    self.fired.set()
                    return
                server.sendall(data)
        except OSError:
            pass

    def _down(self, server: socket.socket, client: socket.socket, cut: threading.Event) -> None:
        try:
            while data := server.recv(65536):
                if cut.is_set():
                    time.sleep(0.2)  # let the commit finish on the server, then cut
                    _cut(client, server)
                    return
                client.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._listener.close()
        _cut(*self._socks)


def _cut(*socks: socket.socket) -> None:
    """shutdown() first: a plain close() leaves the connection up while a thread is in recv()."""
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def _bench_behind_cutter(
    root: PKI, postgres: TempPostgres, tmp_path: Path, *, after: bool
) -> tuple[Path, _CommitCutter]:
    """A new station whose registry URL goes through a :class:`_CommitCutter`."""
    station = _station_dir(root, tmp_path, "bench")
    proxy = _CommitCutter(postgres.port, after=after)
    toml = station / "pki.toml"
    toml.write_text(toml.read_text().replace(f":{postgres.port}/", f":{proxy.port}/"))
    return station, proxy


@pytest.mark.parametrize("after", [True, False], ids=["answer-lost", "never-arrived"])
def test_a_commit_cut_off_is_applied_exactly_once(
    root: PKI, postgres: TempPostgres, tmp_path: Path, after: bool
) -> None:
    """Whether the lost COMMIT happened or not, the device is recorded once (and the call
    returns normally): the station recognises its own transaction id after reconnecting."""
    station, proxy = _bench_behind_cutter(root, postgres, tmp_path, after=after)
    try:
        with PKI.open(station) as ca:
            proxy.armed.set()
            ca.issue("dev-once")
            assert proxy.fired.is_set()
            rows = ca.registry.history("dev-once")
            issues = [e for _, e in ca.ledger.entries() if e.data.get("name") == "dev-once"]
            ca.verify_ledger()
    finally:
        proxy.close()
    assert len(rows) == 1
    assert len(issues) == 1


@pytest.mark.parametrize("after", [True, False], ids=["answer-lost", "never-arrived"])
def test_a_renewal_offer_cut_off_at_commit_is_kept_once(
    root: PKI, postgres: TempPostgres, tmp_path: Path, after: bool
) -> None:
    """The offer book (renewals.sqlite3) is written inside the retried transaction: whether the
    lost COMMIT happened or not, the offer is in the book once with one ledger line, and the
    renewal is recorded once when its COMMIT is cut off too."""
    station, proxy = _bench_behind_cutter(root, postgres, tmp_path, after=after)
    try:
        with PKI.open(station) as ca:
            old = ca.issue("dev-r")
            prepared = ca.prepare("dev-r", rotate=True)
            proxy.armed.set()
            offer = ca.offer(prepared, request_id="req-1", replaces=old.record.serial)
            assert proxy.fired.is_set()
            assert [o.request_id for o in ca.offers.open_offers("dev-r")] == ["req-1"]
            proxy.fired.clear()
            proxy.armed.set()
            moved, record = ca.record_offer(offer, via="test")
            assert proxy.fired.is_set()
            assert record is not None
            assert moved.state.value == "recorded"
            book = ca.offers.get("req-1")
            assert book is not None
            assert book.state.value == "recorded"
            active = ca.registry.active("dev-r")
            assert active is not None
            assert active.serial == record.serial == offer.new_serial
            events = [e for _, e in ca.ledger.entries() if e.data.get("name") == "dev-r"]
            ca.verify_ledger()
    finally:
        proxy.close()
    assert [e.event for e in events].count("renewal-offer") == 1
    renewed = [e for e in events if e.event == "issue" and e.data.get("renewal") == "req-1"]
    assert len(renewed) == 1


@needs_softhsm
def test_a_station_issuing_key_in_a_token(root: PKI, softhsm: SoftHSM, tmp_path: Path) -> None:
    """A station's issuing CA key made in a PKCS#11 token: no key file in its directory, its
    certificates, CRL and ledger lines signed in the token, and the shared ledger verifies."""
    from provisioning.hsm import Pkcs11Signer

    out = tmp_path / "bench-hsm"
    root.add_station("bench-hsm", out=out, issuing_key=softhsm.uri("bench-hsm"))
    assert not (out / "private" / "issuing.key").exists()
    assert "bench-hsm" in softhsm.objects()
    with PKI.open(out) as station:
        assert station.config.issuing_key == softhsm.uri("bench-hsm")
        assert station.config.root_key is None
        assert isinstance(station.issuing_key(), Pkcs11Signer)
        issued = station.issue("dev-t", out=tmp_path / "dev-t")
        station.revoke("dev-t")
        station.verify_ledger()
    assert openssl_verify(out, tmp_path / "dev-t" / "device.crt").returncode == 0
    revoked = openssl_verify(out, tmp_path / "dev-t" / "device.crt", crl=True)
    assert "revoked" in revoked.stdout + revoked.stderr
    assert issued.record.issuer == fingerprint_of(out)
    assert root.verify_ledger().entries >= 4


def test_a_station_token_key_that_cannot_be_made_leaves_nothing(
    root: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token that cannot be reached: one error, no station directory, no station row."""
    monkeypatch.setenv("IOTAUTH_PKCS11_MODULE", str(tmp_path / "no-such-module.so"))
    with pytest.raises(PKIError):
        root.add_station("bench-x", out=tmp_path / "bench-x", issuing_key="pkcs11:token=t;object=o")
    assert not (tmp_path / "bench-x").exists()
    assert [st.name for st in root.stations()] == ["main"]


def fingerprint_of(pki_dir: Path) -> str:
    from provisioning.certificates import fingerprint

    return fingerprint(x509.load_pem_x509_certificate((pki_dir / "issuing.crt").read_bytes()))
