"""Inference chains for local scripts: how a chain is configured and routed, and the
open / step / close requests of the socket API."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence

import trio

from peerd.chain import ChainOptions, InferenceChain, Planning
from peerd.local_api.connection import ApiConnection
from peerd.models import ModelRegistry
from peerd.swarm import SwarmAccess
from routing import BanList
from wire import local as api

log = logging.getLogger("peerd.api")


class ChainFactory:
    """Builds chains over the swarm; one ban list shared by every chain of this daemon (a
    server that failed one script is avoided by all)."""

    def __init__(self, swarm: SwarmAccess) -> None:
        self.swarm = swarm
        self.bans = BanList()

    def options(
        self,
        model_id: str,
        num_blocks: int,
        max_length: int,
        *,
        batch_size: int = 1,
        compression: str = "none",
        allow: Iterable[str] | None = None,
        deny: Iterable[str] | None = None,
        mode: str = "latency",
        pad_lengths: Sequence[int] | None = None,
    ) -> ChainOptions:
        return ChainOptions(
            model_id=model_id,
            start=0,
            end=num_blocks,
            max_length=max_length,
            batch_size=batch_size,
            compression=compression,
            allow=frozenset(allow) if allow is not None else None,
            deny=frozenset(deny or ()),
            mode=mode,
            pad_lengths=pad_lengths,
        )

    def planning(self, options: ChainOptions) -> Planning:
        model_id = options.model_id
        return Planning(
            options=options,
            source=lambda: self.swarm.server_spans(model_id),
            probe_rtts=self.swarm.probe_rtts,
            bans=self.bans,
            clock=trio.current_time,
        )

    def chain(self, options: ChainOptions) -> InferenceChain:
        return InferenceChain(options, self.planning(options), self.swarm.connect)

    async def open(self, options: ChainOptions) -> InferenceChain:
        """An open chain (every hop's session opened), or an error with nothing left open."""
        chain = self.chain(options)
        try:
            await chain.open()
        except BaseException:
            with trio.CancelScope(shield=True):
                await chain.aclose()
            raise
        log.info("chain for %s opened: %s", options.model_id, route_text(chain.route))
        return chain


class ChainHandlers:
    """OpenChain, ChainStep and CloseChain: research access to hidden states."""

    def __init__(self, models: ModelRegistry, chains: ChainFactory, max_frame: int) -> None:
        self.models = models
        self.chains = chains
        self.max_frame = max_frame  # of the local socket: clients cut bigger steps

    async def open(self, request: api.OpenChain, conn: ApiConnection) -> None:
        model = await self.models.resolve(request.model)
        options = self.chains.options(
            model.model_id,
            model.num_blocks,
            request.max_length,
            batch_size=request.batch_size,
            compression=request.compression,
            allow=request.allow,
            deny=request.deny,
            pad_lengths=request.pad_lengths,
        )
        chain = await self.chains.open(options)
        chain_id = uuid.uuid4().hex
        conn.chains[chain_id] = chain
        await conn.reply(
            api.ChainOpened(
                chain_id=chain_id,
                model_id=model.model_id,
                num_blocks=model.num_blocks,
                route=chain.route,
                max_frame=self.max_frame,
            )
        )

    async def step(self, request: api.ChainStep, conn: ApiConnection) -> None:
        chain = conn.chain(request.chain_id)
        last = conn.last_steps.get(request.chain_id)
        if request.request_id is not None and last is not None and last[0] == request.request_id:
            await conn.reply(last[1])  # a client's retry of a step already applied
            return
        hidden = await chain.step(request.hidden.float(), reorder=request.reorder)
        reply = api.ChainStepResult(
            hidden=hidden.to(request.hidden.dtype),
            route=chain.route,
            recoveries=len(chain.recoveries),
            compression=request.compression,
        )
        if request.request_id is not None:
            conn.last_steps[request.chain_id] = (request.request_id, reply)
        await conn.reply(reply)

    async def close(self, request: api.CloseChain, conn: ApiConnection) -> None:
        chain = conn.chain(request.chain_id)
        del conn.chains[request.chain_id]
        conn.last_steps.pop(request.chain_id, None)
        await chain.aclose()
        await conn.reply(api.ChainClosed(chain_id=request.chain_id))


def route_text(route: list[tuple[str, int, int]]) -> str:
    return " → ".join(f"{peer[-6:]}[{start}:{end})" for peer, start, end in route)
