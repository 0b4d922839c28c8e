"""pytest fixtures for testing software against a realistic iotauth fleet (entry point pytest11).

Installed with the package; available in any pytest run where iotauth is installed:

``iotauth_pki``
    A fresh fleet PKI (:class:`provisioning.pki.PKI`) in a temporary directory.
``iotauth_broker``
    Our hardened broker on 127.0.0.1:0 for that PKI (:class:`iotauth.testing.BrokerEndpoint`).
``iotauth_service_client``
    ``iotauth_service_client(name="observer")`` -> a connected :class:`ServiceClient` with a real
    service certificate; closed at the end of the test.
``iotauth_fleet``
    ``iotauth_fleet(n)`` -> n provisioned devices running the real agent, connected with their own
    certificates (see docs/TESTING.md).

Example::

    def test_sink_sees_every_device(iotauth_fleet, iotauth_service_client):
        sink = iotauth_service_client("telemetry-sink")
        sink.subscribe("devices/+/telemetry/#")
        fleet = iotauth_fleet(50)
        sink.wait_for(lambda msgs: {m.topic.split("/")[1] for m in msgs} >= set(fleet.device_ids))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from iotauth.testing import BrokerEndpoint, Fleet, ServiceClient
    from provisioning.pki import PKI

__all__ = ["iotauth_broker", "iotauth_fleet", "iotauth_pki", "iotauth_service_client"]


@pytest.fixture
def iotauth_pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PKI]:
    from provisioning.pki import PKI

    root = tmp_path_factory.mktemp("iotauth")
    pki = PKI.init(root / "pki", trust_domain="fleet.test")
    yield pki
    pki.close()


@pytest.fixture
def iotauth_broker(iotauth_pki: PKI) -> Iterator[BrokerEndpoint]:
    from iotauth.testing import running_broker

    with running_broker(iotauth_pki.path) as endpoint:
        yield endpoint


@pytest.fixture
def iotauth_service_client(
    iotauth_pki: PKI, iotauth_broker: BrokerEndpoint
) -> Iterator[Callable[..., ServiceClient]]:
    from iotauth.testing import ServiceClient, issue_service

    clients: list[ServiceClient] = []

    def connect(name: str = "observer") -> ServiceClient:
        creds = issue_service(iotauth_pki, name, Path(iotauth_pki.path).parent / "services" / name)
        client = ServiceClient(creds, iotauth_broker).connect()
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


@pytest.fixture
def iotauth_fleet(
    iotauth_pki: PKI, iotauth_broker: BrokerEndpoint
) -> Iterator[Callable[..., Fleet]]:
    """``iotauth_fleet(n, telemetry_interval=0.5)`` -> n connected agents; stopped afterwards."""
    import contextlib

    from iotauth.testing import start_fleet

    with contextlib.ExitStack() as stack:

        def make(count: int, *, telemetry_interval: float = 0.5, prefix: str = "dev") -> Fleet:
            fleet = start_fleet(
                iotauth_pki,
                iotauth_broker,
                count,
                prefix=prefix,
                telemetry_interval=telemetry_interval,
            )
            return stack.enter_context(fleet)

        yield make
