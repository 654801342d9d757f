"""balancing/: swarm throughput, where a joining server sits, when a server moves."""

from __future__ import annotations

import random
from collections import namedtuple

import pytest

from balancing import (
    SwarmEntry,
    block_throughputs,
    canonical_plan,
    choose_blocks,
    join_place,
    settle,
    should_move,
    swarm_throughput,
)

E = SwarmEntry


def test_bottleneck_is_the_worst_block_and_a_gap_is_zero() -> None:
    swarm = [E("a", 0, 6, 2.0), E("b", 4, 10, 3.0)]
    assert block_throughputs(10, swarm) == [2, 2, 2, 2, 5, 5, 3, 3, 3, 3]
    assert swarm_throughput(10, swarm) == 2.0
    assert swarm_throughput(12, swarm) == 0.0  # blocks 10 and 11 are not served


def test_sums_are_bit_identical_in_any_record_order() -> None:
    rng = random.Random(3)
    swarm = [E(f"p{i}", s, s + 7, rng.uniform(0.1, 10)) for i, s in enumerate(range(0, 30, 2))]
    reference = block_throughputs(40, swarm)
    for _ in range(20):
        rng.shuffle(swarm)
        assert block_throughputs(40, swarm) == reference


def test_bad_records_add_nothing_and_bad_arguments_are_refused() -> None:
    swarm = [E("a", 0, 4, float("nan")), E("b", 0, 4, -1.0), E("c", 0, 4, 1.0)]
    assert block_throughputs(4, swarm) == [1.0] * 4
    with pytest.raises(ValueError, match="num_blocks"):
        block_throughputs(0, swarm)
    with pytest.raises(ValueError, match="at least one block"):
        choose_blocks(4, swarm, 0, 1.0)


def test_records_of_other_shapes_are_accepted() -> None:
    """The daemon passes its own records (e.g. routing.ServerSpan): duck-typed fields."""
    Record = namedtuple("Record", "peer_id start end throughput bandwidth")
    swarm = [Record("a", 0, 5, 1.0, 1e8), Record("b", 5, 10, 2.0, 1e8)]
    assert swarm_throughput(10, swarm) == 1.0
    assert choose_blocks(10, swarm, 5, 1.0) == (0, 5)


def test_routing_records_work_unchanged() -> None:
    from routing import ServerSpan

    swarm = [ServerSpan("a", 0, 40, 2.0, load=0.5), ServerSpan("b", 0, 40, 3.0)]
    assert swarm_throughput(80, swarm) == 0.0
    assert choose_blocks(80, swarm, 40, 1.0) == (40, 80)
    assert should_move(80, swarm, swarm[0]) == (True, (40, 80))


def test_first_server_starts_at_block_zero() -> None:
    assert choose_blocks(80, [], 30, 5.0) == (0, 30)
    assert choose_blocks(20, [], 30, 5.0) == (0, 20)  # more memory than blocks


def test_gaps_get_filled_first() -> None:
    # Blocks 40..79 are served by nobody; a strong swarm on 0..40 does not distract.
    swarm = [E("a", 0, 40, 100.0), E("b", 0, 40, 100.0)]
    assert choose_blocks(80, swarm, 40, 1.0) == (40, 80)
    # A hole in the middle.
    swarm = [E("a", 0, 30, 1.0), E("b", 50, 80, 1.0)]
    assert choose_blocks(80, swarm, 20, 1.0) == (30, 50)
    # A hole larger than the server: it covers as much of it as it can, from the left.
    assert choose_blocks(80, swarm, 10, 1.0) == (30, 40)


def test_the_weakest_blocks_get_the_help() -> None:
    swarm = [E("a", 0, 80, 5.0), E("b", 0, 20, 5.0), E("c", 30, 80, 5.0)]
    # Blocks 20..29 have 5, everything else 10.
    assert choose_blocks(80, swarm, 10, 1.0) == (20, 30)
    start, end = choose_blocks(80, swarm, 16, 1.0)
    assert start <= 20 and end >= 30


