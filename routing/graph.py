"""The span graph the planner searches, kept small and rebuilt one vertex at a time.

Vertices (tuples, so they hash fast and print plainly):

- ``("A", b, s)``: server ``s`` has computed blocks up to boundary ``b`` and may go on.
- ``("S", b, p)``: a source: the activations for boundary ``b`` sit at peer ``p`` (``None`` =
  the client) and the next hop is a new one. Made on demand for ``route_from``.
- ``("H", b)`` and ``("T", b, level, i)``: the hub of boundary ``b`` and the nodes of its
  slot tree (``routing.hub``) over the servers entering there, for links nobody measured.
- ``GOAL``: the client, holding the output of the last block.

Edges and their costs (``half(p, t)`` is half the RTT of link p->t, ``enter(t)`` is
hop_overhead(t) + block_time(t), see ``routing.cost``):

- ``A(b, s) -> A(b+1, s)``: block_time(s), while s holds block b: a hop may be any
  sub-interval of a server's span, so a hop of k blocks is one entry and k-1 continuations.
- a new hop out of ``A(b, p)`` or ``S(b, p)`` into ``A(b+1, t)``, for every t holding
  block b: half(p, t) + enter(t). Measured links get a direct edge; all the others cost
  the same default, so they share one edge ``-> H(b)`` of cost half(default); hub and
  tree edges cost 0 and a level-1 tree node leads into ``A(b+1, t)`` at enter(t). That
  keeps the edge count linear in servers instead of quadratic.
- ``A(end, s) -> GOAL`` and ``S(end, p) -> GOAL``: half(s, client) + transfer_time(s).

The hub is exact only for a source with no measured link dearer than the default into its
boundary. Such a source starts "relaxed", with the hub edge anyway: its costs are then
lower bounds. When the planner finds a route that crosses a relaxed hub edge into one of
those dearer servers it makes the source "tight": edges to the tree nodes holding none of
them and direct edges to the remaining servers (``SlotTree.avoiding``), then repairs. A
route that crosses no such edge costs what the graph says, and no route is cheaper in a
graph whose costs never exceed the true ones, so it is optimal (lazy edge evaluation).

Why paths are routes: a route's cost is a sum of per-link, per-hop and per-block terms, so
a path costs what its route costs, and every route is such a path. A hub path reaching a
server whose link was measured cheaper than the default is never better than the direct
edge; re-entering the same server costs at least the continuation. The reference search in
``routing.reference`` checks all this in tests.
"""

from __future__ import annotations

from collections.abc import Iterable

from routing.cost import CostModel, RttTable
from routing.hub import FANOUT, LEVELS, SlotTree
from routing.types import ServerSpan

Vertex = tuple
GOAL: Vertex = ("G",)
_NONE: frozenset = frozenset()


