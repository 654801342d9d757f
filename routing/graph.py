"""The span graph the planner searches, kept small and rebuilt one vertex at a time.

Vertices (tuples, so they hash fast and print plainly):

- ``("A", b, s)``: server ``s`` has computed blocks up to boundary ``b`` and may go on.
- ``("E", b, s)``: a new hop enters server ``s`` at boundary ``b``.
- ``("S", b, p)``: a source: the activations for boundary ``b`` sit at peer ``p`` (``None`` =
  the client) and the next hop is a new one. Made on demand for ``route_from``.
- ``("H", b)`` and ``("T", b, level, i)``: the hub of boundary ``b`` and the nodes of its
  slot tree (``routing.hub``) over the servers entering there, for links nobody measured.
- ``GOAL``: the client, holding the output of the last block.

Edges and their costs (``half(p, t)`` is half the RTT of link p->t, see ``routing.cost``):

- ``A(b, s) -> A(b+1, s)``: block_time(s), while s holds block b: a hop may be any
  sub-interval of a server's span, so a hop of k blocks is one entry and k-1 continuations.
- ``E(b, s) -> A(b+1, s)``: hop_overhead(s) + block_time(s).
- switching out of ``A(b, p)`` or ``S(b, p)`` into ``E(b, t)`` for every t holding block b:
  half(p, t). Measured links get a direct edge; all the others cost the same default,
  so they share one edge ``-> H(b)`` (hub and tree edges cost 0). That keeps the edge
  count linear in servers instead of quadratic. The hub is exact only if the source has no
  measured link dearer than the default into this boundary; a source that has some
  ("exclusive") links instead to the tree nodes holding none of those servers and directly
  to the remaining servers (``SlotTree.avoiding``).
- ``A(end, s) -> GOAL`` and ``S(end, p) -> GOAL``: half(s, client) + transfer_time(s).

Why it is exact: a route's cost is a sum of per-link, per-hop and per-block terms, so a
path through A/E vertices costs what its route costs, and every route is such a path. A
hub path reaching a server whose link was measured cheaper than the default is never
better than the direct edge; a self re-entry ``A(b, s) -> E(b, s)`` costs at least the
continuation. The reference search in ``routing.reference`` checks all this in tests.
"""

from __future__ import annotations

from collections.abc import Iterable

