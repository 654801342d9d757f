"""Forward and backward through a chain of servers, for training (deep prompt tuning).

Routes in throughput mode (spread over servers). A failed server is banned and the request
re-routed; when no server covers some blocks the request waits for coverage up to the
recovery timeout and then fails naming the missing blocks. `forward` returns a trace (the
inputs each span saw) so that `backward` need not recompute; when a span of the trace fails
during backward, its blocks are re-run on a fresh route (forward to recover the intermediate
inputs of the new split, then backward through it).

Each server is asked once what it accepts (`Info`: frame limit, tokens per request, compute
dtype; remembered in the shared Planning); a batch too big for one of its frames is cut
into several requests of whole sequences, on one stream, and the results are put together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import trio

import wire
from peerd.hops import (
    AVOID,
    BAN,
    ChainError,
    Connector,
    HopFailed,
    HopLimits,
    exchange,
    open_channel,
    our_fault,
)
from peerd.planning import ChainOptions, Planning
from peerd.server.protocols import RPC_PROTOCOL
from wire import ErrorCode
from wire.sizing import BATCH, INT_LIST_ITEM_BYTES, counted_bytes, int_list_bytes

log = logging.getLogger("peerd.training")


@dataclass(frozen=True)
class TraceEntry:
    """One span of a forward pass: which server ran which blocks on which input."""

    peer_id: str
    start: int
    end: int
    inputs: torch.Tensor


@dataclass(frozen=True)
class BatchCut:
    """How one request over a batch is cut: the row slices, and how prompts go with them."""

    pieces: list[slice]
    prompts_per_row: bool

    def prompts(self, prompts: torch.Tensor | None, piece: slice) -> torch.Tensor | None:
        if prompts is None or not self.prompts_per_row:
            return prompts
        return prompts[:, piece]


class TrainingChain:
    """Stateless forward/backward requests routed over the swarm with retries."""

    def __init__(self, options: ChainOptions, planning: Planning, connect: Connector) -> None:
        self.options = options
        self.planning = planning
        self.connect = connect
        self.failures = 0
        pads = options.pad_lengths
        self.pad_lengths = None if pads is None else [int(p) for p in pads]

    def _prompts_for(
        self, prompts: torch.Tensor | None, start: int, end: int
    ) -> torch.Tensor | None:
        if prompts is None:
            return None
        return prompts[start - self.options.start : end - self.options.start]

    # ----- one server -----------------------------------------------------------------
    async def _limits(self, peer_id: str, channel) -> HopLimits:
        known = self.planning.peer_limits.get(peer_id)
        if known is not None:
            return known
        reply = await exchange(
            channel,
            peer_id,
            wire.Info(),
            timeout=self.options.step_timeout,
            max_frame=channel.max_frame,
        )
        if not isinstance(reply, wire.InfoResult):
            raise HopFailed(peer_id, f"unexpected reply {type(reply).__name__} to Info")
        limits = HopLimits.from_info(reply.limits, channel.max_frame)
        self.planning.peer_limits[peer_id] = limits
        return limits

    async def _call(
        self, peer_id: str, requests: Callable[[HopLimits], list[wire.Message]]
    ) -> list[wire.Message]:
        """Send the requests built for this server's limits on one stream; their replies."""
        try:
            with trio.fail_after(self.options.open_timeout):
                channel = await open_channel(self.connect, peer_id, RPC_PROTOCOL)
        except trio.TooSlowError:
            raise HopFailed(peer_id, "no stream within the open timeout") from None
        try:
            limits = await self._limits(peer_id, channel)
            replies = []
            for message in requests(limits):
                reply = await exchange(
                    channel,
                    peer_id,
                    message,
                    timeout=self.options.step_timeout,
                    max_frame=limits.max_frame,
                )
                replies.append(reply)
            return replies
        finally:
            with trio.move_on_after(0.5):
                await channel.aclose()

    def _cut(
        self, limits: HopLimits, shape: torch.Size, prompts: torch.Tensor | None, tensors: int
    ) -> BatchCut:
        """Cut a batch into requests of whole sequences that fit this server's frames."""
        batch = shape[0]
        per_row = prompts is not None and batch > 1 and prompts.shape[1] == batch
        fixed = row_extra = 0
        if prompts is not None:  # replies (gradients included) are no bigger than requests
            if per_row:
                one = [prompts.shape[0], 1, *prompts.shape[2:]]
                row_extra += counted_bytes(one, limits.dtype, self.options.compression)
            else:
                fixed += counted_bytes(prompts.shape, limits.dtype, self.options.compression)
        if self.pad_lengths is not None:
            fixed += int_list_bytes(0)
            row_extra += INT_LIST_ITEM_BYTES
        rows = limits.rows(
            shape,
            self.options.compression,
            dim=BATCH,
            tensors=tensors,
            fixed_bytes=fixed,
            row_extra_bytes=row_extra,
        )
        return BatchCut(wire.cuts(batch, rows), per_row)

    def _pads(self, piece: slice) -> list[int] | None:
        return None if self.pad_lengths is None else self.pad_lengths[piece]

    def _ban(self, failure: HopFailed) -> None:
        self.failures += 1
        if self.failures > self.options.max_failures:
            raise ChainError(
                ErrorCode.NO_ROUTE,
                f"giving up after {self.failures} server failures; last: {failure}",
            )
        log.warning("server %s failed (%s); re-routing", failure.peer_id[:12], failure.reason)
        if failure.kind == AVOID:  # healthy, but cannot take these requests: no strike
            self.planning.avoid(failure.peer_id, failure.reason)
        elif failure.kind == BAN:
            self.planning.ban(failure.peer_id)

    # ----- forward ----------------------------------------------------------------------
    async def forward(
        self,
        hidden: torch.Tensor,
        prompts: torch.Tensor | None = None,
        *,
        start: int | None = None,
        end: int | None = None,
    ) -> tuple[torch.Tensor, list[TraceEntry]]:
        """Run blocks [start, end) (default the chain's) on full sequences; returns output and trace."""
        start = self.options.start if start is None else start
        end = self.options.end if end is None else end
        x = hidden.detach().to("cpu")
        trace: list[TraceEntry] = []
        block = start
        route = await self.planning.route_range(block, end)
        while block < end:
            peer_id, s, e = route[0]
            try:
                y = await self._forward_span(peer_id, s, e, x, self._prompts_for(prompts, s, e))
            except HopFailed as failure:
                self._ban(failure)
                route = await self.planning.route_range(block, end)
                continue
            trace.append(TraceEntry(peer_id, s, e, x))
            x = y
            block = e
            route = route[1:]
        return x.to(hidden.dtype), trace

    async def _forward_span(
        self, peer_id: str, s: int, e: int, x: torch.Tensor, prompts: torch.Tensor | None
    ) -> torch.Tensor:
        chunks: list[torch.Tensor] = []

        def requests(limits: HopLimits) -> list[wire.Message]:
            dtype = limits.torch_dtype
            h = x.to(dtype)
            p = None if prompts is None else prompts.to(dtype)
            cut = self._cut(limits, h.shape, p, tensors=1)
            chunks.extend(h[piece] for piece in cut.pieces)
            with our_fault("forward not sent"):
                return [
                    wire.Forward(
                        model_id=self.options.model_id,
                        start=s,
                        end=e,
                        hidden=h[piece],
                        prompts=cut.prompts(p, piece),
                        compression=self.options.compression,
                        pad_lengths=self._pads(piece),
                    )
                    for piece in cut.pieces
                ]

        replies = await self._call(peer_id, requests)
        for reply, chunk in zip(replies, chunks, strict=True):
            if not isinstance(reply, wire.ForwardResult) or reply.hidden.shape != chunk.shape:
                raise HopFailed(peer_id, f"bad forward reply {type(reply).__name__}")
        return torch.cat([r.hidden for r in replies], dim=0)

    # ----- backward ---------------------------------------------------------------------
    async def backward(
        self, trace: list[TraceEntry], grad_out: torch.Tensor, prompts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients w.r.t. the trace's first input and (if given) the deep prompts."""
        grad = grad_out.detach().to("cpu")
        grad_prompts = None if prompts is None else torch.zeros_like(prompts, device="cpu")
        for entry in reversed(trace):
            grad = await self._backward_span(entry, grad, prompts, grad_prompts)
        return grad.to(grad_out.dtype), grad_prompts

    async def _backward_span(
        self,
        entry: TraceEntry,
        grad: torch.Tensor,
        prompts: torch.Tensor | None,
        grad_prompts: torch.Tensor | None,
    ) -> torch.Tensor:
        span_prompts = self._prompts_for(prompts, entry.start, entry.end)
        try:
            grad_hidden, span_grad_prompts = await self._backward_call(entry, grad, span_prompts)
        except HopFailed as failure:
            self._ban(failure)
            # Re-run these blocks on a fresh route: forward for the new split's inputs, then back.
            _, sub_trace = await self.forward(
                entry.inputs, prompts, start=entry.start, end=entry.end
            )
            for sub in reversed(sub_trace):
                grad = await self._backward_span(sub, grad, prompts, grad_prompts)
            return grad
        if grad_prompts is not None and span_grad_prompts is not None:
            lo, hi = entry.start - self.options.start, entry.end - self.options.start
            if span_grad_prompts.shape != grad_prompts[lo:hi].shape:  # would broadcast
                raise HopFailed(
                    entry.peer_id,
                    f"prompt gradients of shape {list(span_grad_prompts.shape)} for prompts "
                    f"{list(grad_prompts[lo:hi].shape)}",
                )
            grad_prompts[lo:hi] += span_grad_prompts.to(grad_prompts.dtype)
        return grad_hidden

    async def _backward_call(
        self, entry: TraceEntry, grad: torch.Tensor, prompts: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        shapes: list[torch.Size] = []
        cuts: list[BatchCut] = []

        def requests(limits: HopLimits) -> list[wire.Message]:
            dtype = limits.torch_dtype
            h, g = entry.inputs.to(dtype), grad.to(dtype)
            p = None if prompts is None else prompts.to(dtype)
            cut = self._cut(limits, h.shape, p, tensors=2)
            cuts.append(cut)
            shapes.extend(h[piece].shape for piece in cut.pieces)
            with our_fault("backward not sent"):
                return [
                    wire.Backward(
                        model_id=self.options.model_id,
                        start=entry.start,
                        end=entry.end,
                        hidden=h[piece],
                        grad_out=g[piece],
                        prompts=cut.prompts(p, piece),
                        compression=self.options.compression,
                        pad_lengths=self._pads(piece),
                    )
                    for piece in cut.pieces
                ]

        replies = await self._call(entry.peer_id, requests)
        for reply, shape in zip(replies, shapes, strict=True):
            if not isinstance(reply, wire.BackwardResult) or reply.grad_hidden.shape != shape:
                raise HopFailed(entry.peer_id, f"bad backward reply {type(reply).__name__}")
        grad_hidden = torch.cat([r.grad_hidden for r in replies], dim=0)
        parts = [r.grad_prompts for r in replies]
        if prompts is None or any(p is None for p in parts):
            return grad_hidden, None
        if cuts[0].prompts_per_row:
            return grad_hidden, torch.cat(parts, dim=1)
        return grad_hidden, torch.stack([p.float() for p in parts]).sum(dim=0)
