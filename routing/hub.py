"""The servers entering at one boundary, arranged as a shallow tree for the switching hub.

Each server holds a slot; node ``(level, i)`` covers slots ``[i * F**level, (i+1) * F**level)``
with ``F = FANOUT`` (level 0 is a server itself). The root covers every top-level node.
A source that must avoid a few servers ``K`` reaches all the others through the untouched
subtrees: about ``top nodes + (F - 1) * LEVELS * |K|`` edges instead of one per server.
Freed slots are reused, so the tree stays as wide as the most servers ever held at once.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator

FANOUT = 4
LEVELS = 2  # root -> nodes of 16 slots -> nodes of 4 slots -> servers


class SlotTree:
    def __init__(self) -> None:
        self.peer_at: dict[int, str] = {}
        self.slot_of: dict[str, int] = {}
        self.count: dict[tuple[int, int], int] = {}  # (level, i) -> servers below
        self._free: list[int] = []
        self._next = 0
        self._kids: dict[tuple[int, int], list] = {}  # cache of children(), by node
        self._tops: list[int] | None = None

    def __contains__(self, peer: object) -> bool:
        return peer in self.slot_of

    def __len__(self) -> int:
        return len(self.slot_of)

    def _path(self, slot: int) -> Iterator[tuple[int, int]]:
        for level in range(1, LEVELS + 1):
            yield level, slot // FANOUT**level

    def join(self, peer: str) -> list[tuple[int, int]]:
        """Give ``peer`` a slot; returns the nodes whose children changed."""
        slot = heapq.heappop(self._free) if self._free else self._next
        self._next = max(self._next, slot + 1)
        self.peer_at[slot] = peer
        self.slot_of[peer] = slot
        path = list(self._path(slot))
        for node in path:
            self.count[node] = self.count.get(node, 0) + 1
            self._kids.pop(node, None)
        self._tops = None
        return path

    def leave(self, peer: str) -> list[tuple[int, int]]:
        slot = self.slot_of.pop(peer)
        del self.peer_at[slot]
        heapq.heappush(self._free, slot)
        path = list(self._path(slot))
        for node in path:
            self.count[node] -= 1
            self._kids.pop(node, None)
        self._tops = None
        return path

    def tops(self) -> list[int]:
        """Occupied top-level nodes, the root's children."""
        if self._tops is None:
            width, count = FANOUT**LEVELS, self.count
            top = range((self._next + width - 1) // width)
            self._tops = [i for i in top if count.get((LEVELS, i))]
        return self._tops

    def children(self, level: int, i: int) -> list:
        """Occupied child nodes of ``(level, i)``; peers when ``level == 1``."""
        kids = self._kids.get((level, i))
        if kids is None:
            lo = i * FANOUT
            if level == 1:
                kids = [self.peer_at[s] for s in range(lo, lo + FANOUT) if s in self.peer_at]
            else:
                kids = [c for c in range(lo, lo + FANOUT) if self.count.get((level - 1, c))]
            self._kids[(level, i)] = kids
        return kids

    def avoiding(self, excluded: Iterable[str]) -> tuple[list[tuple[int, int]], list[str]]:
        """Whole nodes and single peers that together hold every server not in ``excluded``."""
        excluded = set(excluded)
        tainted = set()
        for t in excluded:
            slot = self.slot_of[t]
            for level in range(1, LEVELS + 1):
                tainted.add((level, slot // FANOUT**level))
        nodes: list[tuple[int, int]] = []
        peers: list[str] = []
        stack = [(LEVELS, i) for i in self.tops()]
        while stack:
            level, i = stack.pop()
            if (level, i) not in tainted:
                nodes.append((level, i))
            elif level == 1:
                peers.extend(p for p in self.children(1, i) if p not in excluded)
            else:
                stack.extend((level - 1, c) for c in self.children(level, i))
        return nodes, peers
