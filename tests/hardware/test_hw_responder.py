"""The device-side state machine, driven through real encoded bytes with no I/O."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from hardware.codec import Command, DeviceState, Frame, ObjectKind, Status
from hardware.messages import (
    pack_genkey_request,
    pack_put_begin_request,
    pack_put_data_request,
    pack_read_request,
    reset_token,
    unpack_commit_response,
    unpack_genkey_response,
    unpack_hello_response,
    unpack_verify_response,
    unpack_watermark,
)
from hardware.responder import NEXT_STATES, TABLE, Responder
from hardware.store import FILE_NAMES, CredentialStore
from tests.hardware.hw_helpers import Station, identity_json, make_key

DEVICE = "dev-0001"
CREDENTIAL_FILES = sorted(FILE_NAMES.values())


def put(station: Station, kind: ObjectKind, data: bytes, *, chunk: int = 100) -> None:
    begin = station.ask(Command.PUT_BEGIN, pack_put_begin_request(kind, len(data), _sha(data)))
    assert begin.status == Status.OK
    mark = unpack_watermark(begin.payload)
    while mark < len(data):
        reply = station.ask(
            Command.PUT_DATA, pack_put_data_request(kind, mark, data[mark:][:chunk])
        )
        assert reply.status == Status.OK, Status(reply.status).name
        mark = unpack_watermark(reply.payload)


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def genkey(station: Station, device_id: str = DEVICE) -> bytes:
    """GENKEY until OK (running the device's pending work in between); returns the CSR DER."""
    reply = station.ask(Command.GENKEY, pack_genkey_request(device_id.encode()))
    if reply.status == Status.BUSY:
        station.responder.work()
        reply = station.ask(Command.GENKEY, pack_genkey_request(device_id.encode()))
    assert reply.status == Status.OK
    csr_len, csr_sha = unpack_genkey_response(reply.payload)
    der = read_all(station, ObjectKind.CSR)
    assert (len(der), _sha(der)) == (csr_len, csr_sha)
    return der


def read_all(station: Station, kind: ObjectKind) -> bytes:
    out = b""
    while True:
        reply = station.ask(Command.READ, pack_read_request(kind, len(out), 200))
        assert reply.status == Status.OK, Status(reply.status).name
        out += reply.payload
        if len(reply.payload) < 200:
            return out


def provision(station: Station, mini_ca, *, inject: bool = False) -> dict[ObjectKind, bytes]:
    """A full provisioning run up to COMMIT; returns what was sent per kind."""
    sent: dict[ObjectKind, bytes] = {}
    if inject:
        key_pem, public_key = make_key()
        put(station, ObjectKind.KEY, key_pem)
        sent[ObjectKind.KEY] = key_pem
    else:
        der = genkey(station)
        public_key = x509.load_der_x509_csr(der).public_key()
    sent[ObjectKind.CERT] = mini_ca.issue(public_key, DEVICE)
    sent[ObjectKind.CHAIN] = mini_ca.chain_pem
    sent[ObjectKind.CA] = mini_ca.root_pem
    sent[ObjectKind.IDENTITY] = identity_json(DEVICE)
    for kind in (ObjectKind.CERT, ObjectKind.CHAIN, ObjectKind.CA, ObjectKind.IDENTITY):
        put(station, kind, sent[kind])
    reply = station.ask(Command.COMMIT)
    assert reply.status == Status.OK, Status(reply.status).name
    return sent


def credential_files(responder: Responder) -> list[str]:
    return sorted(n for n in os.listdir(responder.store.root) if not n.startswith("."))


def snapshot(responder: Responder) -> dict[str, bytes]:
    out = {}
    for name in CREDENTIAL_FILES:
        with open(os.path.join(responder.store.root, name), "rb") as f:
            out[name] = f.read()
    return out


@pytest.fixture
def station(make_responder) -> Station:
    return Station(make_responder())


# -- the table --------------------------------------------------------------------------------


def test_table_covers_every_state_and_command() -> None:
    """Rule 1: one table decides, so it must say something about every (state, command)."""
    for state in DeviceState:
        assert set(TABLE[state]) == set(Command)
    for cmd in (Command.GENKEY, Command.PUT_BEGIN, Command.PUT_DATA, Command.COMMIT):
        assert TABLE[DeviceState.LOCKED][cmd] == Status.LOCKED
    assert TABLE[DeviceState.FACTORY][Command.LOCK] == Status.BAD_STATE


def test_state_only_moves_along_the_table(station: Station, mini_ca) -> None:
    """Every command of a full session leaves the device in a state NEXT_STATES allows."""
    responder = station.responder
    original_handle = responder.handle
    seen: list[tuple[DeviceState, int, DeviceState]] = []

    def watched(request: Frame) -> Frame | None:
        before = responder.state
        reply = original_handle(request)
        seen.append((before, request.cmd, responder.state))
        return reply

    responder.handle = watched  # type: ignore[method-assign]
    station.ask(Command.HELLO, b"\x01")
    provision(station, mini_ca)
    station.ask(Command.LOCK, DEVICE.encode())
    station.ask(Command.PUT_BEGIN, pack_put_begin_request(ObjectKind.CA, 3, _sha(b"abc")))
    station.ask(Command.FACTORY_RESET, reset_token("HW-0001"))
    for before, cmd, after in seen:
        allowed = NEXT_STATES[before].get(Command(cmd), (before,))
        assert after in allowed, (before, Command(cmd).name, after)
    assert {after for _, _, after in seen} == set(DeviceState)


def test_hello_reports_capabilities(make_responder) -> None:
    info = unpack_hello_response(Station(make_responder()).ask(Command.HELLO, b"\x01").payload)
    assert info.can_genkey
    assert info.state == DeviceState.FACTORY
    assert info.hardware_serial == "HW-0001"
    assert info.max_payload == 1024
    info = unpack_hello_response(
        Station(make_responder(can_genkey=False, subdir="b")).ask(Command.HELLO, b"\x01").payload
    )
    assert not info.can_genkey


def test_unknown_command(station: Station) -> None:
    assert station.ask(0x55).status == Status.UNKNOWN_COMMAND
    assert station.send_bytes(station.wire(Command.HELLO | 0x80)) is None
    assert station.responder.receive_data(b"\x00garbage\x00\x00") == b""


# -- idempotency ------------------------------------------------------------------------------


def test_retransmission_is_replayed_not_executed(station: Station) -> None:
    """The same (seq, cmd, payload) gets the cached answer, byte for byte, with no new work."""
    data = b"-----BEGIN CERTIFICATE-----\nroot\n"
    station.ask(Command.PUT_BEGIN, pack_put_begin_request(ObjectKind.CA, len(data), _sha(data)))
    wire = station.wire(Command.PUT_DATA, pack_put_data_request(ObjectKind.CA, 0, data[:10]))
    first = station.responder.receive_data(wire)
    executed = station.responder.stats.executed
    again = station.responder.receive_data(wire)
    assert again == first
    assert station.responder.stats.executed == executed
    assert station.responder.stats.replayed == 1
    commit = station.wire(Command.COMMIT)
    put_rest = station.ask(Command.PUT_DATA, pack_put_data_request(ObjectKind.CA, 10, data[10:]))
    assert unpack_watermark(put_rest.payload) == len(data)
    first = station.responder.receive_data(commit)
    assert station.responder.receive_data(commit) == first
    assert unpack_commit_response(station.send_bytes(commit).payload)[1] == 1 << ObjectKind.CA


def test_same_seq_with_other_payload_executes(station: Station) -> None:
    """The cache matches a true retransmission only; a different request is executed."""
    station.ask(Command.VERIFY, bytes([ObjectKind.CA]), seq=7)
    executed = station.responder.stats.executed
    station.ask(Command.VERIFY, bytes([ObjectKind.CHAIN]), seq=7)
    assert station.responder.stats.executed == executed + 1


def test_busy_is_never_cached_and_genkey_is_idempotent(station: Station) -> None:
    wire = station.wire(Command.GENKEY, pack_genkey_request(DEVICE.encode()))
    assert station.send_bytes(wire).status == Status.BUSY
    assert station.send_bytes(wire).status == Status.BUSY
    assert station.responder.has_work
    station.responder.work()
    done = station.send_bytes(wire)
    assert done.status == Status.OK
    again = station.ask(Command.GENKEY, pack_genkey_request(DEVICE.encode()))
    assert again.payload == done.payload
    forced = station.ask(Command.GENKEY, pack_genkey_request(DEVICE.encode(), force=True))
    assert forced.status == Status.BUSY
    station.responder.work()
    fresh = station.ask(Command.GENKEY, pack_genkey_request(DEVICE.encode()))
    assert fresh.status == Status.OK
    assert fresh.payload != done.payload


def test_csr_is_valid_and_names_the_device(station: Station) -> None:
    csr = x509.load_der_x509_csr(genkey(station))
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == f"CN={DEVICE}"
    key_path = os.path.join(station.responder.store.root, ".staging", "key.part")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600


@pytest.mark.parametrize("bad", ["", "-dev", "Dev-1", "dev_1", "dev 1", "a" * 65, "dév"])
def test_genkey_and_lock_refuse_bad_device_ids(station: Station, bad: str) -> None:
    raw = bad.encode()
    assert station.ask(Command.GENKEY, pack_genkey_request(raw)).status == Status.BAD_DEVICE_ID
    assert not station.responder.has_work


@pytest.mark.parametrize("good", ["a", "0", "dev-0001", "a" * 64, "9-x-"])
def test_genkey_accepts_good_device_ids(station: Station, good: str) -> None:
    assert station.ask(Command.GENKEY, pack_genkey_request(good.encode())).status == Status.BUSY


def test_genkey_unsupported_without_backend(make_responder) -> None:
    station = Station(make_responder(can_genkey=False))
    reply = station.ask(Command.GENKEY, pack_genkey_request(DEVICE.encode()))
    assert reply.status == Status.UNSUPPORTED


# -- provisioning and lock --------------------------------------------------------------------


@pytest.mark.parametrize("inject", [False, True], ids=["genkey", "injected-key"])
def test_full_provisioning_writes_a_credential_directory(
    make_responder, mini_ca, inject: bool
) -> None:
    station = Station(make_responder(can_genkey=not inject))
    sent = provision(station, mini_ca, inject=inject)
    root = station.responder.store.root
    assert credential_files(station.responder) == CREDENTIAL_FILES
    assert stat.S_IMODE(os.stat(os.path.join(root, "device.key")).st_mode) == 0o600
    with open(os.path.join(root, "device.crt"), "rb") as f:
        assert f.read() == sent[ObjectKind.CERT] + sent[ObjectKind.CHAIN]
    assert os.listdir(os.path.join(root, ".staging")) == []
    for kind, data in sent.items():
        reply = station.ask(Command.VERIFY, bytes([kind]))
        assert unpack_verify_response(reply.payload) == (len(data), _sha(data))
    assert station.responder.state == DeviceState.PROVISIONED
    lock = station.ask(Command.LOCK, DEVICE.encode())
    assert lock.status == Status.OK
    assert lock.payload == bytes([DeviceState.LOCKED]) + DEVICE.encode()


def test_read_never_returns_the_key(station: Station, mini_ca) -> None:
    """Staged, committed, locked: READ of the key is FORBIDDEN, and no READ leaks its bytes."""
    genkey(station)
    assert station.ask(Command.READ, pack_read_request(ObjectKind.KEY, 0, 100)).status == (
        Status.FORBIDDEN
    )
    provision(station, mini_ca)
    with open(os.path.join(station.responder.store.root, "device.key"), "rb") as f:
        key_body = f.read().splitlines()[1]
    for locked in (False, True):
        if locked:
            station.ask(Command.LOCK, DEVICE.encode())
        reply = station.ask(Command.READ, pack_read_request(ObjectKind.KEY, 0, 100))
        assert reply.status == Status.FORBIDDEN
        assert reply.payload == b""
        for kind in (ObjectKind.CERT, ObjectKind.CHAIN, ObjectKind.CA, ObjectKind.IDENTITY):
            assert key_body not in read_all(station, kind)


def test_locked_device_refuses_every_write(station: Station, mini_ca) -> None:
    provision(station, mini_ca)
    assert station.ask(Command.LOCK, DEVICE.encode()).status == Status.OK
    before = snapshot(station.responder)
    data = b"-----BEGIN CERTIFICATE-----\nx\n"
    for cmd, payload in [
        (Command.GENKEY, pack_genkey_request(DEVICE.encode(), force=True)),
        (Command.PUT_BEGIN, pack_put_begin_request(ObjectKind.CA, len(data), _sha(data))),
        (Command.PUT_DATA, pack_put_data_request(ObjectKind.CA, 0, data)),
        (Command.COMMIT, b""),
    ]:
        assert station.ask(cmd, payload).status == Status.LOCKED, cmd.name
    assert not station.responder.has_work
    after = snapshot(station.responder)
    assert after == before
    assert station.ask(Command.VERIFY, bytes([ObjectKind.CERT])).status == Status.OK
    assert station.ask(Command.HELLO, b"\x01").status == Status.OK
    assert station.ask(Command.LOCK, DEVICE.encode()).status == Status.OK
    assert station.ask(Command.LOCK, b"other-device").status == Status.LOCKED
    info = unpack_hello_response(station.ask(Command.HELLO, b"\x01").payload)
    assert (info.state, info.device_id) == (DeviceState.LOCKED, DEVICE)


def test_lock_needs_committed_credentials_and_matching_identity(station: Station, mini_ca) -> None:
    assert station.ask(Command.LOCK, DEVICE.encode()).status == Status.BAD_STATE
    provision(station, mini_ca)
    assert station.ask(Command.LOCK, b"someone-else").status == Status.BAD_DEVICE_ID
    data = b"-----BEGIN CERTIFICATE-----\nnew root\n"
    station.ask(Command.PUT_BEGIN, pack_put_begin_request(ObjectKind.CA, len(data), _sha(data)))
    assert station.ask(Command.LOCK, DEVICE.encode()).status == Status.BAD_STATE
    assert station.ask(Command.LOCK, b"-bad").status == Status.BAD_DEVICE_ID


def test_factory_reset_needs_the_token_then_wipes_and_unlocks(station: Station, mini_ca) -> None:
    provision(station, mini_ca)
    station.ask(Command.LOCK, DEVICE.encode())
    assert station.ask(Command.FACTORY_RESET, b"please").status == Status.BAD_TOKEN
    assert station.ask(Command.FACTORY_RESET, reset_token("HW-9999")).status == Status.BAD_TOKEN
    assert station.responder.state == DeviceState.LOCKED
    reply = station.ask(Command.FACTORY_RESET, reset_token("HW-0001"))
    assert reply.status == Status.OK
    assert station.responder.state == DeviceState.FACTORY
    assert credential_files(station.responder) == []
    assert station.ask(Command.VERIFY, bytes([ObjectKind.KEY])).status == Status.NOT_FOUND


# -- commit integrity -------------------------------------------------------------------------


def test_commit_refuses_hash_mismatch_and_writes_nothing(station: Station, mini_ca) -> None:
    """All or nothing: one bad object keeps every other staged object out too."""
    put(station, ObjectKind.CA, mini_ca.root_pem)
    good = mini_ca.chain_pem
    evil = bytes([good[0]]) + b"X" + good[2:]
    station.ask(Command.PUT_BEGIN, pack_put_begin_request(ObjectKind.CHAIN, len(good), _sha(good)))
    station.ask(Command.PUT_DATA, pack_put_data_request(ObjectKind.CHAIN, 0, evil))
    assert station.ask(Command.COMMIT).status == Status.HASH_MISMATCH
    assert credential_files(station.responder) == []
    root = station.responder.store.root
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]
    # The corrupt upload is forgotten, so a retry starts from zero; the good one waits.
    assert station.responder.store.staged(ObjectKind.CHAIN) is None
    assert station.responder.store.staged(ObjectKind.CA) is not None
    put(station, ObjectKind.CHAIN, good)
    mask = unpack_commit_response(station.ask(Command.COMMIT).payload)[1]
    assert mask == (1 << ObjectKind.CA) | (1 << ObjectKind.CHAIN)


