"""The station side of the serial provisioning protocol.

``ClientCore`` is the sans-IO part: it numbers requests, keeps the exact bytes of the one request in
flight for retransmission, and picks the matching response out of whatever arrives (stale answers
to earlier retransmissions, echoes, noise). ``DeviceClient`` is the thin blocking driver that moves
bytes between a core and a pyserial port and owns the policy: retransmit after ``timeout``, give up
with ``DeviceGoneError`` after ``retries``, poll while the device answers BUSY, and resume uploads
from the device's watermark.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeAlias, TypeVar

from hardware.codec import (
    BITS_PER_BYTE,
    BODY_OVERHEAD,
    MAX_ENCODED_FRAME,
    MAX_PAYLOAD,
    Command,
    DecoderStats,
    DeviceState,
    Frame,
    FrameDecoder,
    ObjectKind,
    Status,
    command_name,
    encode_frame,
    max_encoded_size,
    status_name,
)
from hardware.errors import (
    DeviceGoneError,
    DeviceRefusedError,
    IntegrityError,
    InvalidDeviceIdError,
    PortError,
    ProtocolViolationError,
)
from hardware.messages import (
    HelloInfo,
    device_id_problem,
    pack_genkey_request,
    pack_hello_request,
    pack_put_begin_request,
    pack_put_data_request,
    pack_read_request,
    reset_token,
    unpack_commit_response,
    unpack_genkey_response,
    unpack_hello_response,
    unpack_lock_response,
    unpack_reset_response,
    unpack_verify_response,
    unpack_watermark,
)

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "ClientCore",
    "ClientStats",
    "DeviceClient",
    "ProgressCallback",
    "PutResult",
    "SerialPort",
    "open_port",
]

ProgressCallback: TypeAlias = Callable[[int, int], None]
"""``progress(sent, total)`` after each acknowledged chunk of ``put_object``."""

_PUT_DATA_HEADER = 5  # kind u8 | offset u32
_MIN_CHUNK = 32  # below this, frame overhead dominates and a line that bad will not recover
_GROW_AFTER = 8
_T = TypeVar("_T")


class SerialPort(Protocol):
    """The part of ``serial.Serial`` the driver uses; tests may pass anything shaped like it."""

    timeout: float | None

    @property
    def in_waiting(self) -> int: ...

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes, /) -> int | None: ...

    def close(self) -> None: ...


def open_port(
    url: str,
    *,
    baudrate: int = 115200,
    exclusive: bool = True,
    read_slice: float = 0.02,
    **options: Any,  # noqa: ANN401 - passed through to pyserial untouched
) -> SerialPort:
    """Open a pyserial URL or device path for the protocol.

    ``exclusive`` takes an flock on real ports so two stations cannot drive one device. DTR and
    RTS stay de-asserted: on ESP32-style boards toggling them resets the chip into its ROM loader.
    """
    import serial

    try:
        port = serial.serial_for_url(
            url,
            do_not_open=True,
            baudrate=baudrate,
            timeout=read_slice,
            # A whole frame must fit: at 1200 baud the longest one takes about 9 s to send.
            write_timeout=max(5.0, 2 * MAX_ENCODED_FRAME * BITS_PER_BYTE / baudrate),
            exclusive=exclusive,
            **options,
        )
        port.dtr = False
        port.rts = False
        port.open()
    except (serial.SerialException, ValueError, OSError) as exc:
        raise PortError(url, str(exc)) from exc
    return port  # type: ignore[no-any-return]


@dataclass(slots=True)
class ClientStats:
    """Per-command request and retransmission counts, and what the decoder threw away."""

    requests: Counter[str] = field(default_factory=Counter)
    retransmits: Counter[str] = field(default_factory=Counter)
    stale: int = 0
    decoder: DecoderStats = field(default_factory=DecoderStats)


class ClientCore:
    """Request numbering, the request in flight, and response matching; no I/O."""

    def __init__(self, *, first_seq: int | None = None, max_payload: int = MAX_PAYLOAD) -> None:
        # A random start keeps a restarted station from colliding with the device's replay cache.
        self._seq = secrets.randbelow(256) if first_seq is None else first_seq & 0xFF
        self.max_payload = max_payload
        self._decoder = FrameDecoder(max_payload=MAX_PAYLOAD)
        self.stats = ClientStats(decoder=self._decoder.stats)
        self._pending: Frame | None = None
        self._wire = b""
        self.attempts = 0

    @property
    def pending(self) -> Frame | None:
        return self._pending

    def start(self, cmd: int, payload: bytes = b"") -> bytes:
        """Begin a new request; returns the bytes to write."""
        self._seq = (self._seq + 1) & 0xFF
        self._pending = Frame(cmd, self._seq, 0, payload)
        self._wire = encode_frame(self._pending, max_payload=self.max_payload)
        self.attempts = 1
        self.stats.requests[command_name(cmd)] += 1
        return self._wire

    def retransmit(self) -> bytes:
        """The very same bytes again, so the device's replay cache recognises them."""
        if self._pending is None:
            msg = "no request in flight"
            raise RuntimeError(msg)
        self.attempts += 1
        self.stats.retransmits[command_name(self._pending.cmd)] += 1
        return self._wire

    def receive_data(self, data: bytes) -> None:
        self._decoder.receive_data(data)

    def next_response(self) -> Frame | None:
        """The answer to the request in flight, or ``None``; anything else is skipped."""
        pending = self._pending
        while True:
            frame = self._decoder.next_frame()
            if frame is None:
                return None
            if (
                pending is not None
                and frame.is_response
                and frame.command == pending.cmd
                and frame.seq == pending.seq
            ):
                self._pending = None
                return frame
            self.stats.stale += 1


