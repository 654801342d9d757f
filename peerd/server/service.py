"""`peerd serve`: choose blocks, load them, serve them, announce them, rebalance.

Runs as a service inside the node's nursery. Life cycle: fingerprint the checkpoint → pick
the interval (explicit, or the one `balancing/` says the swarm needs most) → announce
JOINING → load only those blocks → measure (or reuse) throughput → serve and announce
ONLINE → every rebalance period, ask `should_move` and move when the swarm gains enough.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import trio

import wire
from balancing import (
    DEFAULT_MAX_DEFERRALS,
    SwarmEntry,
    choose_blocks,
    first_mover,
    join_place,
    should_move,
)
from blocks import (
    LoadedBlocks,
    ModelConfig,
    checkpoint_fingerprint,
    load_config,
    measure_throughput,
)
from peerd.framed import FramedChannel, Libp2pByteStream
from peerd.records import ServerRecord, State
from peerd.server.block_server import INFERENCE_PROTOCOL, RPC_PROTOCOL, BlockServer
from peerd.server.memory import blocks_that_fit
from peerd.server.options import ServeOptions  # defined apart: the CLI imports it light
from peerd.swarm import SwarmAccess

log = logging.getLogger("peerd.serve")

NEXT_RTT_PEERS = 8
RTT_FIRST_DELAY = 5.0
RTT_PERIOD = 60.0
INFO_TIMEOUT = 5.0  # seconds to wait for a server's own word on its blocks
# Start-up: rounds of claim (announce JOINING) → wait → re-list before loading, the wait
# between them (seconds, random so that servers started together interleave), and how long
# one claim's announcement may take.
SETTLE_ROUNDS = 6
SETTLE_WAIT = (0.5, 1.5)
CLAIM_TIMEOUT = 5.0


class BlockService:
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

    async def _choose_interval(self) -> tuple[int, int]:
        opts, total = self.options, self.config.num_blocks
        if opts.blocks is not None:
            return opts.blocks
        size = opts.num_blocks or blocks_that_fit(self.config, opts)
        size = max(1, min(size, total))
        swarm = await self._swarm_entries()
        guess = self._my_throughput_guess(swarm)
        start, end = choose_blocks(total, swarm, size, guess)
        log.info(
            "chose blocks %d:%d of %d (swarm has %d other servers)", start, end, total, len(swarm)
        )
        return await self._settle_claim((start, end), guess)

    async def _settle_claim(self, claim: tuple[int, int], guess: float) -> tuple[int, int]:
        """Announce `claim` as JOINING and re-check it against the claims of servers that
        started with us (`join_place`) until it holds, before loading anything.

        Servers started together each list the swarm before the others announced, and pick
        the same blocks; once loaded, only the rebalance period (minutes) would part them.
        The claim holds after two checks in a row (the first may run before the claims of
        servers started with us are visible, the second sees them; they may still be moving).
        """
        total, me = self.config.num_blocks, self.swarm.node.peer_id
        held = 0
        for round_ in range(SETTLE_ROUNDS):
            self.interval, self.state = claim, State.JOINING
            await self._announce_claim(provide=round_ == 0)
            await trio.sleep(random.uniform(*SETTLE_WAIT))
            joining: set[str] = set()
            swarm = await self._swarm_entries(joining)
            new = join_place(total, swarm, SwarmEntry(me, *claim, guess), joining)
            if new != claim:
                log.info("claim %d:%d taken by servers joining too; claiming %d:%d", *claim, *new)
                claim, held = new, 0
                continue
            held += 1
            if held >= 2:
                break
        return claim

    async def _announce_claim(self, provide: bool) -> None:
        """Store our JOINING record now and, the first time, say that we serve the model
        (listings find servers by those provider records; the announcer's loop would only
        add ours at its next round), so that the others' next listing shows our claim."""
        node = self.swarm.node
        with trio.move_on_after(CLAIM_TIMEOUT):
            try:
                await node.announce(timeout=CLAIM_TIMEOUT)
                if provide and node.dht is not None:
                    await node.dht.provide(self.model_id, node.peer_id)
            except Exception as exc:  # noqa: BLE001 - the announcer's loop retries
                log.debug("announcing our claim failed: %r", exc)

    async def _swarm_entries(self, joining: set[str] | None = None) -> list[SwarmEntry]:
        """The other servers of our model, JOINING ones included: they are about to hold
        those blocks (counting only ONLINE ones made servers that start or move together all
        pick the same blocks). A record without a measured throughput yet counts at the
        median of the measured ones. The peer ids of JOINING ones are added to `joining`."""
        records = await self.swarm.list_servers(self.model_id)
        me = self.swarm.node.peer_id
        others = [r for r in records if r.peer_id != me and r.state is not State.OFFLINE]
        if joining is not None:
            joining.update(r.peer_id for r in others if r.state is State.JOINING)
        measured = sorted(r.inference_throughput for r in others if r.inference_throughput > 0)
        fallback = measured[len(measured) // 2] if measured else 1.0
        return [
            SwarmEntry(r.peer_id, r.start, r.end, r.inference_throughput or fallback)
            for r in others
        ]

    def _my_throughput_guess(self, swarm: list[SwarmEntry]) -> float:
        if self.throughput:
            return float(self.throughput["block_inference_steps_per_s"])
        return sorted(e.throughput for e in swarm)[len(swarm) // 2] if swarm else 1.0

    async def _load_and_serve(self, interval: tuple[int, int]) -> None:
        opts = self.options
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
            await _contained(
                self.server.handle_inference, FramedChannel(Libp2pByteStream(stream), max_frame)
            )

        async def rpc(stream) -> None:
            await _contained(
                self.server.handle_rpc, FramedChannel(Libp2pByteStream(stream), max_frame)
            )

        node = self.swarm.node
        node.set_stream_handler(INFERENCE_PROTOCOL, inference)
        node.set_stream_handler(RPC_PROTOCOL, rpc)
        self.swarm.local_handlers[INFERENCE_PROTOCOL] = lambda ch: _contained(
            self.server.handle_inference, ch
        )
        self.swarm.local_handlers[RPC_PROTOCOL] = lambda ch: _contained(self.server.handle_rpc, ch)

    async def _rtt_loop(self) -> None:
        await trio.sleep(RTT_FIRST_DELAY)
        while True:
            try:
                await self._measure_next_rtts()
            except Exception as exc:  # noqa: BLE001 - a failed measurement waits for the next round
                log.debug("measuring next-server round trips failed: %r", exc)
            await trio.sleep(RTT_PERIOD)

    async def _rebalance_loop(self) -> None:
        """Every period (randomly stretched or shrunk), ask `should_move`; move when a second
        check soon after says the same: a DHT listing that missed a live server (a lookup timed
        out on a busy machine) would otherwise send us off blocks that only we serve."""
        period = self.options.rebalance_period
        pending: tuple[int, int] | None = None
        while True:
            share = random.uniform(0.2, 0.4) if pending else random.uniform(0.5, 1.5)
            await trio.sleep(period * share)
            try:
                new = await self._wanted_move()
            except Exception as exc:  # noqa: BLE001 - a failed listing waits for the next round
                log.warning("rebalancing check failed: %r", exc)
                continue
            if new is None or new != pending:
                if new is not None:
                    log.info("rebalancing: blocks %d:%d would help more; checking again", *new)
                pending = new
                continue
            pending = None
            log.info("rebalancing: moving from blocks %d:%d to %d:%d", *self.interval, *new)
            await self._load_and_serve(new)

    async def _wanted_move(self) -> tuple[int, int] | None:
        """The interval `should_move` sends us to now, or None to stay (balancing's
        `first_mover` rule decides which of several servers that should move goes first)."""
        if self.interval is None:
            return None
        others = await self._swarm_entries()
        start, end = self.interval
        me = SwarmEntry(self.swarm.node.peer_id, start, end, self._my_throughput_guess(others))
        everyone, total, min_gain = [*others, me], self.config.num_blocks, self.options.min_gain
        move, new = should_move(total, everyone, me, min_gain)
        if not move:
            self._deferrals = 0
            return None
        # a move restarts us and may leave blocks only we serve: decide on what the servers
        # say they hold right now, not on DHT records that can lag a move by many seconds
        others = await self._confirmed(others)
        everyone = [*others, me]
        move, new = should_move(total, everyone, me, min_gain)
        if not move:
            return None
        first = first_mover(total, everyone, min_gain)
        if first is not None and first < me.peer_id and self._deferrals < DEFAULT_MAX_DEFERRALS:
            self._deferrals += 1
            log.info("rebalancing: blocks %d:%d would help more; %s moves first", *new, first)
            return None
        self._deferrals = 0
        return tuple(new)

    async def _confirmed(self, entries: list[SwarmEntry]) -> list[SwarmEntry]:
        """`entries` with the blocks each server reports in an Info reply; a server that
        does not answer keeps its listed blocks, one that serves something else drops out."""
        confirmed: dict[str, SwarmEntry | None] = {e.peer_id: e for e in entries}

        async def ask(entry: SwarmEntry) -> None:
            with trio.move_on_after(INFO_TIMEOUT):
                try:
                    confirmed[entry.peer_id] = await self._live_entry(entry)
                except Exception as exc:  # noqa: BLE001 - unconfirmed: keep the listed blocks
                    log.debug("no Info from %s: %r", entry.peer_id, exc)

        async with trio.open_nursery() as nursery:
            for entry in entries:
                nursery.start_soon(ask, entry)
        return [e for e in confirmed.values() if e is not None]

    async def _live_entry(self, entry: SwarmEntry) -> SwarmEntry | None:
        channel = await self.swarm.connect(entry.peer_id, RPC_PROTOCOL)
        try:
            await channel.write_message(wire.Info().to_wire())
            reply = wire.parse_message(await channel.read_message())
        finally:
            await channel.aclose()
        if not isinstance(reply, wire.InfoResult):
            return entry
        record = reply.record
        start, end = record.get("start"), record.get("end")
        if (
            record.get("model_id") != self.model_id
            or record.get("state") not in (State.ONLINE.value, State.JOINING.value)
            or not (type(start) is int and type(end) is int and 0 <= start < end)
        ):
            return None
        throughput = record.get("inference_throughput")
        if not isinstance(throughput, float) or not throughput > 0:
            throughput = entry.throughput
        return SwarmEntry(entry.peer_id, start, end, throughput)

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


async def _contained(handler, channel: FramedChannel) -> None:
    """A handler's unexpected exception ends its own stream only, never the daemon."""
    try:
        await handler(channel)
    except Exception:  # noqa: BLE001
        log.exception("request handler failed")
        with trio.move_on_after(1):
            await channel.aclose()
