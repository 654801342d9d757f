"""Test helpers for real daemons: the package's launcher plus an in-process Node runner.

    with DaemonGroup(tmp_path) as group:
        boot = group.start("boot", "--new-swarm")
        peer = group.start("a", "--initial-peers", boot.addrs[0], "--test-record", "m@x:0:4")
        ...  # every daemon is stopped (SIGTERM, then SIGKILL) when the block ends

Each daemon costs ~3-4 s of imports on a 2-core machine: share one swarm per test module, and
start daemons together (`spawn` them all, then `wait_ready`) so their imports overlap; a
bootstrap's address can be known before it runs (`free_port`, `prepare_identity`).
"""

from __future__ import annotations

import socket
from pathlib import Path

import trio

from tests.launcher import DaemonFailed, DaemonProcess
from tests.launcher import HarnessGroup as DaemonGroup

Daemon = DaemonProcess
REPO = Path(__file__).resolve().parents[1]

__all__ = [
    "REPO",
    "Daemon",
    "DaemonFailed",
    "DaemonGroup",
    "free_port",
    "prepare_identity",
    "run_with_node",
    "wait_for",
]


def run_with_node(config, body, *, timeout: float = 60.0):
    """Run an in-process Node (the test's own peer), call `await body(node)`, shut it down."""
    from peerd.node import Node

    async def main():
        node = Node(config)
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                await nursery.start(node.run)
                try:
                    return await body(node)
                finally:
                    await node.shutdown()
                    nursery.cancel_scope.cancel()

    return trio.run(main)


async def wait_for(predicate, *, timeout: float, interval: float = 0.3):
    """Await `predicate()` until it returns something truthy; that value, or None on timeout."""
    with trio.move_on_after(timeout):
        while True:
            value = await predicate()
            if value:
                return value
            await trio.sleep(interval)
    return None


def free_port() -> int:
    """A TCP port free on loopback right now (so peers can be given an address up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_identity(home: Path) -> str:
    """Create a daemon's identity in `home` ahead of time; returns its peer id."""
    from peerd.identity import load_or_create_identity, peer_id_of

    return peer_id_of(load_or_create_identity(Path(home) / "identity.key"))
