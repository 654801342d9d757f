"""Turning signed server records into what routing and `peerd status` need."""

from __future__ import annotations

from collections.abc import Iterable

from peerd.records import ServerRecord, State
from routing import ServerSpan

MIN_THROUGHPUT = 1e-3  # a record that announces no figure yet still routes, but last


def record_to_span(record: ServerRecord) -> ServerSpan:
    """The routing view of one ONLINE server record (records carry no load figure yet)."""
    return ServerSpan(
        peer_id=record.peer_id,
        start=record.start,
        end=record.end,
        throughput=max(record.inference_throughput, MIN_THROUGHPUT),
        forward_throughput=max(record.forward_throughput, MIN_THROUGHPUT),
        next_rtts=dict(record.next_rtts),
        dtype=record.dtype,
        quant=record.quant,
        expires_at=record.expires_at,
    )


def online_spans(records: Iterable[ServerRecord]) -> list[ServerSpan]:
    return [record_to_span(r) for r in records if r.state is State.ONLINE and r.end > r.start]


def coverage(records: Iterable[ServerRecord], num_blocks: int) -> list[int]:
    """How many ONLINE servers cover each block."""
    counts = [0] * num_blocks
    for r in records:
        if r.state is State.ONLINE:
            for block in range(max(0, r.start), min(num_blocks, r.end)):
                counts[block] += 1
    return counts


def gaps(counts: list[int]) -> list[tuple[int, int]]:
    """Half-open intervals of blocks that nobody serves."""
    out: list[tuple[int, int]] = []
    start = None
    for block, n in enumerate(counts + [1]):
        if n == 0 and start is None:
            start = block
        elif n > 0 and start is not None:
            out.append((start, block))
            start = None
    return out
