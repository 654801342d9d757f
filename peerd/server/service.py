"""`peerd serve`: choose blocks, load them, serve them, announce them, rebalance.

Runs as a service inside the node's nursery. Life cycle: fingerprint the checkpoint → pick
the interval (explicit, or the one `balancing/` says the swarm needs most) → announce
JOINING → load only those blocks → measure (or reuse) throughput → serve and announce
ONLINE → every rebalance period, ask `should_move` and move when the swarm gains enough.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from blocks import (
    LoadedBlocks,
    ModelConfig,
    checkpoint_fingerprint,
    load_config,
    measure_throughput,
)
from peerd.records import ServerRecord, State
from peerd.server.block_server import INFERENCE_PROTOCOL, RPC_PROTOCOL, BlockServer
from peerd.server.options import ServeOptions  # defined apart: the CLI imports it light
from peerd.server.placement import StartupPlacement
from peerd.server.rebalancing import Rebalancing
from peerd.server.streams import PeerAdmission, contained, peer_channel, refuse_loading
from peerd.swarm import SwarmAccess

log = logging.getLogger("peerd.serve")

NEXT_RTT_PEERS = 8
RTT_FIRST_DELAY = 5.0
RTT_PERIOD = 60.0
DRAIN_ANNOUNCE_TIMEOUT = 5.0  # seconds to spend announcing DRAINING


class BlockService(StartupPlacement, Rebalancing):
    """The server side of a daemon: owns the current span and its `BlockServer`."""

    def __init__(self, options: ServeOptions, swarm: SwarmAccess) -> None:
        self.options = options
        self.swarm = swarm
        self.config: ModelConfig = load_config(options.model_path)
        self.model_id = ""
        self.state = State.JOINING
        self.interval: tuple[int, int] | None = None
        self.server: BlockServer | None = None
        self.throughput: dict = {}
        self.next_rtts: dict[str, float] = {}
        self.online = trio.Event()
        self.on_change: Callable[[], None] = lambda: None  # state or interval changed
        self._deferrals = 0
        self._stopping = False  # draining: no move may bring us back ONLINE
        limits = options.limits
        self.admission = PeerAdmission(limits.max_streams_per_peer, limits.peer_bytes_in_flight)

    # ----- the record ------------------------------------------------------------------
    def record(self) -> ServerRecord | None:
        if self.interval is None:
            return None
        start, end = self.interval
        server = self.server
        return ServerRecord(
            model_id=self.model_id,
            peer_id=self.swarm.node.peer_id,
            start=start,
            end=end,
            num_blocks=self.config.num_blocks,
            state=self.state,
            inference_throughput=float(self.throughput.get("block_inference_steps_per_s", 0.0)),
            forward_throughput=float(self.throughput.get("block_forward_tokens_per_s", 0.0)),
            dtype=self.options.dtype,
            quant=self.options.quant,
            free_cache_tokens=server.budget.free if server is not None else 0,
            next_rtts=dict(self.next_rtts),
        )

    def summary(self) -> dict | None:
        """What the ready file says we serve: model id, blocks and state."""
        if self.interval is None:
            return None
        start, end = self.interval
        return {"model_id": self.model_id, "start": start, "end": end, "state": self.state.value}

    # ----- running ---------------------------------------------------------------------
    async def run(self, node) -> None:  # a Node service
        opts = self.options
        fingerprint = await trio.to_thread.run_sync(
            lambda: checkpoint_fingerprint(opts.model_path, self.swarm.cache_dir)
        )
        name = opts.model_name or self.swarm.model_name_for(opts.model_path)
        self.model_id = f"{name}@{fingerprint}"
        node.set_record_provider(self.record)  # nothing to announce until we claim blocks
        interval = await self._choose_interval()
        await self._load_and_serve(interval)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._rtt_loop)
            if opts.rebalance_period > 0 and opts.blocks is None:
                nursery.start_soon(self._rebalance_loop)

    async def _load_and_serve(self, interval: tuple[int, int]) -> bool:
        """Load `interval` and serve it; False when the daemon started draining meanwhile."""
        opts = self.options
        if self._stopping:
            return False
        self.interval, self.state = interval, State.JOINING
        self.swarm.node.request_announce()
        self.on_change()
        start, end = interval
        began = time.monotonic()
        log.info(
            "loading blocks %d:%d of %s (%s, quant %s, %s)",
            start,
            end,
            self.model_id,
            opts.dtype,
            opts.quant,
            opts.device,
        )
        span = await trio.to_thread.run_sync(lambda: self._load_span(start, end))
        if self._stopping:  # drained while loading: these blocks will never serve
            return False
        log.info(
            "loaded %d blocks (%.0f MiB) in %.1f s",
            end - start,
            span.nbytes / 2**20,
            time.monotonic() - began,
        )
        self.throughput = await trio.to_thread.run_sync(
            lambda: measure_throughput(span, self.swarm.cache_dir, self.model_id)
        )
        server = BlockServer(span, self.model_id, opts.limits, record=self._record_dict)
        self._install(server)
        self.state = State.ONLINE
        self.swarm.node.request_announce()
        self.online.set()
        self.on_change()
        log.info(
            "online: blocks %d:%d, %.1f inference steps/s per block, %d cache tokens",
            start,
            end,
            self.throughput.get("block_inference_steps_per_s", 0.0),
            server.budget.capacity,
        )
        return True

    async def drain(self) -> None:
        """Stop taking new sessions, announce DRAINING, let open sessions finish within the
        grace period (`limits.drain_timeout`): their clients need no replay."""
        server = self.server
        if self._stopping:
            return
        self._stopping = True
        if server is None:
            return
        grace = self.options.limits.drain_timeout
        self.state = State.DRAINING
        server.draining = True
        self.on_change()
        log.info("draining: %d sessions open, %.0f s to finish them", len(server.sessions), grace)
        with trio.move_on_after(min(grace, DRAIN_ANNOUNCE_TIMEOUT) + 1):
            try:
                await self.swarm.node.announce(timeout=min(grace, DRAIN_ANNOUNCE_TIMEOUT))
            except Exception as exc:  # noqa: BLE001 - the OFFLINE announcement still follows
                log.info("announcing DRAINING failed: %r", exc)
        if await server.drain(grace):
            log.info("drained: every session has ended")
        else:
            log.info("drain grace over: closing %d sessions", len(server.sessions))

    def _load_span(self, start: int, end: int) -> LoadedBlocks:
        """Load with a progress bar on stderr (weights of big models take minutes to read)."""
        from tqdm import tqdm

        opts = self.options
        with tqdm(
            total=end - start, desc=f"loading blocks {start}:{end}", unit="block", leave=False
        ) as bar:
            return LoadedBlocks.load(
                opts.model_path,
                start,
                end,
                dtype=opts.dtype,
                quant=opts.quant,
                device=opts.device,
                progress=lambda _: bar.update(1),
            )

    def _record_dict(self) -> dict:
        record = self.record()
        return record.to_dict() if record is not None else {}

    def _install(self, server: BlockServer) -> None:
        """Route new streams to `server`; streams of the old one finish on the old one."""
        self.server = server
        max_frame = self.options.limits.max_frame

        async def inference(stream) -> None:
            channel = peer_channel(stream, max_frame)
            await self.admission.serve(self._handler(INFERENCE_PROTOCOL), channel)

        async def rpc(stream) -> None:
            channel = peer_channel(stream, max_frame)
            await self.admission.serve(self._handler(RPC_PROTOCOL), channel)

        node = self.swarm.node
        node.set_stream_handler(INFERENCE_PROTOCOL, inference)
        node.set_stream_handler(RPC_PROTOCOL, rpc)
        self.swarm.local_handlers[INFERENCE_PROTOCOL] = lambda ch: contained(
            self._handler(INFERENCE_PROTOCOL), ch
        )
        self.swarm.local_handlers[RPC_PROTOCOL] = lambda ch: contained(
            self._handler(RPC_PROTOCOL), ch
        )

    def _handler(self, protocol: str):
        """The current server's handler of `protocol` (a refusal while none serves)."""
        server = self.server
        if server is None:
            return refuse_loading
        return server.handle_inference if protocol == INFERENCE_PROTOCOL else server.handle_rpc

    async def _rtt_loop(self) -> None:
        await trio.sleep(RTT_FIRST_DELAY)
        while True:
            try:
                await self._measure_next_rtts()
            except Exception as exc:  # noqa: BLE001 - a failed measurement waits for the next round
                log.debug("measuring next-server round trips failed: %r", exc)
            await trio.sleep(RTT_PERIOD)

    async def _measure_next_rtts(self) -> None:
        """Round trips to servers of the blocks after ours (the next hop of a chain)."""
        if self.interval is None:
            return
        end = self.interval[1]
        records = await self.swarm.list_servers(self.model_id)
        nexts = [
            r.peer_id
            for r in records
            if r.start <= end < r.end and r.peer_id != self.swarm.node.peer_id
        ]
        self.next_rtts = await self.swarm.probe_rtts(nexts[:NEXT_RTT_PEERS])
