"""Logits processors: small functions of (scores [rows, vocab], seen [rows, vocab]) -> scores.

Each one means what transformers' LogitsProcessor of the same name means, and
`processors_for` lists them in transformers' order: the repetition penalty first, then, only
when sampling, temperature, top-k, top-p and min-p. `seen` marks the tokens already in each
row's sequence (prompt and generated, never padding), kept up to date by the engine so the
penalty costs O(vocab) per step instead of a scan of the whole sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .params import GenerationParams

Processor = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class RepetitionPenalty:
    """CTRL: a seen token's score is divided by `penalty` when positive, multiplied when not."""

    penalty: float

    def __call__(self, scores: Tensor, seen: Tensor) -> Tensor:
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalised, scores)


@dataclass(frozen=True)
class Temperature:
    temperature: float

    def __call__(self, scores: Tensor, seen: Tensor) -> Tensor:
        return scores / self.temperature


@dataclass(frozen=True)
class TopK:
    """Keep the k best scores (ties with the k-th kept too); at least `min_keep`."""

    k: int
    min_keep: int = 1

    def __call__(self, scores: Tensor, seen: Tensor) -> Tensor:
        k = min(max(self.k, self.min_keep), scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        return scores.masked_fill(scores < kth, float("-inf"))


@dataclass(frozen=True)
class TopP:
    """Nucleus: drop the least likely tokens whose total probability is at most 1 - p."""

    p: float
    min_keep: int = 1

    def __call__(self, scores: Tensor, seen: Tensor) -> Tensor:
        ascending, order = torch.sort(scores, dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - self.p
        drop[..., -self.min_keep :] = False
        return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


@dataclass(frozen=True)
class MinP:
    """Drop tokens less likely than p times the most likely one."""

    p: float
    min_keep: int = 1

    def __call__(self, scores: Tensor, seen: Tensor) -> Tensor:
        probs = scores.softmax(dim=-1)
        drop = probs < self.p * probs.amax(dim=-1, keepdim=True)
        best = torch.topk(probs, min(self.min_keep, probs.shape[-1]), dim=-1).indices
        drop.scatter_(-1, best, False)
        return scores.masked_fill(drop, float("-inf"))


def processors_for(params: GenerationParams) -> list[Processor]:
    """The processors `params` asks for, in transformers' order."""
    out: list[Processor] = []
    if params.repetition_penalty != 1.0:
        out.append(RepetitionPenalty(params.repetition_penalty))
    if not params.do_sample:
        return out
    # beam sampling keeps one token more than there are EOS ids, so some beam can go on
    keep = 1
    if params.num_beams > 1:
        keep = len(params.eos_token_id) + 1 if params.eos_token_id else 2
    if params.temperature != 1.0:
        out.append(Temperature(params.temperature))
    if params.top_k != 0:
        out.append(TopK(params.top_k, keep))
    if params.top_p < 1.0:
        out.append(TopP(params.top_p, keep))
    if params.min_p is not None:
        out.append(MinP(params.min_p, keep))
    return out


def apply(processors: Sequence[Processor], scores: Tensor, seen: Tensor) -> Tensor:
    for processor in processors:
        scores = processor(scores, seen)
    return scores


def seen_tokens(ids: Tensor, vocab_size: int, mask: Tensor | None = None) -> Tensor:
    """[rows, T] ids -> [rows, vocab] bool of the ids present (where `mask` is True, if given)."""
    seen = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    ids = ids.clamp(max=vocab_size)  # ids past the head's vocabulary land in a dropped column
    if mask is not None:
        ids = ids.masked_fill(~mask, vocab_size)
    seen.scatter_(1, ids, True)
    return seen[:, :vocab_size]
