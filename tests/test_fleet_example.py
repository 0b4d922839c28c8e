"""The example from docs/TESTING.md: a backend tested against a 50-device fleet.

It uses only the public fixtures of the iotauth pytest plugin, as a user's test suite would.
"""

from __future__ import annotations

from pathlib import Path


def test_sink_receives_telemetry_from_every_device(iotauth_fleet, iotauth_service_client) -> None:
    sink = iotauth_service_client("telemetry-sink")
    assert sink.subscribe("devices/+/telemetry/#")
    fleet = iotauth_fleet(50)

    def senders(messages) -> set[str]:
        return {m.topic.split("/")[1] for m in messages if "/telemetry" in m.topic}

    sink.wait_for(lambda msgs: senders(msgs) >= set(fleet.device_ids), timeout=60)


def test_a_device_cannot_speak_for_another_or_read_the_fleet(
    iotauth_pki, iotauth_broker, iotauth_fleet, iotauth_service_client, tmp_path: Path
) -> None:
    from iotauth.testing import ServiceClient

    sink = iotauth_service_client("telemetry-sink")
    assert sink.subscribe("devices/+/telemetry/#")
    fleet = iotauth_fleet(5)
    victim = fleet.device_ids[0]

    iotauth_pki.issue("dev-rogue", out=tmp_path / "rogue")
    rogue = ServiceClient(tmp_path / "rogue", iotauth_broker).connect()
    try:
        assert not rogue.subscribe("devices/+/telemetry/#"), "a device may not read the fleet"
        rogue.publish(f"devices/{victim}/telemetry/spoofed", b"fake", qos=0)
    finally:
        rogue.close()
    rogue = ServiceClient(tmp_path / "rogue", iotauth_broker).connect()
    try:
        rogue.publish("services/telemetry-sink/inbox", b"hello", qos=0)
    finally:
        rogue.close()
    # Real telemetry keeps arriving; the spoof and the direct message never do.
    sink.wait_for(lambda msgs: sum("/telemetry" in m.topic for m in msgs) >= 20)
    assert not [
        m for m in sink.messages if m.topic.endswith("/spoofed") or m.topic.startswith("services/")
    ]