def test_commit_refuses_incomplete_upload(station: Station, mini_ca) -> None:
    data = mini_ca.root_pem
    station.ask(Command.PUT_BEGIN, pack_put_begin_request(ObjectKind.CA, len(data), _sha(data)))
    station.ask(Command.PUT_DATA, pack_put_data_request(ObjectKind.CA, 0, data[:50]))
    assert station.ask(Command.COMMIT).status == Status.BAD_STATE
    assert credential_files(station.responder) == []


def test_commit_refuses_cert_for_another_key(make_responder, mini_ca) -> None:
    station = Station(make_responder())
    key_pem, _ = make_key()
    _, other_public = make_key()
    put(station, ObjectKind.KEY, key_pem)
    put(station, ObjectKind.CERT, mini_ca.issue(other_public, DEVICE))
    assert station.ask(Command.COMMIT).status == Status.KEY_MISMATCH
    assert credential_files(station.responder) == []


def test_commit_refuses_cert_without_key(station: Station, mini_ca) -> None:
    _, public = make_key()
    put(station, ObjectKind.CERT, mini_ca.issue(public, DEVICE))
    assert station.ask(Command.COMMIT).status == Status.NO_KEY


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        (ObjectKind.CA, b"not a certificate\n"),
        (ObjectKind.KEY, b"-----BEGIN NOTHING-----\n"),
        (ObjectKind.IDENTITY, b'{"device_id": "Bad Id"}'),
        (ObjectKind.IDENTITY, b"[1, 2]"),
    ],
)
def test_commit_refuses_malformed_objects(station: Station, kind: ObjectKind, data: bytes) -> None:
    put(station, kind, data)
    assert station.ask(Command.COMMIT).status == Status.BAD_ARGS
    assert credential_files(station.responder) == []


