"""From-scratch Dijkstra over the literal hop graph: the yardstick for the D* Lite planner.

It shares only the cost model with the planner, not the graph: its states are (boundary a,
peer holding the activations), and every server covering a may take any sub-interval
[a, b) of what it holds. That is the definition of a route, with no compression, so it
checks the planner's smaller graph too. It costs O(states * servers * span) per search,
fine for checks and modest swarms, not for the daemon's hot path.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Mapping

from routing.cost import CostModel, RttTable, check_mode
from routing.types import Hop, NoRouteError, Route, ServerSpan, first_gap


def dijkstra_route(
    servers: Iterable[ServerSpan],
    cost_model: CostModel,
    *,
    start: int = 0,
    end: int,
    mode: str = "latency",
    prev_peer: str | None = None,
    rtt_overrides: Mapping[tuple[str | None, str | None], float] | None = None,
) -> Route:
    """Cheapest route covering [start, end) for activations that sit at ``prev_peer``.

    ``rtt_overrides`` maps (src, dst) to re-measured RTTs on top of the records, as
    ``RttChanged`` does for the planner (``None`` = the client).
    """
    check_mode(mode)
    if not (0 <= start <= end):
        raise ValueError(f"bad block interval {start}..{end}")
    spans = {s.peer_id: s for s in servers}
    rtts = RttTable.build(spans.values(), cost_model)
    for (src, dst), rtt in (rtt_overrides or {}).items():
        rtts.set(src, dst, rtt)
    covering: dict[int, list[ServerSpan]] = {a: [] for a in range(start, end)}
    for s in sorted(spans.values(), key=lambda s: s.peer_id):
        for a in range(max(s.start, start), min(s.end, end)):
            covering[a].append(s)

    def finish(peer: str | None) -> float:
        if peer is None:
            return 0.0
        cost = rtts.rtt(peer, None) / 2
        return cost + (cost_model.transfer_time(spans[peer]) if peer in spans else 0.0)

    source = (start, prev_peer)
    best: dict[tuple[int, str | None], float] = {source: 0.0}
    parent: dict[tuple[int, str | None], tuple[int, str | None]] = {}
    tie = itertools.count()
    heap = [(0.0, next(tie), source)]
    goal_cost, goal_state = float("inf"), None
    while heap:
        dist, _, state = heapq.heappop(heap)
        if dist >= goal_cost:
            break
        if dist > best[state]:
            continue
        a, peer = state
        if a == end:
            total = dist + finish(peer)
            if total < goal_cost:
                goal_cost, goal_state = total, state
            continue
        for s in covering[a]:
            enter = dist + rtts.rtt(peer, s.peer_id) / 2 + cost_model.hop_overhead(s)
            per_block = cost_model.block_time(s, mode)
            for b in range(a + 1, min(s.end, end) + 1):
                nxt = (b, s.peer_id)
                cost = enter + (b - a) * per_block
                if cost < best.get(nxt, float("inf")):
                    best[nxt] = cost
                    parent[nxt] = state
                    heapq.heappush(heap, (cost, next(tie), nxt))
    if goal_state is None:
        raise NoRouteError(first_gap(spans.values(), start, end) or (start, end))
    hops = []
    state = goal_state
    while state != source:
        before = parent[state]
        hops.append(Hop(state[1], before[0], state[0]))
        state = before
    return Route(tuple(reversed(hops)), goal_cost)
