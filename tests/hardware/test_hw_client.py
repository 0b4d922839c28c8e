"""The station client: sans-IO bookkeeping, and the driver against an in-memory device."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hardware.client import ClientCore, DeviceClient
from hardware.codec import Command, Frame, ObjectKind, Status, encode_frame
from hardware.emulator import VirtualDevice
from hardware.errors import DeviceGoneError, DeviceRefusedError, InvalidDeviceIdError, PortError
from hardware.responder import Responder


class FakePort:
    """A pyserial-shaped port wired straight to a responder; it can lose chosen answers."""

    def __init__(self, responder: Responder | None, *, lose: set[int] = frozenset()) -> None:
        self.responder = responder
        self.lose = set(lose)
        self.writes = 0
        self.timeout: float | None = 0.005
        self._rx = bytearray()

    @property
    def in_waiting(self) -> int:
        return len(self._rx)

    def write(self, data: bytes) -> int:
        self.writes += 1
        if self.responder is not None:
            out = self.responder.receive_data(data)
            if self.responder.has_work:
                self.responder.work()
            if self.writes not in self.lose:
                self._rx += out
        return len(data)

    def read(self, size: int = 1) -> bytes:
        if not self._rx:
            time.sleep(self.timeout or 0)
            return b""
        out = bytes(self._rx[:size])
        del self._rx[:size]
        return out

    def close(self) -> None:
        pass


def test_core_numbers_requests_and_retransmits_identical_bytes() -> None:
    core = ClientCore(first_seq=254)
    first = core.start(Command.HELLO, b"\x01")
    assert core.pending == Frame(Command.HELLO, 255, 0, b"\x01")
    assert core.retransmit() == first
    assert core.attempts == 2
    core.start(Command.HELLO, b"\x01")
    assert core.pending is not None
    assert core.pending.seq == 0
    assert core.stats.retransmits["HELLO"] == 1


def test_core_skips_stale_and_foreign_frames() -> None:
    core = ClientCore(first_seq=9)
    core.start(Command.VERIFY, b"\x02")  # seq 10
    stale = encode_frame(Frame(Command.VERIFY | 0x80, 9, 0, b"old"))
    echo = encode_frame(Frame(Command.VERIFY, 10, 0, b"\x02"))
    other = encode_frame(Frame(Command.READ | 0x80, 10, 0, b""))
    good = Frame(Command.VERIFY | 0x80, 10, 0, b"new")
    core.receive_data(stale + echo + other + b"noise")
    assert core.next_response() is None
    core.receive_data(encode_frame(good))
    assert core.next_response() == good
    assert core.stats.stale == 3
    assert core.pending is None


def test_lost_answers_are_recovered_by_replay(make_responder) -> None:
    """Answers lost on the way back: the retransmission is answered from the device's cache."""
    responder = make_responder()
    port = FakePort(responder, lose={1, 3, 4})
    client = DeviceClient(port, timeout=0.02, retries=5, busy_interval=0.001)
    assert client.hello().hardware_serial == "HW-0001"
    assert responder.stats.replayed == 1
    client.put_object(ObjectKind.IDENTITY, b'{"device_id": "dev-1"}')
    assert client.stats.retransmits["PUT_BEGIN"] == 2
    assert responder.stats.executed == 3  # HELLO, PUT_BEGIN, PUT_DATA: each exactly once


def test_silence_gives_device_gone_after_retries() -> None:
    port = FakePort(None)
    client = DeviceClient(port, name="fake", timeout=0.01, retries=3)
    with pytest.raises(DeviceGoneError) as caught:
        client.hello()
    assert caught.value.attempts == 4
    assert caught.value.command == "HELLO"
    assert port.writes == 4
    assert "fake" in str(caught.value)


def test_refusal_carries_status(make_responder) -> None:
    client = DeviceClient(FakePort(make_responder()), timeout=0.05)
    with pytest.raises(DeviceRefusedError) as caught:
        client.read(ObjectKind.KEY)
    assert caught.value.status == Status.FORBIDDEN
    assert caught.value.command == "READ"


@pytest.mark.parametrize("bad", ["", "Dev", "-x", "a" * 65])
def test_bad_device_id_is_refused_before_sending(make_responder, bad: str) -> None:
    port = FakePort(make_responder())
    client = DeviceClient(port, timeout=0.05)
    with pytest.raises(InvalidDeviceIdError):
        client.genkey(bad)
    with pytest.raises(InvalidDeviceIdError):
        client.lock(bad)
    assert port.writes == 0


def test_small_chunks_and_progress(make_responder) -> None:
    client = DeviceClient(FakePort(make_responder()), timeout=0.05, chunk_size=7)
    seen: list[tuple[int, int]] = []
    data = b'{"device_id": "dev-1", "trust_domain": "x"}'
    result = client.put_object(
        ObjectKind.IDENTITY,
        data,
        lambda sent, total: seen.append((sent, total)),
    )
    assert result.resumed_from == 0
    assert seen[0] == (0, len(data))
    assert seen[-1] == (len(data), len(data))
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)
    assert client.commit() == {ObjectKind.IDENTITY}
    assert client.read(ObjectKind.IDENTITY) == data


def test_open_missing_port_is_a_port_error(tmp_path) -> None:
    with pytest.raises(PortError) as caught:
        DeviceClient.open(str(tmp_path / "ttyNOPE"))
    assert "ttyNOPE" in caught.value.port


def test_stats_decoder_counts_noise(make_responder) -> None:
    client = DeviceClient(FakePort(make_responder()), timeout=0.05)
    client.core.receive_data(b"\x00junk\x00")
    client.hello()
    assert client.stats.decoder.garbage == 1


def test_the_wait_for_an_answer_covers_the_time_on_the_wire(tmp_path: Path) -> None:
    """At 2400 baud the device's CSR (about 500 bytes) takes some 2 s to arrive: the station
    waits for it (``timeout`` is the margin beyond the wire time) instead of retransmitting into
    a link that is still busy with the answer and giving up after ``retries``."""
    device = VirtualDevice(tmp_path / "store", "socket://127.0.0.1:0", baudrate=2400).start()
    try:
        with DeviceClient.open(device.address, baudrate=2400, timeout=0.3, retries=2) as client:
            client.hello()
            csr = client.genkey("dev-slow")
            retransmits = sum(client.stats.retransmits.values())
    finally:
        device.stop()
    assert "BEGIN CERTIFICATE REQUEST" in csr
    assert retransmits == 0
    assert DeviceClient(FakePort(None), timeout=0.5).attempt_seconds(100) == 0.5
    slow = DeviceClient(FakePort(None), timeout=0.5, baudrate=1200)
    assert slow.attempt_seconds(1000) > 0.5 + 1000 * 10 / 1200
