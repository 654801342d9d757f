"""The one cost model of a route, shared by the D* Lite planner and the reference search.

A request of ``tokens`` tokens leaves the client, visits the hops in order and returns:

    cost = sum over links  rtt(a, b) / 2                      (each link is crossed once)
         + sum over hops   tokens * bytes_per_token / bandwidth(hop server)   (receive input)
                           + load_penalty * load(hop server)
                           + blocks(hop) * tokens / rate(hop server)
         + tokens * bytes_per_token / bandwidth(last server)   (send the output back)

``rate`` is ``throughput`` in "latency" mode and ``forward_throughput`` (falling back to
``throughput``) in "throughput" mode. A link's RTT is what ``src`` measured to ``dst``, else
what ``dst`` measured to ``src``, else ``default_rtt``; a server reaches itself for free.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from routing.types import Route, ServerSpan

MODES = ("latency", "throughput")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


@dataclass
class CostModel:
    """Knobs of the cost model; every figure is in seconds, bytes or tokens."""

    client_rtts: Mapping[str, float] = field(default_factory=dict)  # measured by the client
    default_rtt: float = 0.1  # assumed for a link nobody measured
    tokens: int = 1  # tokens per request: 1 for a decoding step, batch*length for training
    bytes_per_token: int = 4096 * 4  # hidden size * bytes per element, after compression
    load_penalty: float = 1.0  # seconds charged per hop for a fully loaded server

    def __post_init__(self) -> None:
        if not (math.isfinite(self.default_rtt) and self.default_rtt >= 0):
            raise ValueError(f"default_rtt must be >= 0, got {self.default_rtt!r}")
        if self.tokens < 1 or self.bytes_per_token < 0 or self.load_penalty < 0:
            raise ValueError("tokens must be >= 1, bytes_per_token and load_penalty >= 0")

    def block_time(self, server: ServerSpan, mode: str) -> float:
        """Seconds one block of this server takes for one request."""
        rate = server.throughput
        if mode == "throughput" and server.forward_throughput is not None:
            rate = server.forward_throughput
        return self.tokens / rate

    def transfer_time(self, server: ServerSpan) -> float:
        """Seconds to move one request's activations through this server's link."""
        return self.tokens * self.bytes_per_token / server.bandwidth

    def hop_overhead(self, server: ServerSpan) -> float:
        """Per-hop cost apart from links and compute: receiving the input, and load."""
        return self.transfer_time(server) + self.load_penalty * server.load


class RttTable:
    """Measured round trips keyed by (src, dst), ``None`` being the client.

    The planner mutates it as records and measurements arrive; lookups fall back to the
    reverse direction and then to the default, so a link measured by either end is known.
    """

    def __init__(self, default_rtt: float) -> None:
        self.default = default_rtt
        self.out: dict[str | None, dict[str | None, float]] = {}  # src -> dst -> rtt
        self.near: dict[str | None, set[str | None]] = {}  # peers measured either way

    @classmethod
    def build(cls, servers: Iterable[ServerSpan], cost_model: CostModel) -> RttTable:
        table = cls(cost_model.default_rtt)
        for peer, rtt in cost_model.client_rtts.items():
            table.set(None, peer, rtt)
        for s in servers:
            table.set_record(s)
        return table

    def set(self, src: str | None, dst: str | None, rtt: float) -> None:
        self.out.setdefault(src, {})[dst] = rtt
        self.near.setdefault(src, set()).add(dst)
        self.near.setdefault(dst, set()).add(src)

    def drop_source(self, src: str | None) -> set[str | None]:
        """Forget everything ``src`` measured; returns the peers it had measured."""
        gone = self.out.pop(src, {})
        for dst in gone:
            if src not in self.out.get(dst, ()):
                self.near[src].discard(dst)
                self.near[dst].discard(src)
        return set(gone)

    def set_record(self, server: ServerSpan) -> set[str | None]:
        """Replace what ``server`` measured by its record; returns old and new partners."""
        touched = self.drop_source(server.peer_id)
        for dst, rtt in server.next_rtts.items():
            self.set(server.peer_id, dst, rtt)
            touched.add(dst)
        return touched

    def rtt(self, src: str | None, dst: str | None) -> float:
        if src == dst and src is not None:
            return 0.0
        row = self.out.get(src)
        if row is not None and dst in row:
            return row[dst]
        row = self.out.get(dst)
        if row is not None and src in row:
            return row[src]
        return self.default

    def partners(self, peer: str | None) -> set[str | None]:
        """Peers whose link with ``peer`` was measured in either direction (do not mutate)."""
        return self.near.get(peer, _EMPTY)


_EMPTY: set = set()


def route_cost(
    route: Route,
    servers: Iterable[ServerSpan],
    cost_model: CostModel,
    *,
    mode: str = "latency",
    prev_peer: str | None = None,
    rtt_overrides: Mapping[tuple[str | None, str | None], float] | None = None,
) -> float:
    """Cost of the given hops under the model, computed literally (for checks and simnet)."""
    spans = {s.peer_id: s for s in servers}
    rtts = RttTable.build(spans.values(), cost_model)
    for (src, dst), rtt in (rtt_overrides or {}).items():
        rtts.set(src, dst, rtt)
    total, prev = 0.0, prev_peer
    for hop in route.hops:
        s = spans[hop.peer_id]
        if not (s.start <= hop.start < hop.end <= s.end):
            raise ValueError(f"{hop} is outside what {s.peer_id} serves ({s.start}..{s.end})")
        total += rtts.rtt(prev, s.peer_id) / 2 + cost_model.hop_overhead(s)
        total += (hop.end - hop.start) * cost_model.block_time(s, mode)
        prev = s.peer_id
    if prev is not None:
        total += rtts.rtt(prev, None) / 2
        if prev in spans:
            total += cost_model.transfer_time(spans[prev])
    return total
