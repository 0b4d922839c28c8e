"""Revocation through the shared registry: every broker of a factory, within one second.

Two brokers run from two station directories of one PostgreSQL registry (a real cluster from the
``postgres`` fixture). Devices issued by any station authenticate at either broker; a revocation
committed by any station closes the device's live sessions on both; a revoked station's devices
are all refused; a broker that loses the database keeps serving and catches up.
"""

from __future__ import annotations

import functools
import json
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from cryptography import x509

from broker.revocation import SNAPSHOT_NAME, RegistryRevocationWatcher
from broker.server import BrokerThread
from broker.settings import BrokerSettings
from iotauth.pgcluster import TempPostgres
from provisioning.identity import IdentityKind
from provisioning.pki import PKI
from tests.broker.broker_helpers import (
    closed_by_peer,
    connect_packet,
    read_connack,
    tls_socket,
    wait_until,
)
from tests.conftest import Result, assert_one_line_error, openssl

pytestmark = pytest.mark.slow


@dataclass
class Factory:
    root: PKI
    stations: dict[str, PKI]
    brokers: list[BrokerThread]
    tmp: Path

    def creds(self, station: str, name: str) -> Path:
        out = self.tmp / "creds" / name
        if not out.exists():
            self.stations[station].issue(name, kind=IdentityKind.DEVICE, out=out)
        return out

    def connect(self, broker: BrokerThread, name: str) -> ssl.SSLSocket:
        sock = tls_socket(broker.port, self.tmp / "creds" / name, root=self.root.path / "root.crt")
        sock.sendall(connect_packet(name))
        assert read_connack(sock) == 0, f"{name} was refused"
        return sock

    def refused(self, broker: BrokerThread, name: str) -> bool:
        """Refused in the handshake, or by CONNACK (MQTT-3.2.2-5: then the server closes)."""
        try:
            sock = tls_socket(
                broker.port, self.tmp / "creds" / name, root=self.root.path / "root.crt"
            )
            sock.sendall(connect_packet(name))
            code = read_connack(sock)
            sock.close()
        except (ssl.SSLError, OSError):
            return True
        return code != 0


@pytest.fixture
def factory(tmp_path: Path, pg_url: str) -> Iterator[Factory]:
    root = PKI.init(tmp_path / "root-ca", trust_domain="fleet.example", registry=pg_url)
    stations = {"root": root}
    for name in ("station-1", "station-3"):
        root.add_station(name, out=tmp_path / name)
        stations[name] = PKI.open(tmp_path / name)
    brokers = [
        BrokerThread(BrokerSettings(tmp_path / name)).start() for name in ("station-3", "station-1")
    ]
    f = Factory(root, stations, brokers, tmp_path)
    yield f
    for b in brokers:
        b.stop()
    for ca in stations.values():
        ca.close()


def test_a_revocation_by_any_station_kicks_on_every_broker_within_one_second(
    factory: Factory, cli: Callable[..., Result]
) -> None:
    a, b = factory.brokers
    assert all(isinstance(x.broker.watcher, RegistryRevocationWatcher) for x in factory.brokers)
    factory.creds("station-3", "dev-0042")
    factory.creds("station-1", "dev-0007")
    factory.creds("root", "dev-0001")
    # A device from any station authenticates at any broker.
    live = {(i, n): factory.connect(x, n) for i, x in enumerate(factory.brokers)
            for n in ("dev-0042", "dev-0007", "dev-0001")}  # fmt: skip
    # Revoked by station-1, issued by station-3: the revocation travels through the database.
    cli("device", "revoke", "dev-0042", "--pki", "station-1", check=True)
    assert closed_by_peer(live[0, "dev-0042"], 1.0)
    assert closed_by_peer(live[1, "dev-0042"], 1.0)
    for other in ("dev-0007", "dev-0001"):  # the negative twins stay connected
        assert not closed_by_peer(live[0, other], 0.2)
        assert not closed_by_peer(live[1, other], 0.2)
    assert factory.refused(a, "dev-0042")
    assert factory.refused(b, "dev-0042")
    assert a.broker.audit.events("kick", reason="revoked", client_id="dev-0042")
    assert b.broker.audit.events("kick", reason="revoked", client_id="dev-0042")
    for sock in live.values():
        sock.close()


