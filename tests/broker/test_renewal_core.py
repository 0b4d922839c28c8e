"""The renewal service's decisions (broker/renewal_core.py), the offer table
(provisioning/offers.py) and the message module (provisioning/renewal_protocol.py), by plain
calls: no broker, no clock, no CA."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker.errors import ConfigError
from broker.renewal_core import (
    ActiveCertificate,
    AuditThrottle,
    Confirm,
    FairQueue,
    RenewalSettings,
    Reply,
    Resend,
    Sign,
    decide_csr,
    decide_installed,
)
from provisioning.errors import PKIError
from provisioning.offers import TRANSITIONS, Offer, OfferEvent, OfferState, next_state
from provisioning.renewal_protocol import (
    CertificateAnswer,
    CsrRequest,
    InstalledReport,
    MalformedMessageError,
    RecordedAnswer,
    Refusal,
    RefusedAnswer,
    answer_topic,
    decode_answer,
    decode_request,
    device_of_request_topic,
    encode,
    request_topic,
)

DAY = 86400.0
NOW = 1_000_000_000.0
ACTIVE = ActiveCertificate("aa", "device", NOW - 10 * DAY, NOW + 80 * DAY, "key-now")


def _offer(state: OfferState = OfferState.OFFERED, **kw: Any) -> Offer:
    fields: dict[str, Any] = {
        "request_id": "r1",
        "device_id": "dev-1",
        "old_serial": "aa",
        "new_serial": "bb",
        "cert_pem": b"PEM",
        "created": NOW - 60,
        "state": state,
    }
    fields.update(kw)
    return Offer(**fields)


def _csr(**kw: Any) -> object:
    args: dict[str, Any] = {
        "device_id": "dev-1",
        "request_id": "r2",
        "previous": None,
        "active": ACTIVE,
        "csr_problem": None,
        "csr_key_sha256": "key-new",
        "open_offer": None,
        "open_offer_key_sha256": None,
        "signed_at": [],
        "now": NOW,
        "settings": RenewalSettings(),
    }
    args.update(kw)
    return decide_csr(**args)


def _refused(step: object) -> str:
    assert isinstance(step, Reply), step
    assert isinstance(step.answer, RefusedAnswer), step
    return step.answer.reason


# -- decide_csr ---------------------------------------------------------------------------------


def test_a_good_request_is_signed() -> None:
    assert _csr() == Sign("r2", "aa")


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (OfferState.OFFERED, Resend),
        (OfferState.RECORDED, RecordedAnswer),
        (OfferState.VOIDED, RefusedAnswer),
    ],
)
def test_a_repeated_request_gets_the_same_answer(state: OfferState, expected: type) -> None:
    step = _csr(previous=_offer(state), request_id="r1")
    if expected is Resend:
        assert step == Resend(_offer(state), "r1")
    else:
        assert isinstance(step, Reply)
        assert isinstance(step.answer, expected)


def test_another_devices_request_id_is_refused() -> None:
    step = _csr(previous=_offer(device_id="dev-9"), request_id="r1")
    assert _refused(step) == Refusal.BAD_REQUEST


@pytest.mark.parametrize(
    ("facts", "reason"),
    [
        ({"active": None}, Refusal.NOT_ACTIVE),
        (
            {"active": ActiveCertificate("aa", "service", 0, NOW + DAY, "k")},
            Refusal.NOT_ACTIVE,
        ),
        ({"csr_problem": (Refusal.BAD_CSR, "signature")}, Refusal.BAD_CSR),
        ({"csr_problem": (Refusal.IDENTITY_MISMATCH, "CN")}, Refusal.IDENTITY_MISMATCH),
        ({"csr_key_sha256": "key-now"}, Refusal.KEY_REUSE),
    ],
)
def test_checks_of_the_device_and_the_csr(facts: dict[str, Any], reason: Refusal) -> None:
    assert _refused(_csr(**facts)) == reason


def test_one_open_offer_per_device() -> None:
    """The key on offer asked again (any request id): that offer; another key: refused."""
    open_offer = _offer()
    same = _csr(open_offer=open_offer, open_offer_key_sha256="key-new")
    assert same == Resend(open_offer, "r2")
    other = _csr(open_offer=open_offer, open_offer_key_sha256="key-other")
    assert _refused(other) == Refusal.OFFER_OPEN


def test_the_signing_rate_is_per_rolling_window() -> None:
    settings = RenewalSettings(max_signatures=2, rate_window=DAY)
    two_recent = [NOW - 3600, NOW - 60]
    assert _refused(_csr(signed_at=two_recent, settings=settings)) == Refusal.RATE_LIMITED
    one_old = [NOW - DAY - 1, NOW - 60]  # the older one left the window
    assert _csr(signed_at=one_old, settings=settings) == Sign("r2", "aa")


def test_the_minimum_life_fraction() -> None:
    # ACTIVE is 10 of 90 days into its life (11 %).
    assert _refused(_csr(settings=RenewalSettings(min_life_fraction=0.5))) == Refusal.TOO_EARLY
    assert _csr(settings=RenewalSettings(min_life_fraction=0.1)) == Sign("r2", "aa")


def test_checks_run_in_order_the_final_ones_first() -> None:
    """A revoked device with a bad CSR is told not-active; a bad CSR over its rate, bad-csr."""
    assert _refused(_csr(active=None, csr_problem=(Refusal.BAD_CSR, "x"))) == Refusal.NOT_ACTIVE
    settings = RenewalSettings(max_signatures=1)
    step = _csr(csr_problem=(Refusal.BAD_CSR, "x"), signed_at=[NOW], settings=settings)
    assert _refused(step) == Refusal.BAD_CSR


@pytest.mark.parametrize(
    "bad",
    [
        {"offer_ttl": 0},
        {"max_signatures": 0},
        {"queue_per_device": 0},
        {"min_life_fraction": 1.0},
        {"min_life_fraction": -0.1},
        {"audit_interval": -1},
        {"mqtt_version": "4"},
    ],
)
def test_settings_refuse_what_cannot_work(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        RenewalSettings(**bad)


# -- decide_installed ---------------------------------------------------------------------------


def test_installed_reports() -> None:
    offer = _offer()
    assert decide_installed(device_id="dev-1", request_id="x", serial="bb", offer=offer) == Confirm(
        offer, "x"
    )
    recorded = decide_installed(
        device_id="dev-1", request_id="x", serial="bb", offer=_offer(OfferState.RECORDED)
    )
    assert recorded == Reply(RecordedAnswer("x", "bb"))
    for wrong in (
        {"offer": None},
        {"serial": "cc"},
        {"device_id": "dev-2"},
    ):
        args: dict[str, Any] = {"device_id": "dev-1", "request_id": "x", "serial": "bb"}
        args["offer"] = offer
        args.update(wrong)
        assert _refused(decide_installed(**args)) == Refusal.UNKNOWN_REQUEST
    voided = decide_installed(
        device_id="dev-1", request_id="x", serial="bb", offer=_offer(OfferState.VOIDED)
    )
    assert _refused(voided) == Refusal.OFFER_VOID


# -- the offer table ----------------------------------------------------------------------------


def test_the_offer_table() -> None:
    assert next_state(OfferState.OFFERED, OfferEvent.CONFIRM) is OfferState.RECORDED
    assert next_state(OfferState.OFFERED, OfferEvent.VOID) is OfferState.VOIDED
    for final in (OfferState.RECORDED, OfferState.VOIDED):
        for event in OfferEvent:
            assert (final, event) not in TRANSITIONS
            with pytest.raises(PKIError, match=f"is {final.value} cannot {event.value}"):
                next_state(final, event)


# -- scheduling and audit -----------------------------------------------------------------------


def test_fair_queue_serves_devices_in_turn_and_drops_excess() -> None:
    queue: FairQueue[str, int] = FairQueue(per_key=4)
    accepted = [queue.push("dev-1", i) for i in range(1000)]
    assert accepted.count(True) == 4  # the rest is dropped on arrival
    assert queue.push("dev-2", 0)
    assert queue.push("dev-3", 0)
    order = [queue.pop() for _ in range(len(queue))]
    assert [k for k, _ in order if k] == ["dev-1", "dev-2", "dev-3", "dev-1", "dev-1", "dev-1"]
    assert [i for k, i in order if k == "dev-1"] == [0, 1, 2, 3]  # FIFO within a device
    assert queue.pop() is None
    assert queue.push("dev-1", 5)  # room again


def test_audit_throttle_one_line_per_window_with_the_count() -> None:
    throttle: AuditThrottle[str] = AuditThrottle(interval=60)
    assert throttle.note("a", 0) == 1
    assert [throttle.note("a", t) for t in range(1, 10)] == [None] * 9
    assert throttle.note("b", 5) == 1  # another key has its own window
    assert throttle.drain(30) == []
    assert throttle.note("a", 61, count=5) == 9 + 5  # held back + this batch
    assert throttle.note("a", 62) is None
    assert throttle.drain(200) == [("a", 1)]
    assert throttle.drain(300) == []


# -- the message module -------------------------------------------------------------------------


def test_messages_keep_the_wire_format() -> None:
    """Byte for byte what agents in the field send and expect (keys, order, null request id)."""
    assert json.loads(encode(CsrRequest("r1", "PEM"))) == {
        "type": "csr",
        "request_id": "r1",
        "csr": "PEM",
    }
    assert encode(RefusedAnswer(None, "bad-request", "x")) == (
        b'{"type": "refused", "request_id": null, "reason": "bad-request", "detail": "x"}'
    )
    for message in (
        CsrRequest("r1", "PEM"),
        InstalledReport("r1", "ab"),
    ):
        assert decode_request(encode(message)) == message
    for answer in (
        CertificateAnswer("r1", "PEM"),
        RefusedAnswer("r1", "offer-open", "d"),
        RefusedAnswer(None, "bad-request", "d"),
        RecordedAnswer("r1", "ab"),
    ):
        assert decode_answer(encode(answer)) == answer
    assert request_topic("dev-1") == "devices/dev-1/certs/csr"
    assert answer_topic("dev-1") == "devices/dev-1/certs/issued"
    assert device_of_request_topic("devices/dev-1/certs/csr") == "dev-1"
    assert device_of_request_topic("devices/dev-1/certs/issued") is None


@pytest.mark.parametrize(
    ("payload", "detail", "request_id"),
    [
        (b"not json", "not a JSON renewal message", None),
        (b"[]", "not a JSON renewal message", None),
        (b'{"type": "csr"}', "not a JSON renewal message", None),
        (b'{"type": "csr", "request_id": "a/b"}', "invalid request_id", None),
        (b'{"type": "csr", "request_id": ""}', "invalid request_id", None),
        (b'{"type": "csr", "request_id": 5}', "invalid request_id", None),
        (b'{"type": "hello", "request_id": "r1"}', "unknown type 'hello'", "r1"),
    ],
)
def test_malformed_requests(payload: bytes, detail: str, request_id: str | None) -> None:
    with pytest.raises(MalformedMessageError) as info:
        decode_request(payload)
    assert info.value.detail == detail
    assert info.value.request_id == request_id


def test_reply_route_stays_inside_the_requesting_devices_subtree() -> None:
    """MQTT 5 Response Topic on a renewal request: followed only inside devices/<id>/ (not the
    request topic itself, no wildcards); anything else is answered on certs/issued as on 3.1.1."""
    from provisioning.renewal_protocol import ReplyRoute, reply_route

    ok = reply_route("dev-1", "devices/dev-1/certs/issued", b"r1")
    assert ok == ReplyRoute("devices/dev-1/certs/issued", b"r1")
    assert reply_route("dev-1", "devices/dev-1/certs/issued", None) == ReplyRoute(
        "devices/dev-1/certs/issued", None
    )
    for foreign in (
        None,
        "",
        "devices/dev-2/certs/issued",
        "devices/dev-1",
        "devices/dev-1/",
        "devices/dev-1/certs/csr",
        "devices/dev-1/certs/+",
        "devices/dev-1/#",
        "devices/dev-10/certs/issued",
    ):
        assert reply_route("dev-1", foreign, b"r1") is None, foreign
