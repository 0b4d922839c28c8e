"""The device side of the serial provisioning protocol: bytes in, bytes out, nothing else.

Theory of operation
-------------------
Rule 1: everything that decides whether a command may run in a state lives in ``TABLE`` below, and
nowhere else. The device state is not a variable that can drift from the disk; it is *derived*
from the credential store every time (``LOCKED`` if the lock marker exists, ``PROVISIONED`` if a key
and a certificate are committed, ``FACTORY`` otherwise). A reboot therefore never loses it.

Rule 2: every command is idempotent, because on a noisy cable the station cannot know whether a
request or only its answer was lost. The responder keeps the last answer and replays it, byte for
byte, to a retransmission (same ``seq``, ``cmd`` and payload) without executing anything again. Even
without that cache (after a reboot) re-execution is harmless: PUT_DATA is offset-addressed,
PUT_BEGIN with the same length and hash resumes, COMMIT with nothing staged is a no-op, GENKEY for
the same device id returns the CSR it already made, LOCK with the same id answers OK.

Rule 3: slow work never blocks the line. GENKEY answers BUSY at once and records a job; the
transport calls ``work()`` when the line is idle; the station polls GENKEY until the answer is OK.
BUSY answers are never cached, so a poll always sees fresh progress.

Rule 4: damaged input is never answered (the decoder drops and counts it); a well-formed request
with bad arguments gets a specific status. Nothing a station sends can crash the responder.

State diagram (writes = GENKEY, PUT_BEGIN, PUT_DATA, COMMIT)::

               COMMIT (key + cert stored)             LOCK(id)
    FACTORY ------------------------------> PROVISIONED ---------> LOCKED
       ^   every command except LOCK            |  every command        |  HELLO, VERIFY, READ,
       |                                        |                       |  LOCK(same id); writes
       |                                        |                       |  answer LOCKED
       +------------- FACTORY_RESET(token) -----+-----------------------+

This module, ``codec``, ``messages``, ``store`` and ``keygen`` are the device-side code. They run
unchanged under MicroPython (``hardware.mp_device`` serves them on a tty or stdio there; CI runs
it against the real station): ``hardware._compat`` bridges ``enum``, ``dataclasses`` and
``typing``, and the code avoids what MicroPython lacks (``{**a, **b}`` displays, for one).
"""

import hashlib
import json

from hardware._compat import TYPE_CHECKING, dataclass, field, members
from hardware.codec import (
    MAX_PAYLOAD,
    Command,
    DecoderStats,
    DeviceFlag,
    DeviceState,
    Frame,
    FrameDecoder,
    ObjectKind,
    Status,
    encode_frame,
    status_name,
)
from hardware.errors import StoreError
from hardware.keygen import KeyBackend, default_backend
from hardware.messages import (
    device_id_problem,
    pack_commit_response,
    pack_genkey_response,
    pack_hello_response,
    pack_lock_response,
    pack_reset_response,
    pack_verify_response,
    pack_watermark,
    reset_token,
    unpack_genkey_request,
    unpack_kind,
    unpack_put_begin_request,
    unpack_put_data_request,
    unpack_read_request,
)
from hardware.store import MAX_OBJECT_SIZE, CredentialStore

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "HANDLE",
    "NEXT_STATES",
    "TABLE",
    "WRITABLE_KINDS",
    "Responder",
    "ResponderStats",
]

HANDLE = None
"""In ``TABLE``: run the command's handler (which may still refuse on its arguments)."""

_ALL = members(Command)
_WRITES = (Command.GENKEY, Command.PUT_BEGIN, Command.PUT_DATA, Command.COMMIT)


def _row(refusals: dict[Command, Status]) -> dict[Command, Status | None]:
    """One state's row: every command runs its handler except those refused outright."""
    row: dict[Command, Status | None] = {cmd: HANDLE for cmd in _ALL}
    row.update(refusals)
    return row


# Rule 1. state -> command -> HANDLE, or the status that refuses the command outright.
TABLE: dict[DeviceState, dict[Command, Status | None]] = {
    # Locking a unit with nothing committed would freeze it empty.
    DeviceState.FACTORY: _row({Command.LOCK: Status.BAD_STATE}),
    DeviceState.PROVISIONED: _row({}),
    DeviceState.LOCKED: _row({cmd: Status.LOCKED for cmd in _WRITES}),
}