def test_ties_are_broken_the_same_way_whatever_the_record_order() -> None:
    rng = random.Random(5)
    swarm = [E(f"p{i}", rng.randrange(0, 60), 0, 1.0) for i in range(12)]
    swarm = [E(e.peer_id, e.start, e.start + 20, rng.choice([1.0, 2.0])) for e in swarm]
    expected = choose_blocks(80, swarm, 15, 1.0)
    for _ in range(10):
        rng.shuffle(swarm)
        assert choose_blocks(80, swarm, 15, 1.0) == expected


def test_balanced_swarm_stays_put() -> None:
    swarm = [E("a", 0, 40, 1.0), E("b", 40, 80, 1.0), E("c", 0, 40, 1.0), E("d", 40, 80, 1.0)]
    for me in swarm:
        assert should_move(80, swarm, me) == (False, (me.start, me.end))


def test_a_server_moves_to_the_bottleneck_when_it_pays() -> None:
    # Blocks 40..79 have half the throughput of 0..39; c is redundant where it sits.
    swarm = [E("a", 0, 40, 1.0), E("b", 0, 80, 1.0), E("c", 0, 40, 1.0)]
    assert swarm_throughput(80, swarm) == 1.0
    assert should_move(80, swarm, swarm[2]) == (True, (40, 80))
    # Not when the threshold asks for more than doubling.
    assert should_move(80, swarm, swarm[2], min_gain=1.5) == (False, (0, 40))


def test_sole_holder_does_not_leave_a_gap() -> None:
    # Only a serves blocks 0..9; moving to 10..19 would help there but open a gap.
    swarm = [E("a", 0, 10, 1.0), E("b", 10, 20, 1.0), E("c", 10, 20, 5.0)]
    assert should_move(20, swarm, swarm[0]) == (False, (0, 10))
    # The swarm does rebalance (c trades places), and never has a gap on the way.
    final = _rebalance(20, swarm, random.Random(0), check_no_gap=True)
    assert swarm_throughput(20, final) > swarm_throughput(20, swarm)


def test_a_cycle_of_sole_holders_moves_only_for_a_large_gain() -> None:
    # s002, s003 and s004 should each take over blocks only the next one serves: any first
    # move opens a gap. The plan is 73% better, so with the default gap_gain (50%) one moves,
    # the others close the gap, and the swarm gets there; with a higher bar nobody moves.
    swarm = [
        E("s005", 0, 6, 8.86),
        E("s008", 6, 15, 4.05),
        E("s002", 13, 20, 1.43),
        E("s003", 20, 35, 2.95),
        E("s004", 35, 45, 3.85),
        E("s000", 40, 45, 1.97),
        E("s006", 40, 80, 1.36),
        E("s009", 45, 57, 1.59),
        E("s007", 64, 75, 1.19),
        E("s001", 72, 80, 1.0),
    ]
    assert swarm_throughput(80, swarm) == pytest.approx(1.36)
    assert not any(should_move(80, swarm, me, gap_gain=1.0)[0] for me in swarm)
    final = _rebalance(80, swarm, random.Random(0))
    assert swarm_throughput(80, final) == pytest.approx(2.36)


def test_no_oscillation_over_many_rounds() -> None:
    rng = random.Random(11)
    for _ in range(15):
        n = 40
        swarm: list[SwarmEntry] = []
        for i in range(rng.randint(3, 25)):
            size, value = rng.randint(3, 20), 10 ** rng.uniform(0, 1)
            start, end = choose_blocks(n, swarm, size, value)
            swarm.append(E(f"s{i:02d}", start, end, value))
        joined = swarm_throughput(n, swarm)
        final = _rebalance(n, swarm, rng, max_rounds=len(swarm) + 10)
        assert swarm_throughput(n, final) >= joined
        # Stable: a further round moves nobody.
        assert all(not should_move(n, final, me)[0] for me in final)


def test_rebalancing_escapes_a_local_optimum() -> None:
    # Joined one by one in this order; no single move raises the bottleneck (settling keeps
    # it at 1), but placing the strong server first doubles it.
    swarm = [E("s0", 0, 2, 1.0), E("s1", 2, 9, 2.0), E("s2", 9, 12, 1.0), E("s3", 4, 12, 1.0)]
    assert swarm_throughput(12, swarm) == 1.0
    assert swarm_throughput(12, settle(12, swarm, 8)) == 1.0
    assert swarm_throughput(12, canonical_plan(12, swarm, 8)) == 2.0
    final = _rebalance(12, swarm, random.Random(1), check_no_gap=True)
    assert swarm_throughput(12, final) == 2.0


