"""Scenario 4: servers started at the same moment, each choosing from a stale listing.

Every server lists the swarm (it sees records announced at least `visible_s` before the
listing began; a listing takes `list_s`), takes `balancing.choose_blocks`, and then either
loads at once (`settle=False`, as servers did before issue 9) or first settles its claim as
`peerd serve` does: announce it JOINING, wait `settle_wait_s` (random), list again and take
`balancing.join_place` until the claim holds twice in a row (at most `settle_rounds`). Loading takes `load_s`; online servers check
`balancing.should_move` every `rebalance_period_s` (randomly stretched 0.5-1.5x) and, when
`balancing.first_mover` names them (or after `DEFAULT_MAX_DEFERRALS` deferrals), reload.

Measured: seconds from the start until every block is served by an ONLINE server.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import simpy

from balancing import (
    ClaimCheck,
    SwarmEntry,
    choose_blocks,
    first_mover,
    join_place,
    should_move,
    waits_for,
)


@dataclass(frozen=True)
class JoinConfig:
    num_blocks: int = 6
    servers: int = 3
    span: int = 2  # blocks per server
    start_jitter_s: float = 0.2  # servers start within this much of each other
    visible_s: float = 0.5  # an announced record shows in others' listings after this
    list_s: float = 0.3  # one DHT listing
    load_s: float = 0.5
    settle: bool = True
    settle_rounds: int = 6
    settle_wait_s: tuple[float, float] = (0.5, 1.5)
    rebalance_period_s: float = 300.0
    horizon_s: float = 3600.0


@dataclass
class _Record:
    entry: SwarmEntry
    online: bool
    visible_at: float


class JoinSim:
    """One start of `config.servers` servers; `covered_at` once all blocks are online."""

    def __init__(self, config: JoinConfig, seed: int) -> None:
        self.config, self.rng = config, random.Random(seed)
        self.env = simpy.Environment()
        self.board: dict[str, list[_Record]] = {}  # per peer, in the order announced
        self.covered_at: float | None = None
        self.moves = 0

    def run(self) -> float | None:
        for index in range(self.config.servers):
            self.env.process(self._server(f"peer{index:02d}"))
        watch = self.env.process(self._watch())
        self.env.run(until=self.env.any_of([watch, self.env.timeout(self.config.horizon_s)]))
        return self.covered_at

    # ----- what a server does ----------------------------------------------------------
    def _server(self, me: str) -> Iterator[simpy.Event]:
        cfg = self.config
        yield self.env.timeout(self.rng.uniform(0.0, cfg.start_jitter_s))
        others, _ = yield from self._listing(me)
        start, end = choose_blocks(cfg.num_blocks, others, cfg.span, 1.0)
        if cfg.settle:
            start, end = yield from self._settle(me, (start, end))
        yield from self._load(me, (start, end))
        deferrals = 0
        while True:
            yield self.env.timeout(cfg.rebalance_period_s * self.rng.uniform(0.5, 1.5))
            others, _ = yield from self._listing(me)
            mine = SwarmEntry(me, start, end, 1.0)
            move, new = should_move(cfg.num_blocks, [*others, mine], mine)
            if not move:
                deferrals = 0
                continue
            first = first_mover(cfg.num_blocks, [*others, mine])
            if waits_for(first, me, deferrals):
                deferrals += 1
                continue
            deferrals, self.moves = 0, self.moves + 1
            start, end = new
            yield from self._load(me, new)

    def _settle(self, me: str, claim: tuple[int, int]) -> Iterator[simpy.Event]:
        cfg, check = self.config, ClaimCheck(claim)
        for _ in range(cfg.settle_rounds):
            self._announce(me, check.claim, online=False)
            yield self.env.timeout(self.rng.uniform(*cfg.settle_wait_s))
            others, joining = yield from self._listing(me)
            placed = join_place(cfg.num_blocks, others, SwarmEntry(me, *check.claim, 1.0), joining)
            if check.update(placed):
                break
        return check.claim

    def _load(self, me: str, span: tuple[int, int]) -> Iterator[simpy.Event]:
        self._announce(me, span, online=False)
        yield self.env.timeout(self.config.load_s)
        self._announce(me, span, online=True)

    # ----- the DHT, as a board with delays ---------------------------------------------
    def _announce(self, me: str, span: tuple[int, int], online: bool) -> None:
        entry = SwarmEntry(me, span[0], span[1], 1.0)
        record = _Record(entry, online, self.env.now + self.config.visible_s)
        self.board.setdefault(me, []).append(record)

    def _visible(self, now: float) -> dict[str, _Record]:
        """Each peer's newest record that others can see at `now` (an older one until then)."""
        seen = {}
        for peer, records in self.board.items():
            shown = [r for r in records if r.visible_at <= now]
            if shown:
                seen[peer] = shown[-1]
        return seen

    def _listing(self, me: str) -> Iterator[simpy.Event]:
        """(other servers, peer ids of JOINING ones) as seen when the listing began."""
        now = self.env.now
        seen = [r for p, r in self._visible(now).items() if p != me]
        yield self.env.timeout(self.config.list_s)
        return [r.entry for r in seen], {r.entry.peer_id for r in seen if not r.online}

    def _watch(self) -> Iterator[simpy.Event]:
        while self.covered_at is None:
            served = set()
            for records in self.board.values():
                record = records[-1]  # what the server does now
                if record.online:
                    served |= set(range(record.entry.start, record.entry.end))
            if served == set(range(self.config.num_blocks)):
                self.covered_at = self.env.now
                return
            yield self.env.timeout(0.1)


def run_joins(config: JoinConfig, seeds: range) -> list[float | None]:
    """Seconds until all blocks are covered, one per seed (None: not within the horizon)."""
    return [JoinSim(config, seed).run() for seed in seeds]
