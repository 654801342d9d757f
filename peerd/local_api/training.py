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
        self._traces: OrderedDict[str, list[TraceEntry]] = OrderedDict()
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
            self._traces[trace_id] = trace
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
        trace = self._traces.pop(request.trace_id, None) if request.trace_id else None
        if not trace or not torch.equal(trace[0].inputs, hidden):
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
