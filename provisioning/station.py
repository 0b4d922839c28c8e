"""The bench station: put an identity onto a device over the serial provisioning protocol.

One device, start to finish (docs/SERIAL_PROTOCOL.md)::

    HELLO          who is there: hardware serial, state, can it make keys
    GENKEY         (device key mode) the device makes its key and returns a CSR; or, in station
                   key mode, a key is made here and injected with PUT
    PUT ...        certificate, chain, trust anchor, identity.json; resumable after a pulled cable
    COMMIT         the device stores everything atomically
    VERIFY         read-back SHA-256 of every object, compared with what was sent
    HELLO          still the same unit?
    LOCK           the device echoes its id; afterwards it refuses writes
    record         only now: registry row and ledger line (hardware serial, station, timings,
                   hashes)

The certificate is signed before it is uploaded but recorded only after LOCK (two-phase issuance,
:class:`provisioning.pki.Prepared`). If anything fails after the certificate may have reached
the device, it is recorded as revoked (``PKI.void``) so the CRL covers a certificate that exists
but belongs to no provisioned unit; before that point nothing is recorded at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import re
import string
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from hardware import (
    PROTOCOL_VERSION,
    DeviceClient,
    DeviceGoneError,
    DeviceRefusedError,
    DeviceState,
    HardwareError,
    HelloInfo,
    IntegrityError,
    ObjectKind,
    PortError,
    ProtocolViolationError,
    Status,
)
from provisioning.errors import InvalidIdentityError, ProvisioningError
from provisioning.identity import validate_name
from provisioning.pki import PKI, Prepared, identity_json, passphrase_from_env

__all__ = [
    "DEFAULT_ID_TEMPLATE",
    "INTERRUPTED",
    "KeyMode",
    "ProgressCallback",
    "ProvisionResult",
    "StationError",
    "StationInterrupted",
    "StationSettings",
    "device_id_from_template",
    "provision",
    "provision_many",
    "serial_for_id",
    "validate_id_template",
]

KeyMode = Literal["auto", "device", "station"]
DEFAULT_ID_TEMPLATE = "dev-{serial}"
# (port, phase, done, total): phases are hello, genkey, upload, commit, verify, lock, record.
ProgressCallback = Callable[[str, str, int, int], None]
_T = TypeVar("_T")


class StationError(ProvisioningError):
    """Provisioning one device failed; ``reason`` is the one line a technician reads."""

    def __init__(self, port: str, reason: str, *, device_id: str | None = None) -> None:
        self.port = port
        self.reason = reason
        self.device_id = device_id
        super().__init__(f"{port}: {reason}")


INTERRUPTED = "interrupted before the device was locked; nothing active was recorded"


class StationInterrupted(ProvisioningError):  # noqa: N818 - it is what happened, not a bug
    """Ctrl-C in gang mode: every port stopped at its next step; ``results`` says where.

    A port that had locked its device finished (recorded); the others end with
    :data:`INTERRUPTED`, a certificate already sent to the device recorded as revoked.
    """

    def __init__(self, results: list[ProvisionResult]) -> None:
        self.results = results
        kept = sum(r.ok for r in results)
        super().__init__(f"interrupted: {kept} of {len(results)} device(s) provisioned")


@dataclass(frozen=True, slots=True)
class StationSettings:
    """How patient the station is with a link; the defaults suit a USB-UART at 115200 baud."""

    baudrate: int = 115200
    timeout: float = 0.5
    retries: int = 6
    busy_timeout: float = 60.0
    # Polling a busy device costs two short frames; the line is idle meanwhile, so poll often.
    busy_interval: float = 0.01
    # A pulled cable: how often and how long to wait for the device to come back.
    reconnects: int = 3
    reconnect_delay: float = 1.0


@dataclass(frozen=True, slots=True)
class ProvisionResult:
    port: str
    ok: bool
    device_id: str | None = None
    hardware_serial: str | None = None
    key_mode: str | None = None
    cert_serial: str | None = None
    seconds: float = 0.0
    retransmits: int = 0
    resumed: bool = False
    reason: str | None = None


def validate_id_template(template: str) -> str:
    """Check an ``--id-template`` before any port is opened; return it unchanged.

    The template is taken literally: only ``{serial}`` is replaced, and everything else must
    already be id characters (``a-z``, ``0-9``, ``-``), because an id that the station would have
    to rewrite is not the id the user asked for. So ``DEV_{serial}`` and ``{serial}/`` are
    refused with the reason, as ``--device-id`` would refuse them.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # "Single '}' encountered", "expected '}' before end of string"
        raise InvalidIdentityError(template, f"{exc}", what="--id-template") from None
    placeholders = [(name, spec, conv) for _, name, spec, conv in parsed if name is not None]
    unknown = sorted({name for name, _, _ in placeholders} - {"serial"})
    if unknown:
        reason = f"unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}"
        raise InvalidIdentityError(template, f"{reason}; the only one is {{serial}}", what=_TPL)
    if not placeholders:
        reason = "it has no {serial}, so every device would get the same id (use --device-id)"
        raise InvalidIdentityError(template, reason, what=_TPL)
    if any(spec or conv for _, spec, conv in placeholders):
        raise InvalidIdentityError(template, "write {serial} without ':' or '!'", what=_TPL)
    try:  # the literal text, with the shortest serial, must already be a valid id
        validate_name(template.format(serial="0"))
    except InvalidIdentityError as exc:
        raise InvalidIdentityError(template, exc.reason, what=_TPL) from None
    return template


