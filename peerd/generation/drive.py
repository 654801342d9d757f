"""Drivers of a `Generation`: a plain loop for synchronous callers, an async one for the daemon.

`step(request)` / `await astep(request)` does the I/O: embed `request.input_ids`, run the
blocks (applying `request.reorder` to their caches first), apply the LM head, and return the
logits of each row's last position, [rows, vocab]. Neither driver knows what runs the blocks;
the async one needs no event-loop library of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from torch import Tensor

from .engine import Generation
from .types import PromptResult, StepRequest, TokenEvent

Step = Callable[[StepRequest], Tensor]
AsyncStep = Callable[[StepRequest], Awaitable[Tensor]]


def run_sync(gen: Generation, step: Step) -> Iterator[TokenEvent]:
    """Every token event, as the steps produce them; `gen.result()` once exhausted."""
    request = gen.first_request()
    while request is not None:
        update = gen.feed(step(request))
        yield from update.events
        request = update.next


def generate_sync(gen: Generation, step: Step) -> list[PromptResult]:
    """Run the generation to its end; the result per prompt."""
    for _ in run_sync(gen, step):
        pass
    return gen.result()


async def run_async(gen: Generation, astep: AsyncStep) -> AsyncIterator[TokenEvent]:
    """`run_sync` for async callers (trio, asyncio): awaits each step."""
    request = gen.first_request()
    while request is not None:
        update = gen.feed(await astep(request))
        for event in update.events:
            yield event
        request = update.next