def test_put_refuses_csr_slot_and_oversize(station: Station) -> None:
    sha = _sha(b"x")
    assert station.ask(
        Command.PUT_BEGIN, pack_put_begin_request(ObjectKind.CSR, 1, sha)
    ).status == (Status.FORBIDDEN)
    assert station.ask(
        Command.PUT_BEGIN, pack_put_begin_request(ObjectKind.CA, 10**6, sha)
    ).status == (Status.TOO_LARGE)
    assert station.ask(Command.PUT_BEGIN, pack_put_begin_request(9, 1, sha)).status == (
        Status.BAD_ARGS
    )
    assert station.ask(Command.PUT_BEGIN, b"short").status == Status.BAD_ARGS
    assert station.ask(Command.PUT_DATA, pack_put_data_request(ObjectKind.CA, 0, b"x")).status == (
        Status.BAD_STATE
    )


# -- resume -----------------------------------------------------------------------------------


def test_upload_resumes_from_watermark_after_reboot(make_responder, mini_ca) -> None:
    data = mini_ca.chain_pem
    station = Station(make_responder())
    begin = pack_put_begin_request(ObjectKind.CHAIN, len(data), _sha(data))
    assert unpack_watermark(station.ask(Command.PUT_BEGIN, begin).payload) == 0
    station.ask(Command.PUT_DATA, pack_put_data_request(ObjectKind.CHAIN, 0, data[:120]))
    # A reboot: a new responder on the same directory, nothing volatile survives.
    station = Station(make_responder())
    assert unpack_watermark(station.ask(Command.PUT_BEGIN, begin).payload) == 120
    gap = station.ask(Command.PUT_DATA, pack_put_data_request(ObjectKind.CHAIN, 200, data[200:]))
    assert gap.status == Status.BAD_STATE
    overlap = station.ask(
        Command.PUT_DATA, pack_put_data_request(ObjectKind.CHAIN, 100, data[100:])
    )
    assert unpack_watermark(overlap.payload) == len(data)
    past = station.ask(Command.PUT_DATA, pack_put_data_request(ObjectKind.CHAIN, 0, data + b"x"))
    assert past.status == Status.BAD_ARGS
    assert station.ask(Command.COMMIT).status == Status.OK
    with open(os.path.join(station.responder.store.root, "chain.crt"), "rb") as f:
        assert f.read() == data


