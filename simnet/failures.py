"""Scenario 2: sequential generation through a chain of servers that fail.

A client generates `tokens` tokens one step at a time through a chain chosen by
`routing.RoutePlanner` (latency mode). The model's blocks are split into `hops` equal spans,
each served by `replicas` servers, so a failed server always has a replacement. At every step,
each server of the chain fails with probability `failure_rate` when the step reaches it; the
client notices after `detect_s`, bans it (`routing.BanList`) and the server stays down for
`downtime_s` (its record is gone meanwhile, so nobody routes to it). Strategies:

- "restart" (a): servers keep KV caches; after a failure the client re-plans the whole chain
  and starts the generation again from the prompt (the lost cache cannot be rebuilt).
- "nocache" (b): servers keep nothing; every step sends the whole prefix through the chain;
  a failed step is re-planned and sent again.
- "replay" (c): servers keep KV caches and the client keeps the inputs it sent to each span;
  on a failure it asks `RoutePlanner.route_from(span start, previous peer)` for the rest of
  the chain, sends the replacement the span's past inputs (rebuilding its cache) together
  with the current step, and carries on. Hops before the failure keep their caches.

Every new session with a server costs a dial (`dial_s`) and a round trip. Costs of compute and
transfers come from `simnet.timing`. Results are steps/s = tokens / simulated seconds of the
whole generation, over `runs` generations. A generation longer than `max_time_s` is cut off
and counted as finishing then (so the steps/s shown for it is an upper bound); after three
such generations in a row a combination is not run further.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import simpy

from routing import BanList, CostModel, Hop, NoRouteError, RoutePlanner, ServerSpan
from simnet.network import Network
from simnet.report import new_figure, save, table
from simnet.timing import BLOOM_7B, BLOOM_176B, Hardware, ModelShape

STRATEGIES = {
    "restart": "(a) server caches, restart",
    "nocache": "(b) no caches",
    "replay": "(c) dual caches, replay",
}


@dataclass(frozen=True)
class Assumptions:
    """Everything the failure scenario assumes besides compute (see simnet.timing)."""

    hops: int = 3  # spans the model is split into (servers in a chain)
    replicas: int = 3  # servers per span
    prompt_tokens: int = 8
    detect_s: float = 1.0  # a crash is noticed (timeout, connection reset) after this
    dial_s: float = 0.25  # opening a connection to a new server (libp2p dial), plus one RTT
    downtime_s: float = 30.0  # a failed server is back after this
    ban_base_s: float = 10.0  # first ban; doubles on every repeat failure
    max_time_s: float = 20000.0  # a generation is cut off after this much simulated time
    rtt_range: tuple[float, float] = (0.08, 0.12)  # round trips between any two peers
    bandwidth: float = 12.5e6  # bytes/s (100 Mbit/s) at every peer
    hardware: Hardware = field(default_factory=Hardware)


@dataclass(frozen=True)
class GenerationResult:
    strategy: str
    tokens: int
    seconds: float
    failures: int
    cut_off: bool


class FailureSwarm:
    """The servers of one model, their state (up or down) and the network between them."""

    def __init__(self, shape: ModelShape, assumptions: Assumptions, rng: random.Random) -> None:
        self.shape, self.assumptions = shape, assumptions
        self.network = Network(rng, assumptions.rtt_range, assumptions.bandwidth)
        bounds = [
            round(i * shape.num_blocks / assumptions.hops) for i in range(assumptions.hops + 1)
        ]
        self.spans = list(zip(bounds, bounds[1:], strict=False))
        step_time = assumptions.hardware.block_time(shape, 1, 0)
        peers = [f"s{i}r{r}" for i in range(len(self.spans)) for r in range(assumptions.replicas)]
        self.network.add_peers([None, *peers])
        self.servers: dict[str, ServerSpan] = {}
        for index, (start, end) in enumerate(self.spans):
            following = [f"s{index + 1}r{r}" for r in range(assumptions.replicas)]
            for r in range(assumptions.replicas):
                peer = f"s{index}r{r}"
                self.servers[peer] = ServerSpan(
                    peer,
                    start,
                    end,
                    throughput=1.0 / step_time,
                    bandwidth=assumptions.bandwidth,
                    next_rtts={p: self.network.rtt(peer, p) for p in following if p in peers},
                )
        self.down_until: dict[str, float] = {}

    def cost_model(self) -> CostModel:
        return CostModel(
            client_rtts={p: self.network.rtt(None, p) for p in self.servers},
            default_rtt=sum(self.assumptions.rtt_range) / 2,
            tokens=1,
            bytes_per_token=self.assumptions.hardware.token_bytes(self.shape),
        )

    def is_up(self, peer: str, now: float) -> bool:
        return self.down_until.get(peer, -1.0) <= now


class ChainClient:
    """One client generating through the swarm with one strategy (a simpy process)."""

    def __init__(
        self,
        env: simpy.Environment,
        swarm: FailureSwarm,
        strategy: str,
        failure_rate: float,
        rng: random.Random,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; pick one of {sorted(STRATEGIES)}")
        self.env, self.swarm, self.strategy = env, swarm, strategy
        self.failure_rate, self.rng = failure_rate, rng
        self.assumptions = swarm.assumptions
        self.bans = BanList(base=self.assumptions.ban_base_s, factor=2.0, max_backoff=300.0)
        self.planner = RoutePlanner(
            list(swarm.servers.values()),
            swarm.cost_model(),
            end=swarm.shape.num_blocks,
            mode="latency",
            rng=random.Random(rng.random()),
        )
        self.failures = 0

    def generate(self, tokens: int, results: list[GenerationResult]) -> Iterator[simpy.Event]:
        """Generate `tokens` tokens; append the outcome to `results`."""
        env, a = self.env, self.assumptions
        began = env.now
        route: list[Hop] = []
        cached: dict[tuple[str, int, int], int] = {}  # (peer, start, end) -> tokens in its KV cache
        done, failures = 0, 0
        while done < tokens:
            if env.now - began > a.max_time_s:
                results.append(
                    GenerationResult(self.strategy, tokens, env.now - began, failures, True)
                )
                return
            if not route:
                self.planner.set_banned(self._excluded())
                try:
                    route = list(self.planner.plan().hops)
                except NoRouteError:
                    yield env.timeout(a.detect_s)  # every replica of a span is banned: wait
                    continue
                yield env.timeout(self._connect_time(route, cached))
            context = 0 if done == 0 else a.prompt_tokens + done - 1
            total = context + (a.prompt_tokens if done == 0 else 1)
            failed = yield from self._step(route, cached, total)
            if failed is None:
                done += 1
                continue
            failures += 1
            self.failures += 1
            index = failed
            peer = route[index].peer_id
            self.swarm.down_until[peer] = env.now + a.downtime_s
            self.bans.ban(peer, env.now)
            cached = {key: n for key, n in cached.items() if key[0] != peer}
            yield env.timeout(a.detect_s)
            if self.strategy == "restart":
                route, cached, done = [], {}, 0
            elif self.strategy == "nocache":
                route = []
            else:
                self.planner.set_banned(self._excluded())
                prev = route[index - 1].peer_id if index > 0 else None
                try:
                    tail = self.planner.route_from(route[index].start, prev).hops
                except NoRouteError:
                    route = []  # no replacement yet: plan the whole chain next turn
                    continue
                route = route[:index] + list(tail)
                yield env.timeout(self._connect_time(list(tail), cached))
        results.append(GenerationResult(self.strategy, tokens, env.now - began, failures, False))

    def _step(
        self, route: list[Hop], cached: dict[tuple[str, int, int], int], total: int
    ) -> Iterator[simpy.Event]:
        """One step bringing every hop's cache to `total` tokens; the failed hop's index or None."""
        env, a, shape = self.env, self.assumptions, self.swarm.shape
        network, hardware = self.swarm.network, a.hardware
        prev: str | None = None
        for index, hop in enumerate(route):
            key = (hop.peer_id, hop.start, hop.end)
            have = 0 if self.strategy == "nocache" else cached.get(key, 0)
            new = total - have
            if new <= 0:
                prev = hop.peer_id  # already done before a failure further down the chain
                continue
            if not self.swarm.is_up(hop.peer_id, env.now) or self.rng.random() < self.failure_rate:
                return index
            send = network.send_time(prev, hop.peer_id, new * hardware.token_bytes(shape))
            compute = (hop.end - hop.start) * hardware.block_time(shape, new, have)
            yield env.timeout(send + compute)
            self.bans.clear(hop.peer_id)  # it answered: forget its past strikes
            cached[key] = total
            prev = hop.peer_id
        yield env.timeout(network.send_time(prev, None, hardware.token_bytes(shape)))
        return None

    def _excluded(self) -> set[str]:
        """Banned peers, and peers whose records say they are down (the DHT knows)."""
        now = self.env.now
        down = {p for p in self.swarm.servers if not self.swarm.is_up(p, now)}
        return self.bans.banned(now) | down

    def _connect_time(self, hops: list[Hop], cached: dict[tuple[str, int, int], int]) -> float:
        """Opening sessions with the servers of `hops` that have none yet (in parallel)."""
        fresh = [h for h in hops if (h.peer_id, h.start, h.end) not in cached]
        if not fresh:
            return 0.0
        network = self.swarm.network
        return self.assumptions.dial_s + max(network.rtt(None, h.peer_id) for h in fresh)


@dataclass(frozen=True)
class FailureRow:
    model: str
    tokens: int
    failure_rate: float
    strategy: str
    steps_per_s: float
    failures: float  # per generation
    cut_off: bool


def run_failures(
    seed: int = 0,
    shapes: tuple[ModelShape, ...] = (BLOOM_7B, BLOOM_176B),
    lengths: tuple[int, ...] = (128, 1024),
    rates: tuple[float, ...] = (0.0, 1e-3, 1e-2),
    runs: int = 10,
    assumptions: Assumptions | None = None,
) -> list[FailureRow]:
    """Every (model, length, failure rate, strategy) combination, `runs` generations each."""
    assumptions = assumptions or Assumptions()
    rows = []
    for shape in shapes:
        for tokens in lengths:
            for rate in rates:
                for strategy in STRATEGIES:
                    rng = random.Random(f"{seed}/{shape.name}/{tokens}/{rate}/{strategy}")
                    swarm = FailureSwarm(shape, assumptions, random.Random(f"{seed}/{shape.name}"))
                    env = simpy.Environment()
                    client = ChainClient(env, swarm, strategy, rate, rng)
                    results: list[GenerationResult] = []

                    def one_by_one(client=client, results=results, tokens=tokens):
                        for _ in range(runs):
                            yield from client.generate(tokens, results)
                            if len(results) >= 3 and all(r.cut_off for r in results):
                                return  # hopeless: more runs would only show the same bound

                    env.process(one_by_one())
                    env.run()
                    seconds = sum(r.seconds for r in results)
                    rows.append(
                        FailureRow(
                            shape.name,
                            tokens,
                            rate,
                            strategy,
                            tokens * len(results) / seconds,
                            sum(r.failures for r in results) / len(results),
                            any(r.cut_off for r in results),
                        )
                    )
    return rows


def report(rows: list[FailureRow], out_dir: Path) -> tuple[str, Path]:
    """Steps/s per strategy (columns) for every model, length and failure rate (rows)."""
    keys = sorted(
        {(r.model, r.tokens, r.failure_rate) for r in rows},
        key=lambda k: (k[0] != BLOOM_7B.name, k[1], k[2]),
    )
    by_key = {(r.model, r.tokens, r.failure_rate, r.strategy): r for r in rows}
    lines = []
    for model, tokens, rate in keys:
        cells: list[object] = [model, tokens, rate]
        for strategy in STRATEGIES:
            row = by_key.get((model, tokens, rate, strategy))
            cells.append("-" if row is None else _steps_cell(row))
        lines.append(cells)
    text = table(["model", "tokens", "failure rate", *STRATEGIES.values()], lines)
    text += "\n(steps/s; '<' = some generations were cut off, so the true figure is lower)"
    models = sorted({r.model for r in rows}, key=lambda m: m != BLOOM_7B.name)
    lengths = sorted({r.tokens for r in rows})
    figure, axes = new_figure(
        len(models), len(lengths), size=(5.0 * len(lengths), 3.6 * len(models))
    )
    for i, model in enumerate(models):
        for j, tokens in enumerate(lengths):
            ax = axes[i][j]
            for strategy, label in STRATEGIES.items():
                points = sorted(
                    (r.failure_rate, r.steps_per_s)
                    for r in rows
                    if (r.model, r.tokens, r.strategy) == (model, tokens, strategy)
                )
                xs = [max(x, 1e-4) for x, _ in points]
                ax.plot(xs, [y for _, y in points], marker="o", label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("failure rate per server per step (0 drawn at 1e-4)")
            ax.set_ylabel("steps/s")
            ax.set_title(f"{model}, {tokens} tokens")
            ax.legend(fontsize=7)
    return text, save(figure, out_dir, "failures.png")


def _steps_cell(row: FailureRow) -> str:
    value = f"{row.steps_per_s:.3g}"
    return f"<{value}" if row.cut_off else value