class SpanGraph:
    """The servers, links and hubs of one request, and each vertex's out-edges."""

    def __init__(
        self,
        servers: Iterable[ServerSpan],
        cost_model: CostModel,
        *,
        start: int,
        end: int,
        mode: str,
    ) -> None:
        self.cm, self.start, self.end, self.mode = cost_model, start, end, mode
        self.spans: dict[str, ServerSpan] = {}
        self.rtts = RttTable.build((), cost_model)
        self.trees: dict[int, SlotTree] = {b: SlotTree() for b in range(start, end)}
        self.tight: set[Vertex] = set()  # sources whose hub edges avoid their dear links
        self.exclusive: dict[int, set[Vertex]] = {b: set() for b in range(start, end)}
        self.sources: dict[str | None, set[int]] = {}  # peer -> boundaries of S vertices
        for s in servers:  # no vertex has edges yet, so nothing to mark dirty
            if s.peer_id in self.spans:
                self.replace_server(s.peer_id, s)
                continue
            self.spans[s.peer_id] = s
            self.rtts.set_record(s)
            for b in self.reach(s):
                self.trees[b].join(s.peer_id)

    # ----- what exists
    def reach(self, span: ServerSpan | None) -> range:
        """Boundaries where a hop may enter ``span`` within the request."""
        if span is None:
            return range(0)
        return range(max(span.start, self.start), min(span.end, self.end))

    def server_vertices(self, peer: str) -> list[Vertex]:
        """A vertices of a server, as it stands now."""
        return [("A", b + 1, peer) for b in self.reach(self.spans.get(peer))]

    def sources_of(self, peer: str | None, boundaries: Iterable[int] | None = None) -> set:
        """Vertices whose new hops start at ``peer`` (A for servers, S for anyone)."""
        out: set[Vertex] = set()
        r = self.reach(self.spans.get(peer)) if peer is not None else range(0)
        a_range = range(r.start + 1, r.stop + 1)
        s_set = self.sources.get(peer, _NONE)
        for b in a_range if boundaries is None else boundaries:
            if b in a_range:
                out.add(("A", b, peer))
        for b in s_set if boundaries is None else s_set.intersection(boundaries):
            out.add(("S", b, peer))
        return out

    def all_vertices(self) -> list[Vertex]:
        out: list[Vertex] = [GOAL]
        for b, tree in self.trees.items():
            out.append(("H", b))
            out.extend(("T", b, level, i) for level, i in tree.count)
        for peer in self.spans:
            out.extend(self.server_vertices(peer))
        for peer, bs in self.sources.items():
            out.extend(("S", b, peer) for b in bs)
        return out

    def add_source(self, block: int, peer: str | None) -> Vertex:
        self.sources.setdefault(peer, set()).add(block)
        return ("S", block, peer)

    def drop_source(self, v: Vertex) -> None:
        """Forget a source vertex; the caller drops its edges."""
        _, b, peer = v
        self.sources.get(peer, set()).discard(b)
        if not self.sources.get(peer, True):
            del self.sources[peer]
        self.tight.discard(v)
        self.exclusive.get(b, set()).discard(v)

    def dear(self, peer: str | None, t: str) -> bool:
        """Whether the link peer -> t was measured dearer than the hub charges."""
        return self.rtts.rtt(peer, t) > self.rtts.default

    def tighten(self, v: Vertex) -> None:
        """Stop ``v`` reaching its dear links through the hub (see the module docstring)."""
        self.tight.add(v)

    # ----- changes: each returns the vertices whose out-edges may now differ
    def replace_server(self, peer: str, new: ServerSpan | None) -> set[Vertex]:
        """Add, update (``new``) or remove (``None``) a server.

        A record replaces what the server measured only when its ``next_rtts`` differ from
        the previous record's, so a fresher ``RttChanged`` survives a load-only update.
        """
        old = self.spans.get(peer)
        if old is None and new is None:
            return set()
        old_reach, new_reach = set(self.reach(old)), set(self.reach(new))
        dirty = set(self.server_vertices(peer)) | self.sources_of(peer)
        for b in old_reach:  # whatever leads into the server's A vertices
            dirty.add(("T", b, 1, self.trees[b].slot_of[peer] // FANOUT))
        new_rtts = old is None or new is None or old.next_rtts != new.next_rtts
        near = old_reach | new_reach
        partners = set(self.rtts.partners(peer))
        if new is None:
            partners |= self.rtts.drop_source(peer)
            del self.spans[peer]
        else:
            if new_rtts:
                partners |= self.rtts.set_record(new)
            self.spans[peer] = new
        partners |= self.rtts.partners(peer)
        for b in old_reach - new_reach:
            dirty |= self._touched(b, self.trees[b].leave(peer))
        for b in new_reach - old_reach:
            dirty |= self._touched(b, self.trees[b].join(peer))
        dirty |= set(self.server_vertices(peer)) | self.sources_of(peer)
        for p in partners:  # direct edges into the server, and their tightness
            dirty |= self.sources_of(p, near)
        for b in near:  # tight sources: direct edges into the server, or the tree they avoid
            dirty |= self.exclusive[b]
        return dirty

    def set_rtt(self, src: str | None, dst: str | None, rtt: float) -> set[Vertex]:
        self.rtts.set(src, dst, rtt)
        return self.sources_of(src) | self.sources_of(dst)

    def _touched(self, b: int, nodes: list[tuple[int, int]]) -> set[Vertex]:
        """Membership of boundary b changed: its hub and the tree path of the slot."""
        dirty = {("H", b)}
        dirty.update(("T", b, level, i) for level, i in nodes)
        return dirty

    # ----- out-edges of one vertex, from the current state
    def enter(self, peer: str) -> float:
        s = self.spans[peer]
        return self.cm.hop_overhead(s) + self.cm.block_time(s, self.mode)

    def out_edges(self, v: Vertex) -> dict[Vertex, float]:
        kind = v[0]
        if kind == "A" or kind == "S":
            return self._source_edges(v)
        if kind == "T":
            _, b, level, i = v
            kids = self.trees[b].children(level, i)
            if level == 1:
                return {("A", b + 1, t): self.enter(t) for t in kids}
            return {("T", b, level - 1, c): 0.0 for c in kids}
        if kind == "H":
            return {("T", v[1], LEVELS, i): 0.0 for i in self.trees[v[1]].tops()}
        return {}

    def _source_edges(self, v: Vertex) -> dict[Vertex, float]:
        kind, b, peer = v
        if b < self.end:
            self.exclusive[b].discard(v)
        out: dict[Vertex, float] = {}
        span = self.spans.get(peer) if peer is not None else None
        if kind == "A":
            if span is None or not (max(span.start, self.start) < b <= min(span.end, self.end)):
                self.tight.discard(v)
                return out
            if b < min(span.end, self.end):
                out[("A", b + 1, peer)] = self.cm.block_time(span, self.mode)
        elif b not in self.sources.get(peer, _NONE):
            return out
        if b == self.end:
            back = self.rtts.rtt(peer, None) / 2 if peer is not None else 0.0
            out[GOAL] = back + (self.cm.transfer_time(span) if span is not None else 0.0)
            return out
        self._hop_edges(v, b, peer, out)
        return out

    def _hop_edges(self, v: Vertex, b: int, peer: str | None, out: dict) -> None:
        """Edges from a source at boundary b into every server that holds block b."""
        tree = self.trees[b]
        rtts, inside = self.rtts, tree.slot_of
        hub = rtts.default / 2
        dear = []
        for t in rtts.partners(peer):
            if t in inside and t != peer:
                cost = rtts.rtt(peer, t) / 2
                if cost != hub:
                    out[("A", b + 1, t)] = cost + self.enter(t)
                    if cost > hub:
                        dear.append(t)
        if v[0] == "S" and peer in inside:
            out[("A", b + 1, peer)] = self.enter(peer)  # a new hop on the same server
        if not dear or v not in self.tight:
            out[("H", b)] = hub
            return
        self.exclusive[b].add(v)
        nodes, peers = tree.avoiding(dear)
        for level, i in nodes:
            out[("T", b, level, i)] = hub
        for t in peers:
            a = ("A", b + 1, t)
            if a not in out:  # keeps the continuation and cheaper measured links
                out[a] = hub + self.enter(t)
