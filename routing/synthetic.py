"""Random swarms for tests, benchmarks and simulations (seeded through the given rng).

Figures are kept on coarse grids on purpose, so that ties between routes, and RTTs equal
to the default, turn up often enough to exercise the tie-breaking and hub code.
"""

from __future__ import annotations

import random

from routing.types import ServerSpan


def random_server(
    rng: random.Random,
    peer_id: str,
    n_blocks: int,
    *,
    peers: list[str],
    min_span: int = 1,
    max_span: int | None = None,
    measured: int = 3,
    default_rtt: float = 0.1,
) -> ServerSpan:
    """One server holding a random interval, with RTTs measured to a few of ``peers``."""
    length = rng.randint(min(min_span, n_blocks), min(max_span or n_blocks, n_blocks))
    start = rng.randint(0, n_blocks - length)
    others = [p for p in peers if p != peer_id]
    rtts = {p: random_rtt(rng, default_rtt) for p in rng.sample(others, min(measured, len(others)))}
    return ServerSpan(
        peer_id,
        start,
        start + length,
        throughput=float(rng.choice([10, 20, 20, 40, 80])),
        forward_throughput=rng.choice([None, 100.0, 400.0, 1000.0]),
        bandwidth=rng.choice([10e6, 100e6, 100e6, 1e9]),
        load=rng.choice([0.0, 0.0, 0.0, 0.25, 0.5, 1.0]),
        next_rtts=rtts,
    )


def random_rtt(rng: random.Random, default_rtt: float = 0.1) -> float:
    """An RTT below, at or above the default, on a 5 ms grid."""
    if rng.random() < 0.2:
        return default_rtt
    return round(rng.uniform(0.005, 0.3) / 0.005) * 0.005


def random_swarm(
    rng: random.Random,
    n_blocks: int,
    n_servers: int,
    *,
    min_span: int = 1,
    max_span: int | None = None,
    measured: int = 3,
    client_measured: float = 0.7,
    default_rtt: float = 0.1,
) -> tuple[list[ServerSpan], dict[str, float]]:
    """Servers over ``n_blocks`` blocks and the RTTs the client measured to some of them."""
    peers = [f"p{i}" for i in range(n_servers)]
    kw = dict(min_span=min_span, max_span=max_span, measured=measured, default_rtt=default_rtt)
    servers = [random_server(rng, p, n_blocks, peers=peers, **kw) for p in peers]
    client = {p: random_rtt(rng, default_rtt) for p in peers if rng.random() < client_measured}
    return servers, client
