"""What one local-socket connection owns: its framed channel and the chains it opened."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import wire
from peerd.chain import InferenceChain
from peerd.framed import FramedChannel
from wire import ErrorCode, WireError


@dataclass
class ApiConnection:
    channel: FramedChannel
    chains: dict[str, InferenceChain] = field(default_factory=dict)

    async def reply(self, message: wire.Message) -> None:
        await self.channel.write_message(message.to_wire())

    def chain(self, chain_id: str) -> InferenceChain:
        chain = self.chains.get(chain_id)
        if chain is None:
            raise WireError(
                ErrorCode.UNKNOWN_SESSION, f"no open chain {chain_id!r} on this connection"
            )
        return chain


Handler = Callable[[wire.Message, ApiConnection], Awaitable[None]]
