"""What the client side of a daemon needs from the swarm, on top of a `Node`.

Server listings (ONLINE records → routing spans), client-to-server round trips, and framed
streams to servers — including to the blocks this very daemon serves, which are reached
in-process instead of over the network.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from peerd.framed import FramedChannel, Libp2pByteStream, memory_pipe
from peerd.records import ServerRecord
from peerd.swarm_view import online_spans
from routing import ServerSpan

if TYPE_CHECKING:
    from peerd.node import Node

log = logging.getLogger("peerd.swarm")

PING_TIMEOUT = 2.0
LocalHandler = Callable[[FramedChannel], Awaitable[None]]


class SwarmAccess:
    """A node's view of the swarm for chains and the local API."""

    def __init__(self, node: Node, *, max_frame: int, cache_dir: Path) -> None:
        self.node = node
        self.max_frame = max_frame
        self.cache_dir = cache_dir
        self.local_handlers: dict[str, LocalHandler] = {}  # protocol -> handler of our own blocks
        self._nursery: trio.Nursery | None = None
        self._records: dict[str, ServerRecord] = {}  # peer id -> freshest record seen

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Owns the tasks that serve in-process streams to our own blocks."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def list_servers(self, model_id: str | None) -> list[ServerRecord]:
        """Live server records, fresh from the DHT merged with unexpired ones seen before.

        A DHT listing on a busy swarm can miss some peers (a lookup timed out); a record
        carries its own expiry, so a server seen recently is kept until its record expires
        or it announces OFFLINE, instead of flickering in and out of the routes.
        """
        fresh = await self.node.list_servers(model_id, include_offline=True)
        for record in fresh:
            known = self._records.get(record.peer_id)
            if known is None or record.seq >= known.seq:
                self._records[record.peer_id] = record
        now = time.time()
        for peer_id in [p for p, r in self._records.items() if r.expires_at <= now]:
            del self._records[peer_id]
        return sorted(
            (
                r
                for r in self._records.values()
                if r.is_live(now) and (model_id is None or r.model_id == model_id)
            ),
            key=lambda r: (r.model_id, r.start, r.end, r.peer_id),
        )

    async def server_spans(self, model_id: str) -> list[ServerSpan]:
        return online_spans(await self.list_servers(model_id))

    async def probe_rtts(self, peer_ids: Sequence[str]) -> dict[str, float]:
        """Ping candidates in parallel; the unreachable are left out (the planner's default)."""
        rtts: dict[str, float] = {}

        async def one(peer_id: str) -> None:
            if peer_id == self.node.peer_id:
                rtts[peer_id] = 0.0
                return
            with trio.move_on_after(PING_TIMEOUT):
                try:
                    rtts[peer_id] = await self.node.ping(peer_id)
                except Exception as exc:  # noqa: BLE001 - a failed ping only leaves a gap
                    log.debug("ping %s failed: %r", peer_id[:12], exc)

        async with trio.open_nursery() as nursery:
            for peer_id in peer_ids:
                nursery.start_soon(one, peer_id)
        return rtts

    async def connect(self, peer_id: str, protocol: str) -> FramedChannel:
        if peer_id == self.node.peer_id and protocol in self.local_handlers and self._nursery:
            ours, theirs = memory_pipe()
            handler = self.local_handlers[protocol]
            self._nursery.start_soon(handler, FramedChannel(theirs, self.max_frame))
            return FramedChannel(ours, self.max_frame)
        stream = await self.node.open_stream(peer_id, protocol)
        return FramedChannel(Libp2pByteStream(stream), self.max_frame)

    @staticmethod
    def model_name_for(path: Path) -> str:
        """The name part of a model id: the checkpoint directory's name, or its config's."""
        try:
            config = json.loads((Path(path) / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        name = config.get("_peerd_name") or Path(path).resolve().name
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:120] or "model"
