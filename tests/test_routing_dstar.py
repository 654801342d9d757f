"""D* Lite against the from-scratch reference on many random swarms, before and after changes."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from routing import (
    CostModel,
    NoRouteError,
    Route,
    RoutePlanner,
    RttChanged,
    ServerAdded,
    ServerRemoved,
    ServerSpan,
    ServerUpdated,
    dijkstra_route,
    route_cost,
)
from routing.synthetic import random_rtt, random_server, random_swarm


class Truth:
    """What the planner should believe, kept with the planner's documented semantics."""

    def __init__(self, servers: list[ServerSpan], cm: CostModel) -> None:
        self.records = {s.peer_id: s for s in servers}
        self.cm = cm
        self.overrides: dict[tuple[str | None, str | None], float] = {}
        self.banned: set[str] = set()

    def live(self) -> list[ServerSpan]:
        return [s for p, s in self.records.items() if p not in self.banned]

    def _forget(self, peer: str) -> None:
        self.overrides = {k: v for k, v in self.overrides.items() if k[0] != peer}

    def apply(self, ch) -> None:
        if isinstance(ch, RttChanged):
            self.overrides[(ch.src, ch.dst)] = ch.rtt
        elif isinstance(ch, ServerRemoved):
            if ch.peer_id in self.records and ch.peer_id not in self.banned:
                self._forget(ch.peer_id)
            self.records.pop(ch.peer_id, None)
        else:
            new = ch.server
            old = self.records.get(new.peer_id)
            if new.peer_id not in self.banned and (old is None or old.next_rtts != new.next_rtts):
                self._forget(new.peer_id)
            self.records[new.peer_id] = new

    def ban(self, peers: set[str]) -> None:
        for p in peers ^ self.banned:
            if p in self.records:
                self._forget(p)
        self.banned = set(peers)


def random_changes(rng: random.Random, truth: Truth, n_blocks: int, fresh: list[int]) -> list:
    changes = []
    peers = list(truth.records)
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.15 or not peers:
            fresh[0] += 1
            pid = f"n{fresh[0]}" if rng.random() < 0.7 or not peers else rng.choice(peers)
            changes.append(
                ServerAdded(random_server(rng, pid, n_blocks, peers=peers + [pid], measured=2))
            )
        elif roll < 0.3:
            changes.append(ServerRemoved(rng.choice(peers + ["ghost"])))
        elif roll < 0.55:
            s = truth.records[rng.choice(peers)]
            s = replace(
                s,
                load=rng.choice([0.0, 0.5, 1.0]),
                throughput=float(rng.choice([10, 20, 40])),
                bandwidth=rng.choice([10e6, 100e6]),
            )
            changes.append(ServerUpdated(s))
        elif roll < 0.65:
            s = truth.records[rng.choice(peers)]
            a = rng.randint(0, n_blocks - 1)
            changes.append(ServerUpdated(replace(s, start=a, end=rng.randint(a + 1, n_blocks))))
        elif roll < 0.75:
            s = truth.records[rng.choice(peers)]
            others = rng.sample(peers, min(2, len(peers)))
            rtts = {p: random_rtt(rng) for p in others if p != s.peer_id}
            changes.append(ServerUpdated(replace(s, next_rtts=rtts)))
        else:
            src = rng.choice(peers + [None])
            dst = rng.choice([p for p in peers + [None] if p != src or p is None])
            if src is None and dst is None:
                dst = rng.choice(peers)
            changes.append(RttChanged(src, dst, random_rtt(rng)))
    for ch in changes:
        truth.apply(ch)
    return changes


def assert_edges_fresh(planner: RoutePlanner) -> None:
    """Every maintained out-edge list equals one rebuilt from the current state."""
    graph = planner.graph
    vertices = set(graph.all_vertices())
    for v in vertices:
        assert planner.succ.get(v, {}) == graph.out_edges(v), v
    assert set(planner.succ) <= vertices


