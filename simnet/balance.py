"""Scenario 1: load balancing against the optimum.

Random heterogeneous swarms (throughputs log-uniform over a 10x range, memory for 5-40 blocks
of an 80-block model) join one by one, each server taking `balancing.choose_blocks`; then
rounds of `balancing.should_move` (servers in a random order each round, moving at once when
told to) run until a round moves nobody. The swarm throughput reached is compared with

- the exact optimum (`optimum.optimal_placement`) for small swarms, and
- for larger ones, where the exact search is out of reach, with the upper bound
  sum(size * throughput) / blocks, so the fraction reported there is a lower bound on the
  fraction of the optimum.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from pathlib import Path

from balancing import (
    DEFAULT_MIN_GAIN,
    SwarmEntry,
    choose_blocks,
    should_move,
    swarm_throughput,
)
from simnet.optimum import SearchLimitReached, optimal_placement, upper_bound
from simnet.report import new_figure, save, table


@dataclass(frozen=True)
class ServerSpec:
    """A server before it joins: how many blocks fit in its memory, how fast it is."""

    peer_id: str
    num_blocks: int
    throughput: float


@dataclass(frozen=True)
class SwarmResult:
    num_servers: int
    joined: float  # swarm throughput after the one-by-one joins
    rebalanced: float  # after should_move rounds
    best: float  # the optimum (exact) or an upper bound on it
    exact: bool
    rounds: int
    moves: int

    @property
    def fraction(self) -> float:
        return self.rebalanced / self.best if self.best > 0 else 1.0

    @property
    def joined_fraction(self) -> float:
        return self.joined / self.best if self.best > 0 else 1.0


def random_swarm(
    rng: random.Random,
    num_servers: int,
    throughput_range: tuple[float, float] = (1.0, 10.0),
    memory_range: tuple[int, int] = (5, 40),
) -> list[ServerSpec]:
    """Servers in join order: throughput log-uniform in the range, memory uniform."""
    low, high = throughput_range
    return [
        ServerSpec(
            f"s{i:03d}",
            rng.randint(*memory_range),
            low * (high / low) ** rng.random(),
        )
        for i in range(num_servers)
    ]


def join_and_rebalance(
    num_blocks: int,
    specs: list[ServerSpec],
    rng: random.Random,
    min_gain: float = DEFAULT_MIN_GAIN,
    max_rounds: int = 100,
) -> tuple[list[SwarmEntry], list[SwarmEntry], int, int]:
    """(swarm after joins, after rebalancing, rounds, moves)."""
    swarm: list[SwarmEntry] = []
    for spec in specs:
        size = min(spec.num_blocks, num_blocks)
        start, end = choose_blocks(num_blocks, swarm, size, spec.throughput)
        swarm.append(SwarmEntry(spec.peer_id, start, end, spec.throughput))
    joined = list(swarm)
    moves = 0
    for rounds in range(1, max_rounds + 1):
        moved = False
        for index in rng.sample(range(len(swarm)), len(swarm)):
            go, (start, end) = should_move(num_blocks, swarm, swarm[index], min_gain)
            if go:
                swarm[index] = SwarmEntry(swarm[index].peer_id, start, end, swarm[index].throughput)
                moves += 1
                moved = True
        if not moved:
            return joined, swarm, rounds, moves
    raise RuntimeError(f"servers still moving after {max_rounds} rounds")


def evaluate_swarm(
    num_blocks: int,
    specs: list[ServerSpec],
    rng: random.Random,
    exact: bool,
    min_gain: float = DEFAULT_MIN_GAIN,
    max_nodes: int = 2_000_000,
) -> SwarmResult:
    joined, final, rounds, moves = join_and_rebalance(num_blocks, specs, rng, min_gain)
    sizes = [min(s.num_blocks, num_blocks) for s in specs]
    values = [s.throughput for s in specs]
    best, proved = upper_bound(num_blocks, sizes, values), False
    if exact:
        where = {e.peer_id: e.start for e in final}
        try:
            optimum = optimal_placement(
                num_blocks, sizes, values, max_nodes, hint=[where[s.peer_id] for s in specs]
            )
            best, proved = optimum.throughput, True
        except SearchLimitReached:
            pass
    return SwarmResult(
        len(specs),
        swarm_throughput(num_blocks, joined),
        swarm_throughput(num_blocks, final),
        best,
        proved,
        rounds,
        moves,
    )


def run_balance(
    seed: int = 0,
    exact_swarms: int = 100,
    exact_servers: int = 10,
    large_swarms: int = 30,
    large_servers: tuple[int, int] = (20, 100),
    num_blocks: int = 80,
    min_gain: float = DEFAULT_MIN_GAIN,
) -> list[SwarmResult]:
    """`exact_swarms` swarms of `exact_servers` servers graded against the exact optimum, and
    `large_swarms` of 20-100 servers graded against the upper bound."""
    rng = random.Random(seed)
    results = []
    for _ in range(exact_swarms):
        specs = random_swarm(rng, exact_servers)
        results.append(evaluate_swarm(num_blocks, specs, rng, exact=True, min_gain=min_gain))
    for _ in range(large_swarms):
        specs = random_swarm(rng, rng.randint(*large_servers))
        results.append(evaluate_swarm(num_blocks, specs, rng, exact=False, min_gain=min_gain))
    return results


def summary_rows(results: list[SwarmResult]) -> list[list[object]]:
    """One row per group: exact optimum vs upper bound."""
    rows = []
    for label, group in (
        ("exact optimum", [r for r in results if r.exact]),
        ("upper bound", [r for r in results if not r.exact]),
    ):
        if not group:
            continue
        sizes = sorted({r.num_servers for r in group})
        rows.append(
            [
                label,
                len(group),
                f"{sizes[0]}-{sizes[-1]}",
                statistics.median(r.joined_fraction for r in group),
                statistics.median(r.fraction for r in group),
                min(r.fraction for r in group),
                statistics.mean(r.moves for r in group),
                max(r.rounds for r in group),
            ]
        )
    return rows


SUMMARY_HEADERS = [
    "graded against",
    "swarms",
    "servers",
    "joined median",
    "rebalanced median",
    "rebalanced worst",
    "moves (mean)",
    "rounds (max)",
]


def report(results: list[SwarmResult], out_dir: Path) -> tuple[str, Path]:
    """The summary table and a plot of fraction of optimum vs swarm size."""
    figure, axes = new_figure()
    ax = axes[0][0]
    for exact, marker, label in ((True, "o", "vs exact optimum"), (False, "^", "vs upper bound")):
        group = [r for r in results if r.exact == exact]
        if not group:
            continue
        ax.scatter(
            [r.num_servers for r in group],
            [r.joined_fraction for r in group],
            marker=marker,
            facecolors="none",
            edgecolors="tab:gray",
            label=f"after joins, {label}",
        )
        ax.scatter(
            [r.num_servers for r in group],
            [r.fraction for r in group],
            marker=marker,
            color="tab:blue",
            alpha=0.6,
            label=f"after rebalancing, {label}",
        )
    ax.axhline(0.9, color="tab:red", linestyle=":", label="90% (Petals paper: 90-100%)")
    ax.set_xlabel("servers in the swarm")
    ax.set_ylabel("swarm throughput / optimum")
    ax.set_ylim(0.0, 1.05)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Load balancing vs the optimal placement")
    path = save(figure, out_dir, "balance.png")
    return table(SUMMARY_HEADERS, summary_rows(results)), path
