"""The best possible placement of a small swarm, found exactly, to grade `balancing/` against.

Problem: server i holds a contiguous interval of exactly `sizes[i]` blocks of an n-block model
and adds `throughputs[i]` to each of them; place every server so the smallest per-block sum
(the swarm throughput) is as large as possible. It is NP-hard in general (with one-block
servers it is machine covering), so this is a branch-and-bound meant for swarms of about ten
servers.

Feasibility of a target T is decided by a depth-first search that always serves the leftmost
block b still below T. Some server not yet placed must cover b in any solution that extends
the current partial one, and it may as well start at b (or at n - size when it would overhang):
shifting it right only takes coverage from blocks left of b, which already reach T. So each
branch is "which server starts at b", with servers placed at the same b taken in index order
(their order does not matter). A branch is cut when the unplaced servers cannot lift the
blocks from b on to T, either one block at a time or in total. The optimum is found by raising
T past the best placement found so far until the search proves no better one exists.

Throughputs are rounded onto an integer grid (1e-9 of the largest) so sums are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from balancing.grid import Grid


class SearchLimitReached(RuntimeError):
    """The search visited more nodes than it was allowed; the optimum is not proved."""


@dataclass(frozen=True)
class Optimum:
    """An optimal placement: the swarm throughput and each server's start block."""

    throughput: float
    starts: tuple[int, ...]
    nodes: int


def upper_bound(num_blocks: int, sizes: Sequence[int], throughputs: Sequence[float]) -> float:
    """No placement beats spreading all capacity evenly: sum(size * throughput) / blocks."""
    return sum(min(k, num_blocks) * t for k, t in zip(sizes, throughputs, strict=True)) / num_blocks


def optimal_placement(
    num_blocks: int,
    sizes: Sequence[int],
    throughputs: Sequence[float],
    max_nodes: int = 5_000_000,
    hint: Sequence[int] | None = None,
) -> Optimum:
    """The exact optimum; raises SearchLimitReached past `max_nodes` search nodes.

    `hint`, the starts of a known placement (e.g. the balancer's), saves the search the steps
    up to its value.
    """
    if len(sizes) != len(throughputs) or not sizes:
        raise ValueError("need one size per throughput and at least one server")
    sizes = [min(max(1, int(k)), num_blocks) for k in sizes]
    grid = Grid(list(throughputs))
    weights = [grid.units(max(0.0, t)) for t in throughputs]
    # Strong servers first: feasible placements are found sooner.
    order = sorted(range(len(sizes)), key=lambda i: (-weights[i], -sizes[i], i))
    search = _Search(num_blocks, [sizes[i] for i in order], [weights[i] for i in order], max_nodes)
    best_value, best_starts = -1, None
    if hint is not None:
        best_starts = [min(max(0, int(hint[i])), num_blocks - sizes[i]) for i in order]
        best_value = _value(num_blocks, search.sizes, search.weights, best_starts)
    while True:
        starts = search.feasible(best_value + 1)
        if starts is None:
            break
        best_value, best_starts = _value(num_blocks, search.sizes, search.weights, starts), starts
    assert best_starts is not None
    placement = [0] * len(sizes)
    for rank, index in enumerate(order):
        placement[index] = best_starts[rank]
    return Optimum(best_value * grid.unit, tuple(placement), search.nodes)


class _Search:
    def __init__(self, num_blocks: int, sizes: list[int], weights: list[int], max_nodes: int):
        self.num_blocks, self.sizes, self.weights = num_blocks, sizes, weights
        self.max_nodes = max_nodes
        self.nodes = 0

    def feasible(self, target: int) -> list[int] | None:
        """Starts of a placement whose every block reaches `target`, or None if none exists."""
        n = self.num_blocks
        if sum(k * w for k, w in zip(self.sizes, self.weights, strict=True)) < n * target:
            return None
        self.target = target
        self.cover = [0] * n
        self.starts = [-1] * len(self.sizes)
        if not self._extend(0, -1):
            return None
        # Servers nobody needed may sit anywhere; put them at block 0.
        return [max(0, s) for s in self.starts]

    def _extend(self, first: int, last_index: int) -> bool:
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise SearchLimitReached(f"more than {self.max_nodes} nodes")
        n, cover, target = self.num_blocks, self.cover, self.target
        block = first
        while block < n and cover[block] >= target:
            block += 1
        if block == n:
            return True
        if block != first:
            last_index = -1
        free = [i for i, s in enumerate(self.starts) if s < 0]
        spare = sum(self.weights[i] for i in free)
        ahead = cover[block:]
        if min(ahead) + spare < target:
            return False
        missing = sum(target - c for c in ahead if c < target)
        if sum(self.weights[i] * min(self.sizes[i], n - block) for i in free) < missing:
            return False
        tried: set[tuple[int, int]] = set()
        for i in free:
            size, weight = self.sizes[i], self.weights[i]
            if i <= last_index or (size, weight) in tried:
                continue
            tried.add((size, weight))
            start = min(block, n - size)
            self._place(i, start, weight)
            if self._extend(block, i):
                return True
            self._place(i, start, -weight)
            self.starts[i] = -1
        return False

    def _place(self, index: int, start: int, weight: int) -> None:
        self.starts[index] = start
        for block in range(start, start + self.sizes[index]):
            self.cover[block] += weight


def _value(num_blocks: int, sizes: list[int], weights: list[int], starts: list[int]) -> int:
    cover = [0] * num_blocks
    for size, weight, start in zip(sizes, weights, starts, strict=True):
        for block in range(start, start + size):
            cover[block] += weight
    return min(cover)
