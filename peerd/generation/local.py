"""Steps run in this process: the client-side parts' embedding and head around a local span.

`LocalStep` runs every block here (the single-process reference that swarm generation must
match; tests, the demo and the benchmarks use it). `last_logits` is the head that every
caller applies to the last block's output, local or remote.
"""

from __future__ import annotations

from torch import Tensor

from blocks import ClientParts, KVCache, LoadedBlocks

from .types import StepRequest


def embed_request(parts: ClientParts, request: StepRequest) -> Tensor:
    """The first block's input for a request's new tokens."""
    return parts.embed(request.input_ids, request.past_length, pad_lengths=request.pad_lengths)


def last_logits(parts: ClientParts, hidden: Tensor) -> Tensor:
    """Last block's output [rows, T, H] -> logits of each row's last position [rows, vocab]."""
    return parts.logits(hidden[:, -1:].to(parts.dtype))[:, -1]


class LocalStep:
    """`step(request)` over a span holding every block, with its own KV cache."""

    def __init__(self, parts: ClientParts, span: LoadedBlocks, max_length: int) -> None:
        self.parts, self.span, self.max_length = parts, span, max_length
        self.cache: KVCache | None = None

    def __call__(self, request: StepRequest) -> Tensor:
        if request.past_length == 0:
            self.cache = self.span.new_cache(
                request.rows, self.max_length, pad_lengths=request.pad_lengths
            )
        assert self.cache is not None, "the first request starts at past_length 0"
        if request.reorder is not None:
            self.cache.reorder(request.reorder)
        hidden = embed_request(self.parts, request).to(self.span.dtype)
        return last_logits(self.parts, self.span.step(hidden, self.cache))
