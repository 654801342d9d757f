"""Swarm throughput: the bottleneck block decides how fast a model runs.

Every token of every request passes through every block once, so a swarm serves a model only
as fast as its worst-covered block: swarm throughput = min over blocks of the summed throughput
of the servers covering that block. A block nobody serves has throughput 0 (the model cannot
run at all).

Sums are taken in sorted (peer_id, start, end) order so every peer that evaluates the same set
of records gets bit-identical floats and therefore the same decisions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Protocol


class Placement(Protocol):
    """What balancing reads from a swarm record (routing.ServerSpan and SwarmEntry both fit)."""

    @property
    def peer_id(self) -> str: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def throughput(self) -> float: ...


@dataclass(frozen=True)
class SwarmEntry:
    """One server of a swarm: it serves blocks [start, end), each at `throughput`."""

    peer_id: str
    start: int
    end: int
    throughput: float

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def moved_to(self, start: int) -> SwarmEntry:
        """The same server holding as many blocks from `start` on."""
        return replace(self, start=start, end=start + self.num_blocks)


def usable_throughput(span: Placement) -> float:
    """A record's throughput, or 0 when it is negative or not finite (a bad record adds nothing)."""
    value = float(span.throughput)
    return value if math.isfinite(value) and value > 0.0 else 0.0


def ordered(swarm: Iterable[Placement]) -> list[Placement]:
    """The swarm in the canonical order every peer uses."""
    return sorted(swarm, key=lambda s: (str(s.peer_id), int(s.start), int(s.end)))


def block_throughputs(num_blocks: int, swarm: Iterable[Placement]) -> list[float]:
    """Summed throughput of the servers covering each block (blocks outside [0, n) are ignored)."""
    if num_blocks <= 0:
        raise ValueError(f"num_blocks must be positive, got {num_blocks}")
    totals = [0.0] * num_blocks
    for span in ordered(swarm):
        value = usable_throughput(span)
        if value == 0.0:
            continue
        for block in range(max(0, int(span.start)), min(num_blocks, int(span.end))):
            totals[block] += value
    return totals


def swarm_throughput(num_blocks: int, swarm: Iterable[Placement]) -> float:
    """The bottleneck: the smallest per-block throughput (0 when some block is not served)."""
    return min(block_throughputs(num_blocks, swarm))
