"""Scenario 3: servers come and go while clients run inference sessions.

Servers (throughput log-uniform over a 10x range, memory for 5-40 blocks of an 80-block model)
arrive as a Poisson process and live for an exponential time; some leave gracefully, the rest
crash (noticed by clients after `detect_s`). A joining server takes
`balancing.choose_blocks` and is online after loading its blocks (`load_s_per_block`). With
rebalancing on, every online server asks `balancing.should_move` every ~`rebalance_period_s`
and, when told to, goes offline, loads its new blocks and comes back.

A client machine runs sessions (Poisson arrivals) of `steps` decoding steps each, routed by
one shared `routing.RoutePlanner` (latency mode) that is kept up to date with ServerAdded /
ServerRemoved as servers come and go and ServerUpdated as their load (sessions running
through them / `sessions_per_server`) changes, so sessions spread over the swarm. A step takes the route's modelled cost. When a server
of a running session goes away, the session asks `route_from(hop start, previous peer)` for a
replacement, pays a reconnect and the replay of its past inputs, and carries on; it fails
when no route exists (some blocks are served by nobody). The same seed gives the same
arrivals, lifetimes and sessions with rebalancing on and off.

Sampled every `sample_s`: swarm throughput (balancing.swarm_throughput of online servers),
servers online, and the share of sessions ending in that interval that succeeded.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import simpy

from balancing import SwarmEntry, choose_blocks, should_move, swarm_throughput
from routing import (
    CostModel,
    Hop,
    NoRouteError,
    Route,
    RoutePlanner,
    ServerAdded,
    ServerRemoved,
    ServerSpan,
    ServerUpdated,
    route_cost,
)
from simnet.report import new_figure, save, table


@dataclass(frozen=True)
class ChurnConfig:
    num_blocks: int = 80
    duration_s: float = 4 * 3600.0
    initial_servers: int = 12
    joins_per_hour: float = 20.0
    mean_lifetime_s: float = 1.5 * 3600.0
    crash_fraction: float = 0.5  # the rest leave gracefully (sessions move on at once)
    throughput_range: tuple[float, float] = (100.0, 1000.0)  # blocks*tokens/s per server
    memory_range: tuple[int, int] = (5, 40)  # blocks a server can hold
    load_s_per_block: float = 2.0  # loading weights when joining or moving
    rebalance_period_s: float = 300.0
    min_gain: float = 0.1
    sessions_per_minute: float = 6.0
    clients_start_s: float = 300.0  # sessions begin once the initial swarm has loaded
    steps: int = 128
    client_rtt_range: tuple[float, float] = (0.02, 0.15)
    default_rtt: float = 0.1  # between servers (not measured here)
    detect_s: float = 1.0
    reconnect_s: float = 0.35  # dial + a round trip
    bytes_per_token: int = 16384  # hidden 8192 in fp16
    bandwidth: float = 12.5e6
    sample_s: float = 120.0
    sessions_per_server: int = 4  # concurrent sessions that make a server fully loaded


@dataclass(frozen=True)
class ServerPlan:
    """A server's whole life, drawn in advance so both runs see the same churn."""

    peer_id: str
    arrives: float
    leaves: float
    crashes: bool
    num_blocks: int
    throughput: float


@dataclass
class ChurnResult:
    rebalancing: bool
    times: list[float] = field(default_factory=list)
    throughput: list[float] = field(default_factory=list)
    servers_online: list[int] = field(default_factory=list)
    success: list[float] = field(default_factory=list)  # NaN when no session ended
    sessions_ok: int = 0
    sessions_failed: int = 0
    moves: int = 0
    recoveries: int = 0

    @property
    def success_rate(self) -> float:
        total = self.sessions_ok + self.sessions_failed
        return self.sessions_ok / total if total else float("nan")


def plan_servers(config: ChurnConfig, rng: random.Random) -> list[ServerPlan]:
    plans = []
    arrivals = [i * 2.0 for i in range(config.initial_servers)]  # the initial swarm, quickly
    now = 0.0
    while True:
        now += rng.expovariate(config.joins_per_hour / 3600.0)
        if now >= config.duration_s:
            break
        arrivals.append(now)
    low, high = config.throughput_range
    for i, arrives in enumerate(arrivals):
        plans.append(
            ServerPlan(
                f"srv{i:04d}",
                arrives,
                arrives + rng.expovariate(1.0 / config.mean_lifetime_s),
                rng.random() < config.crash_fraction,
                rng.randint(*config.memory_range),
                low * (high / low) ** rng.random(),
            )
        )
    return plans


def plan_sessions(config: ChurnConfig, rng: random.Random) -> list[float]:
    times, now = [], config.clients_start_s
    while True:
        now += rng.expovariate(config.sessions_per_minute / 60.0)
        if now >= config.duration_s:
            return times
        times.append(now)


