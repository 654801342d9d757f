"""D* Lite (Koenig & Likhachev, 2002) over the span graph, searching backward from the client.

``g(v)`` is the cost from v to the client holding the output, ``rhs(v)`` its one-step
lookahead. The search runs from the goal toward whichever source the caller asks about, so
after edges change only the vertices whose ``rhs`` moved are re-queued and the plan is
repaired from the caller's current position (block, previous peer), not searched afresh.

The heuristic is zero, so a key is just ``min(g, rhs)`` and the moving start needs no
``k_m`` correction: any vertex may be asked about at any time. A search stops once every
queued key is above the source's cost (times ``1 + tie_tolerance`` in throughput mode), so
every vertex a route may pass through holds its true cost.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import defaultdict
from collections.abc import Iterable

from routing.cost import CostModel, check_mode
from routing.graph import GOAL, SpanGraph, Vertex
from routing.types import (
    Change,
    Hop,
    NoRouteError,
    Route,
    RttChanged,
    ServerAdded,
    ServerRemoved,
    ServerSpan,
    ServerUpdated,
    first_gap,
)

INF = float("inf")
MAX_SOURCES = 256  # positions route_from remembers; older ones are rebuilt when asked again
RESET_FRACTION = 0.3  # when more of the vertices than this change at once, search afresh


class RoutePlanner:
    """Plans a route over blocks [start, end) and repairs it as the swarm changes.

    ``mode="latency"`` picks the cheapest route, ties going to the longer hop and then the
    smaller peer id. ``mode="throughput"`` rates compute by ``forward_throughput`` and
    draws uniformly, with ``rng``, among the next steps that keep the route within
    ``1 + tie_tolerance`` of the cheapest, so clients spread over equal servers.
    """

    def __init__(
        self,
        servers: Iterable[ServerSpan],
        cost_model: CostModel,
        *,
        start: int = 0,
        end: int,
        mode: str = "latency",
        rng: random.Random | None = None,
        tie_tolerance: float = 1e-9,
    ) -> None:
        if not (0 <= start <= end):
            raise ValueError(f"bad block interval {start}..{end}")
        self.mode = check_mode(mode)
        self.start, self.end = start, end
        self.rng = rng if rng is not None else random.Random()
        self.tie_tolerance = tie_tolerance if mode == "throughput" else 0.0
        self.expansions = 0
        self._records: dict[str, ServerSpan] = {}  # every known server, banned or not
        self._recent_sources: dict[Vertex, None] = {}  # S vertices asked about, oldest first
        self._banned: set[str] = set()
        servers = list(servers)
        for s in servers:
            self._records[s.peer_id] = s
        self.graph = SpanGraph(servers, cost_model, start=start, end=end, mode=mode)
        self.succ: dict[Vertex, dict[Vertex, float]] = {}
        self.pred: defaultdict[Vertex, set[Vertex]] = defaultdict(set)
        self.g: dict[Vertex, float] = {}
        self.rhs: dict[Vertex, float] = {GOAL: 0.0}
        self._open: dict[Vertex, float] = {}
        self._heap: list[tuple[float, int, Vertex]] = []
        self._tie = itertools.count()
        self._reset()

    def _reset(self) -> None:
        """Forget every cost and build all edges afresh: the start of a new search."""
        self.succ.clear()
        self.pred.clear()
        self.g.clear()
        self.rhs.clear()
        self.rhs[GOAL] = 0.0
        self._open.clear()
        self._heap.clear()
        pred, out_edges = self.pred, self.graph.out_edges
        for u in self.graph.all_vertices():
            out = out_edges(u)
            if out:
                self.succ[u] = out
                for v in out:
                    pred[v].add(u)
        self._queue(GOAL)

    # ----- public API
    def plan(self) -> Route:
        """Best route over the whole request, from the client."""
        return self.route_from(self.start, None)

    def route_from(self, block: int, prev_peer: str | None = None) -> Route:
        """Best route over [block, end) for activations sitting at ``prev_peer``.

        The first hop is always a new hop (it may be ``prev_peer`` itself, reached at no
        network cost). Raises NoRouteError naming the first uncovered blocks.
        """
        if not (self.start <= block <= self.end):
            raise ValueError(f"block {block} is outside {self.start}..{self.end}")
        source = ("S", block, prev_peer)
        if block not in self.graph.sources.get(prev_peer, ()):
            self.graph.add_source(block, prev_peer)
            self._rebuild(source)
        self._recent_sources.pop(source, None)
        self._recent_sources[source] = None
        if len(self._recent_sources) > MAX_SOURCES:
            self._forget(next(iter(self._recent_sources)))
        while True:
            self._settle(source)
            if min(self.g.get(source, INF), self.rhs.get(source, INF)) == INF:
                gap = first_gap(self.graph.spans.values(), block, self.end)
                raise NoRouteError(gap or (block, self.end))
            route, relaxed = self._extract(source)
            if not relaxed:
                return route
            for v in relaxed:  # the route used a hub edge that undercharges: tighten, repair
                self.graph.tighten(v)
                self._rebuild(v)

    def update(self, changes: Iterable[Change]) -> None:
        """Apply swarm changes; only the vertices whose edges moved are re-queued."""
        graph_changes: list[Change] = []
        for ch in changes:
            if isinstance(ch, ServerRemoved):
                self._records.pop(ch.peer_id, None)
                graph_changes.append(ch)
            elif isinstance(ch, (ServerAdded, ServerUpdated)):
                self._records[ch.server.peer_id] = ch.server
                if ch.server.peer_id not in self._banned:
                    graph_changes.append(ch)
            elif isinstance(ch, RttChanged):
                graph_changes.append(ch)
            else:
                raise TypeError(f"unknown change {ch!r}")
        self._apply(graph_changes)

    def set_banned(self, peers: Iterable[str]) -> None:
        """Exclude exactly these peers from planning (e.g. ``BanList.banned(now)``).

        Peers that leave the set come back with their last known record.
        """
        peers = set(peers)
        changes: list[Change] = [ServerRemoved(p) for p in peers - self._banned]
        changes += [
            ServerAdded(self._records[p]) for p in self._banned - peers if p in self._records
        ]
        self._banned = peers
        self._apply(changes)

    @property
    def servers(self) -> list[ServerSpan]:
        """Servers currently planned over (known and not banned)."""
        return list(self.graph.spans.values())

    # ----- graph maintenance
    def _apply(self, changes: list[Change]) -> None:
        dirty: set[Vertex] = set()
        for ch in changes:
            if isinstance(ch, RttChanged):
                dirty |= self.graph.set_rtt(ch.src, ch.dst, ch.rtt)
                continue
            peer = ch.peer_id if isinstance(ch, ServerRemoved) else ch.server.peer_id
            for v in self.graph.server_vertices(peer):  # whoever pointed at what may vanish
                dirty.add(v)
                dirty |= self.pred.get(v, set())
            new = None if isinstance(ch, ServerRemoved) else ch.server
            dirty |= self.graph.replace_server(peer, new)
        if len(dirty) > RESET_FRACTION * len(self.succ):
            self._reset()  # most of the graph moved: a repair would cost more than a search
            return
        for v in dirty:
            self._rebuild(v)
        for v in dirty:
            if v not in self.succ and not self.pred.get(v) and v[0] != "S" and v != GOAL:
                for table in (self.g, self.rhs, self._open, self.succ, self.pred):
                    table.pop(v, None)

    def _forget(self, source: Vertex) -> None:
        """Drop a source nobody asked about for long; it has no predecessors."""
        del self._recent_sources[source]
        self.graph.drop_source(source)
        self._set_out(source, {})
        for table in (self.g, self.rhs, self._open):
            table.pop(source, None)

    def _rebuild(self, v: Vertex) -> None:
        new = self.graph.out_edges(v)
        if new == self.succ.get(v, {}):
            return
        self._set_out(v, new)
        if v != GOAL:
            self.rhs[v] = self._lookahead(v)
        self._queue(v)

    def _set_out(self, u: Vertex, new: dict[Vertex, float]) -> None:
        old = self.succ.get(u, {})
        for v in old.keys() - new.keys():
            self.pred[v].discard(u)
        for v in new.keys() - old.keys():
            self.pred[v].add(u)
        if new:
            self.succ[u] = new
        else:
            self.succ.pop(u, None)

    # ----- D* Lite proper
    def _lookahead(self, u: Vertex) -> float:
        g = self.g
        return min((c + g.get(v, INF) for v, c in self.succ.get(u, {}).items()), default=INF)

    def _queue(self, u: Vertex) -> None:
        """UpdateVertex: (re)queue u while it is locally inconsistent."""
        g, rhs = self.g.get(u, INF), self.rhs.get(u, INF)
        if g != rhs:
            key = min(g, rhs)
            if self._open.get(u) != key:
                self._open[u] = key
                heapq.heappush(self._heap, (key, next(self._tie), u))
        else:
            self._open.pop(u, None)

    def _settle(self, source: Vertex) -> None:
        """ComputeShortestPath, run until no queued key can matter for ``source``."""
        heap, opened, g, rhs, pred, succ = (
            self._heap,
            self._open,
            self.g,
            self.rhs,
            self.pred,
            self.succ,
        )
        tie, push, pop = self._tie, heapq.heappush, heapq.heappop
        slack = 1.0 + self.tie_tolerance
        expanded = 0
        while heap:
            key, _, u = heap[0]
            if opened.get(u) != key:
                pop(heap)  # stale entry
                continue
            gs = g.get(source, INF)
            if key > gs * slack and gs == rhs.get(source, INF):
                break
            pop(heap)
            del opened[u]
            expanded += 1
            g_old, r = g.get(u, INF), rhs.get(u, INF)
            if g_old > r:  # overconsistent: settle u, offer it to its predecessors
                g[u] = r
                for p in pred.get(u, ()):
                    cand = succ[p][u] + r
                    if cand < rhs.get(p, INF):
                        rhs[p] = cand
                        gp = g.get(p, INF)  # UpdateVertex(p), inlined
                        if gp != cand:
                            k = cand if cand < gp else gp
                            if opened.get(p) != k:
                                opened[p] = k
                                push(heap, (k, next(tie), p))
                        else:
                            opened.pop(p, None)
            else:  # underconsistent: u got dearer, predecessors that used it look again
                g[u] = INF
                for p in pred.get(u, ()):
                    if rhs.get(p, INF) == succ[p][u] + g_old:
                        rhs[p] = self._lookahead(p)
                    self._queue(p)
                self._queue(u)
        self.expansions += expanded

    # ----- reading the route off the g values
    def _steps(self, u: Vertex) -> list[tuple[float, float, Vertex, bool, bool]]:
        """Ways on from u: (cost, cost + g, next A vertex or goal, new hop?, via the hub?).

        One way per next vertex, the cheapest and on a tie not through the hub, so a hub
        path never stands in for a measured link or for carrying on with the same server
        (which a server holding block b always can).
        """
        best: dict[Vertex, tuple[float, float, Vertex, bool, bool]] = {}
        g, succ = self.g, self.succ

        def offer(step: tuple[float, float, Vertex, bool, bool]) -> None:
            seen = best.get(step[2])
            if seen is None or (step[0], step[4]) < (seen[0], seen[4]):
                best[step[2]] = step

        for v, c in succ.get(u, {}).items():
            if v[0] == "H" or v[0] == "T":
                stack = [v]
                while stack:  # hub and upper tree edges cost 0, the last one enter(t)
                    for x, cx in succ.get(stack.pop(), {}).items():
                        if x[0] == "T":
                            stack.append(x)
                        else:
                            offer((c + cx, c + (cx + g.get(x, INF)), x, True, True))
            else:
                new_hop = v[0] == "A" and (u[0] == "S" or v[2] != u[2])
                offer((c, c + g.get(v, INF), v, new_hop, False))
        return list(best.values())

    def _extract(self, source: Vertex) -> tuple[Route, set[Vertex]]:
        """Follow the g values from ``source``; also returns relaxed sources it misused."""
        budget = self.g[source] * (1.0 + self.tie_tolerance)
        hops: list[list] = []  # [peer, start, end]
        relaxed: set[Vertex] = set()
        spent, u = 0.0, source
        while u != GOAL:
            steps = self._steps(u)
            best = min(steps, key=lambda s: (s[1], s[3], str(s[2][1:])))
            if self.mode == "throughput":
                fits = [s for s in steps if spent + s[1] <= budget]
                fits.sort(key=lambda s: (s[3], str(s[2][1:])))
                best = self.rng.choice(fits) if fits else best
            cost, _, v, new_hop, via_hub = best
            spent += cost
            if v != GOAL:
                if via_hub and self.graph.dear(u[2], v[2]):
                    relaxed.add(u)
                if new_hop:
                    hops.append([v[2], v[1] - 1, v[1]])
                else:
                    hops[-1][2] = v[1]
            u = v
        return Route(tuple(Hop(p, a, b) for p, a, b in hops), spent), relaxed
