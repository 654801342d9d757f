"""Seeded generators of hostile frames for real daemons, and what a correct daemon does with each.

A `Shot` is the bytes one fuzz step sends on a stream (or a raw TCP connection) plus the
events a correct daemon answers with, predicted by parsing the bytes locally with `wire`:
one reply per complete frame that decodes to a map, a reply then a hang-up for a frame whose
header or payload is unreadable, a hang-up for a valid CloseSession on an inference stream,
and a frame left incomplete ends with our half-close, after which the daemon must hang up.

Mutations: valid messages, field edits (dropped, added, wrong-typed, boundary values,
swapped), byte edits of the encoded frame (reusing tests/test_wire_fuzz.py), truncation,
oversized headers, tensors with huge declared shapes or with int8 data declared float64 (which
expands ~8x when decoded), non-map payloads and plain garbage.
"""

from __future__ import annotations

import random
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

import wire
from tests.test_wire_fuzz import _mutate, _random_mutations
from wire import local as api

PEER_TYPES = ("open_session", "step", "close_session", "forward", "backward", "info", "ping")
LOCAL_TYPES = (
    "list_models", "open_chain", "chain_step", "close_chain", "generate",
    "chain_forward", "chain_backward", "ping",
)  # fmt: skip
MODES = (
    ("valid", 14), ("field", 34), ("bytes", 20), ("truncated", 8), ("oversize", 4),
    ("huge_shape", 8), ("non_map", 4), ("garbage", 4),
)  # fmt: skip
BOMB_SHARE = 0.002  # of huge_shape shots: a real int8 payload declared float64 (MBs)


@dataclass
class Context:
    """What generators need to know about the target (and the stream's own state)."""

    model_id: str
    model_ref: str  # what a local request names the model by (a checkpoint directory)
    hidden_size: int
    num_blocks: int
    max_frame: int = wire.DEFAULT_MAX_FRAME
    batch: int | None = None  # an open session's batch on this inference stream
    chains: dict[str, int] = field(default_factory=dict)  # open chains on this local connection


@dataclass
class Shot:
    data: bytes
    kind: str  # the RPC type the frame was built from ("garbage": none)
    mode: str
    events: list[str]  # "reply" per answered frame, then "close" (daemon hangs up) or nothing
    partial: bool = False  # bytes of an unfinished frame are left: we half-close after sending
    parsed: list[wire.Message] = field(default_factory=list)  # what a correct daemon parsed