def test_decisions_do_not_depend_on_record_order() -> None:
    rng = random.Random(2)
    swarm = []
    for i in range(10):
        size, value = rng.randint(5, 30), rng.uniform(1, 10)
        start = rng.randint(0, 80 - size)
        swarm.append(E(f"p{i:02d}", start, start + size, value))
    expected = [should_move(80, swarm, me) for me in swarm]
    for _ in range(5):
        shuffled = swarm[:]
        rng.shuffle(shuffled)
        assert [should_move(80, shuffled, me) for me in swarm] == expected


def _rebalance(
    n: int,
    swarm: list[SwarmEntry],
    rng: random.Random,
    max_rounds: int = 30,
    check_no_gap: bool = False,
) -> list[SwarmEntry]:
    """Rounds of should_move in random order until a round moves nobody (must happen)."""
    swarm = list(swarm)
    for _ in range(max_rounds):
        moved = False
        for index in rng.sample(range(len(swarm)), len(swarm)):
            go, (start, end) = should_move(n, swarm, swarm[index])
            if go:
                swarm[index] = E(swarm[index].peer_id, start, end, swarm[index].throughput)
                moved = True
                if check_no_gap:
                    assert swarm_throughput(n, swarm) > 0
        if not moved:
            return swarm
    raise AssertionError(f"still moving after {max_rounds} rounds")


def _places(n: int, swarm: list[SwarmEntry], joining: set[str]) -> dict[str, tuple[int, int]]:
    """Where each joiner of `swarm` goes, each deciding from the same listing."""
    return {e.peer_id: join_place(n, swarm, e, joining - {e.peer_id}) for e in swarm}


def test_servers_joining_on_the_same_blocks_spread_over_all_of_them() -> None:
    # issue 9: three servers started together each listed an empty swarm and claimed 0:2;
    # every one of them settles the same listing the same way, and the model is covered
    swarm = [E(p, 0, 2, 1.0) for p in ("a", "b", "c")]
    places = _places(6, swarm, {"a", "b", "c"})
    assert sorted(places.values()) == [(0, 2), (2, 4), (4, 6)]
    # the case seen with real daemons: one claim seen, two servers on 2:4
    swarm = [E("a", 0, 2, 1.0), E("b", 2, 4, 1.0), E("c", 2, 4, 1.0)]
    places = _places(6, swarm, {"a", "b", "c"})
    assert places == {"a": (0, 2), "b": (4, 6), "c": (2, 4)}  # the smaller id moves
    moved = [E(p, *span, 1.0) for p, span in places.items()]
    assert _places(6, moved, {"a", "b", "c"}) == places  # and then the claims hold
    assert swarm_throughput(6, moved) == 1.0


def test_a_late_joiner_takes_the_claims_it_sees_as_they_are() -> None:
    # "b" and "c" (JOINING: loading) already settled; a late "a", smaller id, must not
    # expect them to make way, nor must they move for it
    swarm = [E("b", 0, 2, 1.0), E("c", 2, 4, 1.0), E("a", 0, 2, 1.0)]
    assert join_place(6, swarm, swarm[2], {"b", "c"}) == (4, 6)
    assert join_place(6, swarm, swarm[0], {"a", "c"}) == (0, 2)
    assert join_place(6, swarm, swarm[1], {"a", "b"}) == (2, 4)


def test_join_place_only_moves_joiners_and_never_for_a_tie() -> None:
    online = [E("a", 0, 3, 2.0), E("b", 3, 6, 2.0)]
    me = E("z", 0, 3, 1.0)
    assert join_place(6, [*online, me], me, set()) == (0, 3)  # a tie: stay
    weaker_first = [E("a", 0, 3, 2.0), E("b", 3, 6, 3.0)]
    assert join_place(6, weaker_first, E("z", 5, 6, 1.0), set()) == (0, 1)  # strictly better
    settled = settle(6, [E("a", 0, 2, 1.0), E("b", 0, 2, 1.0)], 8, movable={"b"})
    assert settled == [E("a", 0, 2, 1.0), E("b", 2, 4, 1.0)]
