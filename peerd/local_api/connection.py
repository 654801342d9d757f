"""What one local-socket connection owns: its framed channel and the chains it opened."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import wire
from peerd.chain import InferenceChain
from peerd.framed import FramedChannel
from wire import ErrorCode, WireError


@dataclass
class ApiConnection:
    channel: FramedChannel
    chains: dict[str, InferenceChain] = field(default_factory=dict)
    request_id: int | None = None  # of the request being answered; echoed on its replies
    # chain id -> (request id, reply) of its last step: a retried step is answered, not rerun
    last_steps: dict[str, tuple[int, wire.Message]] = field(default_factory=dict)

    async def reply(self, message: wire.Message) -> None:
        if self.request_id is not None and _has_request_id(message):
            message = dataclasses.replace(message, request_id=self.request_id)
        await self.channel.write_message(message.to_wire())

    def chain(self, chain_id: str) -> InferenceChain:
        chain = self.chains.get(chain_id)
        if chain is None:
            raise WireError(
                ErrorCode.UNKNOWN_SESSION, f"no open chain {chain_id!r} on this connection"
            )
        return chain


Handler = Callable[[wire.Message, ApiConnection], Awaitable[None]]


def _has_request_id(message: Any) -> bool:
    return any(f.name == "request_id" for f in dataclasses.fields(message))
