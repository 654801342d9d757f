"""Fault-tolerant inference chains: a route of servers, one session per span, replay on failure.

The client keeps, for every block boundary where a span of the current chain starts, the
inputs it sent there (`history[boundary]`, all tokens so far). When a server fails or times
out, the chain bans it, tells the D* Lite planner, repairs the route from the failed span's
first block, replays the stored inputs to the replacement spans one after another (each
replay's output is the history of the next boundary, so a replacement may split the blocks
differently from the failed server), and retries the step. Spans before the failure, and
later spans whose (peer, interval) are unchanged, keep their server-side caches.

A step with `reorder` (beam search) gathers every server's cache rows before it runs; the
chain gathers its stored history (and the pad lengths) the same way, so a replay rebuilds
exactly the reordered caches. Steps and replays too big for one frame are cut along the
sequence (peerd.hops).

Every Step carries the hop's cache position and every reply's cache length is checked, so a
chain never computes on a cache that is not exactly its tokens. A step that fails part-way
(an early hop advanced, a later one could not be repaired) rolls the stored history back to
the chain's length; the next step first reopens and replays every hop whose cache differs
(on the same servers, nobody banned). A chain refuses further steps only once it gave up
after `max_failures` server failures: by then every repair would just ban more servers.
Failures have kinds (peerd.hops): BAN (a strike, routed around), AVOID (left out of this
chain only: moved blocks, limits too small, cache full) and RESYNC (reopen the same server
and replay: its idle timeout closed the session, or it was out of step).
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Sequence

import torch
import trio

import wire
from peerd.chain_repair import ChainRepair, RecoveryEvent  # noqa: F401 - re-exported
from peerd.hops import (
    RETRYABLE_CODES,
    ChainError,
    ChainHop,
    Connector,
    HopFailed,
    HopLimits,
)
from peerd.planning import ChainOptions, Planning, RttProbe, ServerSource
from peerd.replay_history import BoundaryHistory
from wire import ErrorCode
from wire.sizing import SEQUENCE, int_list_bytes

log = logging.getLogger("peerd.chain")

OPEN_WAIT = 3.0  # seconds an opening chain waits for a missing block to appear

__all__ = [
    "OPEN_WAIT",
    "RETRYABLE_CODES",
    "ChainError",
    "ChainHop",
    "ChainOptions",
    "Connector",
    "HopFailed",
    "HopLimits",
    "InferenceChain",
    "Planning",
    "RecoveryEvent",
    "RttProbe",
    "ServerSource",
]


class InferenceChain(ChainRepair):
    """One inference session across the swarm, surviving server failures."""

    def __init__(self, options: ChainOptions, planning: Planning, connect: Connector) -> None:
        self.options = options
        self.planning = planning
        self.connect = connect
        self.hops: list[ChainHop] = []
        self.history: dict[int, BoundaryHistory] = {}
        self.broken: str | None = None  # why a step failed part-way (the chain is unusable)
        self.length = 0
        self.recoveries: list[RecoveryEvent] = []
        self.failures = 0
        self._step_ids = itertools.count()
        self.precision: dict[int, tuple[str, str]] = {}  # block -> (dtype, quant) serving it
        self._precision_changes: list[str] = []
        self._missed_reorder: set[ChainHop] = set()  # hops a failed step's reorder never reached
        # the stored history and pad lengths before this step's reorder (undone on failure)
        self._before_reorder: tuple[dict[int, list], list[int] | None] | None = None
        self.session_id = uuid.uuid4().hex
        pads = options.pad_lengths
        self.pad_lengths = None if pads is None else [int(p) for p in pads]
        if self.pad_lengths is not None and len(self.pad_lengths) != options.batch_size:
            raise ChainError(
                ErrorCode.BAD_REQUEST,
                f"{len(self.pad_lengths)} pad lengths for a batch of {options.batch_size}",
            )

    @property
    def route(self) -> list[tuple[str, int, int]]:
        return [h.key for h in self.hops]

    # ----- lifecycle --------------------------------------------------------------
    async def open(self) -> None:
        await self.planning.build()
        self.hops = []
        self.planning.waiting = OPEN_WAIT  # a gap at the start is reported soon, not waited out
        try:
            await self._repair(0, None)
        finally:
            self.planning.waiting = None

    async def aclose(self) -> None:
        """Close every session; the route stays readable afterwards."""
        for hop in self.hops:
            await hop.close()

    async def __aenter__(self) -> InferenceChain:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()

    # ----- stepping ---------------------------------------------------------------
    async def step(
        self, hidden: torch.Tensor, reorder: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Hidden states [B, T, H] in, hidden states after the last block out (in the dtype
        of `hidden`). `reorder`: row i of every cache becomes row reorder[i] before the step."""
        if self.broken is not None:
            raise ChainError(
                ErrorCode.CLOSED, f"this chain gave up ({self.broken}); open a new one"
            )
        batch = self.options.batch_size
        if hidden.dim() != 3 or hidden.shape[0] != batch or hidden.shape[1] < 1:
            raise ChainError(
                ErrorCode.BAD_REQUEST,
                f"expected hidden states [batch={batch}, tokens, hidden], got {list(hidden.shape)}",
            )
        index = self._check_reorder(reorder)
        if self.length + hidden.shape[1] > self.options.max_length:
            raise ChainError(
                ErrorCode.CACHE_FULL,
                f"session max length {self.options.max_length} exceeded: {self.length} done + "
                f"{hidden.shape[1]} new",
            )
        x = hidden.detach().to("cpu")
        frames = [h.limits.ours for h in self.hops if h.limits is not None and h.limits.ours]
        ours = HopLimits(min(frames, default=wire.DEFAULT_MAX_FRAME))
        # a step our own frame limit cannot carry is refused before anyone gets it
        ours.rows(
            x.shape, self.options.compression, dim=SEQUENCE, fixed_bytes=_reorder_bytes(index)
        )
        await self._restore()
        try:
            x = await self._step_every_hop(x, index)
        except BaseException:
            self._roll_back()
            raise
        self.length += hidden.shape[1]
        return x.to(hidden.dtype)

    def _stale(self) -> list[int]:
        """Positions of hops whose cache does not hold exactly the chain's tokens."""
        return [i for i, h in enumerate(self.hops) if h.channel is None or h.length != self.length]

    def _roll_back(self) -> None:
        """After a step that failed part-way: the stored history goes back to the chain's
        length (and row order, when the step had a reorder); the hops whose caches now differ
        from it are replayed by the next step before anything else."""
        if self._before_reorder is not None:
            # the failed step's reorder is undone: the caller may send it again
            pieces, pads = self._before_reorder
            for boundary in list(self.history):
                if boundary in pieces:
                    self.history[boundary].restore(pieces[boundary])
                else:  # made by a replay of reordered inputs during the step
                    del self.history[boundary]
            self.pad_lengths = pads
            for hop in self.hops:  # every hop the step reached holds reordered rows
                if hop not in self._missed_reorder:
                    hop.length = None
        for past in self.history.values():
            past.truncate(self.length)

    async def _restore(self) -> None:
        """Bring every hop back to the chain's length: reopen and replay the stale ones (on
        the same servers when they are still eligible; nobody is banned for it)."""
        stale = self._stale()
        if not stale:
            return
        log.warning("chain out of step after a failed step: replaying %d hop(s)", len(stale))
        for i in stale:
            await self.hops[i].close()
        started = time.monotonic()
        replayed = await self._repair(stale[0], None)
        self.recoveries.append(
            RecoveryEvent(
                failed_peer="",
                reason="restore after a step that failed part-way",
                from_block=self.hops[stale[0]].start,
                new_route=self.route,
                replayed_tokens=replayed,
                seconds=time.monotonic() - started,
                precision_changes=self._take_precision_changes(),
            )
        )

    async def _step_every_hop(self, x: torch.Tensor, index: list[int] | None) -> torch.Tensor:
        self._before_reorder = None
        if index is not None:
            snapshot = {b: past.snapshot() for b, past in self.history.items()}
            self._before_reorder = (
                snapshot,
                None if self.pad_lengths is None else list(self.pad_lengths),
            )
            self._reorder_history(index)
        # hops open before this step get the reorder; replacements replay gathered history
        self._missed_reorder = set(self.hops) if index is not None else set()
        position = 0
        while position < len(self.hops):
            hop = self.hops[position]
            reorder = index if hop in self._missed_reorder else None
            self._missed_reorder.discard(hop)
            try:
                y = await self._send(hop, x, reorder=reorder)
            except HopFailed as failure:
                await self._recover(position, failure)
                continue
            self.history.setdefault(hop.start, BoundaryHistory()).append(x)
            x = y
            position += 1
        return x

    def _check_reorder(self, reorder: Sequence[int] | None) -> list[int] | None:
        if reorder is None:
            return None
        batch = self.options.batch_size
        index = [int(i) for i in reorder]
        if len(index) != batch or any(not 0 <= i < batch for i in index):
            raise ChainError(
                ErrorCode.BAD_REQUEST,
                f"reorder must list {batch} row indices in [0, {batch}), got {index[:16]}",
            )
        return index

    def _reorder_history(self, index: list[int]) -> None:
        """Gather the stored inputs (and pad lengths) like the servers gather their caches."""
        rows = torch.tensor(index)
        for past in self.history.values():
            past.reorder(rows)
        if self.pad_lengths is not None:
            self.pad_lengths = [self.pad_lengths[i] for i in index]

    async def _send(
        self,
        hop: ChainHop,
        x: torch.Tensor,
        *,
        replay: bool = False,
        reorder: list[int] | None = None,
    ) -> torch.Tensor:
        return await hop.step(
            x,
            self._step_ids,
            compression=self.options.compression,
            timeout=self.options.step_timeout,
            replay=replay,
            reorder=reorder,
        )

    # ----- recovery ---------------------------------------------------------------


def _reorder_bytes(index: list[int] | None) -> int:
    return int_list_bytes(len(index)) if index else 0
