"""Forward and backward through a chain of servers, for training (deep prompt tuning, adapters).

Routes in throughput mode (spread over servers). A failed server is banned and the request
re-routed; when no server covers some blocks the request waits for coverage up to the
recovery timeout and then fails naming the missing blocks. `forward` returns a trace (the
inputs each span saw) so that `backward` need not recompute; when a span of the trace fails
during backward, its blocks are re-run on a fresh route (forward to recover the intermediate
inputs of the new split, then backward through it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import trio

import wire
from peerd.chain import RETRYABLE_CODES, ChainError, ChainOptions, Connector, HopFailed, Planning
from peerd.framed import ConnectionLost
from peerd.server.block_server import RPC_PROTOCOL

log = logging.getLogger("peerd.training")


@dataclass(frozen=True)
class TraceEntry:
    """One span of a forward pass: which server ran which blocks on which input."""

    peer_id: str
    start: int
    end: int
    inputs: torch.Tensor


class TrainingChain:
    """Stateless forward/backward requests routed over the swarm with retries."""

    def __init__(self, options: ChainOptions, planning: Planning, connect: Connector) -> None:
        self.options = options
        self.planning = planning
        self.connect = connect
        self.failures = 0

    def _prompts_for(
        self, prompts: torch.Tensor | None, start: int, end: int
    ) -> torch.Tensor | None:
        if prompts is None:
            return None
        return prompts[start - self.options.start : end - self.options.start]

    async def _call(self, peer_id: str, message: wire.Message) -> wire.Message:
        try:
            with trio.fail_after(self.options.step_timeout):
                channel = await self.connect(peer_id, RPC_PROTOCOL)
                try:
                    await channel.write_message(message.to_wire())
                    reply = wire.parse_message(await channel.read_message())
                finally:
                    with trio.move_on_after(0.5):
                        await channel.aclose()
        except trio.TooSlowError:
            raise HopFailed(peer_id, f"no reply within {self.options.step_timeout:.1f} s") from None
        except (ConnectionLost, wire.WireError, OSError) as exc:
            raise HopFailed(peer_id, f"stream failed: {exc}") from exc
        if isinstance(reply, wire.Error):
            if reply.code in RETRYABLE_CODES:
                raise HopFailed(peer_id, f"{reply.code}: {reply.message}")
            raise ChainError(reply.code, f"server {peer_id[:12]}…: {reply.message}")
        return reply

    def _ban(self, failure: HopFailed) -> None:
        self.failures += 1
        if self.failures > self.options.max_failures:
            raise ChainError(
                "no_route", f"giving up after {self.failures} server failures; last: {failure}"
            )
        log.warning("server %s failed (%s); re-routing", failure.peer_id[:12], failure.reason)
        self.planning.ban(failure.peer_id)

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
            request = wire.Forward(
                model_id=self.options.model_id,
                start=s,
                end=e,
                hidden=x,
                prompts=self._prompts_for(prompts, s, e),
                compression=self.options.compression,
            )
            try:
                reply = await self._call(peer_id, request)
            except HopFailed as failure:
                self._ban(failure)
                route = await self.planning.route_range(block, end)
                continue
            if not isinstance(reply, wire.ForwardResult) or reply.hidden.shape != x.shape:
                self._ban(HopFailed(peer_id, f"bad forward reply {type(reply).__name__}"))
                route = await self.planning.route_range(block, end)
                continue
            trace.append(TraceEntry(peer_id, s, e, x))
            x = reply.hidden
            block = e
            route = route[1:]
        return x, trace

    async def backward(
        self, trace: list[TraceEntry], grad_out: torch.Tensor, prompts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients w.r.t. the trace's first input and (if given) the deep prompts."""
        grad = grad_out.detach().to("cpu")
        grad_prompts = None if prompts is None else torch.zeros_like(prompts, device="cpu")
        for entry in reversed(trace):
            grad = await self._backward_span(entry, grad, prompts, grad_prompts)
        return grad, grad_prompts

    async def _backward_span(
        self,
        entry: TraceEntry,
        grad: torch.Tensor,
        prompts: torch.Tensor | None,
        grad_prompts: torch.Tensor | None,
    ) -> torch.Tensor:
        request = wire.Backward(
            model_id=self.options.model_id,
            start=entry.start,
            end=entry.end,
            hidden=entry.inputs,
            grad_out=grad,
            prompts=self._prompts_for(prompts, entry.start, entry.end),
            compression=self.options.compression,
        )
        try:
            reply = await self._call(entry.peer_id, request)
            if (
                not isinstance(reply, wire.BackwardResult)
                or reply.grad_hidden.shape != entry.inputs.shape
            ):
                raise HopFailed(entry.peer_id, f"bad backward reply {type(reply).__name__}")
        except HopFailed as failure:
            self._ban(failure)
            # Re-run these blocks on a fresh route: forward for the new split's inputs, then back.
            _, sub_trace = await self.forward(
                entry.inputs, prompts, start=entry.start, end=entry.end
            )
            for sub in reversed(sub_trace):
                grad = await self._backward_span(sub, grad, prompts, grad_prompts)
            return grad
        if grad_prompts is not None and reply.grad_prompts is not None:
            lo, hi = entry.start - self.options.start, entry.end - self.options.start
            grad_prompts[lo:hi] += reply.grad_prompts
        return reply.grad_hidden
