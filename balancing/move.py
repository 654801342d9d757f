"""When a server that already holds blocks should move to others.

Moving costs a restart (reloading weights, warming up), so a server moves only when the swarm
gains more than `min_gain` (relative swarm throughput), in one of two ways, checked in order:

1. Re-plan. The canonical plan (every server placed from scratch, strongest first, then
   settled; see choose.py) beats the current swarm by more than `min_gain`, and beats what
   the greedy path from here (below) reaches by more than `replan_gain` (default 10%; a
   re-plan moves many servers, and under churn the plan shifts with every join): then the
   server moves to its own place in the plan. The plan depends only on the set of servers, so all of them head for the same
   placement, and once they are there nobody re-plans again until servers come or go. A
   re-planning move that would leave blocks unserved (the mover is their only server) waits
   unless the plan gains more than `gap_gain` (default 50%): servers whose targets form a
   cycle (each sole holder of blocks the next one should take) can only get there through
   a short gap, which the others then close at once.
2. Greedy. The server leaves in its mind and re-chooses among the others (choose.py's rule).
   The new place must be strictly better in leximin order than staying, which can never
   lower the bottleneck or open a gap (a block only this server covers would drop to 0, the
   worst value there is). It moves when that gains more than `min_gain` at once, or once the
   others have followed with their own strictly improving moves (`settle`, simulated here: a
   bottleneck shared by far-apart blocks only rises after several servers have moved).

Greedy moves raise the swarm's sorted per-block vector strictly and re-planning moves head to
one fixed placement, so servers that move one at a time cannot oscillate.
"""

from __future__ import annotations

from collections.abc import Iterable

from balancing.choose import canonical_plan, entries_of, own_entry, settle
from balancing.grid import Grid, best_start, bottleneck_gain, totals, window_masks
from balancing.swarm import Placement, SwarmEntry, ordered

# Default relative gain a move must bring (moving costs a restart: reload weights, warm up).
DEFAULT_MIN_GAIN = 0.1
# Rounds of greedy moves when simulating how a swarm settles.
DEFAULT_LOOKAHEAD_ROUNDS = 8
# Re-planning moves many servers, so the plan must beat what greedy moves reach by this much.
DEFAULT_REPLAN_GAIN = 0.1
# Rounds a server that should move lets another one (with a smaller peer id) move first before
# it moves anyway (that one may not rebalance at all).
DEFAULT_MAX_DEFERRALS = 4
# A re-planning move that leaves blocks unserved for a while (the mover was their only
# server) is made only when the plan beats the current swarm by this much.
DEFAULT_GAP_GAIN = 0.5


def should_move(
    num_blocks: int,
    swarm: Iterable[Placement],
    me: Placement,
    min_gain: float = DEFAULT_MIN_GAIN,
    lookahead_rounds: int = DEFAULT_LOOKAHEAD_ROUNDS,
    gap_gain: float = DEFAULT_GAP_GAIN,
    replan_gain: float = DEFAULT_REPLAN_GAIN,
) -> tuple[bool, tuple[int, int]]:
    """(True, new interval) when `me` should move, else (False, its current interval).

    `swarm` may or may not contain `me` (matched by peer_id); `me` keeps its interval size.
    """
    if not min_gain >= 0.0:
        raise ValueError(f"min_gain must be >= 0, got {min_gain}")
    mine = own_entry(num_blocks, me)
    others = [e for e in entries_of(num_blocks, swarm) if e.peer_id != mine.peer_id]
    everyone = tuple(ordered([*others, mine]))
    current = (mine.start, mine.end)
    grid = Grid([e.throughput for e in everyone])
    masks = window_masks(num_blocks, mine.num_blocks)
    base = totals(num_blocks, others, grid)
    step = grid.units(mine.throughput)
    now = base + step * masks[mine.start]

    best = best_start(base, mine.num_blocks, step, current=mine.start)
    greedy = best != mine.start
    if greedy and bottleneck_gain(now, base + step * masks[best], min_gain):
        return True, (best, best + mine.num_blocks)
    settled = totals(num_blocks, settle(num_blocks, everyone, lookahead_rounds), grid)
    plan = canonical_plan(num_blocks, everyone, lookahead_rounds)
    planned = totals(num_blocks, plan, grid)
    if bottleneck_gain(now, planned, min_gain) and bottleneck_gain(settled, planned, replan_gain):
        target = _planned_start(plan, mine)
        after = base + step * masks[target]
        opens_gap = now.min() > 0 and after.min() == 0
        if target != mine.start and (not opens_gap or bottleneck_gain(now, planned, gap_gain)):
            return True, (target, target + mine.num_blocks)
        return False, current
    if greedy and bottleneck_gain(now, settled, min_gain):
        return True, (best, best + mine.num_blocks)
    return False, current


def first_mover(
    num_blocks: int, swarm: Iterable[Placement], min_gain: float = DEFAULT_MIN_GAIN
) -> str | None:
    """Of the servers of `swarm` that should move now, the one that moves this round.

    Servers that see the same swarm reach the same verdicts, so several of them (two that
    picked the same blocks at the same moment, say) would move together, the same way, and
    undo it together for ever. Progress is guaranteed for moves made one at a time, so only
    the server with the smallest peer id moves; the others see its move next round. None
    when nobody should move.
    """
    everyone = list(swarm)
    movers = [e.peer_id for e in everyone if should_move(num_blocks, everyone, e, min_gain)[0]]
    return min(movers, default=None)


def waits_for(first: str | None, me: str, deferrals: int) -> bool:
    """Whether `me`, which should move, lets `first` (`first_mover`'s answer) go first this
    round: only a smaller peer id, and at most DEFAULT_MAX_DEFERRALS rounds in a row (it may
    not rebalance at all)."""
    return first is not None and first < me and deferrals < DEFAULT_MAX_DEFERRALS


def _planned_start(plan: list[SwarmEntry], mine: SwarmEntry) -> int:
    for entry in plan:
        if entry.peer_id == mine.peer_id:
            return entry.start
    raise AssertionError("the plan lost a server")
