"""Activations on the wire, for bench_generation: bytes and codec time of one Step frame per
hidden dtype, and how a long prefill is cut to fit frames (`wire.rows_per_frame`, `wire.cuts`)."""

from __future__ import annotations

import torch

import wire
from benchmarks.common import interleaved
from wire.sizing import SEQUENCE

HIDDEN = 4096  # a 7B model's hidden size
PREFILL = (1, 4096, 8192)  # a 4096-token prompt of a 70B-shaped model
FRAME_LIMITS = (wire.DEFAULT_MAX_FRAME, 1 << 20)
WIRE_VARIANTS = (  # (hidden dtype, compression)
    ("float32", "none"),
    ("bfloat16", "none"),
    ("float16", "none"),
    ("float32", "float16"),
    ("float32", "int8"),
)


def step_frame(hidden: torch.Tensor, compression: str, max_frame: int) -> bytes:
    return wire.encode_frame(wire.Step(hidden, 0, compression=compression).to_wire(), max_frame)


def round_trip(hidden: torch.Tensor, compression: str) -> torch.Tensor:
    """Encode a Step frame and decode it again, as the sending and receiving daemons do."""
    frame = memoryview(step_frame(hidden, compression, wire.DEFAULT_MAX_FRAME))
    n = wire.parse_header(frame[: wire.HEADER_SIZE], wire.DEFAULT_MAX_FRAME)
    payload = frame[wire.HEADER_SIZE : wire.HEADER_SIZE + n]
    return wire.parse_message(wire.decode_payload(payload)).hidden


def bench_wire_step(tokens: int, runs: int) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(1, tokens, HIDDEN)
    inputs = {v: x.to(wire.DTYPES[v[0]]) for v in WIRE_VARIANTS}
    fns = {v: (lambda h=inputs[v], c=v[1]: round_trip(h, c)) for v in WIRE_VARIANTS}
    for fn in fns.values():
        fn()
    reps = max(1, 1024 // tokens)  # a timing covers several frames when they are small
    times = interleaved(
        {v: (lambda fn=fn: [fn() for _ in range(reps)]) for v, fn in fns.items()}, runs
    )
    base_bytes = len(step_frame(x, "none", wire.DEFAULT_MAX_FRAME))
    base_s = min(times[WIRE_VARIANTS[0]]) / reps
    out = []
    for v in WIRE_VARIANTS:
        size = len(step_frame(inputs[v], v[1], wire.DEFAULT_MAX_FRAME))
        seconds = min(times[v]) / reps
        back = round_trip(inputs[v], v[1]).float()
        out.append(
            {
                "dtype": v[0],
                "compression": v[1],
                "tokens": tokens,
                "frame_bytes": size,
                "bytes_vs_float32": size / base_bytes,
                "round_trip_us": seconds * 1e6,
                "time_vs_float32": seconds / base_s,
                "rel_error": float((back - x).norm() / x.norm()),
            }
        )
    return out


def bench_cuts() -> list[dict]:
    """How a big prefill is cut into Step messages, each frame encoded to check it fits."""
    torch.manual_seed(0)
    full = torch.randn(PREFILL)
    out = []
    for dtype in ("float32", "bfloat16"):
        x = full.to(wire.DTYPES[dtype])
        for limit in FRAME_LIMITS:
            per = wire.rows_per_frame(list(x.shape), dtype, "none", limit, dim=SEQUENCE)
            pieces = wire.cuts(x.shape[1], per)
            sizes = [len(step_frame(x[:, p], "none", limit)) for p in pieces]  # raises if too big
            out.append(
                {
                    "dtype": dtype,
                    "max_frame": limit,
                    "tensor_bytes": x.numel() * x.element_size(),
                    "tokens_per_piece": per,
                    "pieces": len(pieces),
                    "last_piece_tokens": pieces[-1].stop - pieces[-1].start,
                    "largest_frame": max(sizes),
                    "smallest_frame": min(sizes),
                    "fill": max(sizes) / limit,
                }
            )
    del full
    return out


# ----- the whole run --------------------------------------------------------------------------