def test_revoking_a_station_refuses_every_one_of_its_devices(
    factory: Factory, cli: Callable[..., Result]
) -> None:
    a, b = factory.brokers
    for n in range(2):
        factory.creds("station-3", f"s3-dev-{n}")
    factory.creds("station-1", "s1-dev")
    live = [factory.connect(x, f"s3-dev-{n}") for x in (a, b) for n in range(2)]
    keep = [factory.connect(x, "s1-dev") for x in (a, b)]
    cli("ca", "revoke-station", "station-3", "--pki", "root-ca", "--reason", "key-compromise",
        check=True)  # fmt: skip
    for sock in live:
        assert closed_by_peer(sock, 1.0)
    for sock in keep:
        assert not closed_by_peer(sock, 0.2)
    for x in (a, b):
        assert factory.refused(x, "s3-dev-0")  # in the handshake: its CA's CRL is withdrawn
        assert not factory.refused(x, "s1-dev")
    again = cli("device", "issue", "s3-dev-9", "--pki", "station-3", "--out", "c9")
    assert_one_line_error(again, "station-3", "was revoked")
    for sock in live + keep:
        sock.close()


def test_a_broker_that_loses_the_database_keeps_serving_and_catches_up(
    factory: Factory, postgres: TempPostgres, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = factory.brokers
    factory.creds("station-1", "dev-a")
    factory.creds("station-3", "dev-b")
    factory.creds("station-3", "dev-old")
    factory.stations["station-3"].revoke("dev-old")
    assert wait_until(lambda: factory.refused(a, "dev-old"), 2.0)

    def up(x: BrokerThread) -> float:
        return x.broker.metrics.value("iotauth_broker_registry_up")

    assert up(a) == up(b) == 1.0
    live = factory.connect(a, "dev-a")
    postgres.stop()
    try:
        assert wait_until(lambda: up(a) == 0.0 and up(b) == 0.0, 10.0)
        assert "lost" in caplog.text
        # Still serving what it knew: good devices in, the revoked one out, live sessions kept.
        factory.connect(b, "dev-b").close()
        assert factory.refused(a, "dev-old")
        assert not closed_by_peer(live, 0.2)
    finally:
        postgres.resume()
    assert wait_until(lambda: up(a) == 1.0 and up(b) == 1.0, 15.0)
    # Caught up: a revocation committed while broker b is cut off arrives when it reconnects.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'iotauth' AND pid <> pg_backend_pid()"
        )
    factory.stations["station-1"].revoke("dev-a")
    assert closed_by_peer(live, 3.0)
    assert wait_until(lambda: factory.refused(b, "dev-a"), 5.0)
    assert "is back" in caplog.text


def _up(x: BrokerThread) -> float:
    return x.broker.metrics.value("iotauth_broker_registry_up")


