"""The renewal service's decisions, without I/O: what to answer, when to sign, who goes next.

``broker/renewal.py`` feeds this module facts (the request, the device's active certificate, the
checked CSR, its open offer, when it last had certificates signed, the time) and carries out the
step it returns: answer, resend an offer, sign, confirm. The module reads no clock, no socket and
no database, so every rule is tested by plain calls (tests/broker/test_renewal_core.py).

Bounds (issue 17 item 7a: one device must not make the CA sign without bound):

- **one open offer per device**: a request for the key already on offer gets that certificate
  again (a repeated request, whatever its request id); a request for another key is refused
  (``offer-open``) until the offer is used or voided;
- **a signing rate per device**: at most ``max_signatures`` certificates per ``rate_window``
  (rolling; 4 per day by default), and optionally only once the current certificate is past
  ``min_life_fraction`` of its life (off by default, because the agent's ``renew`` command and the
  demo renew a fresh certificate on purpose); refused as ``rate-limited`` / ``too-early``;
- **fair scheduling**: requests wait in one small queue per device (:class:`FairQueue`), served
  round-robin, and a device's requests beyond ``queue_per_device`` are dropped before they reach
  the CA, so one device's flood never queues another device's renewal behind it;
- **audited, not amplified**: refusals and drops are audited at most once per device, reason and
  ``audit_interval``, with the number of events the line stands for (:class:`AuditThrottle`).
"""

from __future__ import annotations

import collections
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from broker.errors import ConfigError
from provisioning.offers import Offer, OfferState
from provisioning.renewal_protocol import Answer, RecordedAnswer, Refusal, RefusedAnswer

__all__ = [
    "ActiveCertificate",
    "AuditThrottle",
    "Confirm",
    "FairQueue",
    "RenewalSettings",
    "Reply",
    "Resend",
    "Sign",
    "Step",
    "decide_csr",
    "decide_installed",
]

K = TypeVar("K")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RenewalSettings:
    """The renewal service; ``BrokerSettings(renewal=RenewalSettings())`` runs it in the broker."""

    # A signed certificate that the device has not used within this many seconds is voided.
    offer_ttl: float = 3600.0
    # How often offers are checked for expiry and for revocation of the device meanwhile.
    sweep_interval: float = 1.0
    service_name: str = "renewal"
    # The service's own MQTT client: "auto" (MQTT 5, so answers can follow a request's Response
    # Topic; 3.1.1 with a broker that refuses 5), "5" or "311".
    mqtt_version: str = "auto"
    # The service's own credential directory; default <pki>/services/<service_name>.
    credentials: Path | None = None
    max_request_bytes: int = 16 * 1024
    # At most this many certificates signed for one device per rate_window seconds (rolling).
    max_signatures: int = 4
    rate_window: float = 86400.0
    # Renew only once the current certificate is past this fraction of its life (0: any time).
    min_life_fraction: float = 0.0
    # Requests of one device waiting for the CA; more are dropped (and audited) on arrival.
    queue_per_device: int = 4
    # At most one audit line per device and refusal reason per this many seconds.
    audit_interval: float = 60.0

    def __post_init__(self) -> None:
        positive = ("offer_ttl", "sweep_interval", "rate_window", "audit_interval")
        for name in positive:
            if not getattr(self, name) > 0:
                msg = f"renewal {name} must be positive, not {getattr(self, name)!r}"
                raise ConfigError(msg)
        for name in ("max_signatures", "queue_per_device", "max_request_bytes"):
            if getattr(self, name) < 1:
                msg = f"renewal {name} must be at least 1, not {getattr(self, name)!r}"
                raise ConfigError(msg)
        if self.mqtt_version not in ("auto", "5", "311"):
            msg = f"renewal mqtt_version must be auto, 5 or 311, not {self.mqtt_version!r}"
            raise ConfigError(msg)
        if not 0 <= self.min_life_fraction < 1:
            msg = (
                "renewal min_life_fraction is a fraction of the certificate's life in [0, 1), "
                f"not {self.min_life_fraction!r}"
            )
            raise ConfigError(msg)


@dataclass(frozen=True, slots=True)
class ActiveCertificate:
    """The device's registered, active certificate (what the registry says)."""

    serial: str
    kind: str
    not_before: float  # Unix time
    not_after: float
    public_key_sha256: str


# -- steps: what the adapter does next --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``answer`` to the device; nothing else happens."""

    answer: Answer


@dataclass(frozen=True, slots=True)
class Resend:
    """Send ``offer``'s certificate again, under the request id the device used."""

    offer: Offer
    request_id: str


@dataclass(frozen=True, slots=True)
class Sign:
    """Sign the CSR and keep the certificate as this device's open offer."""

    request_id: str
    replaces: str


@dataclass(frozen=True, slots=True)
class Confirm:
    """The device says it uses ``offer``'s certificate: record it."""

    offer: Offer
    request_id: str


Step = Reply | Resend | Sign | Confirm


