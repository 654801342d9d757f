"""The lab's delaying relay: one process for every node of a lab (tests/netlab.py starts it).

    python -m tests.netlab_relay CONFIG.json

For each node it listens on the node's lab address and forwards every connection to the
node's daemon on 127.0.0.1 (the first of its port slots that answers), delaying each chunk by
the one-way latency of the pair in both directions, in order, EOF included; a connection the
daemon refuses is reset after a round trip. It enters each node's namespace only to make a
socket (a socket stays in the namespace it was made in).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CLONE_NEWNET = 0x40000000
CHUNK = 1 << 16
QUEUED_CHUNKS = 64  # per direction: past ~4 MiB in flight the relay stops reading (TCP backs off)

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns failed")


@contextmanager
def in_netns(netns: str) -> Iterator[None]:
    """Sockets made inside the block belong to `netns` (this thread only; they stay there)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


async def _forward(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
) -> None:
    """Copy reader to writer, each chunk `delay` seconds after it arrived, in order; EOF too."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUED_CHUNKS)

    async def receive() -> None:
        try:
            while data := await reader.read(CHUNK):
                await queue.put((loop.time() + delay, data))
        finally:
            await queue.put((loop.time() + delay, b""))

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    await _all_or_none(receive(), send())


async def _all_or_none(*coroutines: Any) -> None:
    """Run them together; the first error cancels the others and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a reset, as a peer whose process died would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class _NodeRelay:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.delays: dict[str, float] = spec["delays"]
        self.ports: list[int] = spec["upstream_ports"]  # the last one that answered first

    def socket(self) -> socket.socket:
        with in_netns(self.spec["netns"]):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    async def start(self) -> asyncio.Server:
        listener = self.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.spec["ip"], self.spec["listen_port"]))
        listener.listen(128)
        return await asyncio.start_server(self.handle, sock=listener)

    async def connect_upstream(self) -> socket.socket | None:
        """A connection to the daemon, on whichever port slot it listens (None: none)."""
        for port in list(self.ports):
            upstream = self.socket()
            try:
                await asyncio.get_running_loop().sock_connect(upstream, ("127.0.0.1", port))
            except OSError:
                upstream.close()
                continue
            self.ports.remove(port)
            self.ports.insert(0, port)
            return upstream
        return None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = writer.get_extra_info("peername")[0]
        delay = self.delays.get(source, self.spec["default_delay"])
        upstream = await self.connect_upstream()
        if upstream is None:
            await asyncio.sleep(2 * delay)  # the refusal travels back like any answer
            _abort(writer)
            return
        up_reader, up_writer = await asyncio.open_connection(sock=upstream)
        try:
            await _all_or_none(
                _forward(reader, up_writer, delay), _forward(up_reader, writer, delay)
            )
        except OSError:
            _abort(writer)
            _abort(up_writer)
        finally:
            writer.close()
            up_writer.close()


async def run_relay(specs: Iterable[dict[str, Any]]) -> None:
    servers = [await _NodeRelay(spec).start() for spec in specs]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


if __name__ == "__main__":
    asyncio.run(run_relay(json.loads(Path(sys.argv[1]).read_text())))
