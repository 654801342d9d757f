"""Where a server should sit: the greedy placement rule and the settling it leads to.

Placement rule (joining, `choose_blocks`): try every start; adding the server's throughput to
the window gives a new per-block vector; keep the start whose vector is best in *leximin*
order (compare the sorted vectors: the larger smallest value wins, ties go to the next
smallest, and so on). The first criterion is exactly "raise the bottleneck most"; the later ones
say "among those, lift the next-worst blocks", which covers gaps first (a gap is the worst
possible block) and makes progress even when the bottleneck is shared by blocks that no single
server can cover together. Exact ties go to the lowest start (to the current one for a server
that already sits somewhere). Values are compared on an integer grid (see grid.py), so float
noise never counts as progress and every peer decides the same from the same records.

`settle` lets servers take turns at strictly improving greedy moves: the placement a swarm can
reach one move at a time. `canonical_plan` places the same servers from scratch, strongest
first (by throughput, by throughput x size, by size: the best of the three), then settles:
greedy joins in random order leave small swarms in local optima (weak servers spread over the
model before strong ones arrive), and strongest-first joins chain the strong servers end to
end, which is how optimal placements look. The plan depends only on the set of servers (not
on where they sit now), so every server computes the same plan.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from balancing.grid import Grid, best_start, totals, window_masks
from balancing.swarm import Placement, SwarmEntry, ordered, usable_throughput


def choose_blocks(
    num_blocks: int, swarm: Iterable[Placement], my_num_blocks: int, my_throughput: float
) -> tuple[int, int]:
    """The interval [start, end) of `my_num_blocks` blocks that helps `swarm` most."""
    size = checked_size(num_blocks, my_num_blocks)
    entries = entries_of(num_blocks, swarm)
    value = max(0.0, float(my_throughput))
    grid = Grid([e.throughput for e in entries] + [value])
    start = best_start(totals(num_blocks, entries, grid), size, grid.units(value))
    return start, start + size


def settle(
    num_blocks: int,
    swarm: Iterable[Placement],
    max_rounds: int,
    movable: Iterable[str] | None = None,
) -> list[SwarmEntry]:
    """Let servers, one at a time in peer_id order, make strictly improving greedy moves.

    Stops after a round without moves or after `max_rounds`. No gain threshold: this is the
    placement a swarm can reach by greedy steps. `movable` (peer ids) limits the moves to
    those servers; the others stay where they are (None: everyone may move).
    """
    allowed = None if movable is None else frozenset(str(p) for p in movable)
    return list(_settle(num_blocks, _entries_tuple(num_blocks, swarm), max_rounds, allowed))


class ClaimCheck:
    """When a start-up claim holds: `join_place` gave the same answer twice in a row (the first
    check may run before the claims of servers started with us are visible, the second sees
    them; they may still be moving). The daemon and simnet both settle with it."""

    CONFIRMATIONS = 2

    def __init__(self, claim: tuple[int, int]) -> None:
        self.claim = claim
        self._held = 0

    def update(self, placed: tuple[int, int]) -> bool:
        """Take `join_place`'s answer as the claim; True once the claim holds."""
        if placed != self.claim:
            self.claim, self._held = placed, 0
            return False
        self._held += 1
        return self._held >= self.CONFIRMATIONS


def join_place(
    num_blocks: int,
    swarm: Iterable[Placement],
    me: Placement,
    joining: Iterable[str],
    max_rounds: int = 8,
) -> tuple[int, int]:
    """Where `me`, a server that has not loaded its blocks yet, should settle.

    Servers started together each choose from a listing that does not show the others yet,
    and pick the same blocks. Once their claims (JOINING records) are visible, each of them
    settles by greedy moves in peer_id order (choose_blocks' rule; moving costs nothing before
    loading, so any strict improvement counts) and takes its own place in the result. Only
    `me` and the servers of `joining` (peer ids) with a smaller peer id than mine move in
    that settling: a joiner with a larger one settles after seeing my claim, and one that
    already loads (its record says JOINING too) never moves again, so a server that joins
    late with a small peer id just best-responds to the claims it sees. Peers with the same
    listing reach the same placement: of two servers on the same blocks, the one with the
    smaller peer id moves first and the other sees its new place.
    """
    mine = own_entry(num_blocks, me)
    others = [e for e in entries_of(num_blocks, swarm) if e.peer_id != mine.peer_id]
    movable = {p for p in (str(p) for p in joining) if p < mine.peer_id} | {mine.peer_id}
    for entry in settle(num_blocks, [*others, mine], max_rounds, movable):
        if entry.peer_id == mine.peer_id:
            return entry.start, entry.end
    raise AssertionError("settling lost a server")


