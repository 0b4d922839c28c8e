"""Broker fixtures: a fleet PKI with credentials, a real broker on 127.0.0.1:0, real clients.

The broker runs on its own thread and event loop (``BrokerThread``); paho clients run their own
network threads, as devices would. Raw TLS sockets stand in for misbehaving clients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioning.pki import PKI
from tests.broker.broker_helpers import BrokerFactory, Fleet, Peer


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    ca = PKI.init(tmp_path / "pki", trust_domain="fleet.example")
    f = Fleet(ca, tmp_path)
    for name in ("dev-1", "dev-2"):
        f.creds(name)
    f.creds("sink", service=True)
    yield f
    ca.close()


@pytest.fixture
def make_broker(fleet: Fleet) -> Iterator[BrokerFactory]:
    factory = BrokerFactory(fleet)
    yield factory
    for thread in factory.started:
        thread.stop()


@pytest.fixture
def broker(make_broker: BrokerFactory) -> Any:
    return make_broker()


@pytest.fixture
def peers(fleet: Fleet) -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(
        port: int, name: str, client_id: str | None = None, *, service: bool = False, **kw: Any
    ) -> Peer:
        creds = fleet.creds(name, service=service) if name else None
        peer = Peer(port, creds, client_id if client_id is not None else name, **kw)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()
