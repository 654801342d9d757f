"""Greedy decoding and sampling: one token per row per step, like transformers' `_sample`.

Rows that finished keep getting the pad token (so every row's cache stays in step) but emit
no more events; the generation ends when every row has finished.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .detokenize import SequenceText
from .layout import RowLayout
from .params import GenerationParams
from .processors import apply, processors_for, seen_tokens
from .stopping import LENGTH, StopRules
from .types import PromptResult, SequenceResult, StepRequest, TokenEvent, Update


class Sampler:
    def __init__(self, layout: RowLayout, params: GenerationParams, tokenizer) -> None:
        self.layout, self.params = layout, params
        self.rules = StopRules(params)
        self.processors = processors_for(params)
        rows = layout.rows
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.texts = [
            SequenceText(tokenizer, layout.prompts[layout.prompt_of(r)], params.stop)
            for r in range(rows)
        ]
        self.reasons: list[str | None] = [None] * rows
        self.step = 0  # tokens generated per row (rows that finished got pad tokens since)
        self._seen: Tensor | None = None
        self._generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return all(self.reasons)

    def first_request(self) -> StepRequest:
        layout = self.layout
        return StepRequest(layout.ids, 0, layout.pad_lengths, None, layout.rows)

    def feed(self, logits: Tensor) -> Update:
        scores = logits.float()
        if self._seen is None:
            layout, device = self.layout, scores.device
            self._seen = seen_tokens(
                layout.ids.to(device), layout.vocab_size, layout.mask.to(device)
            )
        scores = apply(self.processors, scores, self._seen)
        if self.params.do_sample:
            probs = scores.softmax(dim=-1)
            chosen = torch.multinomial(probs, 1, generator=self._rng(scores)).squeeze(1)
        else:
            chosen = scores.argmax(dim=-1)
        self.step += 1
        pad = self.params.pad_id
        picked = chosen.tolist()
        events = []
        for row, token in enumerate(picked):
            if self.reasons[row] is not None:
                picked[row] = pad
                continue
            events.append(self._emit(row, token))
        picked_t = torch.tensor(picked, dtype=torch.long)
        self._seen[torch.arange(len(picked)), picked_t.to(scores.device)] = True
        if self.done:
            return Update(events, None)
        request = StepRequest(
            picked_t[:, None],
            self.layout.length + self.step - 1,
            self.layout.pad_lengths,
            None,
            self.layout.rows,
        )
        return Update(events, request)

    def result(self) -> list[PromptResult]:
        layout = self.layout
        out = [PromptResult(list(p)) for p in layout.prompts]
        for row in range(layout.rows):
            text, reason = self.texts[row].text, self.reasons[row] or LENGTH
            out[layout.prompt_of(row)].sequences.append(
                SequenceResult(self.tokens[row], text, reason)
            )
        return out

    def _emit(self, row: int, token: int) -> TokenEvent:
        self.tokens[row].append(token)
        text = self.texts[row]
        piece = text.push(token)
        reason = self.rules.reason(token, len(self.tokens[row]), text.stopped)
        if reason is not None:
            piece += text.finish()
            self.reasons[row] = reason
        layout = self.layout
        return TokenEvent(layout.prompt_of(row), token, piece, layout.copy_of(row), reason)

    def _rng(self, scores: Tensor) -> torch.Generator | None:
        if self.params.seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=scores.device).manual_seed(self.params.seed)
        return self._generator
