"""The rows of a generation: prompts left-padded to one length, each repeated per beam/sample."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor


class RowLayout:
    """Row r holds prompt r // copies (copy r % copies), left-padded with `pad_id`.

    Left padding keeps every row's last token at the same position, so one step appends one
    token to every row; the padded positions are masked out by the blocks (`pad_lengths`).
    """

    def __init__(
        self, prompts: Sequence[Sequence[int]], copies: int, pad_id: int, vocab_size: int
    ) -> None:
        self.prompts = _check_prompts(prompts, vocab_size)
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_token_id {pad_id} is outside the vocabulary ({vocab_size})")
        self.copies = copies
        self.vocab_size = vocab_size
        self.length = max(len(p) for p in self.prompts)
        pads = [self.length - len(p) for p in self.prompts for _ in range(copies)]
        self.rows = len(pads)
        self.pad_lengths: tuple[int, ...] | None = tuple(pads) if any(pads) else None
        self.ids = torch.tensor(
            [[pad_id] * pad + list(self.prompts[r // copies]) for r, pad in enumerate(pads)],
            dtype=torch.long,
        )
        self.mask = torch.arange(self.length)[None, :] >= torch.tensor(pads)[:, None]

    def prompt_of(self, row: int) -> int:
        return row // self.copies

    def copy_of(self, row: int) -> int:
        return row % self.copies


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, Tensor) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token id lists")
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str | bytes) or not isinstance(prompt, Sequence) or not prompt:
            raise ValueError(f"prompt {i} must be a non-empty list of token ids")
        try:
            ids = [operator.index(t) for t in prompt]
        except TypeError:
            raise ValueError(f"prompt {i} holds something that is not a token id") from None
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"prompt {i}: token id {bad[0]} is outside the vocabulary ({vocab_size})"
            )
        out.append(ids)
    return out
