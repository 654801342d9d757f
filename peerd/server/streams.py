"""Routing libp2p streams to the block server: who opened them, and failures kept to them."""

from __future__ import annotations

import logging

import trio

import wire
from peerd.framed import FramedChannel, Libp2pByteStream

log = logging.getLogger("peerd.serve")


async def refuse_loading(channel: FramedChannel) -> None:
    """Between unloading old blocks and serving new ones: "busy", go elsewhere."""
    message = "server loading other blocks; not serving yet"
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
