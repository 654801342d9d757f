"""Before a move: what the other servers say they hold now (DHT records can lag a move)."""

from __future__ import annotations

import logging

import trio

import wire
from balancing import SwarmEntry
from peerd.records import State
from peerd.server.protocols import RPC_PROTOCOL

log = logging.getLogger("peerd.serve")

INFO_TIMEOUT = 5.0  # seconds to wait for a server's own word on its blocks


async def confirmed_entries(swarm, model_id: str, entries: list[SwarmEntry]) -> list[SwarmEntry]:
    """`entries` with the blocks each server reports in an Info reply; a server that
    does not answer keeps its listed blocks, one that serves something else (or drains)
    drops out."""
    confirmed: dict[str, SwarmEntry | None] = {e.peer_id: e for e in entries}

    async def ask(entry: SwarmEntry) -> None:
        with trio.move_on_after(INFO_TIMEOUT):
            try:
                confirmed[entry.peer_id] = await live_entry(swarm, model_id, entry)
            except Exception as exc:  # noqa: BLE001 - unconfirmed: keep the listed blocks
                log.debug("no Info from %s: %r", entry.peer_id, exc)

    async with trio.open_nursery() as nursery:
        for entry in entries:
            nursery.start_soon(ask, entry)
    return [e for e in confirmed.values() if e is not None]


async def live_entry(swarm, model_id: str, entry: SwarmEntry) -> SwarmEntry | None:
    channel = await swarm.connect(entry.peer_id, RPC_PROTOCOL)
    try:
        await channel.write_message(wire.Info().to_wire())
        reply = wire.parse_message(await channel.read_message(), max_decoded=channel.max_frame)
    finally:
        await channel.aclose()
    if not isinstance(reply, wire.InfoResult):
        return entry
    record = reply.record
    start, end = record.get("start"), record.get("end")
    if (
        record.get("model_id") != model_id
        or record.get("state") not in (State.ONLINE.value, State.JOINING.value)
        or not (type(start) is int and type(end) is int and 0 <= start < end)
    ):
        return None
    throughput = record.get("inference_throughput")
    if not isinstance(throughput, float) or not throughput > 0:
        throughput = entry.throughput
    return SwarmEntry(entry.peer_id, start, end, throughput)