def _refuse(request_id: str | None, reason: Refusal, detail: str) -> Reply:
    return Reply(RefusedAnswer(request_id, reason.value, detail))


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def decide_csr(  # noqa: PLR0911 - one return per rule, read top to bottom
    *,
    device_id: str,
    request_id: str,
    previous: Offer | None,
    active: ActiveCertificate | None,
    csr_problem: tuple[Refusal, str] | None,
    csr_key_sha256: str | None,
    open_offer: Offer | None,
    open_offer_key_sha256: str | None,
    signed_at: list[float],
    now: float,
    settings: RenewalSettings,
) -> Step:
    """The answer to ``{"type": "csr"}``, checks in order: the cheap and final ones first."""
    if previous is not None:
        # The same request again (a resend after a timeout or a reconnect): the same answer.
        if previous.device_id != device_id:
            return _refuse(request_id, Refusal.BAD_REQUEST, "request_id already used")
        if previous.state is OfferState.OFFERED:
            return Resend(previous, request_id)
        if previous.state is OfferState.RECORDED:
            return Reply(RecordedAnswer(request_id, previous.new_serial))
        return _refuse(request_id, Refusal.OFFER_VOID, "this request was voided")
    if active is None or active.kind != "device":
        detail = f"{device_id} has no active device certificate (revoked or unknown)"
        return _refuse(request_id, Refusal.NOT_ACTIVE, detail)
    if csr_problem is not None:
        return _refuse(request_id, *csr_problem)
    if csr_key_sha256 == active.public_key_sha256:
        return _refuse(request_id, Refusal.KEY_REUSE, "the CSR reuses the current key")
    if open_offer is not None:
        if open_offer_key_sha256 is not None and open_offer_key_sha256 == csr_key_sha256:
            return Resend(open_offer, request_id)  # the same key asked again: no new signature
        detail = (
            f"certificate {open_offer.new_serial} is on offer (request {open_offer.request_id}) "
            "until it is used or voided"
        )
        return _refuse(request_id, Refusal.OFFER_OPEN, detail)
    life = active.not_after - active.not_before
    ready_at = active.not_before + settings.min_life_fraction * life
    if now < ready_at:
        detail = (
            f"the current certificate is not past {settings.min_life_fraction:.0%} of its life; "
            f"renew from {_when(ready_at)}"
        )
        return _refuse(request_id, Refusal.TOO_EARLY, detail)
    recent = [t for t in signed_at if t > now - settings.rate_window]
    if len(recent) >= settings.max_signatures:
        next_at = min(recent) + settings.rate_window
        detail = (
            f"{len(recent)} certificate(s) signed for {device_id} in the last "
            f"{settings.rate_window / 3600:g} h; the next from {_when(next_at)}"
        )
        return _refuse(request_id, Refusal.RATE_LIMITED, detail)
    return Sign(request_id, active.serial)


def decide_installed(*, device_id: str, request_id: str, serial: str, offer: Offer | None) -> Step:
    """The answer to ``{"type": "installed"}``; ``offer`` is found by request id or serial."""
    if offer is None or offer.device_id != device_id or offer.new_serial != serial:
        return _refuse(request_id, Refusal.UNKNOWN_REQUEST, "no such renewal")
    if offer.state is OfferState.RECORDED:
        return Reply(RecordedAnswer(request_id, serial))
    if offer.state is OfferState.VOIDED:
        return _refuse(request_id, Refusal.OFFER_VOID, "this request was voided")
    return Confirm(offer, request_id)


# -- scheduling and auditing --------------------------------------------------------------------


class FairQueue(Generic[K, T]):
    """One bounded FIFO per key, served round-robin: a key with a thousand waiting items gets
    one turn, then every other waiting key gets one. ``push`` refuses (returns False) an item
    whose key already has ``per_key`` waiting, so excess is dropped on arrival."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._queues: collections.OrderedDict[K, collections.deque[T]] = collections.OrderedDict()
        self._size = 0

    def push(self, key: K, item: T) -> bool:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = collections.deque()
        if len(queue) >= self.per_key:
            return False
        queue.append(item)
        self._size += 1
        return True

    def pop(self) -> tuple[K, T] | None:
        if not self._queues:
            return None
        key, queue = next(iter(self._queues.items()))
        item = queue.popleft()
        self._size -= 1
        if queue:
            self._queues.move_to_end(key)  # its next item waits for everyone else's turn
        else:
            del self._queues[key]
        return key, item

    def __len__(self) -> int:
        return self._size


class AuditThrottle(Generic[K]):
    """At most one audit line per key per ``interval``: ``note`` returns how many events the
    line to write now stands for (this one plus those held back), or None to hold it back;
    ``drain`` returns the held-back counts of windows that have ended."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._windows: dict[K, list[float]] = {}  # key -> [window start, events held back]

    def note(self, key: K, now: float, count: int = 1) -> int | None:
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval:
            held = int(window[1]) if window is not None else 0
            self._windows[key] = [now, 0]
            return held + count
        window[1] += count
        return None

    def drain(self, now: float) -> list[tuple[K, int]]:
        out: list[tuple[K, int]] = []
        for key, (start, held) in list(self._windows.items()):
            if now - start >= self.interval:
                del self._windows[key]
                if held:
                    out.append((key, int(held)))
        return out
