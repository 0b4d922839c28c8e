"""Revocation through the shared registry: every broker of a factory, within one second.

Two brokers run from two station directories of one PostgreSQL registry (a real cluster from the
``postgres`` fixture). Devices issued by any station authenticate at either broker; a revocation
committed by any station closes the device's live sessions on both; a revoked station's devices
are all refused; a broker that loses the database keeps serving and catches up.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from broker.revocation import RegistryRevocationWatcher
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
from tests.conftest import Result, assert_one_line_error

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
