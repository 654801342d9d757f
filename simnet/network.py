"""Who is how far from whom: a seeded, symmetric round-trip-time matrix and per-peer bandwidth.

`None` stands for the client, as in routing's RttChanged.
"""

from __future__ import annotations

import random
from collections.abc import Iterable


class Network:
    """Round trips drawn uniformly from `rtt_range` per pair (fixed by the seed)."""

    def __init__(
        self,
        rng: random.Random,
        rtt_range: tuple[float, float] = (0.08, 0.12),
        bandwidth: float = 12.5e6,
    ) -> None:
        self._rng = rng
        self.rtt_range = rtt_range
        self.default_bandwidth = bandwidth
        self._rtt: dict[tuple[str | None, str | None], float] = {}
        self.bandwidths: dict[str | None, float] = {}

    def add_peers(self, peers: Iterable[str | None], bandwidth: float | None = None) -> None:
        for peer in peers:
            self.bandwidths[peer] = bandwidth or self.default_bandwidth

    def rtt(self, a: str | None, b: str | None) -> float:
        """Round trip between a and b (0 from a peer to itself), drawn once per pair."""
        if a == b:
            return 0.0
        key = (a, b) if str(a) < str(b) else (b, a)
        if key not in self._rtt:
            self._rtt[key] = self._rng.uniform(*self.rtt_range)
        return self._rtt[key]

    def bandwidth(self, a: str | None, b: str | None) -> float:
        return min(
            self.bandwidths.get(a, self.default_bandwidth),
            self.bandwidths.get(b, self.default_bandwidth),
        )

    def send_time(self, a: str | None, b: str | None, num_bytes: float) -> float:
        """One message: half a round trip plus the bytes over the slower end's link."""
        if a == b:
            return 0.0
        return self.rtt(a, b) / 2 + num_bytes / self.bandwidth(a, b)