def check_route(planner: RoutePlanner, truth: Truth, block: int, prev: str | None) -> Route | None:
    live = truth.live()
    kw = dict(end=planner.end, mode=planner.mode, prev_peer=prev, rtt_overrides=truth.overrides)
    try:
        want = dijkstra_route(live, truth.cm, start=block, **kw)
    except NoRouteError as err:
        with pytest.raises(NoRouteError) as got:
            planner.route_from(block, prev)
        assert got.value.gap == err.gap
        assert str(got.value) == f"blocks {err.gap[0]}..{err.gap[1]} are not served by anyone"
        return None
    got = planner.route_from(block, prev)
    assert got.cost == pytest.approx(want.cost, rel=1e-8, abs=1e-12)
    at = block
    spans = {s.peer_id: s for s in live}
    for hop in got.hops:
        assert hop.start == at and hop.start < hop.end
        assert spans[hop.peer_id].start <= hop.start and hop.end <= spans[hop.peer_id].end
        at = hop.end
    assert at == planner.end
    again = route_cost(got, live, truth.cm, **{k: kw[k] for k in ("mode", "prev_peer")},
                       rtt_overrides=truth.overrides)  # fmt: skip
    assert again == pytest.approx(got.cost, rel=1e-9, abs=1e-12)
    return got


def random_position(rng: random.Random, planner: RoutePlanner, truth: Truth):
    block = rng.randint(planner.start, planner.end)
    prev = rng.choice([None, None, "ghost", *truth.records])
    return block, prev


def test_dstar_matches_dijkstra_on_random_swarms(monkeypatch: pytest.MonkeyPatch) -> None:
    import routing.dstar

    monkeypatch.setattr(routing.dstar, "RESET_FRACTION", float("inf"))  # always repair
    repair_over_fresh = []
    for seed in range(1000):
        rng = random.Random(seed)
        n_blocks = rng.randint(1, 10)
        servers, client = random_swarm(rng, n_blocks, rng.randint(1, 9), measured=3)
        cm = CostModel(
            client_rtts=client,
            tokens=rng.choice([1, 1, 512]),
            load_penalty=rng.choice([0.0, 1.0]),
            default_rtt=rng.choice([0.1, 0.1, 0.0]),
        )
        start = rng.randint(0, n_blocks - 1) if rng.random() < 0.3 else 0
        end = rng.randint(start + 1, n_blocks) if rng.random() < 0.3 else n_blocks
        mode = rng.choice(["latency", "throughput"])
        planner = RoutePlanner(
            servers, cm, start=start, end=end, mode=mode, rng=random.Random(seed)
        )
        truth = Truth(servers, cm)
        check_route(planner, truth, start, None)
        fresh_ids = [0]
        for _ in range(3):
            if rng.random() < 0.2:
                banned = set(rng.sample(list(truth.records), min(2, len(truth.records))))
                banned = {p for p in banned if rng.random() < 0.7}
                planner.set_banned(banned)
                truth.ban(banned)
            else:
                planner.update(random_changes(rng, truth, n_blocks, fresh_ids))
            assert_edges_fresh(planner)
            block, prev = random_position(rng, planner, truth)
            before = planner.expansions
            if check_route(planner, truth, block, prev) is not None:
                repaired = planner.expansions - before
                scratch = RoutePlanner(truth.live(), cm, start=start, end=end, mode=mode)
                scratch.update([RttChanged(s, d, r) for (s, d), r in truth.overrides.items()])
                scratch.route_from(block, prev)
                repair_over_fresh.append(repaired / max(scratch.expansions, 1))
            check_route(planner, truth, *random_position(rng, planner, truth))
    mean = sum(repair_over_fresh) / len(repair_over_fresh)
    print(f"small swarms: repair/fresh expansions mean {mean:.3f} over {len(repair_over_fresh)}")
    assert mean < 1.0


def test_dstar_matches_dijkstra_on_crowded_boundaries() -> None:
    """Dozens of servers per boundary: several hub tree levels, many dear links to avoid.

    Runs with the planner's default reset threshold, so both repairs and resets happen.
    """
    tightened = 0
    for seed in range(40):
        rng = random.Random(10_000 + seed)
        n_blocks = rng.randint(2, 6)
        servers, client = random_swarm(rng, n_blocks, rng.randint(20, 45), measured=6)
        cm = CostModel(client_rtts=client, tokens=rng.choice([1, 256]))
        mode = rng.choice(["latency", "throughput"])
        planner = RoutePlanner(servers, cm, end=n_blocks, mode=mode, rng=random.Random(seed))
        truth = Truth(servers, cm)
        check_route(planner, truth, 0, None)
        fresh_ids = [0]
        for _ in range(8):
            planner.update(random_changes(rng, truth, n_blocks, fresh_ids))
            assert_edges_fresh(planner)
            check_route(planner, truth, *random_position(rng, planner, truth))
            check_route(planner, truth, *random_position(rng, planner, truth))
        tightened += len(planner.graph.tight)
    assert tightened > 0  # the lazy tightening was needed and exercised
