"""Routing benchmark: plan time, and D* Lite repair vs a fresh search after a server fails.

For each swarm (80 blocks, spans of 4-20 blocks, 5 measured next-RTTs per server, the
client's RTTs to 70% of servers): time a planner's construction plus ``plan()``; then fail
the server of the middle hop of that route and time ``update([ServerRemoved])`` plus
``route_from(failed hop's start, previous peer)`` against a fresh planner built on the
swarm without that server, asked the same question. Times are the best of ``--repeat``
runs (CPU time of this process unless ``--wall``); the table shows medians over swarms.
The baseline is measured in the same run; ``--reference`` also times ``dijkstra_route``.

    python -m benchmarks.bench_routing [--servers 50 500] [--swarms 5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time

from routing import CostModel, RoutePlanner, ServerRemoved, dijkstra_route
from routing.synthetic import random_swarm
from routing.types import first_gap

clock = time.process_time  # CPU seconds of this process: steadier than wall time on a busy box


def covered_swarm(seed: int, n_blocks: int, n_servers: int):
    """The first random swarm from ``seed`` on that serves every block."""
    rng = random.Random(seed)
    while True:
        servers, client = random_swarm(
            rng, n_blocks, n_servers, min_span=4, max_span=20, measured=5
        )
        if first_gap(servers, 0, n_blocks) is None:
            return servers, CostModel(client_rtts=client)


def best_of(repeat: int, fn):
    """(best seconds, result of the last call)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = clock()
        result = fn()
        best = min(best, clock() - t0)
    return best, result


def one_swarm(seed: int, n_blocks: int, n_servers: int, repeat: int, reference: bool) -> dict:
    servers, cm = covered_swarm(seed, n_blocks, n_servers)

    def planned():
        planner = RoutePlanner(servers, cm, end=n_blocks)
        return planner, planner.plan()

    plan_s, (planner, route) = best_of(repeat, planned)
    build_s, _ = best_of(repeat, lambda: RoutePlanner(servers, cm, end=n_blocks))
    k = len(route.hops) // 2
    failed = route.hops[k]
    prev = route.hops[k - 1].peer_id if k else None
    rest = [s for s in servers if s.peer_id != failed.peer_id]

    def repaired():
        p = RoutePlanner(servers, cm, end=n_blocks)  # same state as after plan(), untimed
        p.plan()
        before = p.expansions
        t0 = clock()
        p.update([ServerRemoved(failed.peer_id)])
        r = p.route_from(failed.start, prev)
        return clock() - t0, p.expansions - before, r

    repair_s, repair_exp, repaired_route = min(
        (repaired() for _ in range(repeat)), key=lambda x: x[0]
    )

    def fresh():
        p = RoutePlanner(rest, cm, end=n_blocks)
        return p, p.route_from(failed.start, prev)

    fresh_s, (fresh_planner, fresh_route) = best_of(repeat, fresh)
    assert abs(fresh_route.cost - repaired_route.cost) <= 1e-9 * fresh_route.cost
    row = {
        "plan_ms": 1e3 * plan_s,
        "build_ms": 1e3 * build_s,
        "repair_ms": 1e3 * repair_s,
        "fresh_ms": 1e3 * fresh_s,
        "plan_exp": planner.expansions,
        "repair_exp": repair_exp,
        "fresh_exp": fresh_planner.expansions,
        "hops": len(route.hops),
    }
    if reference:
        ref_s, ref = best_of(1, lambda: dijkstra_route(servers, cm, end=n_blocks))
        assert abs(ref.cost - route.cost) <= 1e-9 * ref.cost
        row["dijkstra_ms"] = 1e3 * ref_s
    return row


def median_of(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=80)
    ap.add_argument("--servers", type=int, nargs="+", default=[50, 500])
    ap.add_argument("--swarms", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--reference", action="store_true", help="also time dijkstra_route")
    ap.add_argument("--wall", action="store_true", help="wall-clock instead of CPU time")
    args = ap.parse_args()
    global clock
    if args.wall:
        clock = time.perf_counter
    kind = "wall" if args.wall else "CPU"
    print(
        f"{args.blocks} blocks; {kind} times, best of {args.repeat}; "
        f"medians over {args.swarms} swarms"
    )
    header = (
        "servers  plan ms (build)  repair ms  fresh ms  time ratio  "
        "exp plan  exp repair  exp fresh  exp ratio"
    )
    if args.reference:
        header += "  dijkstra ms"
    print(header)
    for n in args.servers:
        rows = [
            one_swarm(seed, args.blocks, n, args.repeat, args.reference)
            for seed in range(args.swarms)
        ]
        med = functools.partial(median_of, rows)
        time_ratio = statistics.median(r["repair_ms"] / r["fresh_ms"] for r in rows)
        exp_ratio = statistics.median(r["repair_exp"] / r["fresh_exp"] for r in rows)
        line = (
            f"{n:7d}  {med('plan_ms'):7.1f} ({med('build_ms'):5.1f})  {med('repair_ms'):9.1f}"
            f"  {med('fresh_ms'):8.1f}  {time_ratio:10.3f}  {med('plan_exp'):8.0f}"
            f"  {med('repair_exp'):10.0f}  {med('fresh_exp'):9.0f}  {exp_ratio:9.3f}"
        )
        if args.reference:
            line += f"  {med('dijkstra_ms'):11.1f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
