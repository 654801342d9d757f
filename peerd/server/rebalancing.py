"""Moving to other blocks when the swarm needs them more: when to move (`balancing`'s
`should_move` and `first_mover`, checked twice and against what the servers say they hold),
and moving without running out of memory or dying of an error.

A mixin of `BlockService` (peerd/server/service.py): it uses the service's loading, serving
and announcing, and `StartupPlacement`'s swarm listing.
"""

from __future__ import annotations

import gc
import logging
import random

import torch
import trio

from balancing import SwarmEntry, first_mover, should_move, waits_for
from peerd.records import State
from peerd.server import memory
from peerd.server.block_server import BlockServer
from peerd.server.confirm import confirmed_entries

log = logging.getLogger("peerd.serve")

RELEASE_GRACE = 10.0  # most seconds a move waits for the sessions of blocks it must unload


class Rebalancing:
    """The rebalancing loop and the move itself (see the module docstring)."""

    async def _rebalance_loop(self) -> None:
        """Every period (randomly stretched or shrunk), ask `should_move`; move when a second
        check soon after says the same: a DHT listing that missed a live server (a lookup timed
        out on a busy machine) would otherwise send us off blocks that only we serve."""
        period = self.options.rebalance_period
        pending: tuple[int, int] | None = None
        while True:
            share = random.uniform(0.2, 0.4) if pending else random.uniform(0.5, 1.5)
            await trio.sleep(period * share)
            try:
                new = await self._wanted_move()
            except Exception as exc:  # noqa: BLE001 - a failed listing waits for the next round
                log.warning("rebalancing check failed: %r", exc)
                continue
            if new is None or new != pending:
                if new is not None:
                    log.info("rebalancing: blocks %d:%d would help more; checking again", *new)
                pending = new
                continue
            pending = None
            if self._stopping:
                return
            log.info("rebalancing: moving from blocks %d:%d to %d:%d", *self.interval, *new)
            await self._move(new)

    async def _move(self, new: tuple[int, int]) -> None:
        """Serve `new` instead of our blocks, never running out of memory nor dying of an error.

        The new span is loaded beside the old one (which serves on meanwhile) only when it
        fits in the memory free now; else the old one is released first (its sessions get
        RELEASE_GRACE to end) and we announce JOINING. When loading fails we go on serving
        the old span if it is still loaded, else announce OFFLINE and stop the daemon."""
        old_server, old_interval = self.server, self.interval
        size = new[1] - new[0]
        fits = await trio.to_thread.run_sync(
            lambda: memory.span_fits(self.config, self.options, size)
        )
        if not fits and old_server is not None:
            log.info(
                "rebalancing: blocks %d:%d do not fit beside %d:%d; unloading those first",
                *new,
                *old_interval,
            )
            await self._release(old_server, new)
            old_server = None
        try:
            if not await self._load_and_serve(new) and self.server is old_server:
                self.interval = old_interval  # drained meanwhile: the old blocks finish
                self.swarm.node.request_announce()
        except Exception as exc:  # noqa: BLE001 - a failed move must not kill the daemon
            if self._stopping:
                return
            if old_server is not None:
                log.warning(
                    "rebalancing to blocks %d:%d failed (%r): serving %d:%d on",
                    *new,
                    exc,
                    *old_interval,
                )
                self._install(old_server)
                self.interval, self.state = old_interval, State.ONLINE
                self.swarm.node.request_announce()
                self.on_change()
                return
            log.error(
                "rebalancing to blocks %d:%d failed (%r) after unloading our blocks: "
                "announcing OFFLINE and stopping",
                *new,
                exc,
            )
            self.state = State.OFFLINE
            self.on_change()
            await self.swarm.node.shutdown()

    async def _release(self, server: BlockServer, new: tuple[int, int]) -> None:
        """Stop serving `server`'s blocks and let its memory go before loading `new`."""
        self.interval, self.state = new, State.JOINING
        self.server = None  # new streams are refused ("busy") until the new span serves
        self.swarm.node.request_announce()
        self.on_change()
        grace = min(self.options.limits.drain_timeout, RELEASE_GRACE)
        if not await server.drain(grace):
            log.info("unloading blocks with %d sessions still open", len(server.sessions))
        del server
        gc.collect()
        if self.options.device and self.options.device.startswith("cuda"):
            torch.cuda.empty_cache()

    async def _wanted_move(self) -> tuple[int, int] | None:
        """The interval `should_move` sends us to now, or None to stay (balancing's
        `first_mover` rule decides which of several servers that should move goes first)."""
        if self.interval is None:
            return None
        others = await self._swarm_entries()
        start, end = self.interval
        me = SwarmEntry(self.swarm.node.peer_id, start, end, self._my_throughput_guess(others))
        everyone, total, min_gain = [*others, me], self.config.num_blocks, self.options.min_gain
        move, new = should_move(total, everyone, me, min_gain)
        if not move:
            self._deferrals = 0
            return None
        # a move restarts us and may leave blocks only we serve: decide on what the servers
        # say they hold right now, not on DHT records that can lag a move by many seconds
        others = await self._confirmed(others)
        everyone = [*others, me]
        move, new = should_move(total, everyone, me, min_gain)
        if not move:
            return None
        first = first_mover(total, everyone, min_gain)
        if waits_for(first, me.peer_id, self._deferrals):
            self._deferrals += 1
            log.info("rebalancing: blocks %d:%d would help more; %s moves first", *new, first)
            return None
        self._deferrals = 0
        return tuple(new)

    async def _confirmed(self, entries: list[SwarmEntry]) -> list[SwarmEntry]:
        return await confirmed_entries(self.swarm, self.model_id, entries)
