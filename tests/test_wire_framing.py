"""Framing: length-prefixed msgpack, size caps, malformed payloads, incremental decoding."""

from __future__ import annotations

import struct
import tracemalloc

import msgpack
import pytest

import wire
from wire import (
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
    FrameDecoder,
    WireError,
    decode_payload,
    encode_frame,
    parse_header,
)
from wire.guard import MAX_DEPTH, MAX_OBJECTS

MSG = {"v": 1, "type": "ping", "nonce": 5}


def test_frame_is_big_endian_length_then_msgpack():
    frame = encode_frame(MSG)
    (size,) = struct.unpack(">I", frame[:HEADER_SIZE])
    assert size == len(frame) - HEADER_SIZE
    assert msgpack.unpackb(frame[HEADER_SIZE:]) == MSG
    assert parse_header(frame[:HEADER_SIZE], DEFAULT_MAX_FRAME) == size
    assert decode_payload(frame[HEADER_SIZE:]) == MSG


def test_payload_may_be_bytes_bytearray_or_memoryview():
    payload = encode_frame(MSG)[HEADER_SIZE:]
    for buf in (payload, bytearray(payload), memoryview(payload)):
        assert decode_payload(buf) == MSG


def test_header_checks():
    assert parse_header(struct.pack(">I", 1000), 1000) == 1000
    with pytest.raises(WireError) as info:
        parse_header(struct.pack(">I", 1001), 1000)
    assert info.value.code == "too_large" and info.value.details == {"size": 1001, "limit": 1000}
    with pytest.raises(WireError, match="too_large"):
        parse_header(b"\xff\xff\xff\xff")  # default cap: 64 MiB
    with pytest.raises(WireError, match="empty payload"):
        parse_header(b"\x00\x00\x00\x00", 1000)
    for header in (b"", b"\x00\x00\x01", b"\x00\x00\x00\x01\x00"):
        with pytest.raises(WireError, match="header must be 4 bytes"):
            parse_header(header, 1000)


def test_sender_refuses_frames_above_the_cap_and_unpackable_values():
    big = {"v": 1, "blob": b"\x00" * 2000}
    assert len(encode_frame(big, max_frame=4000)) > 2000
    with pytest.raises(WireError) as info:
        encode_frame(big, max_frame=1000)
    assert info.value.code == "too_large"
    with pytest.raises(WireError, match="cannot be packed"):
        encode_frame({"x": object()})
    with pytest.raises(WireError, match="cannot be packed"):
        encode_frame({"x": 2**70})
    with pytest.raises(WireError, match="carries a map"):
        encode_frame([1, 2])


def _nested_arrays(depth: int, declared: int) -> bytes:
    return (b"\xdd" + declared.to_bytes(4, "big")) * depth


BAD_PAYLOADS = [
    (b"", "empty payload"),
    (msgpack.packb(MSG) + b"\x00", "1 trailing bytes"),
    (msgpack.packb(MSG) * 2, "trailing bytes"),
    (msgpack.packb([1, 2]), "must carry a map, got list"),
    (msgpack.packb(7), "must carry a map, got int"),
    (b"\xd4\x01\x02", "extension types"),  # fixext 1
    (b"\xc7\x01\x05\x00", "extension types"),  # ext 8
    (b"\xd6\xff\x00\x00\x00\x01", "extension types"),  # msgpack timestamp
    (b"\x81\xa1a\xd4\x01\x02", "extension types"),  # ext nested in a map
    (b"\xc1", "invalid msgpack type byte 0xc1"),
    (b"\x81\xa1a\xa2\xff\xfe", "UnicodeDecodeError"),
    (b"\x81\x01\x02", "not allowed for map key"),
    (b"\x82\xa1a\x01\xa1a\x02", "duplicate keys"),
    (b"\x81\xa1a\xc4\x10abc", "declared length exceeds the frame"),  # truncated bin
    (b"\x81\xa1a\xdb\xff\xff\xff\xff", "declared length exceeds the frame"),  # str32 of 4 GiB
    (b"\x81\xa1a\xc6\xff\xff\xff\xff", "declared length exceeds the frame"),  # bin32 of 4 GiB
    (b"\xdd\xff\xff\xff\xff", "declares more items than the frame holds"),  # array32
    (b"\xdf\xff\xff\xff\xff", "declares more items than the frame holds"),  # map32
    (b"\x81\xa1a\xcb\x00", "declared length exceeds the frame"),  # truncated float64
    (b"\x81\xa1a", "input ends inside an object"),
    (b"\x81\xa1a\xda\x00", "length field cut short"),
    (_nested_arrays(MAX_DEPTH + 1, 1) + b"\x00", f"nesting deeper than {MAX_DEPTH}"),
    (b"\x91" * (MAX_DEPTH + 1) + b"\x00", f"nesting deeper than {MAX_DEPTH}"),
    (b"\xdd" + (MAX_OBJECTS + 1).to_bytes(4, "big") + b"\x00" * (MAX_OBJECTS + 1), "more than"),
]


