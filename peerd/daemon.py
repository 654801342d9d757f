"""Assembling one daemon: a node, the local socket API and (for `serve`) the block service.

`Daemon.run` starts the parts in order with `nursery.start` and reports readiness twice: to
its caller through `task_status.started(ReadyInfo)`, and to other processes through the ready
file in its home (see `peerd.ready`), rewritten when the block service changes state.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import trio

from peerd.config import NodeConfig
from peerd.local_api import LocalAPI
from peerd.node import Node
from peerd.ready import ReadyInfo, remove_ready, write_ready
from peerd.server.service import BlockService, ServeOptions
from peerd.swarm import SwarmAccess
from wire import DEFAULT_MAX_FRAME

log = logging.getLogger("peerd.daemon")

SOCKET_NAME = "peerd.sock"


def default_socket(home: Path) -> Path:
    return Path(home).expanduser() / SOCKET_NAME


class Daemon:
    """What `peerd serve` and `peerd join` run; the constructor only assembles."""

    def __init__(
        self,
        node_config: NodeConfig,
        *,
        socket_path: Path | None = None,
        serve: ServeOptions | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.home = node_config.home
        self.node = Node(node_config)
        self.swarm = SwarmAccess(self.node, max_frame=max_frame, cache_dir=self.home / "cache")
        self.api = LocalAPI(
            self.swarm, socket_path or default_socket(self.home), max_frame=max_frame
        )
        self.blocks = BlockService(serve, self.swarm) if serve is not None else None
        self._ready: ReadyInfo | None = None
        self.node.on_addrs_change = self._write_ready

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until the node stops (`shutdown()`); the ready file lives exactly as long."""
        try:
            async with trio.open_nursery() as nursery:

                async def node_then_stop(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                    try:
                        await self.node.run(task_status=task_status)
                    finally:
                        nursery.cancel_scope.cancel()

                await nursery.start(node_then_stop)
                await nursery.start(self.swarm.run)
                await nursery.start(self.api.serve)
                if self.blocks is not None:
                    self.blocks.on_change = self._write_ready
                    nursery.start_soon(self.blocks.run, self.node)
                self._write_ready()
                task_status.started(self._ready)
        finally:
            remove_ready(self.home, os.getpid())

    async def shutdown(self) -> None:
        """A serving daemon drains first (open sessions finish within the grace period)."""
        if self.blocks is not None and self.node.ready.is_set():
            await self.blocks.drain()
        await self.node.shutdown()

    def _write_ready(self) -> None:
        if not (self.node.ready.is_set() and self.api.listening.is_set()):
            return  # not ready yet: the first write comes when both are
        info = self.node.info()
        self._ready = ReadyInfo(
            pid=os.getpid(),
            peer_id=info.peer_id,
            addrs=info.addrs,
            relay_addrs=info.relay_addrs,
            reachable=info.reachable,
            socket=str(self.api.socket_path),
            serving=self.blocks.summary() if self.blocks is not None else None,
        )
        write_ready(self.home, self._ready)
