"""Routing: which servers a client chains together for a span of blocks.

A client covers blocks [start, end) with hops, each a server computing a contiguous
sub-interval of the blocks it holds. The cost of a route (``routing.cost``) adds half the
round trip of every link (client -> first, server -> server, last -> client), the input
transfer and a load penalty per hop, and per-block compute from the server's throughput.

``RoutePlanner`` runs D* Lite backward from the client over states (boundary, previous
server) laid out by ``routing.graph``; ``update`` re-queues only the vertices whose edges
changed and ``route_from`` repairs the plan from any position. ``dijkstra_route`` is the
from-scratch reference. ``BanList`` backs failed peers off exponentially. README.md beside
this file states the algorithm and the cost model in full.

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
