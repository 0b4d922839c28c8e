"""The renewal service: devices renew their certificates over MQTT, make-before-break.

Theory of operation
-------------------
The service holds the issuing CA (it opens the PKI directory) and talks MQTT as the service
identity ``renewal``, which the default policy allows to read ``devices/+/certs/csr`` and write
``devices/+/certs/issued``. By default it runs inside the broker process
(``BrokerSettings.renewal``) and connects to its own listener over mutual TLS; the same class
can run next to any broker. The device side and the message formats are described in
``device_agent/renewal.py``.

A CSR on ``devices/<id>/certs/csr`` can only come from ``<id>`` (the broker's ACL), and is refused
(``refused`` with a reason, audited in the log) unless:

- ``<id>`` has an active certificate in the registry (``not-active``: revoked or unknown);
- the CSR's self-signature verifies and its key is acceptable (``bad-csr``: a forged CSR);
- every name in it is ``<id>`` (CN and the SPIFFE SAN URI; ``identity-mismatch``);
- its key is not the current certificate's key (``key-reuse``).

Make-before-break needs the old certificate to stay valid until the device has connected with the
new one, but the registry allows one active certificate per name. So issuance is two-phase
(``PKI.prepare`` / ``PKI.record``):

1. **offer**: the certificate is signed (not yet in the registry), written to the service's own
   table ``renewals.sqlite3`` in the PKI directory (state ``offered``), a ``renewal-offer`` line
   goes into the ledger (request id, device, new and old serial, fingerprint), and the
   certificate is sent to the device. The old certificate stays active.
2. **record**: as soon as the device connects with the new certificate (the broker's own
   ``connect`` audit event names the serial; out of process, the device's ``installed`` message),
   ``PKI.record`` registers it (ledger ``issue`` line with ``renewal``, ``replaces``, ``via``) and
   revokes the old one as ``superseded`` (ledger ``revoke`` line, new CRL; the broker closes any
   session still using the old one).
3. **void**: an offer that is not confirmed within ``offer_ttl``, whose old certificate was revoked
   meanwhile (checked every ``sweep_interval``), or that a newer request of the same device
   replaces, is recorded as issued-and-revoked (``PKI.void``), so the CRL covers it. A device that
   tries a voided certificate is refused and goes back to its old one.

So at any moment every certificate that left the CA is either in the registry or in an ``offered``
row that becomes one of the two within ``offer_ttl`` (and survives a restart of the service).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import queue
import re
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from provisioning.certificates import fingerprint, load_csr, public_key_sha256
from provisioning.errors import CSRRejectedError, InvalidIdentityError, ProvisioningError
from provisioning.identity import Identity, IdentityKind, parse_spiffe_id, validate_name
from provisioning.pki import PKI, Prepared
from provisioning.tls import client_context_for_credentials

__all__ = ["RenewalService", "RenewalSettings"]

log = logging.getLogger("iotauth.broker.renewal")

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CSR_TOPIC = re.compile(r"devices/([^/]+)/certs/csr")


@dataclass(frozen=True, slots=True)
class RenewalSettings:
    """The renewal service in the broker process; ``BrokerSettings(renewal=RenewalSettings())``."""

    # A signed certificate that the device has not used within this many seconds is voided.
    offer_ttl: float = 3600.0
    # How often offers are checked for expiry and for revocation of the device meanwhile.
    sweep_interval: float = 1.0
    service_name: str = "renewal"
    # The service's own credential directory; default <pki>/services/<service_name>.
    credentials: Path | None = None
    max_request_bytes: int = 16 * 1024


@dataclass(frozen=True, slots=True)
class _Offer:
    request_id: str
    device_id: str
    old_serial: str
    new_serial: str
    cert_pem: bytes
    created: float
    state: str


class RenewalService:
    """``start()`` / ``stop()``; everything that touches the PKI runs on one worker thread."""

    def __init__(
        self,
        pki_dir: Path,
        *,
        host: str,
        port: int,
        settings: RenewalSettings | None = None,
        passphrase: bytes | None = None,
    ) -> None:
        self.pki_dir = pki_dir
        self.host = host
        self.port = port
        self.settings = settings or RenewalSettings()
        self._passphrase = passphrase
        self.stats: Counter[str] = Counter()
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._ready = threading.Event()
        self._subscribed = threading.Event()
        self._error: BaseException | None = None
        self._pending_serials: set[tuple[str, str]] = set()
        self._pending_lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name="iotauth-renewal", daemon=True)
        self._client: Any = None
        self._pki: PKI | None = None
        self._db: sqlite3.Connection | None = None
        self._stopping = False

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
        self._stopping = True
        if self._thread.is_alive():
            self._jobs.put(None)
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
        self._jobs.put(lambda: self._confirm(ident.name, credential, via="broker-connect"))

    # -- worker thread ------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._pki = PKI.open(self.pki_dir, passphrase=self._passphrase)
            # The issuing key (a file, or a token that wants its PIN) must work before any CSR is
            # accepted: a missing PIN fails the start with one line, not the first renewal.
            self._pki.issuing_key()
            self._db = self._open_db()
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
            try:
                job = self._jobs.get(timeout=max(0.0, next_sweep - time.monotonic()))
            except queue.Empty:
                job = self._sweep
            if job is None:
                break
            try:
                job()
            except Exception:
                log.exception("renewal service job failed")
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.settings.sweep_interval
                if job is not self._sweep:
                    self._guarded(self._sweep)
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
        if self._db is not None:
            self._db.close()
        if self._pki is not None:
            self._pki.close()

    def _open_db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.pki_dir / "renewals.sqlite3", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS offers (request_id TEXT PRIMARY KEY, device_id TEXT NOT"
            " NULL, old_serial TEXT NOT NULL, new_serial TEXT NOT NULL, cert_pem BLOB NOT NULL,"
            " created REAL NOT NULL, state TEXT NOT NULL)"
        )
        db.execute("CREATE INDEX IF NOT EXISTS offers_device ON offers(device_id, state)")
        return db

    @property
    def pki(self) -> PKI:
        assert self._pki is not None  # noqa: S101 - set before any job runs
        return self._pki

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None  # noqa: S101 - set before any job runs
        return self._db

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
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.reasoncodes import ReasonCode

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.settings.service_name,
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        client.tls_set_context(client_context_for_credentials(creds))
        client.reconnect_delay_set(1, 5)
        topic = "devices/+/certs/csr"

        def on_connect(c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
            if not rc.is_failure:
                c.subscribe(topic, qos=1)

        def on_subscribe(
            c: mqtt.Client, _u: object, _mid: int, codes: list[ReasonCode], _p: object
        ) -> None:
            if all(not code.is_failure for code in codes):
                self._subscribed.set()

        def on_disconnect(c: mqtt.Client, _u: object, _f: object, _rc: object, _p: object) -> None:
            self._subscribed.clear()

        def on_message(c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
            payload = bytes(msg.payload)
            self._jobs.put(lambda: self._handle(msg.topic, payload))

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host  # noqa: S104
        client.connect_async(host, self.port, keepalive=60)
        client.loop_start()
        return client

    # -- protocol -----------------------------------------------------------------------------

    def _publish(self, device_id: str, doc: dict[str, Any]) -> None:
        if self._client is not None:
            self._client.publish(
                f"devices/{device_id}/certs/issued", json.dumps(doc).encode(), qos=1
            )

    def _refuse(self, device_id: str, request_id: str | None, reason: str, detail: str) -> None:
        self.stats[f"refused:{reason}"] += 1
        log.warning("renewal for %s refused: %s (%s)", device_id, reason, detail)
        self._publish(
            device_id,
            {"type": "refused", "request_id": request_id, "reason": reason, "detail": detail},
        )

    def _handle(self, topic: str, payload: bytes) -> None:
        match = _CSR_TOPIC.fullmatch(topic)
        if match is None:
            return
        try:
            device_id = validate_name(match.group(1))
        except InvalidIdentityError:
            return
        if len(payload) > self.settings.max_request_bytes:
            self._refuse(device_id, None, "bad-request", "request too large")
            return
        try:
            doc = json.loads(payload)
            kind = doc["type"]
            request_id = doc["request_id"]
        except (ValueError, KeyError, TypeError):
            self._refuse(device_id, None, "bad-request", "not a JSON renewal request")
            return
        if not isinstance(request_id, str) or not _REQUEST_ID_RE.fullmatch(request_id):
            self._refuse(device_id, None, "bad-request", "invalid request_id")
            return
        if kind == "csr":
            self._offer(device_id, request_id, str(doc.get("csr", "")).encode())
        elif kind == "installed":
            self._installed(device_id, request_id, str(doc.get("serial", "")))
        else:
            self._refuse(device_id, request_id, "bad-request", f"unknown type {kind!r}")

    def _offer(self, device_id: str, request_id: str, csr_pem: bytes) -> None:
        existing = self._offer_row(request_id)
        if existing is not None:
            if existing.device_id != device_id:
                self._refuse(device_id, request_id, "bad-request", "request_id already used")
            elif existing.state == "offered":
                self._send_certificate(existing)  # a repeated request: same answer
            elif existing.state == "recorded":
                self._publish(
                    device_id,
                    {"type": "recorded", "request_id": request_id, "serial": existing.new_serial},
                )
            else:
                self._refuse(device_id, request_id, "offer-void", "this request was voided")
            return
        active = self.pki.registry.active(device_id)
        if active is None or active.kind != "device":
            self._refuse(
                device_id,
                request_id,
                "not-active",
                f"{device_id} has no active device certificate (revoked or unknown)",
            )
            return
        try:
            csr, key = load_csr(csr_pem)
        except CSRRejectedError as exc:
            self._refuse(device_id, request_id, "bad-csr", exc.reason)
            return
        problem = _identity_problem(csr, Identity.device(device_id, self.pki.trust_domain))
        if problem is not None:
            self._refuse(device_id, request_id, "identity-mismatch", problem)
            return
        if public_key_sha256(key) == active.public_key_sha256:
            self._refuse(device_id, request_id, "key-reuse", "the CSR reuses the current key")
            return
        for old in self._offers_for(device_id):
            self._void(old, reason="superseded", answer="superseded by a newer request")
        try:
            prepared = self.pki.prepare(
                device_id,
                csr=csr_pem,
                rotate=True,
                hardware_serial=active.hardware_serial,
            )
        except ProvisioningError as exc:
            self._refuse(device_id, request_id, "issuance-failed", str(exc))
            return
        cert = prepared.certificate
        offer = _Offer(
            request_id,
            device_id,
            active.serial,
            format(cert.serial_number, "x"),
            cert.public_bytes(serialization.Encoding.PEM),
            time.time(),
            "offered",
        )
        self.db.execute(
            "INSERT INTO offers VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                offer.request_id,
                offer.device_id,
                offer.old_serial,
                offer.new_serial,
                offer.cert_pem,
                offer.created,
                offer.state,
            ),
        )
        self.pki.record_event(
            "renewal-offer",
            {
                "name": device_id,
                "request_id": request_id,
                "serial": offer.new_serial,
                "fingerprint": fingerprint(cert),
                "replaces": offer.old_serial,
                "not_after": cert.not_valid_after_utc.isoformat(),
            },
        )
        with self._pending_lock:
            self._pending_serials.add((device_id, offer.new_serial))
        self.stats["offered"] += 1
        log.info(
            "renewal for %s: offered serial %s (replaces %s)",
            device_id,
            offer.new_serial,
            offer.old_serial,
        )
        self._send_certificate(offer)

    def _send_certificate(self, offer: _Offer) -> None:
        chain = offer.cert_pem + self.pki.issuing.public_bytes(serialization.Encoding.PEM)
        self._publish(
            offer.device_id,
            {"type": "certificate", "request_id": offer.request_id, "certificate": chain.decode()},
        )

    def _installed(self, device_id: str, request_id: str, serial: str) -> None:
        offer = self._offer_row(request_id)
        if offer is None or offer.device_id != device_id or offer.new_serial != serial:
            self._refuse(device_id, request_id, "unknown-request", "no such renewal")
            return
        if offer.state == "recorded":
            self._publish(
                device_id, {"type": "recorded", "request_id": request_id, "serial": serial}
            )
            return
        self._confirm(device_id, serial, via="device-report")

    def _confirm(self, device_id: str, serial: str, *, via: str) -> None:
        row = self.db.execute(
            "SELECT * FROM offers WHERE device_id = ? AND new_serial = ? AND state = 'offered'",
            (device_id, serial),
        ).fetchone()
        if row is None:
            return
        offer = _Offer(*row)
        active = self.pki.registry.active(device_id)
        if active is None or active.serial != offer.old_serial:
            self._void(offer, reason="superseded", answer="the device changed meanwhile")
            return
        self.pki.record(
            self._prepared(offer, active.hardware_serial),
            details={"renewal": offer.request_id, "replaces": offer.old_serial, "via": via},
        )
        self._set_state(offer, "recorded")
        self.stats["recorded"] += 1
        log.info(
            "renewal for %s recorded: serial %s replaces %s (%s)",
            device_id,
            offer.new_serial,
            offer.old_serial,
            via,
        )
        self._publish(
            device_id,
            {"type": "recorded", "request_id": offer.request_id, "serial": offer.new_serial},
        )

    def _void(self, offer: _Offer, *, reason: str, answer: str) -> None:
        active = self.pki.registry.active(offer.device_id)
        hw = active.hardware_serial if active is not None else None
        self.pki.void(
            self._prepared(offer, None if active is None else hw),
            reason=reason,
            details={"renewal": offer.request_id, "voided": answer},
        )
        self._set_state(offer, "voided")
        self.stats["voided"] += 1
        log.warning(
            "renewal for %s voided: serial %s, %s", offer.device_id, offer.new_serial, answer
        )
        self._publish(
            offer.device_id,
            {
                "type": "refused",
                "request_id": offer.request_id,
                "reason": "offer-void",
                "detail": answer,
            },
        )

    def _sweep(self) -> None:
        now = time.time()
        for row in self.db.execute("SELECT * FROM offers WHERE state = 'offered'").fetchall():
            offer = _Offer(*row)
            active = self.pki.registry.active(offer.device_id)
            if active is None or active.serial != offer.old_serial:
                self._void(offer, reason="superseded", answer="the device was revoked meanwhile")
            elif now - offer.created > self.settings.offer_ttl:
                self._void(offer, reason="superseded", answer="not used within the offer time")

    # -- offers table -------------------------------------------------------------------------

    def _offer_row(self, request_id: str) -> _Offer | None:
        row = self.db.execute("SELECT * FROM offers WHERE request_id = ?", (request_id,)).fetchone()
        return _Offer(*row) if row else None

    def _offers_for(self, device_id: str) -> list[_Offer]:
        rows = self.db.execute(
            "SELECT * FROM offers WHERE device_id = ? AND state = 'offered'", (device_id,)
        ).fetchall()
        return [_Offer(*r) for r in rows]

    def _set_state(self, offer: _Offer, state: str) -> None:
        self.db.execute(
            "UPDATE offers SET state = ? WHERE request_id = ?", (state, offer.request_id)
        )
        with self._pending_lock:
            self._pending_serials.discard((offer.device_id, offer.new_serial))

    def _load_pending(self) -> None:
        for offer in self._offers_for_all():
            with self._pending_lock:
                self._pending_serials.add((offer.device_id, offer.new_serial))

    def _offers_for_all(self) -> list[_Offer]:
        rows = self.db.execute("SELECT * FROM offers WHERE state = 'offered'").fetchall()
        return [_Offer(*r) for r in rows]

    def _prepared(self, offer: _Offer, hardware_serial: str | None) -> Prepared:
        return Prepared(
            identity=Identity.device(offer.device_id, self.pki.trust_domain),
            certificate=x509.load_pem_x509_certificate(offer.cert_pem),
            issuing=self.pki.issuing,
            key_pem=None,
            key_origin="csr",
            hardware_serial=hardware_serial,
            rotate=True,
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