class ChurnSim:
    """One run: the servers' lives, their rebalancing, and the client's sessions."""

    def __init__(self, config: ChurnConfig, seed: int, rebalancing: bool) -> None:
        self.config, self.rebalancing = config, rebalancing
        self.env = simpy.Environment()
        self.servers = plan_servers(config, random.Random(f"{seed}/servers"))
        self.sessions = plan_sessions(config, random.Random(f"{seed}/sessions"))
        self.rng = random.Random(f"{seed}/run")  # rebalancing periods (same draws in both runs)
        rtt_rng = random.Random(f"{seed}/rtt")
        self.client_rtts = {
            s.peer_id: rtt_rng.uniform(*config.client_rtt_range) for s in self.servers
        }
        self.cost_model = CostModel(
            client_rtts=self.client_rtts,
            default_rtt=config.default_rtt,
            tokens=1,
            bytes_per_token=config.bytes_per_token,
        )
        self.timing_model = replace(self.cost_model, load_penalty=0.0)
        self.planner = RoutePlanner([], self.cost_model, end=config.num_blocks, mode="latency")
        self.announced: dict[str, SwarmEntry] = {}  # records: online or loading
        self.online: dict[str, ServerSpan] = {}
        # Sessions running through each server, in arrival order (dicts, not sets: the order
        # of interrupts must not depend on object addresses or hash seeds).
        self.users: dict[str, dict[simpy.Process, None]] = {}
        self.result = ChurnResult(rebalancing)
        self._ended: list[tuple[float, bool]] = []

    def run(self) -> ChurnResult:
        for plan in self.servers:
            self.env.process(self._server(plan))
        self.env.process(self._clients())
        self.env.process(self._sampler())
        self.env.run(until=self.config.duration_s + 1e-6)  # the last sample is due at the end
        return self.result

    # ----- servers
    def _server(self, plan: ServerPlan) -> Iterator[simpy.Event]:
        env, config = self.env, self.config
        yield env.timeout(plan.arrives)
        size = min(plan.num_blocks, config.num_blocks)
        start, end = choose_blocks(
            config.num_blocks, self.announced.values(), size, plan.throughput
        )
        entry = SwarmEntry(plan.peer_id, start, end, plan.throughput)
        while True:
            self.announced[plan.peer_id] = entry
            loading = min(size * config.load_s_per_block, max(0.0, plan.leaves - env.now))
            yield env.timeout(loading)
            if env.now >= plan.leaves:
                break
            self._go_online(entry)
            moved = False
            while not moved:
                period = config.rebalance_period_s * self.rng.uniform(0.5, 1.5)
                if not self.rebalancing or env.now + period >= plan.leaves:
                    yield env.timeout(max(0.0, plan.leaves - env.now))
                    break
                yield env.timeout(period)
                go, (new_start, new_end) = should_move(
                    config.num_blocks, list(self.announced.values()), entry, config.min_gain
                )
                if go:
                    self.result.moves += 1
                    self._go_offline(plan.peer_id, crashed=False)
                    entry = SwarmEntry(plan.peer_id, new_start, new_end, plan.throughput)
                    moved = True
            if not moved:
                break
        self._go_offline(plan.peer_id, crashed=plan.crashes)
        self.announced.pop(plan.peer_id, None)

    def _go_online(self, entry: SwarmEntry) -> None:
        span = ServerSpan(
            entry.peer_id,
            entry.start,
            entry.end,
            throughput=entry.throughput,
            bandwidth=self.config.bandwidth,
            load=self._load(entry.peer_id),
        )
        self.online[entry.peer_id] = span
        self.planner.update([ServerAdded(span)])

    def _go_offline(self, peer: str, crashed: bool) -> None:
        if self.online.pop(peer, None) is None:
            return
        self.planner.update([ServerRemoved(peer)])
        for session in list(self.users.pop(peer, ())):
            if session.is_alive:
                session.interrupt((peer, crashed))

    # ----- clients
    def _clients(self) -> Iterator[simpy.Event]:
        for at in self.sessions:
            yield self.env.timeout(at - self.env.now)
            self.env.process(self._session())

    def _session(self) -> Iterator[simpy.Event]:
        env, config = self.env, self.config
        me = env.active_process
        try:
            route = self.planner.plan()
        except NoRouteError:
            self._end(False)
            return
        hops = list(route.hops)
        remaining = config.steps
        pause = config.reconnect_s
        while remaining > 0:
            self._join(me, hops)
            step = self._step_time(hops)
            began = env.now
            try:
                yield env.timeout(pause + remaining * step)
                remaining = 0
                break
            except simpy.Interrupt as interrupt:
                peer, crashed = interrupt.cause
            remaining -= max(0, int((env.now - began - pause) / step))
            self._leave(me, hops)
            hops, pause = yield from self._recover(hops, peer, crashed, config.steps - remaining)
            if hops is None:
                self._end(False)
                return
        self._leave(me, hops)
        self._end(True)

    def _recover(
        self, hops: list[Hop], peer: str, crashed: bool, done: int
    ) -> Iterator[simpy.Event]:
        """(new hops, time to reconnect and replay) after `peer` went away, or (None, 0)."""
        env, config = self.env, self.config
        if crashed:
            try:
                yield env.timeout(config.detect_s)
            except simpy.Interrupt:
                pass  # another hop failed meanwhile: the route is re-checked below
        self.result.recoveries += 1
        # The planner only knows online servers, so one repair from the first lost hop is enough.
        gone = next((i for i, h in enumerate(hops) if h.peer_id not in self.online), None)
        if gone is None:
            return hops, 0.0
        prev = hops[gone - 1].peer_id if gone > 0 else None
        try:
            tail = self.planner.route_from(hops[gone].start, prev).hops
        except NoRouteError:
            return None, 0.0
        replay = done * config.bytes_per_token / config.bandwidth
        return hops[:gone] + list(tail), config.reconnect_s + replay

    def _step_time(self, hops: list[Hop]) -> float:
        """The route's modelled time; load steers routing but is not charged as time."""
        route = Route(tuple(hops), 0.0)
        return route_cost(route, self.online.values(), self.timing_model, mode="latency")

    def _join(self, session: simpy.Process, hops: list[Hop]) -> None:
        for hop in hops:
            self.users.setdefault(hop.peer_id, {})[session] = None
        self._publish_load(hops)

    def _leave(self, session: simpy.Process, hops: list[Hop]) -> None:
        for hop in hops:
            users = self.users.get(hop.peer_id)
            if users is not None:
                users.pop(session, None)
        self._publish_load(hops)

    def _load(self, peer: str) -> float:
        return min(1.0, len(self.users.get(peer, ())) / self.config.sessions_per_server)

    def _publish_load(self, hops: list[Hop]) -> None:
        """Servers announce their load; the client's planner learns it (spreads sessions)."""
        changes = []
        for peer in dict.fromkeys(h.peer_id for h in hops):
            span = self.online.get(peer)
            if span is not None and span.load != self._load(peer):
                self.online[peer] = replace(span, load=self._load(peer))
                changes.append(ServerUpdated(self.online[peer]))
        if changes:
            self.planner.update(changes)

    def _end(self, ok: bool) -> None:
        if ok:
            self.result.sessions_ok += 1
        else:
            self.result.sessions_failed += 1
        self._ended.append((self.env.now, ok))

    # ----- measurements
    def _sampler(self) -> Iterator[simpy.Event]:
        env, config = self.env, self.config
        while True:
            yield env.timeout(config.sample_s)
            result = self.result
            result.times.append(env.now)
            result.throughput.append(swarm_throughput(config.num_blocks, self.online.values()))
            result.servers_online.append(len(self.online))
            ended = [ok for at, ok in self._ended if at > env.now - config.sample_s]
            result.success.append(sum(ended) / len(ended) if ended else math.nan)


