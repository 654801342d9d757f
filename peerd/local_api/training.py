"""Forward and backward through every block, for scripts that train (deep prompts, heads).

Training requests of a model share one planning state (pings are measured once). A forward
may keep its trace (the inputs each span saw), so that the matching backward need not run
the forward again; only the latest traces are kept.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict

import torch

from peerd.chain import Planning
from peerd.local_api.chains import ChainFactory
from peerd.local_api.connection import ApiConnection
from peerd.models import ModelRegistry
from peerd.training import TraceEntry, TrainingChain
from wire import local as api

MAX_TRACES = 64


class TrainingHandlers:
    """ChainForward and ChainBackward."""

    def __init__(self, models: ModelRegistry, chains: ChainFactory) -> None:
        self.models = models
        self.chains = chains
        # trace id -> (model id, prompts of the forward, its trace)
        self._traces: OrderedDict[str, tuple[str, torch.Tensor | None, list[TraceEntry]]] = (
            OrderedDict()
        )
        self._plans: dict[str, Planning] = {}

    async def _training_chain(self, model: str, compression: str) -> TrainingChain:
        resolved = await self.models.resolve(model)
        options = self.chains.options(
            resolved.model_id, resolved.num_blocks, 1, compression=compression, mode="throughput"
        )
        planning = self._plans.get(resolved.model_id)
        if planning is None:
            planning = self.chains.planning(options)
            await planning.build()
            self._plans[resolved.model_id] = planning
        else:
            await planning.refresh()
        return TrainingChain(options, planning, self.chains.swarm.connect)

    async def forward(self, request: api.ChainForward, conn: ApiConnection) -> None:
        chain = await self._training_chain(request.model, request.compression)
        output, trace = await chain.forward(request.hidden.float(), _maybe_float(request.prompts))
        trace_id = None
        if request.keep_trace:
            trace_id = uuid.uuid4().hex
            self._traces[trace_id] = (chain.options.model_id, _maybe_float(request.prompts), trace)
            while len(self._traces) > MAX_TRACES:
                self._traces.popitem(last=False)
        await conn.reply(
            api.ChainForwardResult(
                hidden=output.to(request.hidden.dtype),
                trace_id=trace_id,
                compression=request.compression,
            )
        )

    async def backward(self, request: api.ChainBackward, conn: ApiConnection) -> None:
        chain = await self._training_chain(request.model, request.compression)
        prompts = _maybe_float(request.prompts)
        hidden = request.hidden.float()
        kept = self._traces.pop(request.trace_id, None) if request.trace_id else None
        trace = None
        if kept is not None and _same_request(kept, chain.options.model_id, hidden, prompts):
            trace = kept[2]
        if not trace:  # a trace of other inputs or prompts would give wrong gradients
            _, trace = await chain.forward(hidden, prompts)
        grad_hidden, grad_prompts = await chain.backward(trace, request.grad_out.float(), prompts)
        await conn.reply(
            api.ChainBackwardResult(
                grad_hidden=grad_hidden.to(request.hidden.dtype),
                grad_prompts=None
                if grad_prompts is None
                else grad_prompts.to(request.prompts.dtype),
                compression=request.compression,
            )
        )


def _maybe_float(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.float()


def _same_request(
    kept: tuple[str, torch.Tensor | None, list[TraceEntry]],
    model_id: str,
    hidden: torch.Tensor,
    prompts: torch.Tensor | None,
) -> bool:
    """Whether a kept trace was made by a forward of exactly these inputs and prompts."""
    kept_model, kept_prompts, trace = kept
    if kept_model != model_id or not trace or not _equal(trace[0].inputs, hidden):
        return False
    if kept_prompts is None or prompts is None:
        return kept_prompts is None and prompts is None
    return _equal(kept_prompts, prompts)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
