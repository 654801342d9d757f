"""Training traces and gradients: a kept trace is reused only for the very same request, a
trace is kept only when a backward will follow, gradients of the wrong shape are refused."""

from __future__ import annotations

import pytest
import torch
import trio

from peerd.client.connection import PeerdError
from peerd.client.torch_model import _ChainFunction
from peerd.local_api.training import TrainingHandlers
from peerd.training import TraceEntry
from wire import local as api


class FakeChain:
    """Stands for a TrainingChain: records the forwards it was asked for."""

    def __init__(self) -> None:
        self.forwards: list[torch.Tensor | None] = []

        class Options:
            model_id = "m@1"

        self.options = Options()

    async def forward(self, hidden, prompts=None):
        self.forwards.append(prompts)
        return hidden * 2, [TraceEntry("p", 0, 2, hidden)]

    async def backward(self, trace, grad_out, prompts=None):
        return grad_out * 2, None if prompts is None else torch.zeros_like(prompts)


class FakeConn:
    def __init__(self) -> None:
        self.replies: list = []

    async def reply(self, message) -> None:
        self.replies.append(message)


def test_a_kept_trace_is_not_reused_for_other_prompts() -> None:
    chain = FakeChain()
    handlers = TrainingHandlers(models=None, chains=None)  # type: ignore[arg-type]

    async def training_chain(model, compression):
        return chain

    handlers._training_chain = training_chain  # type: ignore[method-assign]
    hidden, prompts = torch.randn(1, 3, 4), torch.randn(2, 1, 1, 4)
    conn = FakeConn()

    async def main():
        await handlers.forward(
            api.ChainForward(model="m", hidden=hidden, prompts=prompts, keep_trace=True), conn
        )
        trace_id = conn.replies[-1].trace_id
        other = prompts + 1
        await handlers.backward(
            api.ChainBackward(
                model="m",
                hidden=hidden,
                grad_out=torch.ones_like(hidden),
                prompts=other,
                trace_id=trace_id,
            ),
            conn,
        )
        return other

    other = trio.run(main)
    assert len(chain.forwards) == 2 and torch.equal(chain.forwards[1], other)


class FakePeer:
    def __init__(self, grad_shape=None) -> None:
        self.keep_trace: list[bool] = []
        self.grad_shape = grad_shape

    def forward(self, model, hidden, prompts, *, compression, keep_trace):
        self.keep_trace.append(keep_trace)
        return hidden * 2, "t" if keep_trace else None

    def backward(self, model, hidden, grad_out, prompts, *, trace_id, compression):
        shape = self.grad_shape or hidden.shape
        return torch.ones(shape), None


def test_no_trace_is_kept_when_no_backward_will_follow() -> None:
    peer = FakePeer()
    hidden = torch.randn(1, 3, 4)
    _ChainFunction.apply(hidden, torch.empty(0), peer, "m", "none")
    _ChainFunction.apply(hidden.requires_grad_(), torch.empty(0), peer, "m", "none")
    assert peer.keep_trace == [False, True]


def test_a_gradient_of_the_wrong_shape_is_refused() -> None:
    peer = FakePeer(grad_shape=(1, 1, 4))  # would broadcast into [1, 3, 4]
    hidden = torch.randn(1, 3, 4, requires_grad=True)
    out = _ChainFunction.apply(hidden, torch.empty(0), peer, "m", "none")
    with pytest.raises(PeerdError, match="shape"):
        out.sum().backward()
