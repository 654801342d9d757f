"""Fuzzing the receive path: random and mutated frames must yield a message or a WireError.

Hypothesis drives 12,500 inputs in all: random bytes (1,500), byte-level mutations of valid
frames (flips, inserts, deletes, duplications, truncation; 600 shrinkable cases plus 9,000
in seeded batches of 10, hypothesis' own overhead being ~1-4 ms per case here), fed whole
and through FrameDecoder in random chunks, field-level mutations (swapped, dropped, added,
replaced values; 800) and random tensor maps (600). Anything that parses must be sendable
again.
"""

from __future__ import annotations

import random

import msgpack
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wire
from wire import (
    WireError,
    decode_payload,
    decode_tensor,
    encode_frame,
    parse_header,
    parse_message,
)


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


MAX_FRAME = 1 << 16


def _samples() -> list[wire.Message]:
    torch.manual_seed(0)
    h = torch.randn(1, 2, 4)
    return [
        wire.OpenSession("bigscience/bloom", 0, 4, 128, 1, "int8", "s-1"),
        wire.SessionOpened("s-1", 0, 4, 1000),
        wire.Step(h, 7, start=1, end=3, replay=True, compression="float16"),
        wire.Step(h.to(torch.bfloat16), 0),
        wire.StepResult(h, 7, 12, compression="int8"),
        wire.CloseSession(),
        wire.Forward("m", 2, 5, h.double(), prompts=torch.randn(3, 1, 2, 4), compression="int8"),
        wire.ForwardResult(h.half()),
        wire.Backward("m", 0, 1, h, h * 2, compression="float16"),
        wire.BackwardResult(h, grad_prompts=torch.randn(2, 4)),
        wire.Info(),
        wire.InfoResult({"blocks": [0, 4], "state": "online", "rtt": {"p": 0.1}}, {"q": 3}),
        wire.Ping(2**64 - 1),
        wire.Pong(0),
        wire.Error("busy", "try later", {"retry_after": 1.5}),
    ]


SAMPLES = _samples()
FRAMES = [encode_frame(m.to_wire()) for m in SAMPLES]
# raw tensor maps of every dtype, with the message dicts, for field-level mutations
TENSOR_MAPS = [
    wire.encode_tensor(torch.arange(6).reshape(2, 3).to(dtype), c)
    for dtype in wire.DTYPES.values()
    for c in wire.COMPRESSIONS
]
DICTS = [decode_payload(f[wire.HEADER_SIZE :]) for f in FRAMES]

plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=24),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=5,
)


def _receive(payload: bytes) -> None:
    """The daemon's path for one payload: only a message or a WireError may come out."""
    try:
        message = parse_message(decode_payload(payload))
    except WireError as exc:
        assert exc.code in wire.ALL_CODES and exc.message
        return
    _resend(message)


def _resend(message: wire.Message) -> None:
    """Whatever was accepted must encode again and parse to the same type."""
    frame = encode_frame(message.to_wire())
    assert type(parse_message(decode_payload(frame[wire.HEADER_SIZE :]))) is type(message)


def _stream(data: bytes, cuts: list[int]) -> None:
    decoder = wire.FrameDecoder(MAX_FRAME)
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    for piece in pieces:
        try:
            maps = decoder.feed(piece)
        except WireError:
            continue
        for d in maps:
            assert isinstance(d, dict)
            try:
                _resend(parse_message(d))
            except WireError:
                pass


@fuzz(1500)
@given(st.binary(max_size=400))
def test_random_payloads_give_message_or_wire_error(payload: bytes) -> None:
    _receive(payload)
    _stream(payload, [len(payload) // 2])


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 16)),
    st.tuples(st.just("duplicate"), st.integers(0, 10**6), st.integers(1, 16)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
)


def _mutate(frame: bytes, mutations: list[tuple]) -> bytes:
    data = bytearray(frame)
    for kind, where, arg in mutations:
        i = where % (len(data) + 1)
        if kind == "flip" and i < len(data):
            data[i] ^= 1 << arg
        elif kind == "set" and i < len(data):
            data[i] = arg
        elif kind == "insert":
            data[i:i] = arg
        elif kind == "delete":
            del data[i : i + arg]
        elif kind == "duplicate":
            data[i:i] = data[i : i + arg]
        elif kind == "truncate":
            del data[i:]
    return bytes(data)


