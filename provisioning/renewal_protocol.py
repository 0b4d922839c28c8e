"""The renewal protocol's topics and messages, encoded and decoded in one place for both sides.

The device agent (``device_agent``) and the renewal service (``broker.renewal``) both import this
module, as the station and the device both import ``hardware.messages`` for the serial protocol.
It lives in ``provisioning`` because that is the one package both may import; it needs only the
standard library at import time, so it adds nothing to a running agent (``tests/test_layout.py``).

Every message is one JSON object with a ``type``; the field names are the wire format that agents
in the field speak, so they never change::

    device  -> devices/<id>/certs/csr     {"type": "csr", "request_id": R, "csr": PEM}
                                          {"type": "installed", "request_id": R, "serial": HEX}
    service -> devices/<id>/certs/issued  {"type": "certificate", "request_id": R,
                                           "certificate": PEM chain (leaf, issuing CA)}
                                          {"type": "refused", "request_id": R or null,
                                           "reason": TOKEN, "detail": TEXT}
                                          {"type": "recorded", "request_id": R, "serial": HEX}

On MQTT 5 a request may carry a Response Topic and Correlation Data (MQTT 5 section 4.10): the
agent sends its own answer topic and the request id. The service answers on that topic with the
same Correlation Data (:func:`reply_route`), but only on a topic inside the requesting device's
own subtree, so a request can never make the service write to another device's topics; anything
else is answered as on 3.1.1, on ``certs/issued``. The payloads are the same on both versions.

A request id is 1-64 of ``[A-Za-z0-9_-]``, chosen by the device and kept across resends, so a
repeated request gets the same answer. Refusal reasons are stable tokens (:class:`Refusal`); a
device that does not know a token treats it as "refused, try again later", which is what every
agent since the first release does.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import Any

from provisioning.errors import ProvisioningError

__all__ = [
    "ANSWER_SUFFIX",
    "REQUEST_FILTER",
    "REQUEST_SUFFIX",
    "Answer",
    "CertificateAnswer",
    "CsrRequest",
    "InstalledReport",
    "MalformedMessageError",
    "MessageType",
    "RecordedAnswer",
    "Refusal",
    "RefusedAnswer",
    "ReplyRoute",
    "Request",
    "answer_topic",
    "decode_answer",
    "decode_request",
    "device_of_request_topic",
    "encode",
    "reply_route",
    "request_topic",
]

REQUEST_SUFFIX = "certs/csr"
ANSWER_SUFFIX = "certs/issued"
# What the service subscribes to; the broker's ACL lets only <id> write devices/<id>/certs/csr.
REQUEST_FILTER = f"devices/+/{REQUEST_SUFFIX}"

_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_REQUEST_TOPIC = re.compile(r"devices/([^/]+)/certs/csr")


def request_topic(device_id: str) -> str:
    return f"devices/{device_id}/{REQUEST_SUFFIX}"


def answer_topic(device_id: str) -> str:
    return f"devices/{device_id}/{ANSWER_SUFFIX}"


@dataclass(frozen=True, slots=True)
class ReplyRoute:
    """Where an MQTT 5 request asked for its answer: a topic and the Correlation Data."""

    topic: str
    correlation: bytes | None


def reply_route(
    device_id: str, response_topic: str | None, correlation: bytes | None
) -> ReplyRoute | None:
    """The route for a request's Response Topic; None (answer on ``certs/issued``) unless it is
    a topic name inside ``devices/<device_id>/`` other than the request topic itself."""
    if not response_topic:
        return None
    base = f"devices/{device_id}/"
    if (
        not response_topic.startswith(base)
        or response_topic == request_topic(device_id)
        or len(response_topic) == len(base)
        or any(c in response_topic for c in "+#\x00")
    ):
        return None
    return ReplyRoute(response_topic, correlation)


def device_of_request_topic(topic: str) -> str | None:
    """``dev-1`` for ``devices/dev-1/certs/csr``; None for any other topic (not validated)."""
    match = _REQUEST_TOPIC.fullmatch(topic)
    return match.group(1) if match else None


class MessageType(enum.StrEnum):
    CSR = "csr"
    INSTALLED = "installed"
    CERTIFICATE = "certificate"
    REFUSED = "refused"
    RECORDED = "recorded"


class Refusal(enum.StrEnum):
    """Why the service refused (the ``reason`` token of a ``refused`` answer)."""

    BAD_REQUEST = "bad-request"  # not JSON, no type or request id, unknown type, too large
    NOT_ACTIVE = "not-active"  # the device has no active certificate (revoked or unknown)
    BAD_CSR = "bad-csr"  # the CSR's signature does not verify, or its key is unacceptable
    IDENTITY_MISMATCH = "identity-mismatch"  # the CSR names someone else
    KEY_REUSE = "key-reuse"  # the CSR carries the current certificate's key
    OFFER_OPEN = "offer-open"  # another certificate is already on offer to this device
    RATE_LIMITED = "rate-limited"  # this device had its share of signatures for now
    TOO_EARLY = "too-early"  # the current certificate is not far enough into its life
    OFFER_VOID = "offer-void"  # the offered certificate was voided (unused, revoked, replaced)
    UNKNOWN_REQUEST = "unknown-request"  # an ``installed`` report for no such offer
    ISSUANCE_FAILED = "issuance-failed"  # the CA could not sign


class MalformedMessageError(ProvisioningError, ValueError):
    """A payload that is not a renewal message; ``request_id`` when it could be read."""

    def __init__(self, detail: str, *, request_id: str | None = None) -> None:
        self.detail = detail
        self.request_id = request_id
        super().__init__(detail)


@dataclass(frozen=True, slots=True)
class CsrRequest:
    request_id: str
    csr: str


@dataclass(frozen=True, slots=True)
class InstalledReport:
    request_id: str
    serial: str


@dataclass(frozen=True, slots=True)
class CertificateAnswer:
    request_id: str
    certificate: str


@dataclass(frozen=True, slots=True)
class RefusedAnswer:
    request_id: str | None
    reason: str  # a Refusal token; kept a str so an unknown token from a newer service decodes
    detail: str


@dataclass(frozen=True, slots=True)
class RecordedAnswer:
    request_id: str
    serial: str


Request = CsrRequest | InstalledReport
Answer = CertificateAnswer | RefusedAnswer | RecordedAnswer

_TYPES: dict[type[Any], MessageType] = {
    CsrRequest: MessageType.CSR,
    InstalledReport: MessageType.INSTALLED,
    CertificateAnswer: MessageType.CERTIFICATE,
    RefusedAnswer: MessageType.REFUSED,
    RecordedAnswer: MessageType.RECORDED,
}


def encode(message: Request | Answer) -> bytes:
    """The JSON payload: ``type`` first, then the fields in declaration order."""
    doc: dict[str, Any] = {"type": _TYPES[type(message)].value}
    doc.update((name, getattr(message, name)) for name in message.__slots__)
    return json.dumps(doc).encode()


def _object(payload: bytes) -> tuple[dict[str, Any], str, str]:
    try:
        doc = json.loads(payload)
        kind, request_id = doc["type"], doc["request_id"]
    except (ValueError, KeyError, TypeError):
        raise MalformedMessageError("not a JSON renewal message") from None
    if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
        raise MalformedMessageError("invalid request_id")
    return doc, str(kind), request_id


def decode_request(payload: bytes) -> Request:
    """What a device sent on ``certs/csr``; MalformedMessageError (with the reason) otherwise."""
    doc, kind, request_id = _object(payload)
    if kind == MessageType.CSR:
        return CsrRequest(request_id, str(doc.get("csr", "")))
    if kind == MessageType.INSTALLED:
        return InstalledReport(request_id, str(doc.get("serial", "")))
    raise MalformedMessageError(f"unknown type {kind!r}", request_id=request_id)


def decode_answer(payload: bytes) -> Answer:
    """What the service sent on ``certs/issued``; MalformedMessageError otherwise."""
    try:
        doc = json.loads(payload)
        kind, request_id = doc["type"], doc["request_id"]
    except (ValueError, KeyError, TypeError):
        raise MalformedMessageError("not a JSON renewal message") from None
    if kind == MessageType.REFUSED:
        rid = request_id if isinstance(request_id, str) else None
        reason = str(doc.get("reason", "refused"))
        return RefusedAnswer(rid, reason, str(doc.get("detail", "")))
    if not isinstance(request_id, str):
        raise MalformedMessageError("invalid request_id")
    if kind == MessageType.CERTIFICATE:
        return CertificateAnswer(request_id, str(doc.get("certificate", "")))
    if kind == MessageType.RECORDED:
        return RecordedAnswer(request_id, str(doc.get("serial", "")))
    raise MalformedMessageError(f"unknown type {kind!r}", request_id=request_id)