@pytest.mark.parametrize(("payload", "fragment"), BAD_PAYLOADS, ids=[f for _, f in BAD_PAYLOADS])
def test_malformed_payloads_raise_wire_error(payload, fragment):
    with pytest.raises(WireError) as info:
        decode_payload(payload)
    assert info.value.code == "bad_request"
    assert fragment in info.value.message


def test_nesting_and_length_bombs_allocate_almost_nothing():
    """msgpack alone allocates ~33 MB for the first bomb: containers are sized when declared."""
    bombs = [
        _nested_arrays(1000, 5000),  # 5 KB of headers each declaring 5000 items
        _nested_arrays(MAX_DEPTH, 2**20) + b"\x00" * 2**20,  # a MiB frame, deep and wide
        b"\xdd" + (10**6).to_bytes(4, "big") + b"\x00" * 10**6,  # a million objects
    ]
    tracemalloc.start()
    try:
        for bomb in bombs:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            with pytest.raises(WireError):
                decode_payload(bomb)
            assert tracemalloc.get_traced_memory()[1] - before < 64 * 1024
    finally:
        tracemalloc.stop()


def test_accepted_frames_stay_within_object_and_depth_limits():
    deep = {"a": 0}
    for _ in range(MAX_DEPTH - 1):
        deep = {"a": deep}
    assert decode_payload(encode_frame(deep)[HEADER_SIZE:]) == deep
    wide = {"x": list(range(MAX_OBJECTS - 3))}  # map, key, list and its items
    assert decode_payload(encode_frame(wide)[HEADER_SIZE:]) == wide


def _frames(*msgs: dict) -> bytes:
    return b"".join(encode_frame(m) for m in msgs)


def test_decoder_handles_any_chunking():
    msgs = [{"v": 1, "n": i, "blob": b"\x07" * (i * 300)} for i in range(4)]
    stream = _frames(*msgs)
    for chunk in (1, 3, 7, 64, 1000, len(stream)):
        decoder = FrameDecoder()
        out = []
        for i in range(0, len(stream), chunk):
            out += decoder.feed(stream[i : i + chunk])
        assert out == msgs and decoder.buffered == 0


def test_decoder_reports_partial_frames_as_buffered():
    frame = encode_frame(MSG)
    decoder = FrameDecoder()
    assert decoder.feed(frame[:-1]) == [] and decoder.buffered == len(frame) - 1
    assert decoder.feed(frame[-1:]) == [MSG] and decoder.buffered == 0


def test_decoder_refuses_oversized_frame_from_its_header_and_stays_broken():
    decoder = FrameDecoder(max_frame=100)
    with pytest.raises(WireError) as info:
        decoder.feed(struct.pack(">I", 101))  # refused before any of the payload arrives
    assert info.value.code == "too_large"
    with pytest.raises(WireError, match="too_large"):
        decoder.feed(encode_frame(MSG))  # the frame boundary is lost for good


def test_decoder_skips_a_bad_payload_and_keeps_the_frames_around_it():
    bad = struct.pack(">I", 3) + b"\x92\x01\x02"  # a list, not a map
    decoder = FrameDecoder()
    with pytest.raises(WireError, match="must carry a map"):
        decoder.feed(encode_frame({"n": 1}) + bad + encode_frame({"n": 2}))
    assert decoder.feed(b"") == [{"n": 1}, {"n": 2}]
    assert decoder.feed(encode_frame({"n": 3})) == [{"n": 3}]


def test_decoder_refuses_an_empty_frame():
    with pytest.raises(WireError, match="empty payload"):
        FrameDecoder().feed(b"\x00\x00\x00\x00")


def test_daemon_read_path_round_trips_messages():
    """What the daemon does: read 4 bytes, parse_header, read n bytes, decode, parse."""
    import torch

    sent = wire.Step(torch.randn(1, 3, 8), 4, compression="int8")
    stream = memoryview(encode_frame(sent.to_wire()) + encode_frame(wire.CloseSession().to_wire()))
    got = []
    while stream:
        n = parse_header(stream[:HEADER_SIZE], DEFAULT_MAX_FRAME)
        got.append(wire.parse_message(decode_payload(stream[HEADER_SIZE : HEADER_SIZE + n])))
        stream = stream[HEADER_SIZE + n :]
    assert isinstance(got[0], wire.Step) and isinstance(got[1], wire.CloseSession)
    assert got[0].step_id == 4
    assert torch.allclose(got[0].hidden, sent.hidden, atol=0.05)


def test_non_byte_buffers_are_read_as_bytes_or_refused():
    import array

    msg = next(m for k in range(4) if len(msgpack.packb(m := {"pad": "x" * k})) % 4 == 0)
    words = array.array("I", msgpack.packb(msg))  # a buffer whose items are 4 bytes wide
    assert decode_payload(words) == msg
    assert parse_header(array.array("B", b"\x00\x00\x01\x00")) == 256
    for not_bytes in ("abcd", 1234, None):
        with pytest.raises(WireError, match="bytes-like"):
            decode_payload(not_bytes)
        with pytest.raises(WireError, match="bytes-like"):
            parse_header(not_bytes)
