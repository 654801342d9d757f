"""Where a new server goes: the interval `balancing/` says the swarm needs most, settled
against the servers that start at the same moment before anything is loaded.

A mixin of `BlockService` (peerd/server/service.py): it reads the service's options, config,
swarm, model id and throughput, and sets its interval and state while it claims.
"""

from __future__ import annotations

import logging
import random

import trio

from balancing import ClaimCheck, SwarmEntry, choose_blocks, join_place
from peerd.records import State
from peerd.server.memory import blocks_that_fit

log = logging.getLogger("peerd.serve")

# Rounds of claim (announce JOINING) → wait → re-list before loading, the wait between them
# (seconds, random so that servers started together interleave), and how long one claim's
# announcement may take.
SETTLE_ROUNDS = 6
SETTLE_WAIT = (0.5, 1.5)
CLAIM_TIMEOUT = 5.0


class StartupPlacement:
    """Choosing and claiming the first interval (see the module docstring)."""

    async def _choose_interval(self) -> tuple[int, int]:
        opts, total = self.options, self.config.num_blocks
        if opts.blocks is not None:
            return opts.blocks
        size = opts.num_blocks or blocks_that_fit(self.config, opts)
        size = max(1, min(size, total))
        swarm = await self._swarm_entries()
        guess = self._my_throughput_guess(swarm)
        start, end = choose_blocks(total, swarm, size, guess)
        log.info(
            "chose blocks %d:%d of %d (swarm has %d other servers)", start, end, total, len(swarm)
        )
        return await self._settle_claim((start, end), guess)

    async def _settle_claim(self, claim: tuple[int, int], guess: float) -> tuple[int, int]:
        """Announce `claim` as JOINING and re-check it against the claims of servers that
        started with us (`join_place`) until it holds, before loading anything.

        Servers started together each list the swarm before the others announced, and pick
        the same blocks; once loaded, only the rebalance period (minutes) would part them.
        When it holds is `balancing.ClaimCheck`'s rule (simnet settles with it too).
        """
        total, me = self.config.num_blocks, self.swarm.node.peer_id
        check = ClaimCheck(claim)
        for round_ in range(SETTLE_ROUNDS):
            self.interval, self.state = check.claim, State.JOINING
            await self._announce_claim(provide=round_ == 0)
            await trio.sleep(random.uniform(*SETTLE_WAIT))
            joining: set[str] = set()
            swarm = await self._swarm_entries(joining)
            placed = join_place(total, swarm, SwarmEntry(me, *check.claim, guess), joining)
            if placed != check.claim:
                log.info(
                    "claim %d:%d taken by servers joining too; claiming %d:%d",
                    *check.claim,
                    *placed,
                )
            if check.update(placed):
                break
        return check.claim

    async def _announce_claim(self, provide: bool) -> None:
        """Store our JOINING record now and, the first time, say that we serve the model
        (listings find servers by those provider records; the announcer's loop would only
        add ours at its next round), so that the others' next listing shows our claim."""
        node = self.swarm.node
        with trio.move_on_after(CLAIM_TIMEOUT):
            try:
                await node.announce(timeout=CLAIM_TIMEOUT)
                if provide and node.dht is not None:
                    await node.dht.provide(self.model_id, node.peer_id)
            except Exception as exc:  # noqa: BLE001 - the announcer's loop retries
                log.debug("announcing our claim failed: %r", exc)

    async def _swarm_entries(self, joining: set[str] | None = None) -> list[SwarmEntry]:
        """The other servers of our model, JOINING ones included: they are about to hold
        those blocks (counting only ONLINE ones made servers that start or move together all
        pick the same blocks). A record without a measured throughput yet counts at the
        median of the measured ones. The peer ids of JOINING ones are added to `joining`."""
        records = await self.swarm.list_servers(self.model_id)
        me = self.swarm.node.peer_id
        others = [r for r in records if r.peer_id != me and r.state is not State.OFFLINE]
        if joining is not None:
            joining.update(r.peer_id for r in others if r.state is State.JOINING)
        measured = sorted(r.inference_throughput for r in others if r.inference_throughput > 0)
        fallback = measured[len(measured) // 2] if measured else 1.0
        return [
            SwarmEntry(r.peer_id, r.start, r.end, r.inference_throughput or fallback)
            for r in others
        ]

    def _my_throughput_guess(self, swarm: list[SwarmEntry]) -> float:
        if self.throughput:
            return float(self.throughput["block_inference_steps_per_s"])
        return sorted(e.throughput for e in swarm)[len(swarm) // 2] if swarm else 1.0
