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
    coming back is banned for longer; the strikes decay, one per ``decay`` seconds after the
    ban ran out (a peer that failed once an hour ago is not punished like a flapping one),
    and ``clear`` (after a success) forgets them at once.
    """

    def __init__(
        self,
        base: float = 1.0,
        factor: float = 2.0,
        max_backoff: float = 300.0,
        decay: float = 120.0,
    ):
        if base <= 0 or factor < 1 or max_backoff < base or decay <= 0:
            raise ValueError("need base > 0, factor >= 1, max_backoff >= base and decay > 0")
        self.base, self.factor, self.max_backoff = base, factor, max_backoff
        self.decay = decay
        self._bans: dict[str, _Ban] = {}

    def strikes(self, peer_id: str, now: float) -> int:
        """Strikes still counted against a peer at ``now`` (after decay)."""
        entry = self._bans.get(peer_id)
        if entry is None:
            return 0
        if now <= entry.until:
            return entry.strikes
        return max(0, entry.strikes - int((now - entry.until) // self.decay))

    def ban(self, peer_id: str, now: float, *, until: float | None = None) -> float:
        """Ban (again) from ``now``, at least up to ``until`` when given (say the expiry of
        the record that made us pick it: a dead server's record goes on listing it till
        then); returns the backoff in seconds."""
        strikes = self.strikes(peer_id, now) + 1
        backoff = self.max_backoff
        if (strikes - 1) * math.log(self.factor) < math.log(self.max_backoff / self.base):
            backoff = min(self.base * self.factor ** (strikes - 1), self.max_backoff)
        if until is not None and math.isfinite(until):
            backoff = max(backoff, until - now)
        self._bans[peer_id] = _Ban(strikes, now + backoff)
        return backoff

    def is_banned(self, peer_id: str, now: float) -> bool:
        entry = self._bans.get(peer_id)
        return entry is not None and now < entry.until

    def clear(self, peer_id: str) -> None:
        self._bans.pop(peer_id, None)

    def banned(self, now: float) -> set[str]:
        return {p for p, e in self._bans.items() if now < e.until}
