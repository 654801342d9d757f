"""In-process swarms for chain tests: real BlockServers over real spans, real wire framing.

Servers are `BlockServer`s spoken to over in-memory streams; each server's end of a stream
enforces its own frame limit, as a libp2p stream handler does. A server "crashes" (its streams
break, new connections are refused) when a test's trigger fires over the messages it
receives, and it records what it got (largest frame, dtypes of hidden states), so tests can
check what really crossed the wire.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import trio
import trio.testing

import wire
from blocks import LoadedBlocks
from peerd.chain import ChainOptions, InferenceChain, Planning
from peerd.framed import ConnectionLost, FramedChannel, TrioByteStream
from peerd.server.block_server import BlockServer
from peerd.server.limits import ServerLimits
from peerd.training import TrainingChain
from routing import BanList, ServerSpan

MODEL_ID = "tiny@cafe"


@dataclass
class FakePeer:
    """A real BlockServer that can crash on a trigger (a predicate over received messages)."""

    peer_id: str
    server: BlockServer
    throughput: float = 100.0
    crash_when: Callable[[dict], bool] | None = None
    dead: bool = False
    received: int = 0
    largest_frame: int = 0
    hidden_dtypes: set[str] = field(default_factory=set)
    steps: int = 0
    quant: str = "none"  # as its record would say

    @property
    def span(self) -> ServerSpan:
        s = self.server.span
        dtype = str(self.server.runner.accepts()["dtype"])
        return ServerSpan(
            self.peer_id, s.start, s.end, throughput=self.throughput, dtype=dtype, quant=self.quant
        )


class RecordingBans(BanList):
    """A BanList that remembers everyone it ever banned."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[str] = []

    def ban(self, peer_id: str, now: float, *, until: float | None = None) -> float:
        self.history.append(peer_id)
        return super().ban(peer_id, now, until=until)


class CrashingChannel(FramedChannel):
    """The server's end of a stream: its frame limit, its records, its crash trigger."""

    def __init__(self, peer: FakePeer, stream) -> None:
        super().__init__(TrioByteStream(stream), peer.server.limits.max_frame)
        self.peer = peer

    async def read_message(self) -> dict:
        if self.peer.dead:
            raise ConnectionLost("crashed")
        size = wire.parse_header(await self._read_exactly(wire.HEADER_SIZE), self.max_frame)
        message = wire.decode_payload(await self._read_exactly(size))
        peer = self.peer
        peer.received += 1
        peer.largest_frame = max(peer.largest_frame, size + wire.HEADER_SIZE)
        if isinstance(message.get("hidden"), dict):
            peer.hidden_dtypes.add(message["hidden"].get("dtype"))
        if message.get("type") == "step":
            peer.steps += 1
        if peer.crash_when is not None and peer.crash_when(message):
            peer.dead = True
            raise ConnectionLost("crashed")
        return message


class Swarm:
    """Servers by name over block intervals; `chain()` and `training()` build clients of them."""

    def __init__(
        self,
        model_dir,
        intervals: dict[str, tuple[int, int]],
        nursery: trio.Nursery,
        throughputs: dict[str, float] | None = None,
        *,
        limits: ServerLimits | dict[str, ServerLimits] | None = None,
        dtypes: dict[str, torch.dtype] | None = None,
        client_max_frame: int = wire.DEFAULT_MAX_FRAME,
        num_blocks: int = 6,
    ):
        self.nursery = nursery
        self.num_blocks = num_blocks
        self.client_max_frame = client_max_frame
        self.bans = RecordingBans()
        self.peers: dict[str, FakePeer] = {}
        for name, (a, b) in intervals.items():
            lim = limits.get(name, ServerLimits()) if isinstance(limits, dict) else limits
            dtype = (dtypes or {}).get(name, torch.float32)
            span = LoadedBlocks.load(model_dir, a, b, dtype=dtype)
            server = BlockServer(span, MODEL_ID, lim or ServerLimits())
            self.peers[name] = FakePeer(
                name, server, throughput=(throughputs or {}).get(name, 100.0)
            )
        self.connects: list[str] = []

    async def source(self):
        return [p.span for p in self.peers.values() if not p.dead]

    async def connect(self, peer_id: str, protocol: str) -> FramedChannel:
        peer = self.peers[peer_id]
        if peer.dead:
            raise OSError(f"{peer_id} refused the connection")
        self.connects.append(peer_id)
        ours, theirs = trio.testing.memory_stream_pair()
        handler = (
            peer.server.handle_inference if "inference" in protocol else peer.server.handle_rpc
        )
        self.nursery.start_soon(handler, CrashingChannel(peer, theirs))
        return FramedChannel(TrioByteStream(ours), self.client_max_frame)

    def options(self, max_length: int, batch_size: int = 1, **kw) -> ChainOptions:
        return ChainOptions(
            model_id=MODEL_ID,
            start=0,
            end=self.num_blocks,
            max_length=max_length,
            batch_size=batch_size,
            recovery_timeout=1.0,
            **kw,
        )

    def planning(self, options: ChainOptions) -> Planning:
        return Planning(
            options=options,
            source=self.source,
            probe_rtts=None,
            bans=self.bans,
            clock=trio.current_time,
        )

    def chain(self, max_length: int, batch_size: int = 1, **kw) -> InferenceChain:
        options = self.options(max_length, batch_size, **kw)
        return InferenceChain(options, self.planning(options), self.connect)

    async def training(self, batch_size: int = 1, **kw) -> TrainingChain:
        options = self.options(1, batch_size, mode="throughput", **kw)
        planning = self.planning(options)
        await planning.build()
        return TrainingChain(options, planning, self.connect)

    def banned(self) -> list[str]:
        """Every peer banned so far, in order (a peer banned twice is listed twice)."""
        return list(self.bans.history)


def is_step(message: dict) -> bool:
    return message.get("type") == "step"


def nth_step(n: int) -> Callable[[dict], bool]:
    """Fires on the n-th Step message a server receives (counting every piece of a cut step)."""
    count = {"steps": 0}

    def trigger(message: dict) -> bool:
        if is_step(message):
            count["steps"] += 1
            return count["steps"] == n
        return False

    return trigger


def is_replay(message: dict) -> bool:
    return is_step(message) and message.get("replay") is True


def has_reorder(message: dict) -> bool:
    return is_step(message) and message.get("reorder") is not None


def run_swarm(model_dir, intervals, body, **swarm_kw):
    """trio.run `await body(swarm)` with a Swarm of `intervals`; returns (swarm, its result)."""

    async def main():
        async with trio.open_nursery() as nursery:
            swarm = Swarm(model_dir, intervals, nursery, **swarm_kw)
            result = await body(swarm)
            nursery.cancel_scope.cancel()
        return swarm, result

    return trio.run(main)
