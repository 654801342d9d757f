"""Banning failed peers with exponential backoff; time is always passed in."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class _Ban:
    strikes: int
    until: float


class BanList:
    """Peers that failed recently, each banned for base * factor**(strikes - 1) seconds.

    A ban that ran out still remembers its strikes, so a peer that fails again right after
    coming back is banned for longer; ``clear`` (after a success) forgets it.
    """

    def __init__(self, base: float = 1.0, factor: float = 2.0, max_backoff: float = 300.0):
        if base <= 0 or factor < 1 or max_backoff < base:
            raise ValueError("need base > 0, factor >= 1 and max_backoff >= base")
        self.base, self.factor, self.max_backoff = base, factor, max_backoff
        self._bans: dict[str, _Ban] = {}

    def ban(self, peer_id: str, now: float) -> float:
        """Ban (again) from ``now``; returns the backoff in seconds."""
        entry = self._bans.get(peer_id)
        strikes = 1 if entry is None else entry.strikes + 1
        backoff = self.max_backoff
        if (strikes - 1) * math.log(self.factor) < math.log(self.max_backoff / self.base):
            backoff = min(self.base * self.factor ** (strikes - 1), self.max_backoff)
        self._bans[peer_id] = _Ban(strikes, now + backoff)
        return backoff

    def is_banned(self, peer_id: str, now: float) -> bool:
        entry = self._bans.get(peer_id)
        return entry is not None and now < entry.until

    def clear(self, peer_id: str) -> None:
        self._bans.pop(peer_id, None)

    def banned(self, now: float) -> set[str]:
        return {p for p, e in self._bans.items() if now < e.until}
