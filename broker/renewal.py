"""The renewal service: devices renew their certificates over MQTT, make-before-break.

Theory of operation
-------------------
The service holds the issuing CA (it opens the PKI directory) and talks MQTT as the service
identity ``renewal``, which the default policy allows to read ``devices/+/certs/csr`` and write
``devices/+/certs/issued``. By default it runs inside the broker process
(``BrokerSettings.renewal``) and connects to its own listener over mutual TLS; the same class
can run next to any broker (``iotauth broker renewal``). The messages and topics are defined once,
for both sides, in ``provisioning/renewal_protocol.py``; the device side is
``device_agent/renewal.py``.

Three layers:

- ``broker/renewal_core.py`` decides, without I/O: the checks below, in order, the per-device
  bounds, the fair queue and the audit throttle;
- ``provisioning/offers.py`` (through ``PKI.offer`` / ``record_offer`` / ``void_offer``) keeps the
  offers in ``<pki>/renewals.sqlite3`` and moves them along their table, under the PKI's lock;
- this module is the adapter: paho (a network thread that only queues), one worker thread that
  carries out the core's steps against the PKI, and the audit.

A CSR on ``devices/<id>/certs/csr`` can only come from ``<id>`` (the broker's ACL), and is refused
(``refused`` with a reason, audited) unless:

- ``<id>`` has an active certificate in the registry (``not-active``: revoked or unknown);
- the CSR's self-signature verifies and its key is acceptable (``bad-csr``: a forged CSR);
- every name in it is ``<id>`` (CN and the SPIFFE SAN URI; ``identity-mismatch``);
- its key is not the current certificate's key (``key-reuse``);
- the device has no other certificate on offer (``offer-open``; the same key asked again gets the
  open offer's certificate, not a new signature);
- the device is within its signing rate (``rate-limited``; ``too-early`` with a minimum life
  fraction), see ``broker/renewal_core.py``.

Make-before-break needs the old certificate to stay valid until the device has connected with the
new one, but the registry allows one active certificate per name. So issuance is two-phase:

1. **offer**: the certificate is signed (``PKI.prepare``, not yet in the registry) and kept as an
   open offer (``PKI.offer``: a row in ``renewals.sqlite3`` and a ``renewal-offer`` ledger line
   with request id, device, new and old serial, fingerprint), then sent to the device. The old
   certificate stays active.
2. **record**: as soon as the device connects with the new certificate (the broker's own
   ``connect`` audit event names the serial; out of process, the device's ``installed`` message),
   ``PKI.record_offer`` registers it (ledger ``issue`` line with ``renewal``, ``replaces``,
   ``via``) and revokes the old one as ``superseded`` (ledger ``revoke`` line, new CRL; the broker
   closes any session still using the old one).
3. **void**: an offer that is not confirmed within ``offer_ttl``, or whose old certificate was
   replaced meanwhile (checked every ``sweep_interval``), is recorded as issued-and-revoked
   (``PKI.void_offer``), so the CRL covers it. ``iotauth device revoke`` voids the device's open
   offer itself, in the same change as the revocation, so it is on the CRL at once whichever
   process runs this service. A device that tries a voided certificate is refused and goes back
   to its old one.

So at any moment every certificate that left the CA is either in the registry or in an ``offered``
row that becomes one of the two within ``offer_ttl`` (and survives a restart of the service).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import functools
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from broker.renewal_core import (
    ActiveCertificate,
    AuditThrottle,
    Confirm,
    FairQueue,
    RenewalSettings,
    Reply,
    Resend,
    Sign,
    Step,
    decide_csr,
    decide_installed,
)
from provisioning.certificates import load_csr, public_key_sha256
from provisioning.errors import CSRRejectedError, InvalidIdentityError, ProvisioningError
from provisioning.identity import Identity, IdentityKind, parse_spiffe_id, validate_name
from provisioning.offers import Offer, OfferState
from provisioning.pki import PKI
from provisioning.renewal_protocol import (
    REQUEST_FILTER,
    Answer,
    CertificateAnswer,
    CsrRequest,
    MalformedMessageError,
    RecordedAnswer,
    Refusal,
    RefusedAnswer,
    ReplyRoute,
    answer_topic,
    decode_request,
    device_of_request_topic,
    encode,
    reply_route,
)
from provisioning.tls import client_context_for_credentials

__all__ = ["RenewalService", "RenewalSettings"]

log = logging.getLogger("iotauth.broker.renewal")

Audit = Callable[..., object]  # AuditLog.emit: (event, **fields)
_IDLE = object()  # no control job this turn


class RenewalService:
    """``start()`` / ``stop()``; everything that touches the PKI runs on one worker thread.

    paho's network thread only sorts arriving requests into the per-device queues (dropping a
    device's excess there); the worker takes control jobs first (stop, confirmations from the
    broker's audit), then one request per device in turn, and sweeps offers every
    ``sweep_interval``. ``audit`` receives the service's audit events (the broker's AuditLog when
    it runs in the broker; JSON lines on stdout for ``iotauth broker renewal``)."""

    def __init__(
        self,
        pki_dir: Path,
        *,
        host: str,
        port: int,
        settings: RenewalSettings | None = None,
        passphrase: bytes | None = None,
        audit: Audit | None = None,
    ) -> None:
        self.pki_dir = pki_dir
        self.host = host
        self.port = port
        self.settings = settings or RenewalSettings()
        self._passphrase = passphrase
        self._audit = audit
        self.stats: collections.Counter[str] = collections.Counter()
        # (device, step) in the order the worker decided them: for tests and debugging.
        self.decided: collections.deque[tuple[str, str]] = collections.deque(maxlen=10_000)
        # Requests received per device (queued or dropped).
        self.arrived: collections.Counter[str] = collections.Counter()
        self._cv = threading.Condition()
        self._control: collections.deque[Callable[[], None] | None] = collections.deque()
        self._requests: FairQueue[str, tuple[bytes, ReplyRoute | None]] = FairQueue(
            self.settings.queue_per_device
        )
        # The reply route of the request the worker is handling (MQTT 5 Response Topic).
        self._route: tuple[str, ReplyRoute] | None = None
        # "5" or "3.1.1" once connected: MQTT 5 where the broker allows it (for Response Topic).
        self.protocol: str | None = None
        self._v311 = self.settings.mqtt_version == "311"
        self._dropped: collections.Counter[str] = collections.Counter()
        self._throttle: AuditThrottle[tuple[str, str]] = AuditThrottle(self.settings.audit_interval)
        self._ready = threading.Event()
        self._subscribed = threading.Event()
        self._error: BaseException | None = None
        self._pending_serials: set[tuple[str, str]] = set()
        self._pending_lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name="iotauth-renewal", daemon=True)
        self._client: Any = None
        self._pki: PKI | None = None

    # -- life cycle (any thread) ----------------------------------------------------------------

    def start(self, *, timeout: float = 30) -> RenewalService:
        self._thread.start()
        self._ready.wait(timeout)
        if self._error is not None:
            raise self._error
        return self

    def wait_subscribed(self, timeout: float = 10) -> bool:
        return self._subscribed.wait(timeout)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._put_control(None)
            self._thread.join(timeout=10)

    def observe_connect(self, identity: str, credential: str) -> None:
        """A connection was accepted (broker audit): confirms an offer if it used the new serial."""
        try:
            ident = parse_spiffe_id(identity)
        except InvalidIdentityError:
            return
        key = (ident.name, credential)
        with self._pending_lock:
            if key not in self._pending_serials:
                return
        self._put_control(lambda: self._confirm_serial(ident.name, credential))

    def _put_control(self, job: Callable[[], None] | None) -> None:
        with self._cv:
            self._control.append(job)
            self._cv.notify()

    def _arrived(self, topic: str, payload: bytes, route: ReplyRoute | None = None) -> None:
        """paho's thread: queue the request behind its own device's, or drop it (audited)."""
        device = device_of_request_topic(topic)
        if device is None:
            return
        with self._cv:
            self.arrived[device] += 1
            if not self._requests.push(device, (payload, route)):
                self._dropped[device] += 1
            self._cv.notify()

    # -- worker thread ------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._pki = PKI.open(self.pki_dir, passphrase=self._passphrase)
            # The issuing key (a file, or a token that wants its PIN) must work before any CSR is
            # accepted: a missing PIN fails the start with one line, not the first renewal.
            self._pki.issuing_key()
            creds = self._ensure_credentials()
            self._load_pending()
            self._client = self._connect(creds)
        except BaseException as exc:  # noqa: BLE001 - re-raised in start()
            self._error = exc
            self._ready.set()
            self._close()
            return
        self._ready.set()
        next_sweep = time.monotonic()
        while True:
            with self._cv:
                while not (self._control or len(self._requests) or self._dropped):
                    wait = next_sweep - time.monotonic()
                    if wait <= 0:
                        break
                    self._cv.wait(wait)
                control = self._control.popleft() if self._control else _IDLE
                request = self._requests.pop() if control is _IDLE else None
                dropped, self._dropped = self._dropped, collections.Counter()
            if control is None:
                break
            for device, count in dropped.items():
                self.stats["dropped"] += count
                self._audit_refusal(device, "dropped", "queue full: request dropped", count)
            if callable(control):
                self._guarded(control)
            elif request is not None:
                device, (payload, route) = request
                self._guarded(functools.partial(self._handle_routed, device, payload, route))
            if time.monotonic() >= next_sweep:
                self._guarded(self._sweep)
                next_sweep = time.monotonic() + self.settings.sweep_interval
        self._close()

    def _guarded(self, job: Callable[[], None]) -> None:
        try:
            job()
        except Exception:
            log.exception("renewal service job failed")

    def _close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.disconnect()
                self._client.loop_stop()
        if self._pki is not None:
            self._pki.close()

    @property
    def pki(self) -> PKI:
        assert self._pki is not None  # noqa: S101 - set before any job runs
        return self._pki

    def _ensure_credentials(self) -> Path:
        """The service's own certificate: issued once, re-issued in the last third of its life."""
        name = self.settings.service_name
        path = self.settings.credentials or self.pki_dir / "services" / name
        active = self.pki.registry.active(name)
        if active is not None and _usable(path, self.pki.issuing, active.serial):
            return path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fresh = path.with_name(f".{name}.new")
        shutil.rmtree(fresh, ignore_errors=True)
        self.pki.issue(name, kind=IdentityKind.SERVICE, out=fresh, rotate=True)
        shutil.rmtree(path, ignore_errors=True)
        fresh.rename(path)
        log.info("issued the renewal service's certificate into %s", path)
        return path

    def _connect(self, creds: Path) -> Any:  # noqa: ANN401 - paho is imported lazily
        """MQTT 5 (answers follow a request's Response Topic), or 3.1.1 with a broker that
        refuses 5: CONNACK 0x84 / return code 1, or a close before any CONNACK after a level-5
        CONNECT. The service runs beside any broker (``iotauth broker renewal``), so both."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.reasoncodes import ReasonCode

        v5 = not self._v311
        if v5:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self.settings.service_name,
                protocol=mqtt.MQTTv5,
            )
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self.settings.service_name,
                clean_session=True,
                protocol=mqtt.MQTTv311,
            )
        client.tls_set_context(client_context_for_credentials(creds))
        client.reconnect_delay_set(1, 5)
        connacked = threading.Event()

        def fall_back(why: str) -> None:
            if self._v311 or self.settings.mqtt_version == "5":
                return
            self._v311 = True
            log.info("the broker refused MQTT 5 (%s); the renewal service uses 3.1.1", why)

            def reconnect() -> None:
                with contextlib.suppress(Exception):
                    client.disconnect()
                    client.loop_stop()
                self._client = self._connect(creds)

            self._put_control(reconnect)

        def on_connect(c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
            connacked.set()
            if v5 and rc.is_failure and int(rc.value) == 0x84:
                fall_back("CONNACK 0x84")
                return
            if not rc.is_failure:
                self.protocol = "5" if v5 else "3.1.1"
                c.subscribe(REQUEST_FILTER, qos=1)

        def on_subscribe(
            c: mqtt.Client, _u: object, _mid: int, codes: list[ReasonCode], _p: object
        ) -> None:
            if all(not code.is_failure for code in codes):
                self._subscribed.set()

        def on_disconnect(c: mqtt.Client, _u: object, _f: object, _rc: object, _p: object) -> None:
            self._subscribed.clear()
            if v5 and not connacked.is_set():
                fall_back("closed before CONNACK")

        def on_message(c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
            route = _route_of(msg.topic, getattr(msg, "properties", None)) if v5 else None
            self._arrived(msg.topic, bytes(msg.payload), route)

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host  # noqa: S104
        client.connect_async(host, self.port, keepalive=60)
        client.loop_start()
        return client

    # -- audit and answers ----------------------------------------------------------------------

    def _emit(self, event: str, **fields: object) -> None:
        if self._audit is not None:
            self._audit(event, **fields)

    def _audit_refusal(self, device_id: str, reason: str, detail: str, count: int = 1) -> None:
        """Audited (and logged) at most once per device, reason and audit_interval."""
        reported = self._throttle.note((device_id, reason), time.monotonic(), count)
        if reported is None:
            return
        log.warning("renewal for %s refused: %s (%s) x%d", device_id, reason, detail, reported)
        self._emit(
            "renewal-refused", client_id=device_id, reason=reason, detail=detail, count=reported
        )

    def _publish(self, device_id: str, answer: Answer) -> None:
        if isinstance(answer, RefusedAnswer):
            self.stats[f"refused:{answer.reason}"] += 1
            self._audit_refusal(device_id, answer.reason, answer.detail)
        if self._client is None:
            return
        if self._route is not None and self._route[0] == device_id:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            route = self._route[1]
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if route.correlation is not None:
                props.CorrelationData = route.correlation
            self._client.publish(route.topic, encode(answer), qos=1, properties=props)
            return
        self._client.publish(answer_topic(device_id), encode(answer), qos=1)

    def _refuse(self, device_id: str, request_id: str | None, reason: Refusal, detail: str) -> None:
        self._publish(device_id, RefusedAnswer(request_id, reason.value, detail))

    def _send_certificate(self, offer: Offer, request_id: str) -> None:
        chain = offer.cert_pem + self.pki.issuing.public_bytes(serialization.Encoding.PEM)
        self._publish(offer.device_id, CertificateAnswer(request_id, chain.decode()))

    # -- protocol -----------------------------------------------------------------------------

    def _handle_routed(self, device: str, payload: bytes, route: ReplyRoute | None) -> None:
        """:meth:`_handle`, its answers sent on the request's reply route when it had one."""
        self._route = (device, route) if route is not None else None
        try:
            self._handle(device, payload)
        finally:
            self._route = None

    def _handle(self, device: str, payload: bytes) -> None:
        try:
            device_id = validate_name(device)
        except InvalidIdentityError:
            return
        if len(payload) > self.settings.max_request_bytes:
            self._refuse(device_id, None, Refusal.BAD_REQUEST, "request too large")
            return
        try:
            request = decode_request(payload)
        except MalformedMessageError as exc:
            self._refuse(device_id, exc.request_id, Refusal.BAD_REQUEST, exc.detail)
            return
        if isinstance(request, CsrRequest):
            step = self._decide_csr(device_id, request)
        else:
            offer = self.pki.offers.get(request.request_id) or self.pki.offers.by_serial(
                device_id, request.serial
            )
            step = decide_installed(
                device_id=device_id,
                request_id=request.request_id,
                serial=request.serial,
                offer=offer,
            )
        self.decided.append((device_id, type(step).__name__.lower()))
        self._carry_out(device_id, step, request)

    def _decide_csr(self, device_id: str, request: CsrRequest) -> Step:
        now = time.time()
        previous = self.pki.offers.get(request.request_id)
        record = self.pki.registry.active(device_id)
        active = (
            None
            if record is None
            else ActiveCertificate(
                record.serial,
                record.kind,
                record.not_before.timestamp(),
                record.not_after.timestamp(),
                record.public_key_sha256,
            )
        )
        problem: tuple[Refusal, str] | None = None
        key_sha: str | None = None
        open_offer: Offer | None = None
        open_key: str | None = None
        signed: list[float] = []
        if previous is None and active is not None:
            try:
                csr, key = load_csr(request.csr.encode())
                key_sha = public_key_sha256(key)
                mismatch = _identity_problem(csr, Identity.device(device_id, self.pki.trust_domain))
                if mismatch is not None:
                    problem = (Refusal.IDENTITY_MISMATCH, mismatch)
            except CSRRejectedError as exc:
                problem = (Refusal.BAD_CSR, exc.reason)
            offers = self.pki.offers.open_offers(device_id)
            if offers:
                open_offer = offers[0]
                cert = x509.load_pem_x509_certificate(open_offer.cert_pem)
                open_key = public_key_sha256(cert.public_key())  # type: ignore[arg-type]
            signed = self.pki.offers.signed_since(device_id, now - self.settings.rate_window)
        return decide_csr(
            device_id=device_id,
            request_id=request.request_id,
            previous=previous,
            active=active,
            csr_problem=problem,
            csr_key_sha256=key_sha,
            open_offer=open_offer,
            open_offer_key_sha256=open_key,
            signed_at=signed,
            now=now,
            settings=self.settings,
        )

    def _carry_out(self, device_id: str, step: Step, request: object) -> None:
        if isinstance(step, Reply):
            self._publish(device_id, step.answer)
        elif isinstance(step, Resend):
            self.stats["resent"] += 1
            self._send_certificate(step.offer, step.request_id)
        elif isinstance(step, Sign):
            assert isinstance(request, CsrRequest)  # noqa: S101 - decide_csr signs only CSRs
            self._sign(device_id, step, request.csr.encode())
        elif isinstance(step, Confirm):
            self._confirm(step.offer, via="device-report", request_id=step.request_id)

    def _sign(self, device_id: str, step: Sign, csr_pem: bytes) -> None:
        active = self.pki.registry.active(device_id)
        try:
            prepared = self.pki.prepare(
                device_id,
                csr=csr_pem,
                rotate=True,
                hardware_serial=active.hardware_serial if active else None,
            )
        except ProvisioningError as exc:
            self._refuse(device_id, step.request_id, Refusal.ISSUANCE_FAILED, str(exc))
            return
        try:
            offer = self.pki.offer(prepared, request_id=step.request_id, replaces=step.replaces)
        except ProvisioningError as exc:
            # The device changed under the lock (revoked, rotated, another offer): the signed
            # certificate exists, so it goes on the CRL.
            self.pki.void(prepared, reason="superseded", details={"renewal": step.request_id})
            self._refuse(device_id, step.request_id, Refusal.OFFER_VOID, str(exc))
            return
        with self._pending_lock:
            self._pending_serials.add((device_id, offer.new_serial))
        self.stats["offered"] += 1
        log.info(
            "renewal for %s: offered serial %s (replaces %s)",
            device_id,
            offer.new_serial,
            offer.old_serial,
        )
        self._emit(
            "renewal-offer",
            client_id=device_id,
            credential=offer.new_serial,
            replaces=offer.old_serial,
            request_id=offer.request_id,
        )
        self._send_certificate(offer, offer.request_id)

    def _confirm_serial(self, device_id: str, serial: str) -> None:
        offer = self.pki.offers.by_serial(device_id, serial)
        if offer is None:
            return
        if offer.state is OfferState.OFFERED:
            self._confirm(offer, via="broker-connect", request_id=offer.request_id)
        else:
            self._forget(offer)  # closed elsewhere (`device revoke` voids offers itself)

    def _confirm(self, offer: Offer, *, via: str, request_id: str) -> None:
        moved, record = self.pki.record_offer(offer, via=via)
        self._forget(moved)
        if record is None:
            if moved.state is OfferState.VOIDED:
                self._voided(moved, "the device changed meanwhile")
            elif moved.state is OfferState.RECORDED:
                self._publish(offer.device_id, RecordedAnswer(request_id, moved.new_serial))
            return
        self.stats["recorded"] += 1
        log.info(
            "renewal for %s recorded: serial %s replaces %s (%s)",
            offer.device_id,
            offer.new_serial,
            offer.old_serial,
            via,
        )
        self._emit(
            "renewal-recorded",
            client_id=offer.device_id,
            credential=offer.new_serial,
            replaces=offer.old_serial,
            via=via,
        )
        self._publish(offer.device_id, RecordedAnswer(request_id, offer.new_serial))

    def _voided(self, offer: Offer, answer: str) -> None:
        self.stats["voided"] += 1
        log.warning(
            "renewal for %s voided: serial %s, %s", offer.device_id, offer.new_serial, answer
        )
        self._emit(
            "renewal-voided", client_id=offer.device_id, credential=offer.new_serial, detail=answer
        )
        self._refuse(offer.device_id, offer.request_id, Refusal.OFFER_VOID, answer)

    def _void(self, offer: Offer, answer: str) -> None:
        moved = self.pki.void_offer(offer, answer=answer)
        self._forget(moved)
        if moved.state is OfferState.VOIDED:
            self._voided(moved, answer)

    def _sweep(self) -> None:
        now = time.time()
        for offer in self.pki.offers.open_offers():
            active = self.pki.registry.active(offer.device_id)
            if active is None or active.serial != offer.old_serial:
                self._void(offer, "the device was revoked meanwhile")
            elif now - offer.created > self.settings.offer_ttl:
                self._void(offer, "not used within the offer time")
        for (device_id, reason), count in self._throttle.drain(time.monotonic()):
            log.warning("renewal for %s refused: %s x%d (held back)", device_id, reason, count)
            self._emit("renewal-refused", client_id=device_id, reason=reason, count=count)

    # -- the serials a broker connect may confirm -----------------------------------------------

    def _forget(self, offer: Offer) -> None:
        if offer.state is not OfferState.OFFERED:
            with self._pending_lock:
                self._pending_serials.discard((offer.device_id, offer.new_serial))

    def _load_pending(self) -> None:
        # An offer voided by `device revoke` meanwhile stays here until a confirm finds it closed.
        with self._pending_lock:
            for offer in self.pki.offers.open_offers():
                self._pending_serials.add((offer.device_id, offer.new_serial))


