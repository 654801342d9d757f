"""The routing state a chain works with: its options, candidate servers, bans, the planner.

Shared by inference chains (one per session) and training requests (one per model, so that
servers are pinged once): `build` lists and pings the candidates, `ban` takes a failed
server out, `route_from` repairs an inference route with D* Lite, `route_range` plans a
fresh route over some blocks, and both wait (up to the recovery timeout) for a server to
cover blocks nobody serves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import trio

from peerd.hops import ChainError, HopLimits
from routing import (
    BanList,
    CostModel,
    NoRouteError,
    Route,
    RoutePlanner,
    ServerAdded,
    ServerRemoved,
    ServerSpan,
)
from wire import ErrorCode

log = logging.getLogger("peerd.chain")

ServerSource = Callable[[], Awaitable[Sequence[ServerSpan]]]
RttProbe = Callable[[Sequence[str]], Awaitable[dict[str, float]]]


@dataclass
class ChainOptions:
    """Everything a chain needs to know besides where its servers come from."""

    model_id: str
    start: int
    end: int
    max_length: int
    batch_size: int = 1
    compression: str = "none"
    step_timeout: float = 30.0
    open_timeout: float = 10.0
    recovery_timeout: float = 30.0
    max_failures: int = 16
    allow: frozenset[str] | None = None
    deny: frozenset[str] = frozenset()
    mode: str = "latency"
    pad_lengths: Sequence[int] | None = None
    """Left padding of each sequence of the batch (positions at its start never attended to)."""


@dataclass
class Planning:
    """The shared routing state of a chain: candidate servers, bans, the D* Lite planner."""

    options: ChainOptions
    source: ServerSource
    probe_rtts: RttProbe | None
    bans: BanList
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time  # records' expiry is in unix time
    planner: RoutePlanner | None = None
    known: dict[str, ServerSpan] = field(default_factory=dict)
    waiting: float | None = None  # overrides options.recovery_timeout while set
    rtts: dict[str, float] = field(default_factory=dict)
    peer_limits: dict[str, HopLimits] = field(default_factory=dict)  # as servers told us
    avoided: dict[str, str] = field(default_factory=dict)  # left out of this chain, and why

    def _eligible(self, servers: Iterable[ServerSpan]) -> list[ServerSpan]:
        now = self.clock()
        opts = self.options
        return [
            s
            for s in servers
            if (opts.allow is None or s.peer_id in opts.allow)
            and s.peer_id not in opts.deny
            and s.peer_id not in self.avoided
            and not self.bans.is_banned(s.peer_id, now)
            and s.end > opts.start
            and s.start < opts.end
        ]

    async def build(self) -> None:
        servers = self._eligible(await self.source())
        self.rtts = await self.probe_rtts([s.peer_id for s in servers]) if self.probe_rtts else {}
        self.known = {s.peer_id: s for s in servers}
        self.planner = RoutePlanner(
            servers,
            CostModel(client_rtts=self.rtts),
            start=self.options.start,
            end=self.options.end,
            mode=self.options.mode,
        )

    async def refresh(self) -> None:
        """Tell the planner which servers appeared (or came back from a ban) and which left."""
        assert self.planner is not None
        fresh = {s.peer_id: s for s in self._eligible(await self.source())}
        changes: list = [ServerRemoved(p) for p in self.known if p not in fresh]
        changes += [ServerAdded(s) for p, s in fresh.items() if p not in self.known]
        self.known = fresh
        if changes:
            self.planner.update(changes)

    def ban(self, peer_id: str) -> None:
        assert self.planner is not None
        now = self.clock()
        known = self.known.get(peer_id)
        until = None  # a failed server stays out while its record may still list it
        if known is not None and known.expires_at is not None:
            until = now + (known.expires_at - self.wall_clock())
        backoff = self.bans.ban(peer_id, now, until=until)
        self.peer_limits.pop(peer_id, None)
        log.info("banned %s for %.1f s", peer_id[:12], backoff)
        if self.known.pop(peer_id, None) is not None:
            self.planner.update([ServerRemoved(peer_id)])

    def avoid(self, peer_id: str, reason: str) -> None:
        """Leave a healthy server out of this chain only (no strike in the shared bans): it
        moved its blocks, its limits cannot take our steps, or its cache is full."""
        assert self.planner is not None
        self.avoided[peer_id] = reason
        log.info("leaving %s out of this chain: %s", peer_id[:12], reason)
        if self.known.pop(peer_id, None) is not None:
            self.planner.update([ServerRemoved(peer_id)])

    async def route_from(
        self,
        block: int,
        prev_peer: str | None,
        prefer: Callable[[ServerSpan], bool] | None = None,
    ) -> list[tuple[str, int, int]]:
        """Best route from `block` to the end (D* Lite repair); waits for coverage if needed.
        With `prefer`, a route over only the servers it accepts wins when there is one."""
        assert self.planner is not None
        if prefer is not None:
            servers = [s for s in self._eligible(self.known.values()) if prefer(s)]
            try:
                route = RoutePlanner(
                    servers,
                    CostModel(client_rtts=self.rtts),
                    start=self.options.start,
                    end=self.options.end,
                    mode=self.options.mode,
                ).route_from(block, prev_peer)
                return [(h.peer_id, h.start, h.end) for h in route.hops]
            except NoRouteError:
                pass  # none alike covers it: any server will do (the chain says so)
        planner = self.planner
        return await self._wait_for_route(lambda: planner.route_from(block, prev_peer))

    async def route_range(self, start: int, end: int) -> list[tuple[str, int, int]]:
        """A fresh route over exactly [start, end) (training requests and their retries)."""

        def plan() -> Route:
            servers = self._eligible(self.known.values())
            return RoutePlanner(
                servers,
                CostModel(client_rtts=self.rtts),
                start=start,
                end=end,
                mode=self.options.mode,
            ).plan()

        return await self._wait_for_route(plan)

    def _no_route(self, exc: NoRouteError) -> ChainError:
        """The error for a gap; when servers there were left out for their full caches, the
        session is more than they can hold (nobody was banned for it): say so."""
        full = {p: r for p, r in self.avoided.items() if "cache_full" in r}
        if full:
            why = "; ".join(f"{p[:12]}…: {r}" for p, r in sorted(full.items())[:4])
            return ChainError(
                ErrorCode.CACHE_FULL,
                f"{exc}: no server there can hold a session of batch {self.options.batch_size} "
                f"× {self.options.max_length} tokens ({why})",
            )
        return ChainError(ErrorCode.NO_ROUTE, str(exc))

    async def _wait_for_route(self, plan: Callable[[], Route]) -> list[tuple[str, int, int]]:
        wait = self.options.recovery_timeout if self.waiting is None else self.waiting
        deadline = self.clock() + wait
        while True:
            try:
                return [(h.peer_id, h.start, h.end) for h in plan().hops]
            except NoRouteError as exc:
                if self.clock() >= deadline:
                    raise self._no_route(exc) from exc
                log.info("%s; waiting for a server to cover them", exc)
                await trio.sleep(0.5)
                await self.refresh()