@fuzz(600)
@given(
    st.sampled_from(FRAMES),
    st.lists(mutation, min_size=1, max_size=4),
    st.lists(st.integers(0, 600), max_size=3),
    st.booleans(),
)
def test_mutated_frames_give_message_or_wire_error(
    frame: bytes, mutations: list[tuple], cuts: list[int], twice: bool
) -> None:
    data = _mutate(frame, mutations)
    if twice:  # a good frame after the bad one: framing errors must not hide as other errors
        data += frame
    _stream(data, sorted(c % (len(data) + 1) for c in cuts))
    if len(data) >= wire.HEADER_SIZE:
        try:
            parse_header(data[: wire.HEADER_SIZE], MAX_FRAME)
        except WireError:
            return
        _receive(data[wire.HEADER_SIZE :])


BATCH = 10


def _random_mutations(rng: random.Random) -> list[tuple]:
    kinds = ["flip", "set", "insert", "delete", "duplicate", "truncate"]
    out = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(kinds)
        arg = {
            "flip": rng.randrange(8),
            "set": rng.randrange(256),
            "insert": rng.randbytes(rng.randint(1, 8)),
            "delete": rng.randint(1, 16),
            "duplicate": rng.randint(1, 16),
            "truncate": 0,
        }[kind]
        out.append((kind, rng.randrange(10**6), arg))
    return out


@fuzz(900)
@given(st.integers(0, 2**32))
def test_seeded_batches_of_mutated_frames(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(BATCH):
        frame = rng.choice(FRAMES)
        data = _mutate(frame, _random_mutations(rng))
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 3)))
        _stream(data + frame, cuts)
        _receive(data[wire.HEADER_SIZE :])


field_edit = st.one_of(
    st.tuples(st.just("swap"), st.integers(0, 50), st.integers(0, 50)),
    st.tuples(st.just("drop"), st.integers(0, 50), st.none()),
    st.tuples(st.just("add"), st.text(max_size=10), plain),
    st.tuples(st.just("replace"), st.integers(0, 50), plain),
    st.tuples(st.just("tensor"), st.integers(0, 50), st.sampled_from(TENSOR_MAPS)),
)


def _edit(d: dict, edits: list[tuple]) -> dict:
    d = dict(d)
    for kind, a, b in edits:
        keys = list(d)
        if kind == "add":
            d[a] = b
        elif not keys:
            continue
        elif kind == "swap":
            k1, k2 = keys[a % len(keys)], keys[b % len(keys)]
            d[k1], d[k2] = d[k2], d[k1]
        elif kind == "drop":
            del d[keys[a % len(keys)]]
        else:
            d[keys[a % len(keys)]] = b
    return d


@fuzz(800)
@given(st.sampled_from(DICTS), st.lists(field_edit, min_size=1, max_size=3))
def test_field_mutations_give_message_or_wire_error(d: dict, edits: list[tuple]) -> None:
    edited = _edit(d, edits)
    _receive(msgpack.packb(edited, use_bin_type=True))
    try:  # also without msgpack in between (a dict built in-process)
        message = parse_message(edited)
    except WireError:
        return
    _resend(message)


junk = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=6)
    | st.lists(st.integers(), max_size=3)
)
dims = st.integers(-3, 8) | st.sampled_from([2**31 - 1, 2**31, 2**40, 2**63, 2**64 - 1])
tensor_map = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*wire.DTYPES, "float8", "object", ""]) | junk,
        "shape": st.lists(dims, max_size=10) | junk,
        "compression": st.sampled_from(wire.COMPRESSIONS) | junk,
        "data": st.binary(max_size=80) | junk,
    },
    optional={
        "scales": st.binary(max_size=16) | junk,
        "block": st.integers(-2, 70) | junk,
        "extra": junk,
    },
)


@fuzz(600)
@given(tensor_map)
def test_random_tensor_maps_give_tensor_or_wire_error(obj: dict) -> None:
    try:
        tensor = decode_tensor(obj)
    except WireError as exc:
        assert exc.code == wire.ErrorCode.BAD_REQUEST
        return
    assert list(tensor.shape) == obj["shape"]
    assert tensor.dtype == wire.DTYPES[obj["dtype"]]
    assert torch.equal(decode_tensor(wire.encode_tensor(tensor)), tensor) or tensor.isnan().any()
