"""Repairing an inference chain: after a server failed, re-route from its first block (D* Lite,
preferring servers of the same dtype and quantization), open the replacement sessions and
replay the stored inputs; every failure handled by its kind (peerd.hop_errors).

A mixin of `InferenceChain` (peerd/chain.py): it works on the chain's hops, history, options,
planning and recoveries.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import wire
from peerd.hops import AVOID, BAN, RESYNC, ChainError, ChainHop, HopFailed, our_fault
from peerd.replay_history import BoundaryHistory
from routing import ServerSpan
from wire import ErrorCode

log = logging.getLogger("peerd.chain")


@dataclass
class RecoveryEvent:
    """What happened at one failure, for logs, the demo and tests."""

    failed_peer: str
    reason: str
    from_block: int
    new_route: list[tuple[str, int, int]]
    replayed_tokens: int
    seconds: float
    kind: str = BAN  # what was done about the server: BAN, AVOID or RESYNC (peerd.hops)
    precision_changes: list[str] = field(default_factory=list)
    """Blocks now served in another dtype or quantization than before (no alike server was
    left): seeded samples and greedy ties may differ from here on."""


class ChainRepair:
    """Recovery of `InferenceChain` (see the module docstring)."""

    async def _recover(self, index: int, failure: HopFailed) -> None:
        started = time.monotonic()
        log.warning(
            "server %s failed (%s, %s); repairing from block %d",
            failure.peer_id[:12],
            failure.reason,
            failure.kind,
            self.hops[index].start,
        )
        self._handle(failure)
        if failure.kind == RESYNC:  # same server, new session: replayed by _repair
            await self.hops[index].close()
        replayed = await self._repair(index, None if failure.kind == RESYNC else failure.peer_id)
        self.recoveries.append(
            RecoveryEvent(
                failed_peer=failure.peer_id,
                reason=failure.reason,
                from_block=self.hops[index].start,
                new_route=self.route,
                replayed_tokens=replayed,
                seconds=time.monotonic() - started,
                kind=failure.kind,
                precision_changes=self._take_precision_changes(),
            )
        )

    async def _repair(self, index: int, failed_peer: str | None) -> int:
        """Make hops[index:] a working tail: re-route from hops[index].start, open and replay.

        Loops until every hop of the tail has an open session whose cache holds all tokens so
        far; a failure during replay bans that server and repairs again from its first block.
        Returns the number of tokens replayed.
        """
        replayed = 0
        while True:
            block = self.hops[index].start if index < len(self.hops) else self.options.start
            prev = self.hops[index - 1].peer_id if index > 0 else None
            new_keys = await self.planning.route_from(
                block, prev, self._alike if self.precision else None
            )
            old_tail = {hop.key: hop for hop in self.hops[index:] if hop.peer_id != failed_peer}
            tail = [old_tail.pop(key, None) or ChainHop(*key) for key in new_keys]
            for hop in old_tail.values():
                await hop.close()
            for hop in self.hops[index:]:
                if hop.peer_id == failed_peer:
                    await hop.close(graceful=False)
            self.hops = self.hops[:index] + tail
            self._forget_unused_history()
            try:
                for position in range(index, len(self.hops)):
                    hop = self.hops[position]
                    if hop.channel is not None:
                        continue
                    replayed += await self._open_and_replay(hop)
                self._note_precision()
                return replayed
            except HopFailed as failure:
                log.warning(
                    "server %s failed during replay (%s)", failure.peer_id[:12], failure.reason
                )
                self._handle(failure)
                index = next(i for i, h in enumerate(self.hops) if h.peer_id == failure.peer_id)
                if failure.kind == RESYNC:
                    await self.hops[index].close()
                    failed_peer = None
                else:
                    failed_peer = failure.peer_id

    def _precision_of(self, hop: ChainHop) -> tuple[str, str]:
        known = self.planning.known.get(hop.peer_id)
        dtype = hop.limits.dtype if hop.limits is not None else "float32"
        return (dtype, known.quant if known is not None else "none")

    def _alike(self, server: ServerSpan) -> bool:
        """Whether a server computes its blocks in the dtype and quantization the chain had
        there (a replacement of another precision would change seeded samples, greedy ties)."""
        if not self.precision:
            return True
        lo, hi = max(server.start, self.options.start), min(server.end, self.options.end)
        want = {self.precision.get(b) for b in range(lo, hi)} - {None}
        return want <= {(server.dtype, server.quant)}

    def _note_precision(self) -> None:
        """Record what serves each block now; a change of precision is said (log, event)."""
        for hop in self.hops:
            now = self._precision_of(hop)
            before = self.precision.get(hop.start)
            if before is not None and before != now:
                change = (
                    f"blocks {hop.start}..{hop.end}: {before[0]}/{before[1]} -> "
                    f"{now[0]}/{now[1]} on {hop.peer_id[:12]}"
                )
                log.warning("no server alike was left; precision changed: %s", change)
                self._precision_changes.append(change)
            for b in range(hop.start, hop.end):
                self.precision[b] = now

    def _take_precision_changes(self) -> list[str]:
        changes, self._precision_changes = self._precision_changes, []
        return changes

    def _handle(self, failure: HopFailed) -> None:
        """Count the failure; ban the server (BAN) or leave it out of this chain (AVOID)."""
        self.failures += 1
        if self.failures > self.options.max_failures:
            self.broken = f"{self.failures} server failures"
            raise ChainError(
                ErrorCode.NO_ROUTE,
                f"giving up after {self.failures} server failures; last: {failure}",
            )
        if failure.kind == BAN:
            self.planning.ban(failure.peer_id)
        elif failure.kind == AVOID:
            self.planning.avoid(failure.peer_id, failure.reason)

    async def _open_and_replay(self, hop: ChainHop) -> int:
        """Open a session on `hop` and feed it every input its first block has seen so far."""
        opts = self.options
        with our_fault("session not opened"):
            request = wire.OpenSession(
                model_id=opts.model_id,
                start=hop.start,
                end=hop.end,
                max_length=opts.max_length,
                batch_size=opts.batch_size,
                compression=opts.compression,
                session_id=self.session_id,
                pad_lengths=self.pad_lengths,
            )
        await hop.open(self.connect, request, opts.open_timeout)
        self.planning.peer_limits[hop.peer_id] = hop.limits
        if self.length == 0:
            return 0
        past = self.history.get(hop.start)
        if not past:
            raise ChainError(
                ErrorCode.INTERNAL,
                f"no stored inputs for block {hop.start}: cannot rebuild its cache",
            )
        inputs = past.inputs(hop.limits.torch_dtype)
        outputs = await self._send(hop, inputs, replay=True)
        if hop.end < opts.end:
            self.history[hop.end] = BoundaryHistory.of(outputs)
        return inputs.shape[1]

    def _forget_unused_history(self) -> None:
        """History is kept only where a hop starts; a boundary that left the chain goes stale."""
        starts = {hop.start for hop in self.hops}
        for boundary in list(self.history):
            if boundary not in starts:
                del self.history[boundary]
