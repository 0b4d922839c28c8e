"""The fleet simulator: small fleets, real certificates, our broker and mosquitto."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_agent.errors import AgentConfigError
from device_agent.fleet import FleetSpec, run_fleet
from iotauth.fleet_backend import LocalFleetBackend
from provisioning.pki import PKI
from tests.conftest import needs_mosquitto
from tests.device_agent.agent_helpers import run_mixed_fleet


def test_fleet_against_our_broker_with_every_scenario(pki: PKI, tmp_path: Path) -> None:
    """30 devices: revoked and expired ones refused, a broker restart, churn, renewal mid-run."""
    backend = LocalFleetBackend(pki.path, workdir=tmp_path)
    try:
        spec = FleetSpec(
            devices=30,
            duration=8,
            scenarios=("steady", "storm", "churn", "revoked", "renewal"),
            telemetry_interval=0.5,
            reactors=2,
            churn=0.05,
            bad_fraction=0.1,
            renew_fraction=0.2,
        )
        report = run_fleet(spec, backend, workdir=tmp_path / "fleet")
    finally:
        backend.close()
    text = "\n".join(report.lines())
    assert report.expected_online == 24, text
    assert report.first_connect_all_s is not None, text
    assert report.storm_recovery_s is not None, text
    assert report.online_at_end == 24, text
    assert report.refusals.get("expired") == 3, text
    # Our broker names the refusal in a TLS alert, so each revoked device is refused once, as
    # "revoked". (A close before CONNACK can still happen while the broker restarts mid-storm.)
    assert report.refusals.get("revoked") == 3, text
    assert report.renewals_requested == 4, text
    assert report.renewals_completed == 4, text
    assert report.messages_acked > 0, text
    assert report.messages_unique > 0, text
    assert report.handshake_ms["p50"] > 0
    assert report.to_json().startswith("{")


@needs_mosquitto
def test_fleet_against_mosquitto(pki: PKI, tmp_path: Path) -> None:
    """auto: Mosquitto speaks MQTT 5, so every device that connected did so on 5."""
    report = run_mixed_fleet(
        LocalFleetBackend(pki.path, kind="mosquitto", workdir=tmp_path), tmp_path / "fleet"
    )
    assert report.protocols == {"5": 18}, report.lines()
    assert report.fallbacks == 0


@needs_mosquitto
def test_mixed_protocol_fleet_against_mosquitto(pki: PKI, tmp_path: Path) -> None:
    """--mqtt5-share 0.5: a seeded half of the devices on MQTT 5, the rest on 3.1.1, one broker;
    the report counts devices per protocol (the revoked and expired ones never connect)."""
    report = run_mixed_fleet(
        LocalFleetBackend(pki.path, kind="mosquitto", workdir=tmp_path),
        tmp_path / "fleet",
        mqtt5_share=0.5,
    )
    assert sum(report.protocols.values()) == 18, report.lines()
    assert set(report.protocols) == {"5", "3.1.1"}, report.lines()
    spec = FleetSpec(devices=20, mqtt5_share=0.5)
    pinned = spec.versions(spec.names)
    assert sorted(pinned.values()).count("5") == 10
    assert pinned == spec.versions(spec.names)  # seeded: the same devices every run
    assert any("MQTT 3.1.1" in line and "--mqtt5-share 0.5" in line for line in report.lines())


def test_mqtt5_share_is_a_fraction() -> None:
    for bad in (-0.1, 1.5):
        with pytest.raises(AgentConfigError, match="from 0 to 1"):
            FleetSpec(devices=3, mqtt5_share=bad)
    assert set(FleetSpec(devices=3).versions(["a", "b"]).values()) == {"auto"}
    assert set(FleetSpec(devices=3, mqtt5_share=1).versions(["a", "b"]).values()) == {"5"}
    assert set(FleetSpec(devices=3, mqtt5_share=0).versions(["a", "b"]).values()) == {"311"}
