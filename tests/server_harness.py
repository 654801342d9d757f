"""One real BlockServer spoken to over in-memory streams, as a given peer, for limit tests."""

from __future__ import annotations

import torch
import trio
import trio.testing

import wire
from peerd.framed import FramedChannel, TrioByteStream
from peerd.server.block_server import BlockServer

MODEL_ID = "tiny@cafe"


class ServerUnderTest:
    """Opens client streams to `server`, each served by the handler in `nursery`."""

    def __init__(self, server: BlockServer, nursery: trio.Nursery) -> None:
        self.server, self.nursery = server, nursery

    def connect(self, protocol: str = "inference", peer_id: str | None = "peer-a") -> FramedChannel:
        ours, theirs = trio.testing.memory_stream_pair()
        limits = self.server.limits
        channel = FramedChannel(TrioByteStream(theirs), limits.max_frame, peer_id=peer_id)
        handler = (
            self.server.handle_inference if protocol == "inference" else self.server.handle_rpc
        )
        self.nursery.start_soon(handler, channel)
        return FramedChannel(TrioByteStream(ours), wire.DEFAULT_MAX_FRAME)


async def ask(channel: FramedChannel, message: wire.Message) -> wire.Message:
    await channel.write_message(message.to_wire())
    return wire.parse_message(await channel.read_message())


def open_message(span, max_length: int = 16, batch_size: int = 1) -> wire.OpenSession:
    return wire.OpenSession(
        model_id=MODEL_ID,
        start=span.start,
        end=span.end,
        max_length=max_length,
        batch_size=batch_size,
        compression="none",
        session_id="s",
    )


def step_message(span, tokens: int = 1, step_id: int = 0, batch: int = 1) -> wire.Step:
    hidden = torch.randn(batch, tokens, span.config.hidden_size)
    return wire.Step(hidden=hidden, step_id=step_id)