def test_a_broker_starts_from_its_snapshot_while_the_database_is_down_and_catches_up(
    factory: Factory, postgres: TempPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    _, b = factory.brokers  # b runs from station-1's directory
    factory.creds("station-1", "dev-keep")
    factory.creds("station-3", "dev-old")
    factory.creds("station-3", "dev-late")
    factory.stations["station-3"].revoke("dev-old")
    assert wait_until(lambda: factory.refused(b, "dev-old"), 2.0)
    snapshot = factory.tmp / "station-1" / SNAPSHOT_NAME
    assert wait_until(lambda: _serial_in(snapshot, factory, "dev-old"), 2.0)
    b.stop()
    # Revoked while broker b is away: its snapshot cannot know.
    factory.stations["station-1"].revoke("dev-late")
    postgres.stop()
    try:
        c = BrokerThread(BrokerSettings(factory.tmp / "station-1")).start()
        factory.brokers[1] = c  # the fixture stops it
        assert _up(c) == 0.0
        assert c.broker.metrics.value("iotauth_broker_registry_view_age_seconds") > 0
        start_lines = [
            r.getMessage() for r in caplog.records if "unreachable at start" in r.message
        ]
        assert len(start_lines) == 1, start_lines
        assert "snapshot" in start_lines[0]
        assert postgres.password not in caplog.text
        # What it knew: a good device in, the revoked one out.
        factory.connect(c, "dev-keep").close()
        assert factory.refused(c, "dev-old")
        late = factory.connect(c, "dev-late")  # revoked after the snapshot: not known yet
    finally:
        postgres.resume()
    # The database answers again: the broker reconnects (every second), reads the feed it
    # missed and kicks the device revoked while it was away.
    assert closed_by_peer(late, 10.0)
    assert factory.refused(c, "dev-late")
    assert wait_until(lambda: _up(c) == 1.0, 5.0)
    assert c.broker.metrics.value("iotauth_broker_registry_view_age_seconds") == 0.0
    assert "is back" in caplog.text


def _serial_in(snapshot: Path, factory: Factory, name: str) -> bool:
    record = factory.root.registry.active(name) or factory.root.registry.history(name)[-1]
    return record.serial in json.loads(snapshot.read_text())["revoked"]


def test_without_database_or_snapshot_a_broker_does_not_start_and_says_why(
    factory: Factory, postgres: TempPostgres, pg_url: str, cli: Callable[..., Result]
) -> None:
    station = factory.tmp / "station-1"
    (station / SNAPSHOT_NAME).unlink()
    postgres.stop()
    try:
        result = cli("broker", "run", "--pki", "station-1", "--port", "0", "--no-renewal")
    finally:
        postgres.resume()
    assert_one_line_error(result, pg_url, "cannot reach the database server", "no snapshot")
    assert postgres.password not in result.stderr
    # A corrupt snapshot is no better than none: the same refusal, naming the file.
    (station / SNAPSHOT_NAME).write_text("{not json")
    postgres.stop()
    try:
        result = cli("broker", "run", "--pki", "station-1", "--port", "0", "--no-renewal")
    finally:
        postgres.resume()
    assert_one_line_error(result, pg_url, SNAPSHOT_NAME, "unusable")


def _handshake_refused(factory: Factory, broker: BrokerThread, name: str) -> bool:
    """Refused by TLS itself (the station's CRL): the server's alert arrives before any MQTT."""
    sock = tls_socket(
        broker.port, factory.tmp / "creds" / name, root=factory.root.path / "root.crt"
    )
    sock.settimeout(0.5)
    try:
        sock.recv(1)
    except ssl.SSLError as exc:
        return "revoked" in str(exc)
    except TimeoutError:
        return False  # the server waits for CONNECT: the handshake passed
    finally:
        sock.close()
    return False


def test_the_owning_stations_crl_follows_a_revocation_by_another_station(
    factory: Factory, cli: Callable[..., Result]
) -> None:
    a, b = factory.brokers  # a runs from station-3's directory, so it holds station-3's key
    factory.creds("station-3", "s3-dev")
    factory.creds("station-3", "s3-other")
    for x in (a, b):  # the negative twin first: before the revocation, TLS lets it through
        assert not _handshake_refused(factory, x, "s3-dev")
    before = _station_crl(factory.root, "station-3")
    cli("device", "revoke", "s3-dev", "--pki", "station-1", check=True)
    serial = int(factory.root.registry.history("s3-dev")[-1].serial, 16)
    # Station-3's broker re-signs station-3's CRL and publishes it; every broker's handshake
    # then refuses the device (not only CONNECT), as an exported Mosquitto would.
    assert wait_until(
        lambda: (
            _station_crl(factory.root, "station-3").get_revoked_certificate_by_serial_number(serial)
            is not None
        ),
        5.0,
    )
    after = _station_crl(factory.root, "station-3")
    number = x509.CRLNumber
    assert (
        after.extensions.get_extension_for_class(number).value.crl_number
        > before.extensions.get_extension_for_class(number).value.crl_number
    )
    crl_file = factory.tmp / "station-3" / "crl.pem"
    assert openssl("crl", "-in", crl_file, "-noout", "-text").stdout.count("Serial Number") == 1
    for x in (a, b):
        assert wait_until(functools.partial(_handshake_refused, factory, x, "s3-dev"), 5.0)
        assert not _handshake_refused(factory, x, "s3-other")
    factory.root.verify_ledger()


def _station_crl(root: PKI, name: str) -> x509.CertificateRevocationList:
    [st] = [s for s in root.stations() if s.name == name]
    assert st.crl_pem is not None
    return x509.load_pem_x509_crl(st.crl_pem)