@dataclass(frozen=True, slots=True)
class PutResult:
    """What ``put_object`` sent; ``resumed_from`` > 0 when it continued an earlier upload."""

    kind: ObjectKind
    size: int
    sha256: str
    resumed_from: int


class DeviceClient:
    """Blocking station driver over a serial port; one device, one request at a time."""

    def __init__(
        self,
        port: SerialPort,
        *,
        name: str = "serial port",
        timeout: float = 0.5,
        retries: int = 5,
        busy_interval: float = 0.05,
        busy_timeout: float = 60.0,
        chunk_size: int | None = None,
        first_seq: int | None = None,
        baudrate: int | None = None,
    ) -> None:
        """``timeout`` is the patience beyond the time the frames take on the wire at
        ``baudrate`` (None: no wire time, e.g. a test's in-memory port)."""
        if timeout <= 0 or retries < 0:
            msg = "timeout must be positive and retries non-negative"
            raise ValueError(msg)
        self.port = port
        self.name = name
        self.timeout = timeout
        self.retries = retries
        self.byte_time = BITS_PER_BYTE / baudrate if baudrate else 0.0
        self.busy_interval = busy_interval
        self.busy_timeout = busy_timeout
        self.chunk_size = chunk_size
        self.core = ClientCore(first_seq=first_seq)
        self.info: HelloInfo | None = None
        # Adaptive upload chunk: on a noisy line a long frame rarely survives, so a lost frame
        # halves the chunk and a run of clean ones doubles it back (additive-increase would be
        # slower to recover the full payload size on a line that was only briefly noisy).
        self._adaptive: int | None = None
        self._clean = 0

    @classmethod
    def open(
        cls,
        url: str,
        *,
        baudrate: int = 115200,
        exclusive: bool = True,
        **settings: Any,  # noqa: ANN401 - DeviceClient keyword settings
    ) -> Self:
        """Open ``url`` (``/dev/ttyUSB0``, a pty path, ``socket://H:P``, ``loop://``)."""
        port = open_port(url, baudrate=baudrate, exclusive=exclusive)
        return cls(port, name=url, baudrate=baudrate, **settings)

    def close(self) -> None:
        self.port.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def stats(self) -> ClientStats:
        return self.core.stats

    # -- one exchange --------------------------------------------------------------------------

    def transact(
        self,
        cmd: Command,
        payload: bytes = b"",
        *,
        allow_busy: bool = False,
        retries: int | None = None,
    ) -> Frame:
        """Send one request until its response arrives; refusals raise ``DeviceRefusedError``.

        ``retries`` overrides the client's retransmission budget for this one request.
        """
        budget = self.retries if retries is None else retries
        name = cmd.name
        wire = self.core.start(cmd, payload)
        self._write(wire, name)
        patience = self.attempt_seconds(len(wire))
        deadline = time.monotonic() + patience
        while True:
            frame = self.core.next_response()
            if frame is not None:
                break
            if time.monotonic() >= deadline:
                if self.core.attempts > budget:
                    raise DeviceGoneError(
                        self.name, name, self.core.attempts, f"timed out after {patience:.2f} s"
                    )
                self._write(self.core.retransmit(), name)
                deadline = time.monotonic() + patience
                continue
            self.core.receive_data(self._read(name))
        if frame.status == Status.OK or (allow_busy and frame.status == Status.BUSY):
            return frame
        raise DeviceRefusedError(name, frame.status, status_name(frame.status))

    def attempt_seconds(self, request_bytes: int) -> float:
        """How long to wait for an answer before a retransmit: the request and the longest
        response on the wire (start, data and stop bit: 10 bits a byte), plus ``timeout``."""
        longest_response = max_encoded_size(self.core.max_payload) + 2
        return self.timeout + self.byte_time * (request_bytes + longest_response)

    def _write(self, data: bytes, name: str) -> None:
        try:
            self.port.write(data)
        except OSError as exc:  # pyserial's SerialException is an OSError
            raise DeviceGoneError(self.name, name, self.core.attempts, f"link lost: {exc}") from exc

    def _read(self, name: str) -> bytes:
        try:
            return bytes(self.port.read(max(1, self.port.in_waiting)))
        except OSError as exc:
            raise DeviceGoneError(self.name, name, self.core.attempts, f"link lost: {exc}") from exc

    # -- the protocol, high level ----------------------------------------------------------------

    def hello(self) -> HelloInfo:
        """Start a session: the device's capabilities, state, limits and hardware serial."""
        frame = self.transact(Command.HELLO, pack_hello_request())
        info = _parse(Command.HELLO, unpack_hello_response, frame.payload)
        self.info = info
        self.core.max_payload = max(BODY_OVERHEAD, min(MAX_PAYLOAD, info.max_payload))
        return info

    def genkey(self, device_id: str, *, force: bool = False) -> str:
        """Have the device make its key pair; returns the CSR (PEM), checked against its hash.

        The device answers BUSY while it works and this polls every ``busy_interval`` until
        ``busy_timeout``. Without ``force`` an existing key for the same id is reused.
        """
        raw_id = _encode_id(device_id)
        deadline = time.monotonic() + self.busy_timeout
        payload = pack_genkey_request(raw_id, force=force)
        while True:
            frame = self.transact(Command.GENKEY, payload, allow_busy=True)
            if frame.status == Status.OK:
                break
            if time.monotonic() >= deadline:
                raise DeviceGoneError(
                    self.name, "GENKEY", self.core.attempts, "still busy after busy_timeout"
                )
            # Only the first request forces; a forced poll would restart the generation forever.
            payload = pack_genkey_request(raw_id)
            time.sleep(self.busy_interval)
        csr_len, csr_sha = _parse(Command.GENKEY, unpack_genkey_response, frame.payload)
        der = self.read(ObjectKind.CSR)
        if len(der) != csr_len or hashlib.sha256(der).digest() != csr_sha:
            raise IntegrityError("csr", csr_sha.hex(), hashlib.sha256(der).hexdigest())
        return _pem("CERTIFICATE REQUEST", der)

    def put_object(
        self,
        kind: ObjectKind,
        data: bytes,
        progress: ProgressCallback | None = None,
    ) -> PutResult:
        """Upload one object into the device's staging area, resuming a previous attempt.

        A second call after ``DeviceGoneError`` (cable pulled, device rebooted) continues from
        the device's watermark instead of starting over. Nothing is stored until ``commit()``.
        """
        kind = ObjectKind(kind)
        digest = hashlib.sha256(data).digest()
        total = len(data)
        if not 0 < total <= 0xFFFFFFFF:
            msg = f"an object must be 1 byte to 4 GiB long, got {total} bytes"
            raise ValueError(msg)
        begin = pack_put_begin_request(kind, total, digest)
        mark = self._begin(kind, begin, total)
        resumed_from = mark
        if progress is not None:
            progress(mark, total)
        restarts = 0
        while mark < total:
            chunk = self._chunk_size()
            piece = data[mark : mark + chunk]
            # While the chunk can still shrink, give up on a frame after one retransmission and
            # send a smaller one instead (a retransmission must repeat the same bytes). Writes
            # are offset-addressed and overlap-safe, so the device may have either.
            shrinkable = chunk > _MIN_CHUNK
            try:
                frame = self.transact(
                    Command.PUT_DATA,
                    pack_put_data_request(kind, mark, piece),
                    retries=1 if shrinkable else None,
                )
            except DeviceGoneError as gone:
                self._shrink()
                if shrinkable and "timed out" in gone.reason:
                    continue
                raise
            except DeviceRefusedError as refused:
                # BAD_STATE: the device lost the upload we were feeding (reset, discarded after
                # a failed COMMIT); ask it where it stands and carry on from there.
                if refused.status != Status.BAD_STATE or restarts >= 3:
                    raise
                restarts += 1
                mark = self._begin(kind, begin, total)
                continue
            self._adapt()
            new_mark = _parse(Command.PUT_DATA, unpack_watermark, frame.payload)
            if new_mark <= mark or new_mark > total:
                raise ProtocolViolationError("PUT_DATA", f"watermark {new_mark} after {mark}")
            mark = new_mark
            if progress is not None:
                progress(mark, total)
        return PutResult(kind, total, digest.hex(), resumed_from)

    def _begin(self, kind: ObjectKind, begin: bytes, total: int) -> int:
        frame = self.transact(Command.PUT_BEGIN, begin)
        mark = _parse(Command.PUT_BEGIN, unpack_watermark, frame.payload)
        if mark > total:
            raise ProtocolViolationError("PUT_BEGIN", f"watermark {mark} beyond {kind.name}")
        return mark

    def _chunk_limit(self) -> int:
        room = self.core.max_payload - _PUT_DATA_HEADER
        return room if self.chunk_size is None else max(1, min(self.chunk_size, room))

    def _chunk_size(self) -> int:
        limit = self._chunk_limit()
        return limit if self._adaptive is None else min(limit, self._adaptive)

    def _shrink(self) -> None:
        self._adaptive = max(_MIN_CHUNK, self._chunk_size() // 2)
        self._clean = 0

    def _adapt(self) -> None:
        """Called after each PUT_DATA exchange: shrink after a retransmit, grow after 8 clean."""
        if self.core.attempts > 1:
            self._shrink()
            return
        self._clean += 1
        if self._adaptive is not None and self._clean >= _GROW_AFTER:
            self._clean = 0
            grown = self._adaptive * 2
            self._adaptive = None if grown >= self._chunk_limit() else grown

    def commit(self) -> frozenset[ObjectKind]:
        """Store everything staged, atomically; returns every kind the device now holds."""
        frame = self.transact(Command.COMMIT)
        _state, mask = _parse(Command.COMMIT, unpack_commit_response, frame.payload)
        return frozenset(kind for kind in ObjectKind if mask & (1 << kind))

    def verify(self, kind: ObjectKind) -> str:
        """SHA-256 (hex) of the object as the device reads it back from its storage."""
        frame = self.transact(Command.VERIFY, bytes([ObjectKind(kind)]))
        _length, digest = _parse(Command.VERIFY, unpack_verify_response, frame.payload)
        return digest.hex()

    def read(self, kind: ObjectKind) -> bytes:
        """A stored object: CSR, certificate, chain, trust anchor or identity; never the key."""
        kind = ObjectKind(kind)
        out = bytearray()
        # Same size as upload chunks: on a bad line a short frame is far likelier to survive.
        want = self.core.max_payload if self.chunk_size is None else self._chunk_size()
        while True:
            frame = self.transact(Command.READ, pack_read_request(kind, len(out), want))
            out += frame.payload
            if len(frame.payload) < want:
                return bytes(out)

    def lock(self, device_id: str) -> None:
        """Lock the unit to ``device_id``; the device echoes the id so a wrong unit is noticed."""
        raw_id = _encode_id(device_id)
        frame = self.transact(Command.LOCK, raw_id)
        state, echoed = _parse(Command.LOCK, unpack_lock_response, frame.payload)
        if state != DeviceState.LOCKED or echoed != raw_id:
            raise ProtocolViolationError(
                "LOCK", f"device answered state {int(state)} and id {echoed!r}"
            )

    def factory_reset(self) -> None:
        """Wipe and unlock the unit; the token names its hardware serial (from ``hello()``)."""
        info = self.info if self.info is not None else self.hello()
        frame = self.transact(Command.FACTORY_RESET, reset_token(info.hardware_serial))
        _parse(Command.FACTORY_RESET, unpack_reset_response, frame.payload)
        self.info = None


def _encode_id(device_id: str) -> bytes:
    raw = device_id.encode("utf-8")
    problem = device_id_problem(raw)
    if problem is not None:
        raise InvalidDeviceIdError(device_id, problem)
    return raw


def _parse(cmd: Command, unpack: Callable[[bytes], _T], payload: bytes) -> _T:
    try:
        return unpack(payload)
    except ValueError as exc:
        raise ProtocolViolationError(cmd.name, str(exc)) from exc


def _pem(label: str, der: bytes) -> str:
    body = base64.b64encode(der).decode("ascii")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"
