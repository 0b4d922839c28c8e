"""Device identity: the one definition of a valid id, its SPIFFE ID and topic prefix."""

from __future__ import annotations

import pytest

from provisioning.errors import InvalidIdentityError
from provisioning.identity import (
    DeviceId,
    Identity,
    IdentityKind,
    parse_spiffe_id,
    validate_name,
    validate_trust_domain,
)

VALID = ["a", "0", "dev-0001", "sensor-42-b", "x" * 64, "9lives", "a-", "a--b"]

INVALID = [
    ("", "empty"),
    ("x" * 65, "65 characters"),
    ("dev/1", "'/'"),
    ("dev+1", "'+'"),
    ("dev#1", "'#'"),
    ("dev\x001", "NUL"),
    ("dev 1", "whitespace"),
    ("dev\t1", "whitespace"),
    ("Dev-1", "upper-case"),
    ("dév", "non-ASCII"),
    ("dev\u200b1", "non-ASCII"),
    ("-dev", "starts with '-'"),
    ("dev_1", "'_'"),
    ("dev.1", "'.'"),
    ("dev\n1", "whitespace"),
]


@pytest.mark.parametrize("name", VALID)
def test_valid_names_are_accepted(name: str) -> None:
    """Every id the contract allows is accepted unchanged."""
    assert validate_name(name) == name
    assert str(DeviceId(name)) == name


@pytest.mark.parametrize(("name", "reason"), INVALID)
def test_invalid_names_are_refused_with_a_reason(name: str, reason: str) -> None:
    """Each kind of bad id is refused, and the message says which rule it broke, on one line."""
    with pytest.raises(InvalidIdentityError) as info:
        validate_name(name)
    message = str(info.value)
    assert reason in message
    assert "\n" not in message
    assert "\x00" not in message
    assert message.isascii()


def test_non_string_is_refused() -> None:
    with pytest.raises(InvalidIdentityError, match="not a string"):
        validate_name(42)


def test_device_id_dataclass_validates_and_is_frozen() -> None:
    with pytest.raises(InvalidIdentityError):
        DeviceId("BAD")
    dev = DeviceId("dev-1")
    with pytest.raises(AttributeError):
        dev.value = "dev-2"  # type: ignore[misc]
    assert dev.topic_prefix == "devices/dev-1/"


def test_spiffe_ids_and_topic_prefix() -> None:
    device = Identity.device("dev-1", "fleet.example")
    service = Identity.service("telemetry-sink", "fleet.example")
    assert device.spiffe_id == "spiffe://fleet.example/device/dev-1"
    assert service.spiffe_id == "spiffe://fleet.example/service/telemetry-sink"
    assert device.topic_prefix == "devices/dev-1/"
    with pytest.raises(ValueError, match="owns no topic subtree"):
        _ = service.topic_prefix


def test_parse_spiffe_id_round_trips() -> None:
    for ident in (Identity.device("dev-1", "fleet.example"), Identity.service("svc", "a.b")):
        assert parse_spiffe_id(ident.spiffe_id) == ident


@pytest.mark.parametrize(
    "uri",
    [
        "https://fleet.example/device/dev-1",
        "spiffe://fleet.example/device/Dev-1",
        "spiffe://fleet.example/device/dev-1/extra",
        "spiffe://fleet.example/admin/dev-1",
        "spiffe://fleet.example/device/",
        "spiffe://Fleet.Example/device/dev-1",
        "spiffe://fleet.example/device/dev+1",
    ],
)
def test_parse_spiffe_id_refuses_anything_else(uri: str) -> None:
    with pytest.raises(InvalidIdentityError):
        parse_spiffe_id(uri)


@pytest.mark.parametrize("domain", ["", "Fleet.example", "fleet example", ".fleet", "a..b", "a/b"])
def test_bad_trust_domains_are_refused(domain: str) -> None:
    with pytest.raises(InvalidIdentityError, match="trust domain"):
        validate_trust_domain(domain)


def test_identity_kind_values_are_the_spiffe_path_segments() -> None:
    assert [k.value for k in IdentityKind] == ["device", "service"]
