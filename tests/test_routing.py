"""Routing: reference search vs brute force, errors, throughput spreading, bans, repairs."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from routing import (
    BanList,
    CostModel,
    Hop,
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
from routing.synthetic import random_swarm


def all_routes(servers: list[ServerSpan], start: int, end: int):
    """Every route over [start, end), by brute force."""
    if start == end:
        yield ()
        return
    for s in servers:
        if s.start <= start < s.end:
            for b in range(start + 1, min(s.end, end) + 1):
                for rest in all_routes(servers, b, end):
                    yield (Hop(s.peer_id, start, b), *rest)


def test_reference_equals_brute_force() -> None:
    checked = 0
    for seed in range(200):
        rng = random.Random(seed)
        n_blocks = rng.randint(1, 5)
        servers, client = random_swarm(rng, n_blocks, rng.randint(1, 4))
        cm = CostModel(client_rtts=client, tokens=rng.choice([1, 300]))
        mode = rng.choice(["latency", "throughput"])
        prev = rng.choice([None, servers[0].peer_id])
        start = rng.randint(0, n_blocks)
        costs = [
            route_cost(Route(h, 0.0), servers, cm, mode=mode, prev_peer=prev)
            for h in all_routes(servers, start, n_blocks)
        ]
        if not costs:
            with pytest.raises(NoRouteError):
                dijkstra_route(servers, cm, start=start, end=n_blocks, mode=mode, prev_peer=prev)
            continue
        got = dijkstra_route(servers, cm, start=start, end=n_blocks, mode=mode, prev_peer=prev)
        assert got.cost == pytest.approx(min(costs), rel=1e-12)
        checked += 1
    assert checked > 100


def test_cost_model_figures() -> None:
    """One hand-computed route: the documented formula, term by term."""
    a = ServerSpan("a", 0, 4, throughput=10.0, bandwidth=1e6, load=0.5, next_rtts={"b": 0.04})
    b = ServerSpan("b", 2, 6, throughput=20.0, forward_throughput=100.0, bandwidth=2e6)
    cm = CostModel(client_rtts={"a": 0.02, "b": 0.3}, tokens=2, bytes_per_token=1000)
    route = Route((Hop("a", 0, 3), Hop("b", 3, 6)), 0.0)
    latency = (
        0.02 / 2 + 2000 / 1e6 + 1.0 * 0.5 + 3 * 2 / 10.0  # client -> a, a's hop
        + 0.04 / 2 + 2000 / 2e6 + 3 * 2 / 20.0  # a -> b, b's hop
        + 0.3 / 2 + 2000 / 2e6  # b -> client
    )  # fmt: skip
    assert route_cost(route, [a, b], cm) == pytest.approx(latency)
    forward = latency - 3 * 2 / 20.0 + 3 * 2 / 100.0
    assert route_cost(route, [a, b], cm, mode="throughput") == pytest.approx(forward)
    best = RoutePlanner([a, b], cm, end=6).plan()
    assert best.cost == pytest.approx(dijkstra_route([a, b], cm, end=6).cost)
    assert best.cost <= latency + 1e-12


def test_no_route_names_the_first_gap() -> None:
    servers = [
        ServerSpan("a", 0, 3, 10.0),
        ServerSpan("b", 5, 8, 10.0),
        ServerSpan("c", 9, 10, 1.0),
    ]
    cm = CostModel()
    planner = RoutePlanner(servers, cm, end=10)
    with pytest.raises(NoRouteError) as err:
        planner.plan()
    assert err.value.gap == (3, 5)
    assert str(err.value) == "blocks 3..5 are not served by anyone"
    with pytest.raises(NoRouteError, match=r"^blocks 8\.\.9 are not served by anyone$"):
        planner.route_from(5, "a")
    with pytest.raises(NoRouteError) as ref:
        dijkstra_route(servers, cm, end=10)
    assert ref.value.gap == (3, 5)
    planner.update([ServerAdded(ServerSpan("d", 2, 10, 5.0))])
    assert planner.plan().hops[-1].end == 10
    planner.update([ServerRemoved("a")])
    with pytest.raises(NoRouteError, match=r"^blocks 0\.\.2 are not served by anyone$"):
        planner.plan()
    empty = RoutePlanner([], cm, end=4)
    with pytest.raises(NoRouteError) as err:
        empty.plan()
    assert err.value.gap == (0, 4)


def test_route_from_may_reuse_the_previous_server() -> None:
    """The activations sit at p and only p holds the rest: a new hop on p, no network."""
    a = ServerSpan("a", 0, 6, 10.0)
    b = ServerSpan("b", 0, 3, 50.0)
    cm = CostModel(client_rtts={"a": 0.2, "b": 0.2})
    planner = RoutePlanner([a, b], cm, end=6)
    assert planner.plan().peers == ("b", "a")
    got = planner.route_from(3, "a")
    assert got.hops == (Hop("a", 3, 6),)
    assert got.cost == pytest.approx(cm.hop_overhead(a) + 3 * 0.1 + 0.2 / 2 + cm.transfer_time(a))


def test_throughput_mode_spreads_clients_over_equal_servers() -> None:
    servers = [ServerSpan(f"s{i}", 0, 8, 10.0, forward_throughput=100.0) for i in range(4)]
    cm = CostModel(client_rtts={s.peer_id: 0.05 for s in servers}, tokens=256)
    rng = random.Random(7)
    picks = Counter()
    for _ in range(400):  # each client plans on its own, sharing nothing but the rng
        route = RoutePlanner(servers, cm, end=8, mode="throughput", rng=rng).plan()
        assert route.cost == pytest.approx(
            dijkstra_route(servers, cm, end=8, mode="throughput").cost
        )
        assert len(route.hops) == 1
        picks[route.hops[0].peer_id] += 1
    assert set(picks) == {"s0", "s1", "s2", "s3"}
    assert min(picks.values()) >= 60, picks  # 100 expected each
    one = RoutePlanner(servers, cm, end=8, mode="throughput", rng=random.Random(1))
    assert len({one.plan().peers for _ in range(50)}) == 4  # repeated plans spread too
    latency = {RoutePlanner(servers, cm, end=8).plan().peers for _ in range(20)}
    assert latency == {("s0",)}  # latency mode breaks ties by peer id, deterministically


def test_throughput_mode_tolerance_keeps_cost_bound() -> None:
    rng = random.Random(3)
    for seed in range(60):
        servers, client = random_swarm(random.Random(seed), 8, 12, measured=2)
        cm = CostModel(client_rtts=client, tokens=128)
        try:
            best = dijkstra_route(servers, cm, end=8, mode="throughput")
        except NoRouteError:
            continue
        planner = RoutePlanner(servers, cm, end=8, mode="throughput", rng=rng, tie_tolerance=0.1)
        for _ in range(5):
            got = planner.plan()
            assert best.cost - 1e-12 <= got.cost <= best.cost * 1.1 + 1e-12
            assert route_cost(got, servers, cm, mode="throughput") == pytest.approx(got.cost)


def test_bans_back_off_exponentially_and_expire() -> None:
    bans = BanList(base=1.0, factor=2.0, max_backoff=10.0)
    assert bans.ban("x", now=100.0) == 1.0
    assert bans.is_banned("x", 100.5) and not bans.is_banned("x", 101.0)
    assert bans.ban("x", now=101.0) == 2.0
    assert bans.ban("x", now=103.0) == 4.0
    assert bans.ban("x", now=107.0) == 8.0
    assert bans.ban("x", now=115.0) == 10.0  # capped
    assert bans.banned(116.0) == {"x"} and bans.banned(125.0) == set()
    bans.clear("x")
    assert not bans.is_banned("x", 116.0)
    assert bans.ban("x", now=200.0) == 1.0  # a success resets the backoff
    assert bans.ban("y", now=200.0) == 1.0 and bans.banned(200.5) == {"x", "y"}
    huge = BanList(base=1.0, factor=1e6, max_backoff=60.0)
    assert [huge.ban("z", float(t)) for t in range(5)] == [1.0, 60.0, 60.0, 60.0, 60.0]
    with pytest.raises(ValueError):
        BanList(base=0.0)


def test_planner_skips_banned_peers_until_the_ban_expires() -> None:
    fast = ServerSpan("fast", 0, 4, 100.0)
    slow = ServerSpan("slow", 0, 4, 10.0)
    planner = RoutePlanner([fast, slow], CostModel(), end=4)
    bans = BanList(base=5.0)
    assert planner.plan().peers == ("fast",)
    bans.ban("fast", now=0.0)
    planner.set_banned(bans.banned(1.0))
    assert planner.plan().peers == ("slow",)
    planner.update([ServerUpdated(ServerSpan("fast", 0, 4, 200.0))])  # still banned
    assert planner.plan().peers == ("slow",)
    planner.set_banned(bans.banned(6.0))
    assert planner.plan().peers == ("fast",)
    assert planner.plan().cost == pytest.approx(
        dijkstra_route([ServerSpan("fast", 0, 4, 200.0), slow], CostModel(), end=4).cost
    )
    planner.set_banned({"fast", "slow"})
    with pytest.raises(NoRouteError, match="blocks 0..4"):
        planner.plan()


def test_rtt_changes_reroute() -> None:
    a = ServerSpan("a", 0, 4, 10.0)
    b = ServerSpan("b", 0, 4, 10.0)
    cm = CostModel(client_rtts={"a": 0.01, "b": 0.05})
    planner = RoutePlanner([a, b], cm, end=4)
    assert planner.plan().peers == ("a",)
    planner.update([RttChanged(None, "a", 0.5)])  # a's link re-measured: both ways now
    assert planner.plan().peers == ("b",)
    planner.update([RttChanged("a", None, 0.0)])  # a -> client only is fast
    assert planner.plan().cost == pytest.approx(
        dijkstra_route([a, b], cm, end=4, rtt_overrides={(None, "a"): 0.5, ("a", None): 0.0}).cost
    )


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError):
        ServerSpan("a", 3, 3, 1.0)
    with pytest.raises(ValueError):
        ServerSpan("a", 0, 3, 0.0)
    with pytest.raises(ValueError):
        ServerSpan("a", 0, 3, 1.0, load=1.5)
    with pytest.raises(ValueError):
        ServerSpan("a", 0, 3, 1.0, next_rtts={"b": float("nan")})
    with pytest.raises(ValueError):
        RttChanged(None, None, 0.1)
    with pytest.raises(ValueError):
        RttChanged("a", "b", -1.0)
    with pytest.raises(ValueError):
        RoutePlanner([], CostModel(), end=4, mode="fastest")
    planner = RoutePlanner([ServerSpan("a", 0, 4, 1.0)], CostModel(), end=4)
    with pytest.raises(ValueError):
        planner.route_from(5)
    with pytest.raises(TypeError):
        planner.update(["not a change"])
    assert planner.route_from(4, "a").hops == ()  # nothing left to compute: just go home


def test_repair_expands_fewer_vertices_than_a_fresh_search() -> None:
    """Fail the middle hop of a planned route, repair from there, compare with a new search."""
    ratios = []
    for seed in range(12):
        rng = random.Random(seed)
        servers, client = random_swarm(rng, 40, 120, max_span=12, measured=4)
        servers.append(ServerSpan("backbone", 0, 40, 2.0))  # keeps every swarm routable
        cm = CostModel(client_rtts=client)
        planner = RoutePlanner(servers, cm, end=40)
        route = planner.plan()
        k = len(route.hops) // 2
        failed, prev = route.hops[k], (route.hops[k - 1].peer_id if k else None)
        before = planner.expansions
        planner.update([ServerRemoved(failed.peer_id)])
        repaired = planner.route_from(failed.start, prev)
        rest = [s for s in servers if s.peer_id != failed.peer_id]
        fresh = RoutePlanner(rest, cm, end=40)
        again = fresh.route_from(failed.start, prev)
        assert repaired.cost == pytest.approx(again.cost, rel=1e-9)
        ref = dijkstra_route(rest, cm, start=failed.start, end=40, prev_peer=prev)
        assert repaired.cost == pytest.approx(ref.cost, rel=1e-9)
        assert failed.peer_id not in repaired.peers
        ratios.append((planner.expansions - before) / fresh.expansions)
    mean = sum(ratios) / len(ratios)
    print(f"repair/fresh expansions after a failure on the route: mean {mean:.3f}")
    assert mean < 0.5


def test_planner_forgets_old_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    import routing.dstar

    monkeypatch.setattr(routing.dstar, "MAX_SOURCES", 3)
    servers, client = random_swarm(random.Random(5), 10, 15, measured=3)
    servers.append(ServerSpan("backbone", 0, 10, 1.0))
    cm = CostModel(client_rtts=client)
    planner = RoutePlanner(servers, cm, end=10)
    rng = random.Random(1)
    for _ in range(30):
        block, prev = rng.randint(0, 10), rng.choice([None, *(s.peer_id for s in servers)])
        got = planner.route_from(block, prev)
        want = dijkstra_route(servers, cm, start=block, end=10, prev_peer=prev)
        assert got.cost == pytest.approx(want.cost, rel=1e-9)
        assert sum(len(b) for b in planner.graph.sources.values()) <= 3
        assert sum(1 for v in planner.succ if v[0] == "S") <= 3
        if rng.random() < 0.3:
            planner.update([ServerUpdated(ServerSpan(rng.choice(servers).peer_id, 0, 10, 3.0))])
            servers = planner.servers


def test_sweeping_changes_restart_the_search() -> None:
    """Every server's load moved: cheaper to search afresh than to repair, same answer."""
    servers, client = random_swarm(random.Random(2), 20, 60, max_span=8, measured=3)
    servers.append(ServerSpan("backbone", 0, 20, 1.0))
    cm = CostModel(client_rtts=client)
    planner = RoutePlanner(servers, cm, end=20)
    planner.plan()
    moved = [
        ServerSpan(s.peer_id, s.start, s.end, s.throughput, load=(i % 5) / 4, next_rtts=s.next_rtts)
        for i, s in enumerate(servers)
    ]
    before = planner.expansions
    planner.update([ServerUpdated(s) for s in moved])
    got = planner.plan()
    fresh = RoutePlanner(moved, cm, end=20)
    assert got.cost == pytest.approx(fresh.plan().cost, rel=1e-9)
    assert planner.expansions - before <= 1.2 * fresh.expansions  # a repair costs ~2x here


def test_strikes_decay_after_the_ban_runs_out() -> None:
    bans = BanList(base=1.0, factor=2.0, max_backoff=100.0, decay=10.0)
    assert bans.ban("p", 0.0) == 1.0
    assert bans.ban("p", 2.0) == 2.0  # right after: a second strike
    assert bans.strikes("p", 4.0) == 2
    assert bans.strikes("p", 24.5) == 0  # two decay periods after the ban ran out at 4
    assert bans.ban("p", 24.5) == 1.0  # treated like a first failure again


def test_a_ban_lasts_at_least_until_the_given_time() -> None:
    bans = BanList(base=1.0)
    assert bans.ban("p", 10.0, until=53.0) == 43.0
    assert bans.is_banned("p", 52.9) and not bans.is_banned("p", 53.0)
    assert bans.ban("q", 10.0, until=5.0) == 1.0  # an expiry already past changes nothing