def run_churn(config: ChurnConfig | None = None, seed: int = 0) -> list[ChurnResult]:
    """The same churn with rebalancing off, then on."""
    config = config or ChurnConfig()
    return [ChurnSim(config, seed, rebalancing).run() for rebalancing in (False, True)]


def report(results: list[ChurnResult], out_dir: Path) -> tuple[str, Path]:
    rows = []
    for r in results:
        served = list(r.throughput)
        rows.append(
            [
                "on" if r.rebalancing else "off",
                sum(served) / len(served) if served else 0.0,
                sorted(served)[len(served) // 2] if served else 0.0,
                sum(1 for t in served if t == 0) / len(served) if served else 0.0,
                r.sessions_ok + r.sessions_failed,
                r.success_rate,
                r.recoveries,
                r.moves,
            ]
        )
    text = table(
        [
            "rebalancing",
            "throughput mean",
            "median",
            "time with a gap",
            "sessions",
            "succeeded",
            "recoveries",
            "moves",
        ],
        rows,
    )
    figure, axes = new_figure(2, 1, size=(9.0, 6.5))
    for r in results:
        label = f"rebalancing {'on' if r.rebalancing else 'off'}"
        hours = [t / 3600 for t in r.times]
        axes[0][0].plot(hours, r.throughput, label=label)
        axes[1][0].plot(hours, r.success, label=label, marker=".", linestyle="none")
    axes[0][0].set_ylabel("swarm throughput (tokens/s)")
    axes[0][0].legend(fontsize=8)
    axes[0][0].set_title("Churn: servers joining, leaving and crashing")
    axes[1][0].set_ylabel("sessions succeeded")
    axes[1][0].set_xlabel("hours")
    axes[1][0].set_ylim(-0.05, 1.05)
    axes[1][0].legend(fontsize=8)
    return text, save(figure, out_dir, "churn.png")
