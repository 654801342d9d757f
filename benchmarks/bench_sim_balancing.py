"""Balancing benchmark: what one `should_move` decision costs a server, vs one `choose_blocks`.

For swarms of each size (80 blocks, memory for 5-40 blocks, throughputs over 10x, built by
one-by-one joins as in `peerd sim balance`), time `choose_blocks` for a joining server (the
baseline) and `should_move` for every server of the swarm with cold caches (the cost a
daemon pays once per rebalancing period: greedy look-ahead plus the canonical plan). CPU
time of this process; medians over servers.

    python -m benchmarks.bench_sim_balancing [--servers 10 50 100 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from balancing import SwarmEntry, choose_blocks, should_move
from balancing.choose import _canonical_plan, _settle
from simnet.balance import random_swarm
from simnet.report import table

clock = time.process_time


def one_size(num_servers: int, seed: int, num_blocks: int = 80) -> list[object]:
    rng = random.Random(seed)
    specs = random_swarm(rng, num_servers)
    swarm: list[SwarmEntry] = []
    joins = []
    for spec in specs:
        began = clock()
        start, end = choose_blocks(num_blocks, swarm, spec.num_blocks, spec.throughput)
        joins.append(clock() - began)
        swarm.append(SwarmEntry(spec.peer_id, start, end, spec.throughput))
    decisions = []
    for me in swarm[: min(len(swarm), 20)]:
        _settle.cache_clear()
        _canonical_plan.cache_clear()
        began = clock()
        should_move(num_blocks, swarm, me)
        decisions.append(clock() - began)
    join_ms = statistics.median(joins) * 1e3
    move_ms = statistics.median(decisions) * 1e3
    return [num_servers, join_ms, move_ms, move_ms / join_ms]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, nargs="+", default=[10, 50, 100, 300])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = [one_size(n, args.seed) for n in args.servers]
    headers = ["servers", "choose_blocks ms", "should_move ms", "ratio"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
