"""The frame codec: round trips, every way bytes can arrive, and silent, counted drops."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hardware.codec import (
    MAX_PAYLOAD,
    RESPONSE_FLAG,
    Command,
    Frame,
    FrameDecoder,
    Status,
    cobs_decode,
    cobs_encode,
    command_name,
    crc32,
    encode_frame,
    status_name,
)
from hardware.transport import BOOT_LOG

PAYLOADS = [
    b"",
    b"\x00",
    b"\x00\x00\x00",
    b"\x01\x02\x03",
    bytes(range(256)),
    b"\xff" * 254,
    b"\xff" * 255,
    b"\x00" * MAX_PAYLOAD,
    bytes((i * 7 + 3) & 0xFF for i in range(MAX_PAYLOAD)),
]

FRAMES = [
    Frame(cmd, seq, 0, payload)
    for cmd in Command
    for seq, payload in ((cmd * 17 & 0xFF, p) for p in PAYLOADS)
] + [
    Frame(cmd | RESPONSE_FLAG, 255, status, b"\x00answer\x00")
    for cmd in Command
    for status in (Status.OK, Status.BUSY, Status.LOCKED)
]


def decode_all(data: bytes, *, step: int | None = None) -> tuple[list[Frame], FrameDecoder]:
    decoder = FrameDecoder()
    frames: list[Frame] = []
    chunks = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        decoder.receive_data(chunk)
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    return frames, decoder


def test_crc_is_zlib_crc32() -> None:
    """The check value of CRC-32/IEEE, as binascii and zlib compute it on both platforms."""
    assert crc32(b"123456789") == 0xCBF43926


def test_hello_bytes_match_the_research_prototype() -> None:
    """The exact HELLO request bytes that CPython and MicroPython produced in serial.md."""
    wire = encode_frame(Frame(Command.HELLO, 1, 0, b"\x01"))
    assert wire == bytes.fromhex("00 04 01 01 01 02 01 06 01 7e 74 e2 bb 00")


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        (b"", b"\x01"),
        (b"\x00", b"\x01\x01"),
        (b"\x00\x00", b"\x01\x01\x01"),
        (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
        (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
        (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255)) + b"\x01"),
    ],
)
def test_cobs_known_vectors(raw: bytes, encoded: bytes) -> None:
    """Wikipedia's COBS examples, both directions."""
    assert cobs_encode(raw) == encoded
    assert cobs_decode(encoded) == raw


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: f"{command_name(f.cmd)}-{len(f.payload)}")
@pytest.mark.parametrize("step", [None, 1, 7], ids=["whole", "bytewise", "7-byte-slices"])
def test_round_trip_every_command(frame: Frame, step: int | None) -> None:
    """decode(encode(f)) == f for every command, fed whole, one byte at a time, or in slices."""
    wire = encode_frame(frame)
    assert wire[0] == 0
    assert wire[-1] == 0
    assert 0 not in wire[1:-1]
    frames, decoder = decode_all(wire, step=step)
    assert frames == [frame]
    assert decoder.stats.dropped == 0


@pytest.mark.parametrize("step", [None, 1])
def test_garbage_between_frames_is_dropped_and_counted(step: int | None) -> None:
    """Boot log, noise with and without zeros, and idle delimiters around good frames."""
    good = [Frame(cmd, i, 0, bytes([i]) * i) for i, cmd in enumerate(Command)]
    noise = [BOOT_LOG, b"\x00\x00\x00", b"\x13\x37\x00\xde\xad", b"\xff" * 50, b"\x00abc"]
    stream = b"".join(encode_frame(f) + noise[i % len(noise)] for i, f in enumerate(good))
    frames, decoder = decode_all(BOOT_LOG + stream, step=step)
    assert frames == good
    assert decoder.stats.frames == len(good)
    assert decoder.stats.dropped > 0


def test_frame_glued_to_garbage_survives_thanks_to_the_leading_delimiter() -> None:
    """Garbage with no zero right before a frame is cut off by the frame's own leading 00."""
    frame = Frame(Command.READ, 9, 0, b"payload")
    frames, decoder = decode_all(b"noise without a zero" + encode_frame(frame))
    assert frames == [frame]
    assert decoder.stats.garbage == 1