_TPL = "--id-template"


def serial_for_id(hardware_serial: str) -> str:
    """The hardware serial as id characters: ``EMU-1A2B`` -> ``emu-1a2b``, ``AA:BB`` -> ``aa-bb``.

    The rule (the only rewriting the station does): lower-case it, turn every character outside
    ``a-z0-9`` into ``-``, collapse runs of ``-`` and drop them at both ends.
    """
    lowered = hardware_serial.lower()
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9]", "-", lowered)).strip("-")


def device_id_from_template(template: str, hardware_serial: str) -> str:
    """``dev-{serial}`` and ``EMU-1A2B`` give ``dev-emu-1a2b``; see :func:`serial_for_id`.

    The template is never rewritten (:func:`validate_id_template`), and an id longer than 64
    characters is refused, not cut: two units whose serials differ only at the end would
    otherwise get the same id.
    """
    validate_id_template(template)
    serial = serial_for_id(hardware_serial)
    if not serial:
        reason = "it has no letters or digits to put into {serial}"
        raise InvalidIdentityError(hardware_serial, reason, what="hardware serial")
    name = template.format(serial=serial)
    try:
        return validate_name(name)
    except InvalidIdentityError as exc:
        reason = f"{exc.reason} (--id-template {template!r})"
        raise InvalidIdentityError(name, reason) from None


@dataclass
class _Session:
    """One device's run: what the ledger line and the result report."""

    port: str
    started: float = dataclasses.field(default_factory=time.monotonic)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    hashes: dict[str, str] = dataclasses.field(default_factory=dict)
    resumed: bool = False
    info: HelloInfo | None = None
    stop: threading.Event | None = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name != "record":  # every step up to LOCK may stop; recording a locked unit may not
            self.checkpoint()
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.monotonic() - t0, 4)

    def checkpoint(self) -> None:
        """Stop here if asked to (Ctrl-C). Never after LOCK: once the device is locked, the run
        must go on to record it, or a locked unit would hold a voided certificate."""
        if self.stop is not None and self.stop.is_set():
            raise StationError(self.port, INTERRUPTED)


def _explain(port: str, exc: HardwareError, client: DeviceClient | None) -> str:  # noqa: PLR0911 - one reason per failure kind
    """A technician's reason for a protocol-level failure."""
    if isinstance(exc, PortError):
        return (
            exc.reason
            if "busy" in exc.reason or "in use" in exc.reason
            else f"cannot open: {exc.reason}"
        )
    if isinstance(exc, DeviceGoneError):
        if client is not None and client.stats.decoder.bad_version:
            return (
                f"protocol version mismatch: the device answers in another protocol version "
                f"(this station speaks v{PROTOCOL_VERSION})"
            )
        first_hello = client is None or client.stats.requests.get("HELLO", 0) <= 1
        if exc.command == "HELLO" and first_hello:
            return f"no device answering ({exc.reason} after {exc.attempts} attempts)"
        hint = ""
        if exc.reason.startswith("timed out") and client is not None:
            # It did answer before: a slow or noisy link, rather than no device.
            hint = (
                f"; on a slow or noisy link raise --timeout (now {client.timeout:g} s) "
                "and check that --baud matches the device"
            )
        return f"device stopped answering during {exc.command} ({exc.reason}){hint}"
    if isinstance(exc, DeviceRefusedError):
        if exc.status == Status.STORAGE_ERROR:
            return f"device reports its storage is full or failing ({exc.command})"
        if exc.status == Status.LOCKED:
            return "device is locked; re-provisioning needs an explicit 'iotauth hw reset'"
        detail = f": {exc.detail}" if exc.detail else ""
        return f"device refused {exc.command}: {exc.status_name}{detail}"
    if isinstance(exc, IntegrityError):
        return f"read-back of {exc.kind} does not match what was sent"
    if isinstance(exc, ProtocolViolationError):
        return f"device broke the protocol in {exc.command}: {exc.reason}"
    return str(exc)