# Where a command that ran can leave the device; the tests hold the responder to it.
NEXT_STATES: dict[DeviceState, dict[Command, tuple[DeviceState, ...]]] = {
    DeviceState.FACTORY: {
        Command.COMMIT: (DeviceState.FACTORY, DeviceState.PROVISIONED),
        Command.FACTORY_RESET: (DeviceState.FACTORY,),
    },
    DeviceState.PROVISIONED: {
        Command.COMMIT: (DeviceState.PROVISIONED,),
        Command.LOCK: (DeviceState.LOCKED,),
        Command.FACTORY_RESET: (DeviceState.FACTORY,),
    },
    DeviceState.LOCKED: {
        Command.FACTORY_RESET: (DeviceState.FACTORY,),
    },
}
"""Commands not listed for a state leave it unchanged."""

WRITABLE_KINDS = (
    ObjectKind.KEY,
    ObjectKind.CERT,
    ObjectKind.CHAIN,
    ObjectKind.CA,
    ObjectKind.IDENTITY,
)

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


class _Refusal(Exception):  # noqa: N818 - internal control flow, never escapes the responder
    def __init__(self, status: Status) -> None:
        self.status = status
        super().__init__(status_name(status))


@dataclass(slots=True)
class ResponderStats:
    """How much the device did: executed requests, replays from the cache, decoder drops."""

    __match_args__ = ("executed", "replayed", "decoder")  # the field order MicroPython needs
    executed: int = 0
    replayed: int = 0
    decoder: DecoderStats = field(default_factory=DecoderStats)