def test_bad_crc_is_dropped() -> None:
    frame = Frame(Command.PUT_DATA, 3, 0, b"some data")
    body = bytearray(cobs_decode(encode_frame(frame)[1:-1]) or b"")
    body[-1] ^= 0x01
    frames, decoder = decode_all(b"\x00" + cobs_encode(bytes(body)) + b"\x00")
    assert frames == []
    assert decoder.stats.bad_crc == 1


def test_wrong_version_is_dropped() -> None:
    frames, decoder = decode_all(encode_frame(Frame(Command.HELLO, 1), version=2))
    assert frames == []
    assert decoder.stats.bad_version == 1


def test_oversize_payload_is_dropped() -> None:
    """A frame longer than the receiver's limit is dropped, and the next one still arrives."""
    big = encode_frame(Frame(Command.PUT_DATA, 1, 0, b"\x01" * 300), max_payload=300)
    ok = Frame(Command.HELLO, 2)
    decoder = FrameDecoder(max_payload=256)
    decoder.receive_data(big + encode_frame(ok))
    assert decoder.next_frame() == ok
    assert decoder.next_frame() is None
    assert decoder.stats.oversize == 1


def test_endless_noise_without_zero_does_not_grow_the_buffer() -> None:
    decoder = FrameDecoder()
    for _ in range(100):
        decoder.receive_data(b"\x55" * 1000)
    assert len(decoder._buffer) <= 1100
    assert decoder.stats.oversize == 1
    ok = Frame(Command.VERIFY, 4, 0, b"\x02")
    decoder.receive_data(encode_frame(ok))
    assert decoder.next_frame() == ok


def test_inconsistent_length_is_garbage() -> None:
    body = struct.pack("<BBBBH", 1, 1, 1, 0, 5) + b"ab"
    body += struct.pack("<I", crc32(body))
    frames, decoder = decode_all(b"\x00" + cobs_encode(body) + b"\x00")
    assert frames == []
    assert decoder.stats.garbage == 1


def test_encode_refuses_payload_over_the_limit() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame(Frame(Command.PUT_DATA, 1, 0, b"x" * (MAX_PAYLOAD + 1)))


@pytest.mark.parametrize(
    "kwargs",
    [{"cmd": 256, "seq": 0}, {"cmd": 1, "seq": -1}, {"cmd": 1, "seq": 0, "status": 999}],
)
def test_frame_validates_fields(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=r"0\.\.255"):
        Frame(**kwargs)


def test_reply_echoes_seq_and_sets_response_flag() -> None:
    request = Frame(Command.LOCK, 42, 0, b"dev-1")
    reply = request.reply(Status.OK, b"x")
    assert (reply.cmd, reply.seq, reply.status) == (Command.LOCK | 0x80, 42, 0)
    assert reply.is_response
    assert reply.command == Command.LOCK
    assert not request.is_response


def test_names_for_unknown_codes() -> None:
    assert command_name(0x7E) == "CMD_0x7e"
    assert command_name(Command.GENKEY | 0x80) == "GENKEY"
    assert status_name(0xEE) == "STATUS_0xee"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=64))
def test_fuzz_decode_never_raises(data: bytes, step: int) -> None:
    """Arbitrary bytes, arbitrarily sliced: the decoder only ever drops, it never raises."""
    frames, decoder = decode_all(data, step=step)
    assert decoder.stats.frames == len(frames)


frames_strategy = st.builds(
    Frame,
    cmd=st.integers(0, 255),
    seq=st.integers(0, 255),
    status=st.integers(0, 255),
    payload=st.binary(max_size=600),
)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=500), frames_strategy, st.integers(min_value=1, max_value=50))
def test_fuzz_frame_after_any_garbage_is_recovered(garbage: bytes, frame: Frame, step: int) -> None:
    """Whatever came before, a good frame is decoded: resync is always one delimiter away."""
    frames, _ = decode_all(garbage + encode_frame(frame), step=step)
    assert frames
    assert frames[-1] == frame


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=1500))
def test_fuzz_cobs_round_trip(data: bytes) -> None:
    encoded = cobs_encode(data)
    assert 0 not in encoded
    assert cobs_decode(encoded) == data
