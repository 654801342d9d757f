"""Routing libp2p streams to the block server: who opened them, and failures kept to them."""

from __future__ import annotations

import logging

import trio

import wire
from peerd.framed import ByteBudget, FramedChannel, Libp2pByteStream

log = logging.getLogger("peerd.serve")


async def refuse_loading(channel: FramedChannel) -> None:
    """Between unloading old blocks and serving new ones: "busy", go elsewhere."""
    await refuse(channel, "server loading other blocks; not serving yet")


async def refuse(channel: FramedChannel, message: str) -> None:
    """Answer "busy" with `message` and hang up."""
    with trio.move_on_after(5):
        await channel.write_message(
            wire.Error(code=wire.ErrorCode.BUSY, message=message, details={}).to_wire()
        )
    with trio.move_on_after(1):
        await channel.aclose()


def peer_channel(stream, max_frame: int) -> FramedChannel:
    """A framed channel over a libp2p stream, naming the peer that opened it (quotas)."""
    try:
        peer_id = stream.muxed_conn.peer_id.to_base58()
    except AttributeError:
        peer_id = "unknown"
    return FramedChannel(Libp2pByteStream(stream), max_frame, peer_id=peer_id)


async def contained(handler, channel: FramedChannel) -> None:
    """A handler's unexpected exception ends its own stream only, never the daemon."""
    try:
        await handler(channel)
    except Exception:  # noqa: BLE001
        log.exception("request handler failed")
        with trio.move_on_after(1):
            await channel.aclose()


class PeerAdmission:
    """Per-peer limits over all our stream handlers: concurrent streams, bytes being read."""

    def __init__(self, max_streams: int, max_bytes: int) -> None:
        self.max_streams, self.max_bytes = max_streams, max_bytes
        self._streams: dict[str, int] = {}
        self._budgets: dict[str, ByteBudget] = {}

    def open_streams(self, peer_id: str) -> int:
        return self._streams.get(peer_id, 0)

    async def serve(self, handler, channel: FramedChannel) -> None:
        """Run `handler` on `channel` within its peer's limits (the in-process pipe has none)."""
        peer = channel.peer_id
        if peer is None:
            await contained(handler, channel)
            return
        count = self._streams.get(peer, 0)
        if count >= self.max_streams:
            log.info("peer %s has %d streams open: refusing another", peer[-8:], count)
            await refuse(channel, f"too many streams: {count} open, at most {self.max_streams}")
            return
        self._streams[peer] = count + 1
        channel.byte_budget = self._budgets.setdefault(peer, ByteBudget(self.max_bytes))
        try:
            await contained(handler, channel)
        finally:
            self._streams[peer] -= 1
            if not self._streams[peer]:
                del self._streams[peer]
                del self._budgets[peer]