from routing.cost import CostModel, RttTable
from routing.hub import LEVELS, SlotTree
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
        """Boundaries where a hop may enter ``span`` (its E vertices) within the request."""
        if span is None:
            return range(0)
        return range(max(span.start, self.start), min(span.end, self.end))

    def server_vertices(self, peer: str) -> list[Vertex]:
        """A and E vertices of a server, as it stands now."""
        r = self.reach(self.spans.get(peer))
        return [("E", b, peer) for b in r] + [("A", b + 1, peer) for b in r]

    def sources_of(self, peer: str | None, boundaries: Iterable[int] | None = None) -> set:
        """Vertices whose switch edges start at ``peer`` (A for servers, S for anyone)."""
        out: set[Vertex] = set()
        r = self.reach(self.spans.get(peer)) if peer is not None else range(0)
        a_range = range(r.start + 1, r.stop + 1)
        s_set = self.sources.get(peer, _NONE)
        wanted = a_range if boundaries is None else boundaries
        for b in wanted:
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

    # ----- changes: each returns the vertices whose out-edges may now differ
    def replace_server(self, peer: str, new: ServerSpan | None) -> set[Vertex]:
        """Add, update (``new``) or remove (``None``) a server.

        A record replaces what the server measured only when its ``next_rtts`` differ from
        the previous record's, so a fresher ``RttChanged`` survives a load-only update.
        """
        old = self.spans.get(peer)
        if old is None and new is None:
            return set()
        dirty = set(self.server_vertices(peer)) | self.sources_of(peer)
        new_rtts = old is None or new is None or old.next_rtts != new.next_rtts
        old_reach, new_reach = set(self.reach(old)), set(self.reach(new))
        if not new_rtts and old_reach == new_reach:
            self.spans[peer] = new  # only per-server figures moved: its own edges change
            return dirty
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
            dirty |= self._touched(b, self.trees[b].leave(peer), peer)
        for b in new_reach - old_reach:
            dirty |= self._touched(b, self.trees[b].join(peer), peer)
        dirty |= set(self.server_vertices(peer)) | self.sources_of(peer)
        near = old_reach | new_reach
        for p in partners:
            dirty |= self.sources_of(p, near)
        return dirty

    def set_rtt(self, src: str | None, dst: str | None, rtt: float) -> set[Vertex]:
        self.rtts.set(src, dst, rtt)
        return self.sources_of(src) | self.sources_of(dst)

    def _touched(self, b: int, nodes: list[tuple[int, int]], peer: str) -> set[Vertex]:
        """Membership of boundary b changed: its hub, tree path and exclusive sources."""
        dirty = {("H", b), ("E", b, peer)} | self.exclusive[b]
        dirty.update(("T", b, level, i) for level, i in nodes)
        return dirty

    # ----- out-edges of one vertex, from the current state
    def out_edges(self, v: Vertex) -> dict[Vertex, float]:
        kind = v[0]
        if kind == "A" or kind == "S":
            return self._source_edges(v)
        if kind == "E":
            _, b, peer = v
            s = self.spans.get(peer)
            if s is None or peer not in self.trees.get(b, _NONE):
                return {}
            return {("A", b + 1, peer): self.cm.hop_overhead(s) + self.cm.block_time(s, self.mode)}
        if kind == "T":
            _, b, level, i = v
            kids = self.trees[b].children(level, i)
            if level == 1:
                return {("E", b, t): 0.0 for t in kids}
            return {("T", b, level - 1, c): 0.0 for c in kids}
        if kind == "H":
            tree = self.trees[v[1]]
            return {("T", v[1], LEVELS, i): 0.0 for i in tree.tops()}
        return {}

    def _source_edges(self, v: Vertex) -> dict[Vertex, float]:
        kind, b, peer = v
        if b < self.end:
            self.exclusive[b].discard(v)
        out: dict[Vertex, float] = {}
        span = self.spans.get(peer) if peer is not None else None
        if kind == "A":
            if span is None or not (max(span.start, self.start) < b <= min(span.end, self.end)):
                return out
            if b < min(span.end, self.end):
                out[("A", b + 1, peer)] = self.cm.block_time(span, self.mode)
        elif b not in self.sources.get(peer, _NONE):
            return out
        if b == self.end:
            back = self.rtts.rtt(peer, None) / 2 if peer is not None else 0.0
            out[GOAL] = back + (self.cm.transfer_time(span) if span is not None else 0.0)
            return out
        self._switch_edges(v, b, peer, out)
        return out

    def _switch_edges(self, v: Vertex, b: int, peer: str | None, out: dict) -> None:
        """Edges from a source at boundary b into every server entering there."""
        tree = self.trees[b]
        rtts, inside = self.rtts, tree.slot_of
        hub = rtts.default / 2
        excluded = []
        for t in rtts.partners(peer):
            if t in inside:
                cost = rtts.rtt(peer, t) / 2
                if cost != hub:
                    out[("E", b, t)] = cost
                    if cost > hub:
                        excluded.append(t)
        if v[0] == "S" and peer in tree:
            out[("E", b, peer)] = 0.0  # a new hop on the same server: no network
        if not excluded:
            out[("H", b)] = hub
            return
        self.exclusive[b].add(v)
        nodes, peers = tree.avoiding(excluded)
        for level, i in nodes:
            out[("T", b, level, i)] = hub
        for t in peers:
            e = ("E", b, t)
            if e not in out or out[e] > hub:
                out[e] = hub