def _route_of(topic: str, props: object) -> ReplyRoute | None:
    """The reply route of a request that arrived with MQTT 5 properties (or None)."""
    device = device_of_request_topic(topic)
    if device is None or props is None:
        return None
    correlation = getattr(props, "CorrelationData", None)
    return reply_route(
        device,
        getattr(props, "ResponseTopic", None),
        bytes(correlation) if correlation is not None else None,
    )


def _identity_problem(csr: x509.CertificateSigningRequest, identity: Identity) -> str | None:
    for attr in csr.subject:
        if attr.oid == NameOID.COMMON_NAME and attr.value != identity.name:
            return f"the CSR's CN {attr.value!r} is not {identity.name!r}"
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for name in san:
        if not isinstance(name, x509.UniformResourceIdentifier) or name.value != identity.spiffe_id:
            return f"the CSR names {name.value!r}; only {identity.spiffe_id} is allowed"
    return None


def _usable(path: Path, issuing: x509.Certificate, serial: str) -> bool:
    try:
        chain = x509.load_pem_x509_certificates((path / "device.crt").read_bytes())
        if not (path / "device.key").is_file() or len(chain) < 2:
            return False
    except (OSError, ValueError):
        return False
    leaf = chain[0]
    if chain[1] != issuing or format(leaf.serial_number, "x") != serial:
        return False
    now = dt.datetime.now(dt.UTC)
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    return now < leaf.not_valid_after_utc - life / 3