def test_put_begin_with_other_content_restarts(station: Station) -> None:
    a, b = b"-----BEGIN CERTIFICATE-----\na\n", b"-----BEGIN CERTIFICATE-----\nb\n"
    station.ask(Command.PUT_BEGIN, pack_put_begin_request(ObjectKind.CA, len(a), _sha(a)))
    station.ask(Command.PUT_DATA, pack_put_data_request(ObjectKind.CA, 0, a[:10]))
    reply = station.ask(Command.PUT_BEGIN, pack_put_begin_request(ObjectKind.CA, len(b), _sha(b)))
    assert unpack_watermark(reply.payload) == 0


# -- the store's crash safety -----------------------------------------------------------------


def test_interrupted_commit_rolls_forward_on_reopen(
    make_responder, mini_ca, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut after the journal: reopening finishes every rename, never half a set."""
    station = Station(make_responder())
    put(station, ObjectKind.CA, mini_ca.root_pem)
    put(station, ObjectKind.CHAIN, mini_ca.chain_pem)
    real_rename = os.rename
    calls = {"n": 0}

    def cut_power(src: str, dst: str) -> None:
        if dst.endswith(("ca.crt", "chain.crt")):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(5, "power cut")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", cut_power)
    assert station.ask(Command.COMMIT).status == Status.STORAGE_ERROR
    monkeypatch.setattr(os, "rename", real_rename)
    store = CredentialStore(station.responder.store.root)
    assert store.read(ObjectKind.CA) == mini_ca.root_pem
    assert store.read(ObjectKind.CHAIN) == mini_ca.chain_pem
    assert store.staged_kinds() == []
    assert not [n for n in os.listdir(store.root) if n.startswith(".") and n.endswith(".tmp")]


def test_commit_failing_before_journal_changes_nothing(
    make_responder, mini_ca, monkeypatch: pytest.MonkeyPatch
) -> None:
    station = Station(make_responder())
    put(station, ObjectKind.CA, mini_ca.root_pem)
    real_rename = os.rename

    def no_journal(src: str, dst: str) -> None:
        if dst.endswith(".commit-journal"):
            raise OSError(28, "disk full")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", no_journal)
    assert station.ask(Command.COMMIT).status == Status.STORAGE_ERROR
    monkeypatch.setattr(os, "rename", real_rename)
    store = CredentialStore(station.responder.store.root)
    assert store.read(ObjectKind.CA) is None
    assert store.staged_kinds() == [ObjectKind.CA]
    assert not [n for n in os.listdir(store.root) if n.endswith(".tmp")]


def test_cert_read_back_is_the_leaf_even_after_chain_changes(station: Station, mini_ca) -> None:
    provision(station, mini_ca)
    leaf = read_all(station, ObjectKind.CERT)
    new_chain = mini_ca.root_pem
    put(station, ObjectKind.CHAIN, new_chain)
    assert station.ask(Command.COMMIT).status == Status.OK
    assert read_all(station, ObjectKind.CERT) == leaf
    with open(os.path.join(station.responder.store.root, "device.crt"), "rb") as f:
        assert f.read() == leaf + new_chain


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([*Command, 0x00, 0x7F]),
            st.integers(0, 255),
            st.one_of(
                st.binary(max_size=80),
                st.builds(
                    pack_put_begin_request,
                    st.integers(0, 255),
                    st.integers(0, 2**32 - 1),
                    st.binary(min_size=32, max_size=32),
                ),
                st.builds(
                    pack_put_data_request,
                    st.integers(0, 255),
                    st.integers(0, 200),
                    st.binary(max_size=40),
                ),
            ),
        ),
        max_size=25,
    )
)
def test_fuzz_responder_always_answers_never_raises(requests) -> None:
    """Rule 4: any sequence of well-framed requests gets answers, never an exception."""
    with tempfile.TemporaryDirectory() as root:
        station = Station(Responder(CredentialStore(root), hardware_serial="HW-1"))
        for cmd, seq, payload in requests:
            reply = station.ask(cmd, payload, seq=seq)
            assert reply.seq == seq
            if station.responder.has_work:
                station.responder.work()
