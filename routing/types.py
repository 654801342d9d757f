"""Plain data shared by the planner, the reference search and their callers.

Every block interval in this package is half-open: ``[start, end)``, written ``start..end``
in messages like Rust's range syntax, so ``Hop(p, 3, 5)`` serves blocks 3 and 4.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


def _check_rtt(rtt: float, what: str) -> None:
    if not (math.isfinite(rtt) and rtt >= 0):
        raise ValueError(f"{what} must be a finite number of seconds >= 0, got {rtt!r}")


@dataclass(frozen=True)
class ServerSpan:
    """What one server announces about the blocks it serves (a plain copy of its record)."""

    peer_id: str
    start: int  # serves blocks [start, end)
    end: int
    throughput: float  # inference: blocks*tokens per second; 1/throughput s per block per token
    forward_throughput: float | None = None  # batched forward, tokens/s per block
    bandwidth: float = 100e6  # bytes per second
    load: float = 0.0  # 0..1, current load
    next_rtts: Mapping[str, float] = field(default_factory=dict)  # peer -> measured RTT (s)
    dtype: str = "float32"  # compute dtype (a replacement of another dtype changes outputs)
    quant: str = "none"  # weight quantization ("none", "int8", "nf4")
    expires_at: float | None = None  # unix time its record expires (None: not known)

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.end):
            raise ValueError(f"server {self.peer_id}: bad block interval {self.start}..{self.end}")
        for name in ("throughput", "bandwidth"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"server {self.peer_id}: {name} must be > 0, got {value!r}")
        fwd = self.forward_throughput
        if fwd is not None and not (math.isfinite(fwd) and fwd > 0):
            raise ValueError(f"server {self.peer_id}: forward_throughput must be > 0, got {fwd!r}")
        if not (0.0 <= self.load <= 1.0):
            raise ValueError(f"server {self.peer_id}: load must be in [0, 1], got {self.load!r}")
        for peer, rtt in self.next_rtts.items():
            _check_rtt(rtt, f"server {self.peer_id}: rtt to {peer}")
        # Freeze the mapping so a record cannot change under the planner's feet.
        object.__setattr__(self, "next_rtts", MappingProxyType(dict(self.next_rtts)))

    def __hash__(self) -> int:
        return hash((self.peer_id, self.start, self.end))


@dataclass(frozen=True)
class Hop:
    """One server computing blocks [start, end) of a route."""

    peer_id: str
    start: int
    end: int


@dataclass(frozen=True)
class Route:
    """Consecutive hops covering the requested blocks, and their modelled cost in seconds."""

    hops: tuple[Hop, ...]
    cost: float

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(h.peer_id for h in self.hops)


@dataclass(frozen=True)
class ServerRemoved:
    peer_id: str


@dataclass(frozen=True)
class ServerAdded:
    server: ServerSpan


@dataclass(frozen=True)
class ServerUpdated:
    """A fresher record of a known server (load, throughput, span or RTTs changed)."""

    server: ServerSpan


@dataclass(frozen=True)
class RttChanged:
    """A re-measured round trip from ``src`` to ``dst``; ``None`` stands for the client."""

    src: str | None
    dst: str | None
    rtt: float

    def __post_init__(self) -> None:
        if self.src is None and self.dst is None:
            raise ValueError("RttChanged needs at least one server end")
        _check_rtt(self.rtt, f"rtt {self.src}->{self.dst}")


Change = ServerRemoved | ServerAdded | ServerUpdated | RttChanged


class NoRouteError(Exception):
    """No chain of live servers covers the requested blocks.

    ``gap`` is the first uncovered half-open interval ``(a, b)``; the message reads
    ``"blocks a..b are not served by anyone"``.
    """

    def __init__(self, gap: tuple[int, int]) -> None:
        self.gap = gap
        super().__init__(f"blocks {gap[0]}..{gap[1]} are not served by anyone")


def first_gap(servers: Iterable[ServerSpan], start: int, end: int) -> tuple[int, int] | None:
    """The first half-open interval in [start, end) that no server covers, or None."""
    spans = sorted((max(s.start, start), min(s.end, end)) for s in servers)
    covered = start
    for lo, hi in spans:
        if lo > covered:
            return (covered, lo)
        covered = max(covered, hi)
        if covered >= end:
            return None
    return (covered, end) if covered < end else None