def _hidden(rng: random.Random, batch: int, tokens: int, width: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    return torch.randn(batch, tokens, width, generator=gen)


def _span(rng: random.Random, ctx: Context) -> tuple[int, int]:
    start = rng.randrange(ctx.num_blocks)
    return start, rng.randint(start + 1, ctx.num_blocks)


def peer_message(rng: random.Random, kind: str, ctx: Context) -> wire.Message:
    """A valid request of `kind` for a server of `ctx` (cheap to answer when valid)."""
    comp = rng.choice(wire.COMPRESSIONS)
    h = ctx.hidden_size
    if kind == "open_session":
        start, end = _span(rng, ctx)
        batch = rng.randint(1, 2)
        return wire.OpenSession(
            ctx.model_id, start, end, rng.randint(1, 32), batch, comp, uuid.uuid4().hex
        )
    if kind == "step":
        batch = ctx.batch or rng.randint(1, 2)
        reorder = list(range(batch))[::-1] if rng.random() < 0.2 else None
        return wire.Step(
            _hidden(rng, batch, rng.randint(1, 4), h), rng.randrange(64),
            replay=rng.random() < 0.1, compression=comp, reorder=reorder,
        )  # fmt: skip
    if kind in ("forward", "backward"):
        start, end = _span(rng, ctx)
        x = _hidden(rng, rng.randint(1, 2), rng.randint(1, 8), h)
        if kind == "forward":
            return wire.Forward(ctx.model_id, start, end, x, compression=comp)
        return wire.Backward(ctx.model_id, start, end, x, torch.randn_like(x), compression=comp)
    if kind == "close_session":
        return wire.CloseSession()
    if kind == "info":
        return wire.Info()
    if kind == "ping":
        return wire.Ping(rng.randrange(2**64))
    raise ValueError(kind)


def local_message(rng: random.Random, kind: str, ctx: Context) -> wire.Message:
    """A valid local-socket request of `kind` (generations of at most 4 tokens)."""
    comp = rng.choice(wire.COMPRESSIONS)
    h = ctx.hidden_size
    ref = ctx.model_ref if rng.random() < 0.8 else ctx.model_id
    chain_id, batch = (
        rng.choice(sorted(ctx.chains.items())) if ctx.chains else (uuid.uuid4().hex[:16], 1)
    )
    if kind == "list_models":
        return api.ListModels()
    if kind == "open_chain":
        return api.OpenChain(ref, rng.randint(1, 32), rng.randint(1, 2), comp)
    if kind == "chain_step":
        return api.ChainStep(chain_id, _hidden(rng, batch, rng.randint(1, 3), h), comp)
    if kind == "close_chain":
        return api.CloseChain(chain_id)
    if kind == "generate":
        ids = [rng.randrange(300) for _ in range(rng.randint(1, 6))]
        return api.Generate(ref, input_ids=ids, max_new_tokens=rng.randint(1, 4), eos_token_id=[])
    if kind in ("chain_forward", "chain_backward"):
        x = _hidden(rng, 1, rng.randint(1, 4), h)
        if kind == "chain_forward":
            return api.ChainForward(ref, x, compression=comp, keep_trace=rng.random() < 0.3)
        return api.ChainBackward(ref, x, torch.randn_like(x), compression=comp)
    if kind == "ping":
        return wire.Ping(rng.randrange(2**64))
    raise ValueError(kind)


# ----- junk --------------------------------------------------------------------------------

BOUNDARY_INTS = (-1, 0, 1, 2**16, 2**16 + 1, 2**20 + 1, 2**31, 2**63 - 1, 2**64 - 1, -(2**63))


def junk(rng: random.Random, depth: int = 0) -> Any:
    """A msgpack-packable value of a random type (never what a field expects, usually)."""
    pick = rng.randrange(11 if depth < 2 else 7)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick == 2:
        return rng.choice(BOUNDARY_INTS)
    if pick == 3:
        return rng.choice((float("nan"), float("inf"), -0.0, 1e308, 0.5))
    if pick == 4:
        return rng.choice(("", "x" * rng.choice((1, 300, 5000)), "é\u2028\x00", "int8", "step"))
    if pick == 5:
        return rng.randbytes(rng.randint(0, 40))
    if pick == 6:
        return rng.randrange(-1000, 1000)
    if pick in (7, 8):
        return [junk(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if pick == 9:
        return {str(junk(rng, 2))[:8]: junk(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return huge_tensor_map(rng, 64)


def huge_tensor_map(rng: random.Random, width: int) -> dict[str, Any]:
    """A tensor map whose declared shape the few bytes it carries cannot fill."""
    dims = rng.choice(
        ([2**20, 2**20, width], [1, 2**31 - 1, width], [2**31 - 1] * 3, [0, 5, width],
         [1, 1, width, 1, 1, 1, 1, 1, 1], [1, -1, width], [2**64 - 1])
    )  # fmt: skip
    out = {
        "dtype": rng.choice(("float32", "float64", "bfloat16", "int8", "bool", "object")),
        "shape": dims,
        "compression": rng.choice(wire.COMPRESSIONS),
        "data": rng.randbytes(rng.choice((0, 4, 64, 1000))),
    }
    if out["compression"] == "int8":
        out.update(scales=rng.randbytes(8), block=rng.choice((1, 64, 65536, 0)))
    return out


def int8_bomb(rng: random.Random, width: int) -> dict[str, Any]:
    """A well-formed int8 tensor declared float64: `tokens * width` bytes expand 8 + 0.5 x."""
    tokens = rng.choice((16384, 32768, 65536))  # 1, 2, 4 MiB of codes with width 64
    numel = tokens * width
    return {
        "dtype": "float64", "shape": [1, tokens, width], "compression": "int8",
        "data": rng.randbytes(numel), "scales": struct.pack("<f", 0.01) * (numel // 64),
        "block": 64,
    }  # fmt: skip


# ----- mutation ----------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """A deep copy with buffers as bytes (so maps can be edited and repacked)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, memoryview):
        return value.tobytes()
    return value


def frame_of(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _edit_fields(rng: random.Random, d: dict, width: int) -> dict:
    for _ in range(rng.randint(1, 3)):
        keys = list(d)
        op = rng.randrange(6)
        if op == 0 and keys:
            del d[rng.choice(keys)]
        elif op == 1:
            d[rng.choice(("extra", "v2", "", "type ", "data"))] = junk(rng)
        elif op == 2 and keys:
            d[rng.choice(keys)] = junk(rng)
        elif op == 3 and len(keys) > 1:
            a, b = rng.sample(keys, 2)
            d[a], d[b] = d[b], d[a]
        elif op == 4 and keys:
            d[rng.choice(keys)] = rng.choice(BOUNDARY_INTS)
        elif op == 5:  # envelope: version or type
            key = rng.choice(("v", "type"))
            d[key] = rng.choice((0, 2, -1, "1", None, "info", "open_chain", "step", "x" * 300))
    return d


def _tensor_keys(d: dict) -> list[str]:
    return [k for k, v in d.items() if isinstance(v, dict) and "shape" in v]


def mutate(rng: random.Random, message: wire.Message, mode: str, ctx: Context) -> bytes:
    """The bytes of `message` after the mutation `mode` (a frame, or not even one)."""
    d = plain(message.to_wire())
    if mode == "valid":
        return frame_of(pack(d))
    if mode == "field":
        return frame_of(pack(_edit_fields(rng, d, ctx.hidden_size)))
    if mode == "bytes":
        return _mutate(frame_of(pack(d)), _random_mutations(rng))
    if mode == "truncated":
        data = frame_of(pack(d))
        return data[: rng.randrange(1, len(data))]
    if mode == "oversize":
        size = rng.choice((ctx.max_frame + 1, 2**31, 2**32 - 1, 0))
        return struct.pack(">I", size) + rng.randbytes(rng.randint(0, 64))
    if mode == "huge_shape":
        keys = _tensor_keys(d) or ["hidden"]
        bomb = rng.random() < BOMB_SHARE / 0.08
        d[rng.choice(keys)] = (
            int8_bomb(rng, ctx.hidden_size) if bomb else huge_tensor_map(rng, ctx.hidden_size)
        )
        return frame_of(pack(d))
    if mode == "non_map":
        return frame_of(pack(rng.choice(([d], 7, "step", None, [1, 2, 3], b"\x00" * 9))))
    if mode == "garbage":
        return rng.randbytes(rng.randint(1, 300))
    raise ValueError(mode)


def choose_mode(rng: random.Random) -> str:
    return rng.choices([m for m, _ in MODES], [w for _, w in MODES])[0]


def predict(data: bytes, max_frame: int, *, inference: bool) -> Shot:
    """What a correct daemon does with `data` on a fresh read position (see module doc)."""
    shot = Shot(data, "", "", [])
    pos = 0
    while True:
        if len(data) - pos < wire.HEADER_SIZE:
            shot.partial = len(data) > pos
            return shot
        try:
            size = wire.parse_header(data[pos : pos + wire.HEADER_SIZE], max_frame)
        except wire.WireError:
            shot.events += ["reply", "close"]
            return shot
        if len(data) - pos - wire.HEADER_SIZE < size:
            shot.partial = True
            return shot
        payload = data[pos + wire.HEADER_SIZE : pos + wire.HEADER_SIZE + size]
        pos += wire.HEADER_SIZE + size
        try:
            raw = wire.decode_payload(payload)
        except wire.WireError:
            shot.events += ["reply", "close"]
            return shot
        try:
            message = wire.parse_message(raw)
        except wire.WireError:
            shot.events.append("reply")
            continue
        shot.parsed.append(message)
        if inference and isinstance(message, wire.CloseSession):
            shot.events.append("close")
            return shot
        shot.events.append("reply")


def make_shot(rng: random.Random, kind: str, ctx: Context, *, local: bool, inference: bool) -> Shot:
    """One hostile (or valid) frame of RPC type `kind`, with its predicted answer."""
    mode = choose_mode(rng)
    if mode == "garbage":
        data, kind = rng.randbytes(rng.randint(1, 300)), "garbage"
    else:
        build = local_message if local else peer_message
        data = mutate(rng, build(rng, kind, ctx), mode, ctx)
    shot = predict(data, ctx.max_frame, inference=inference)
    shot.kind, shot.mode = kind, mode
    return shot


def tcp_garbage(rng: random.Random, frame: bytes) -> bytes:
    """Bytes for a raw TCP connection to a libp2p port, before any handshake completed."""
    ms = b"\x13/multistream/1.0.0\n"
    noise = b"\x07/noise\n"
    pick = rng.randrange(6)
    if pick == 0:
        return rng.randbytes(rng.randint(1, 2000))
    if pick == 1:
        return ms + rng.randbytes(rng.randint(0, 200))
    if pick == 2:
        return ms + noise + rng.randbytes(rng.randint(0, 200))
    if pick == 3:  # a noise message length far larger than what follows
        return ms + noise + b"\xff\xff" + rng.randbytes(rng.randint(0, 100))
    if pick == 4:
        return frame  # a peerd frame in the clear
    return ms[: rng.randint(1, len(ms))]