@lru_cache(maxsize=64)
def _settle(
    num_blocks: int,
    swarm: tuple[SwarmEntry, ...],
    max_rounds: int,
    movable: frozenset[str] | None = None,
) -> tuple[SwarmEntry, ...]:
    """Cached: every server of one swarm state asks for the same settling."""
    entries = list(swarm)
    grid = Grid([e.throughput for e in entries])
    running = totals(num_blocks, entries, grid)
    for _ in range(max_rounds):
        moved_any = False
        for index, entry in enumerate(entries):
            if movable is not None and entry.peer_id not in movable:
                continue
            step = grid.units(entry.throughput)
            masks = window_masks(num_blocks, entry.num_blocks)
            base = running - step * masks[entry.start]
            best = best_start(base, entry.num_blocks, step, current=entry.start)
            if best != entry.start:
                entries[index] = entry.moved_to(best)
                running = base + step * masks[best]
                moved_any = True
        if not moved_any:
            break
    return tuple(entries)


def canonical_plan(
    num_blocks: int, swarm: Iterable[Placement], max_rounds: int
) -> list[SwarmEntry]:
    """Every server re-placed from scratch in a few fixed orders, settled; the best one."""
    entries = _entries_tuple(num_blocks, swarm)
    return list(_canonical_plan(num_blocks, entries, max_rounds))


# Join orders tried by the canonical plan, strongest first in three senses.
_PLAN_ORDERS = (
    lambda e: (-e.throughput, -e.num_blocks, e.peer_id),
    lambda e: (-e.throughput * e.num_blocks, e.peer_id),
    lambda e: (-e.num_blocks, -e.throughput, e.peer_id),
)


@lru_cache(maxsize=64)
def _canonical_plan(
    num_blocks: int, swarm: tuple[SwarmEntry, ...], max_rounds: int
) -> tuple[SwarmEntry, ...]:
    grid = Grid([e.throughput for e in swarm])
    best, best_value = swarm, -1
    for order in _PLAN_ORDERS:
        running = totals(num_blocks, [], grid)
        placed = []
        for entry in sorted(swarm, key=order):
            step = grid.units(entry.throughput)
            start = best_start(running, entry.num_blocks, step)
            running = running + step * window_masks(num_blocks, entry.num_blocks)[start]
            placed.append(entry.moved_to(start))
        plan = _settle(num_blocks, tuple(ordered(placed)), max_rounds)
        value = int(totals(num_blocks, plan, grid).min())
        if value > best_value:
            best, best_value = plan, value
    return best


def _entries_tuple(num_blocks: int, swarm: Iterable[Placement]) -> tuple[SwarmEntry, ...]:
    return tuple(ordered(entries_of(num_blocks, swarm)))


def checked_size(num_blocks: int, size: int) -> int:
    if num_blocks <= 0:
        raise ValueError(f"num_blocks must be positive, got {num_blocks}")
    if size <= 0:
        raise ValueError(f"a server must hold at least one block, got {size}")
    return min(size, num_blocks)


def own_entry(num_blocks: int, span: Placement) -> SwarmEntry:
    """The deciding server's record inside [0, num_blocks), keeping its size where it fits."""
    size = checked_size(num_blocks, int(span.end) - int(span.start))
    start = min(max(0, int(span.start)), num_blocks - size)
    return SwarmEntry(str(span.peer_id), start, start + size, usable_throughput(span))


def entries_of(num_blocks: int, swarm: Iterable[Placement]) -> list[SwarmEntry]:
    """Other servers' records, cut to the blocks [0, num_blocks) they really cover."""
    entries = []
    for span in swarm:
        start, end = max(0, int(span.start)), min(num_blocks, int(span.end))
        if end > start:
            entries.append(SwarmEntry(str(span.peer_id), start, end, usable_throughput(span)))
    return entries
