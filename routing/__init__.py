"""Routing: which servers a client chains together for a span of blocks.

A client covers blocks [start, end) with hops, each a server computing a contiguous
sub-interval of the blocks it holds. The cost of a route (``routing.cost``) is

    sum of rtt/2 over links (client -> first, server -> server, last -> client)
    + per hop: input transfer (tokens * bytes_per_token / bandwidth) + load_penalty * load
    + per block: tokens / throughput (forward_throughput in "throughput" mode)
    + the output's transfer home from the last server,

unmeasured links costing ``default_rtt``. ``RoutePlanner`` runs D* Lite (zero heuristic)
backward from the client over states (boundary, server that computed up to it), laid out by
``routing.graph`` so the edge count stays linear in the swarm (a shared hub per boundary
for unmeasured links, made exact lazily). ``update`` re-queues only the vertices whose
edges changed and ``route_from`` repairs the plan from any (block, previous peer).
``dijkstra_route`` is the from-scratch reference over the literal hop graph. ``BanList``
backs failed peers off exponentially. README.md beside this file states it all in full.

Block intervals are half-open everywhere: ``Hop(p, 3, 5)`` and ``NoRouteError.gap == (3, 5)``
("blocks 3..5 are not served by anyone") both mean blocks 3 and 4.
"""

from routing.bans import BanList
from routing.cost import MODES, CostModel, route_cost
from routing.dstar import RoutePlanner
from routing.reference import dijkstra_route
from routing.types import (
    Change,
    Hop,
    NoRouteError,
    Route,
    RttChanged,
    ServerAdded,
    ServerRemoved,
    ServerSpan,
    ServerUpdated,
)

__all__ = [
    "MODES",
    "BanList",
    "Change",
    "CostModel",
    "Hop",
    "NoRouteError",
    "Route",
    "RoutePlanner",
    "RttChanged",
    "ServerAdded",
    "ServerRemoved",
    "ServerSpan",
    "ServerUpdated",
    "dijkstra_route",
    "route_cost",
]
