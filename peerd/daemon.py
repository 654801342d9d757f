"""Assembling one daemon: a node, the local socket API and (for `serve`) the block service."""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from peerd.config import NodeConfig
from peerd.local_api import LocalAPI
from peerd.node import Node
from peerd.serving import BlockService, ServeOptions
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
        self.node = Node(node_config)
        home = node_config.home
        self.swarm = SwarmAccess(self.node, max_frame=max_frame, cache_dir=home / "cache")
        self.api = LocalAPI(self.swarm, socket_path or default_socket(home), max_frame=max_frame)
        self.blocks = BlockService(serve, self.swarm) if serve is not None else None
        self.node.add_service(self._services)

    async def _services(self, node: Node) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.swarm.run)
            await nursery.start(self.api.serve)
            if self.blocks is not None:
                nursery.start_soon(self.blocks.run, node)
