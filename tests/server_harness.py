"""One real BlockServer spoken to over in-memory streams, as a given peer, for limit tests."""

from __future__ import annotations

import torch
import trio
import trio.testing

import wire
from peerd.framed import FramedChannel, MemoryByteStream, TrioByteStream
from peerd.server.block_server import BlockServer

MODEL_ID = "tiny@cafe"


class ChunkedStream(MemoryByteStream):
    """An in-process pipe end that hands data over 64 bytes at a time, each when the other
    side asks for it: a writer goes only as fast as its reader reads (a small TCP window)."""

    async def send_all(self, data: bytes) -> None:
        for i in range(0, len(data), 64):
            await super().send_all(data[i : i + 64])


def chunked_pair() -> tuple[ChunkedStream, ChunkedStream]:
    a_send, b_receive = trio.open_memory_channel[bytes](0)
    b_send, a_receive = trio.open_memory_channel[bytes](0)
    return ChunkedStream(a_send, a_receive), ChunkedStream(b_send, b_receive)


class ServerUnderTest:
    """Opens client streams to `server`, each served by the handler in `nursery`."""

    def __init__(self, server: BlockServer, nursery: trio.Nursery) -> None:
        self.server, self.nursery = server, nursery

    def connect(
        self, protocol: str = "inference", peer_id: str | None = "peer-a", *, lockstep=False
    ) -> FramedChannel:
        """A client channel; with `lockstep`, writers go only as fast as their reader reads."""
        limits = self.server.limits
        if lockstep:
            ours, theirs = chunked_pair()
        else:
            trio_ours, trio_theirs = trio.testing.memory_stream_pair()
            ours, theirs = TrioByteStream(trio_ours), TrioByteStream(trio_theirs)
        channel = FramedChannel(theirs, limits.max_frame, peer_id=peer_id)
        handler = (
            self.server.handle_inference if protocol == "inference" else self.server.handle_rpc
        )
        self.nursery.start_soon(handler, channel)
        return FramedChannel(ours, wire.DEFAULT_MAX_FRAME)


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