class _Run:
    """The state of provisioning one device; see the module docstring for the sequence."""

    def __init__(
        self,
        pki: PKI,
        port: str,
        settings: StationSettings,
        progress: ProgressCallback | None,
        stop: threading.Event | None = None,
    ) -> None:
        self.pki = pki
        self.port = port
        self.settings = settings
        self.progress = progress
        self.session = _Session(port, stop=stop)
        self.client: DeviceClient | None = None

    def _report(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(self.port, phase, done, total)

    def _open(self) -> DeviceClient:
        self.client = DeviceClient.open(
            self.port,
            baudrate=self.settings.baudrate,
            timeout=self.settings.timeout,
            retries=self.settings.retries,
            busy_timeout=self.settings.busy_timeout,
            busy_interval=self.settings.busy_interval,
        )
        return self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def _reconnect(self, expected_serial: str) -> DeviceClient:
        """After a pulled cable: reopen the port and make sure the same unit is on it."""
        last: HardwareError | None = None
        for _ in range(self.settings.reconnects):
            time.sleep(self.settings.reconnect_delay)
            self.close()
            try:
                client = self._open()
                info = client.hello()
            except (DeviceGoneError, PortError) as exc:
                last = exc
                continue
            if info.hardware_serial != expected_serial:
                msg = (
                    f"wrong device on the port: expected {expected_serial}, "
                    f"found {info.hardware_serial}"
                )
                raise StationError(self.port, msg)
            return client
        assert last is not None  # noqa: S101 - the loop ran at least once
        raise last

    def _with_reconnect(self, step: Callable[[DeviceClient], _T]) -> _T:
        """Run one protocol step; after a pulled cable, reconnect to the same unit and retry.

        Every step is idempotent on the device (replayed responses, upload watermarks), so
        repeating it never duplicates work the device already has.
        """
        assert self.client is not None  # noqa: S101 - _open() ran
        assert self.session.info is not None  # noqa: S101 - hello() ran
        for attempt in range(self.settings.reconnects + 1):
            try:
                return step(self.client)
            except DeviceGoneError:
                if attempt == self.settings.reconnects:
                    raise
                self.session.resumed = True
                self.client = self._reconnect(self.session.info.hardware_serial)
        raise AssertionError  # pragma: no cover - the loop returns or raises

    def run(
        self,
        *,
        device_id: str | None,
        id_template: str,
        keygen: KeyMode,
        broker: str | None,
        rotate: bool,
    ) -> ProvisionResult:
        s = self.session
        client = self._open()
        with s.phase("hello"):
            self._report("hello", 0, 1)
            info = s.info = client.hello()
            self._report("hello", 1, 1)
        if info.state == DeviceState.LOCKED:
            who = f" as {info.device_id}" if info.device_id else ""
            msg = (
                f"device {info.hardware_serial} is locked{who}; "
                "re-provisioning needs an explicit 'iotauth hw reset'"
            )
            raise StationError(self.port, msg)
        name = device_id or device_id_from_template(id_template, info.hardware_serial)
        validate_name(name)
        mode = self._key_mode(keygen, info)

        prepared: Prepared | None = None
        uploaded = False
        try:
            if mode == "device":
                with s.phase("genkey"):
                    self._report("genkey", 0, 1)
                    csr = self._with_reconnect(lambda c: c.genkey(name))
                    self._report("genkey", 1, 1)
                prepared = self.pki.prepare(
                    name, csr=csr.encode(), hardware_serial=info.hardware_serial, rotate=rotate
                )
            else:
                prepared = self.pki.prepare(
                    name, hardware_serial=info.hardware_serial, rotate=rotate
                )
            objects = self._objects(prepared, broker)
            uploaded = True  # from here on, the certificate may be on the device
            self._upload(objects)
            with s.phase("commit"):
                self._report("commit", 0, 1)
                self._with_reconnect(lambda c: c.commit())
                self._report("commit", 1, 1)
            self._verify(objects)
            with s.phase("lock"):
                self._report("lock", 0, 1)
                again = self._with_reconnect(lambda c: c.hello())
                if again.hardware_serial != info.hardware_serial:
                    msg = (
                        f"wrong device on the port: expected {info.hardware_serial}, "
                        f"found {again.hardware_serial}"
                    )
                    raise StationError(self.port, msg, device_id=name)
                self._with_reconnect(lambda c: c.lock(name))
                self._report("lock", 1, 1)
        except BaseException as exc:
            if prepared is not None and uploaded:
                reason = (
                    str(exc)
                    if not isinstance(exc, HardwareError)
                    else _explain(self.port, exc, self.client)
                )
                with contextlib.suppress(ProvisioningError, OSError):
                    self.pki.void(prepared, details=self._details(mode, failure=reason))
            raise
        with s.phase("record"):
            record = self.pki.record(prepared, details=self._details(mode))
            self._report("record", 1, 1)
        assert self.client is not None  # noqa: S101
        return ProvisionResult(
            port=self.port,
            ok=True,
            device_id=name,
            hardware_serial=info.hardware_serial,
            key_mode=mode,
            cert_serial=record.serial,
            seconds=round(time.monotonic() - s.started, 3),
            retransmits=sum(self.client.stats.retransmits.values()),
            resumed=s.resumed,
        )

    def _key_mode(self, keygen: KeyMode, info: HelloInfo) -> str:
        if keygen == "station" and info.keys_in_tpm:
            msg = (
                f"device {info.hardware_serial} keeps its key in a TPM and takes no injected key; "
                "use --keygen device"
            )
            raise StationError(self.port, msg)
        if keygen == "station":
            return "station"
        if info.can_genkey:
            return "device"
        if keygen == "device":
            msg = f"device {info.hardware_serial} cannot generate keys; use --keygen station"
            raise StationError(self.port, msg)
        return "station"

    @property
    def _keystore(self) -> str:
        """Where the device's key lives, as its HELLO says (a claim: no TPM attestation here)."""
        info = self.session.info
        return "tpm" if info is not None and info.keys_in_tpm else "file"

    def _objects(self, prepared: Prepared, broker: str | None) -> list[tuple[ObjectKind, bytes]]:
        from cryptography.hazmat.primitives.serialization import Encoding

        self.session.checkpoint()  # the last stop before the certificate leaves the station
        objects: list[tuple[ObjectKind, bytes]] = []
        if prepared.key_pem is not None:
            objects.append((ObjectKind.KEY, prepared.key_pem))
        objects += [
            (ObjectKind.CERT, prepared.certificate.public_bytes(Encoding.PEM)),
            (ObjectKind.CHAIN, prepared.issuing.public_bytes(Encoding.PEM)),
            (ObjectKind.CA, self.pki.root.public_bytes(Encoding.PEM)),
            (
                ObjectKind.IDENTITY,
                identity_json(prepared.identity, broker, keystore=self._keystore),
            ),
        ]
        return objects

    def _upload(self, objects: list[tuple[ObjectKind, bytes]]) -> None:
        total = sum(len(data) for _, data in objects)
        done = 0
        with self.session.phase("upload"):
            for kind, data in objects:
                base = done

                def step(
                    client: DeviceClient,
                    kind: ObjectKind = kind,
                    data: bytes = data,
                    base: int = base,
                ) -> None:
                    def sent_so_far(sent: int, _total: int) -> None:
                        self._report("upload", base + sent, total)
                        self.session.checkpoint()

                    result = client.put_object(kind, data, progress=sent_so_far)
                    if result.resumed_from:
                        self.session.resumed = True

                self._with_reconnect(step)
                done += len(data)
                # The key is never read back; its hash is checked by the device at COMMIT.
                self.session.hashes[kind.name.lower()] = hashlib.sha256(data).hexdigest()

    def _verify(self, objects: list[tuple[ObjectKind, bytes]]) -> None:
        with self.session.phase("verify"):
            checkable = [(k, d) for k, d in objects if k != ObjectKind.KEY]
            for n, (kind, data) in enumerate(checkable):
                expected = hashlib.sha256(data).hexdigest()
                actual = self._with_reconnect(functools.partial(DeviceClient.verify, kind=kind))
                if actual != expected:
                    raise IntegrityError(kind.name.lower(), expected, actual)
                self._report("verify", n + 1, len(checkable))
                self.session.checkpoint()

    def _details(self, mode: str, *, failure: str | None = None) -> dict[str, Any]:
        s = self.session
        details: dict[str, Any] = {
            "provisioned_over": self.port,
            "device_key_mode": mode,
            "device_keystore": self._keystore,
            "object_sha256": dict(s.hashes),
            "timings": dict(s.timings),
            "resumed": s.resumed,
        }
        if self.client is not None:
            details["retransmits"] = sum(self.client.stats.retransmits.values())
        if failure:
            details["failure"] = failure
        return details


def provision(
    pki: PKI,
    port: str,
    *,
    device_id: str | None = None,
    id_template: str = DEFAULT_ID_TEMPLATE,
    keygen: KeyMode = "auto",
    broker: str | None = None,
    rotate: bool = False,
    settings: StationSettings | None = None,
    progress: ProgressCallback | None = None,
    stop: threading.Event | None = None,
) -> ProvisionResult:
    """Provision the device on ``port``; raise StationError (or another ProvisioningError).

    Setting ``stop`` ends the run at its next step before LOCK, as a failure (:data:`INTERRUPTED`).
    """
    run = _Run(pki, port, settings or StationSettings(), progress, stop)
    try:
        return run.run(
            device_id=device_id,
            id_template=id_template,
            keygen=keygen,
            broker=broker,
            rotate=rotate,
        )
    except HardwareError as exc:
        raise StationError(port, _explain(port, exc, run.client), device_id=device_id) from exc
    finally:
        run.close()


def provision_many(
    pki_dir: Path,
    ports: Sequence[str],
    *,
    device_id: str | None = None,
    id_template: str = DEFAULT_ID_TEMPLATE,
    keygen: KeyMode = "auto",
    broker: str | None = None,
    rotate: bool = False,
    settings: StationSettings | None = None,
    progress: ProgressCallback | None = None,
    passphrase: bytes | None = None,
) -> list[ProvisionResult]:
    """Gang mode: every port at once, one thread each; a failing port never stops the others.

    Ctrl-C stops every port at its next step before LOCK and raises :class:`StationInterrupted`.
    Each thread opens the PKI itself (a SQLite connection belongs to one thread); the registry's
    write lock keeps their records apart.
    """
    if device_id is not None and len(ports) > 1:
        msg = "--device-id names one device; use --id-template with several ports"
        raise ProvisioningError(msg)
    if len(set(ports)) != len(ports):
        msg = "the same port is listed twice"
        raise ProvisioningError(msg)
    if device_id is None:
        validate_id_template(id_template)  # before any port is opened
    passphrase = passphrase if passphrase is not None else passphrase_from_env()

    def one(port: str) -> ProvisionResult:
        t0 = time.monotonic()
        try:
            with PKI.open(pki_dir, passphrase=passphrase) as pki:
                return provision(
                    pki,
                    port,
                    device_id=device_id,
                    id_template=id_template,
                    keygen=keygen,
                    broker=broker,
                    rotate=rotate,
                    settings=settings,
                    progress=progress,
                    stop=stop,
                )
        except StationError as exc:
            reason = exc.reason
        except ProvisioningError as exc:
            reason = str(exc)
        except OSError as exc:
            reason = f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}"
        seconds = round(time.monotonic() - t0, 3)
        return ProvisionResult(port=port, ok=False, seconds=seconds, reason=reason)

    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=max(1, len(ports)), thread_name_prefix="station") as pool:
        futures = [pool.submit(one, port) for port in ports]
        try:
            return [f.result() for f in futures]
        except KeyboardInterrupt:
            # Ctrl-C reaches only this thread: tell the others, let each end at its next step
            # (voiding a certificate it may have sent), and report what was kept.
            stop.set()
            raise StationInterrupted([f.result() for f in futures]) from None