class Responder:
    """One device's protocol endpoint over a ``CredentialStore``.

    Feed it whatever arrived on the line with ``receive_data``; write back what it returns. Call
    ``work()`` when ``has_work`` and the line is idle (key generation).
    """

    def __init__(
        self,
        store: CredentialStore,
        *,
        hardware_serial: str,
        backend: KeyBackend | None = None,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        if not 16 <= max_payload <= MAX_PAYLOAD:
            msg = f"max_payload must be in 16..{MAX_PAYLOAD}, got {max_payload}"
            raise ValueError(msg)
        self.store = store
        self.hardware_serial = hardware_serial
        self.backend: KeyBackend = default_backend() if backend is None else backend
        self.max_payload = max_payload
        self._decoder = FrameDecoder(max_payload=max_payload)
        self.stats = ResponderStats(decoder=self._decoder.stats)
        self._cache: tuple[int, int, bytes, Frame] | None = None
        self._job: str | None = None
        self._job_failed = False
        self._handlers: dict[Command, Callable[[bytes], bytes]] = {
            Command.HELLO: self._hello,
            Command.GENKEY: self._genkey,
            Command.PUT_BEGIN: self._put_begin,
            Command.PUT_DATA: self._put_data,
            Command.COMMIT: self._commit,
            Command.VERIFY: self._verify,
            Command.READ: self._read,
            Command.LOCK: self._lock,
            Command.FACTORY_RESET: self._factory_reset,
        }

    # -- I/O-free surface ----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> bytes:
        """Bytes from the line in; the bytes to send back out (possibly empty)."""
        self._decoder.receive_data(data)
        out = bytearray()
        while True:
            frame = self._decoder.next_frame()
            if frame is None:
                return bytes(out)
            reply = self.handle(frame)
            if reply is not None:
                out += encode_frame(reply, max_payload=self.max_payload)

    def handle(self, request: Frame) -> Frame | None:
        """The response to one decoded request; ``None`` for frames a device ignores."""
        if request.is_response:
            # Our own answers echoed back (a loopback, a crossed cable) are not requests.
            return None
        cached = self._cache
        if cached is not None and cached[:3] == (request.cmd, request.seq, request.payload):
            self.stats.replayed += 1
            return cached[3]
        reply = self._execute(request)
        self.stats.executed += 1
        self._cache = (
            None
            if reply.status == Status.BUSY
            else (
                request.cmd,
                request.seq,
                request.payload,
                reply,
            )
        )
        return reply

    @property
    def state(self) -> DeviceState:
        if self.store.locked_id() is not None:
            return DeviceState.LOCKED
        if self.store.has(ObjectKind.KEY) and self.store.has(ObjectKind.CERT):
            return DeviceState.PROVISIONED
        return DeviceState.FACTORY

    @property
    def has_work(self) -> bool:
        return self._job is not None

    def work(self) -> None:
        """Do the pending slow job (key generation); the next GENKEY poll sees the result."""
        device_id = self._job
        if device_id is None:
            return
        try:
            key_pem, csr_der = self.backend.generate(device_id)
            self.store.stage_whole(ObjectKind.KEY, key_pem, tag=device_id)
            self.store.stage_whole(ObjectKind.CSR, csr_der, tag=device_id)
        except (StoreError, OSError, ValueError, NotImplementedError):
            self._job_failed = True
        self._job = None

    # -- dispatch ------------------------------------------------------------------------------

    def _execute(self, request: Frame) -> Frame:
        try:
            command = Command(request.cmd)
        except ValueError:
            return request.reply(Status.UNKNOWN_COMMAND)
        refusal = TABLE[self.state][command]
        if refusal is not None:
            return request.reply(refusal)
        try:
            payload = self._handlers[command](request.payload)
        except _Refusal as refused:
            return request.reply(refused.status)
        except ValueError:
            return request.reply(Status.BAD_ARGS)
        except (StoreError, OSError):
            return request.reply(Status.STORAGE_ERROR)
        return request.reply(Status.OK, payload)

    # -- handlers: each returns the OK payload or raises _Refusal ------------------------------

    def _hello(self, payload: bytes) -> bytes:
        store = self.store
        flags = 0
        if self.backend.can_generate:
            flags |= DeviceFlag.CAN_GENKEY
        if self.backend.keystore == "tpm":
            flags |= DeviceFlag.TPM_KEYS
        if store.has(ObjectKind.KEY):
            flags |= DeviceFlag.HAS_KEY
        if store.has(ObjectKind.CERT):
            flags |= DeviceFlag.HAS_CERT
        if store.staged_kinds():
            flags |= DeviceFlag.STAGED
        locked = store.locked_id() or ""
        return pack_hello_response(
            self.state,
            flags,
            self.max_payload,
            self.hardware_serial.encode("ascii", "replace")[:255],
            locked.encode("ascii", "replace")[:64],
        )

    def _genkey(self, payload: bytes) -> bytes:
        force, raw_id = unpack_genkey_request(payload)
        device_id = _checked_id(raw_id)
        if not self.backend.can_generate:
            raise _Refusal(Status.UNSUPPORTED)
        if self._job_failed:
            self._job_failed = False
            raise _Refusal(Status.STORAGE_ERROR)
        if self._job == device_id and not force:
            raise _Refusal(Status.BUSY)
        key = self.store.staged(ObjectKind.KEY)
        csr = self.store.staged(ObjectKind.CSR)
        if (
            not force
            and key is not None
            and csr is not None
            and key.complete
            and csr.complete
            and key.tag == csr.tag == device_id
        ):
            return pack_genkey_response(csr.total, csr.sha256)
        self.store.discard(ObjectKind.CSR)
        self.store.discard(ObjectKind.KEY)
        self._job = device_id
        raise _Refusal(Status.BUSY)

    def _put_begin(self, payload: bytes) -> bytes:
        kind, total, digest = unpack_put_begin_request(payload)
        _check_writable(kind)
        if total == 0:
            raise _Refusal(Status.BAD_ARGS)
        if total > MAX_OBJECT_SIZE:
            raise _Refusal(Status.TOO_LARGE)
        if kind == ObjectKind.KEY:
            if self.backend.keystore == "tpm":
                # A key that crossed the cable was on disk somewhere: a TPM device refuses it.
                raise _Refusal(Status.FORBIDDEN)
            # An injected key replaces a generated one, whose CSR would then certify nothing.
            self.store.discard(ObjectKind.CSR)
        return pack_watermark(self.store.begin(kind, total, digest))

    def _put_data(self, payload: bytes) -> bytes:
        kind, offset, data = unpack_put_data_request(payload)
        _check_writable(kind)
        staged = self.store.staged(kind)
        if staged is None or offset > staged.watermark:
            # No upload, or a gap: the station must ask PUT_BEGIN for the watermark again.
            raise _Refusal(Status.BAD_STATE)
        if offset + len(data) > staged.total:
            raise _Refusal(Status.BAD_ARGS)
        return pack_watermark(self.store.write(kind, offset, data))

    def _commit(self, payload: bytes) -> bytes:
        if payload:
            raise _Refusal(Status.BAD_ARGS)
        store = self.store
        kinds = [kind for kind in store.staged_kinds() if kind in WRITABLE_KINDS]
        if (
            ObjectKind.KEY in kinds
            and ObjectKind.CERT not in kinds
            and store.staged(ObjectKind.CSR) is not None
        ):
            # A generated key waits for the certificate made from its CSR; committing it alone
            # would strand the stored certificate's key.
            kinds.remove(ObjectKind.KEY)
        for kind in kinds:
            staged = store.staged(kind)
            if staged is None or not staged.complete:
                raise _Refusal(Status.BAD_STATE)
            data = store.staged_bytes(kind)
            if hashlib.sha256(data).digest() != staged.sha256:
                # Keeping it would make every retry fail the same way; the station re-uploads.
                store.discard(kind)
                raise _Refusal(Status.HASH_MISMATCH)
            _check_content(kind, data)
        if ObjectKind.CERT in kinds or ObjectKind.KEY in kinds:
            self._check_pair(kinds)
        store.commit(kinds)
        # What is stored, not what this call moved: a COMMIT re-executed after a lost answer
        # (and a reboot that emptied the replay cache) then answers exactly as the first did.
        stored = sum(1 << kind for kind in WRITABLE_KINDS if store.has(kind))
        return pack_commit_response(self.state, stored)

    def _check_pair(self, kinds: list[int]) -> None:
        store = self.store
        key = (
            store.staged_bytes(ObjectKind.KEY)
            if ObjectKind.KEY in kinds
            else store.read(ObjectKind.KEY)
        )
        cert = (
            store.staged_bytes(ObjectKind.CERT)
            if ObjectKind.CERT in kinds
            else store.read(ObjectKind.CERT)
        )
        if cert is None:
            return
        if key is None:
            raise _Refusal(Status.NO_KEY)
        if self.backend.key_matches_cert(key, cert) is False:
            raise _Refusal(Status.KEY_MISMATCH)

    def _verify(self, payload: bytes) -> bytes:
        kind = unpack_kind(payload)
        if kind not in WRITABLE_KINDS and kind != ObjectKind.CSR:
            raise _Refusal(Status.BAD_ARGS)
        found = self.store.digest(kind)
        if found is None:
            raise _Refusal(Status.NOT_FOUND)
        return pack_verify_response(found[0], found[1])

    def _read(self, payload: bytes) -> bytes:
        kind, offset, max_len = unpack_read_request(payload)
        if kind == ObjectKind.KEY:
            # The one rule with no exception: a private key never goes back over the wire.
            raise _Refusal(Status.FORBIDDEN)
        if kind not in WRITABLE_KINDS and kind != ObjectKind.CSR:
            raise _Refusal(Status.BAD_ARGS)
        data = self.store.read(kind)
        if data is None:
            raise _Refusal(Status.NOT_FOUND)
        if offset > len(data):
            raise _Refusal(Status.BAD_ARGS)
        return data[offset : offset + min(max_len, self.max_payload)]

    def _lock(self, payload: bytes) -> bytes:
        device_id = _checked_id(payload)
        store = self.store
        locked = store.locked_id()
        if locked is not None:
            if locked != device_id:
                raise _Refusal(Status.LOCKED)
            return pack_lock_response(DeviceState.LOCKED, payload)
        if [kind for kind in store.staged_kinds() if kind != ObjectKind.CSR]:
            # Uncommitted uploads would be frozen out forever; the station must COMMIT first.
            raise _Refusal(Status.BAD_STATE)
        identity = store.read(ObjectKind.IDENTITY)
        if identity is not None and _identity_device_id(identity) != device_id:
            raise _Refusal(Status.BAD_DEVICE_ID)
        store.discard(ObjectKind.CSR)
        store.lock(device_id)
        return pack_lock_response(DeviceState.LOCKED, payload)

    def _factory_reset(self, payload: bytes) -> bytes:
        if payload != reset_token(self.hardware_serial):
            raise _Refusal(Status.BAD_TOKEN)
        self._job = None
        self._job_failed = False
        self.store.wipe()
        return pack_reset_response(DeviceState.FACTORY)


def _checked_id(raw: bytes) -> str:
    if device_id_problem(raw) is not None:
        raise _Refusal(Status.BAD_DEVICE_ID)
    return raw.decode("ascii")


def _check_writable(kind: int) -> None:
    if kind == ObjectKind.CSR:
        raise _Refusal(Status.FORBIDDEN)
    if kind not in WRITABLE_KINDS:
        raise _Refusal(Status.BAD_ARGS)


def _check_content(kind: int, data: bytes) -> None:
    """Cheap shape checks a microcontroller can afford; the station's CA did the real ones."""
    if kind in (ObjectKind.CERT, ObjectKind.CHAIN, ObjectKind.CA):
        # device.crt is the leaf and the chain glued together, so each must be whole PEM lines.
        if not data.startswith(_PEM_CERT) or not data.endswith(b"\n"):
            raise _Refusal(Status.BAD_ARGS)
    elif kind == ObjectKind.KEY:
        if not data.startswith(b"-----BEGIN ") or b"PRIVATE KEY-----" not in data:
            raise _Refusal(Status.BAD_ARGS)
    elif kind == ObjectKind.IDENTITY:
        device_id = _identity_device_id(data)
        if device_id is None or device_id_problem(device_id.encode("ascii", "replace")):
            raise _Refusal(Status.BAD_ARGS)


def _identity_device_id(data: bytes) -> str | None:
    try:
        document = json.loads(data)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    value = document.get("device_id")
    return value if isinstance(value, str) else None
