"""The public pytest fixtures (entry point pytest11), used exactly as a user would."""

from __future__ import annotations

from pathlib import Path

from iotauth.testing import BrokerEndpoint, ServiceClient
from provisioning.pki import PKI


def test_plugin_is_registered(pytestconfig) -> None:
    assert pytestconfig.pluginmanager.has_plugin("iotauth")


def test_service_client_sees_a_device_and_devices_cannot_read_it(
    iotauth_pki: PKI, iotauth_broker: BrokerEndpoint, iotauth_service_client, tmp_path: Path
) -> None:
    sink = iotauth_service_client("telemetry-sink")
    assert sink.subscribe("devices/+/telemetry/#")
    assert not sink.subscribe("$SYS/#")

    iotauth_pki.issue("dev-1", out=tmp_path / "dev-1")
    device = ServiceClient(tmp_path / "dev-1", iotauth_broker).connect()
    try:
        assert not device.subscribe("devices/+/telemetry/#"), "a device may not read the fleet"
        device.publish("devices/dev-1/telemetry/temp", b"21.5")
    finally:
        device.close()
    got = sink.wait_for(lambda msgs: any(m.topic == "devices/dev-1/telemetry/temp" for m in msgs))
    assert got[-1].payload == b"21.5"
