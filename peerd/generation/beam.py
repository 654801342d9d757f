"""Beam search with transformers' rules, so that it returns the same sequences on the same weights.

Per prompt, `num_beams` running hypotheses (rows b*num_beams .. b*num_beams + num_beams - 1).
Each step:
1. add each row's next-token log-probabilities (after the processors) to its running score
   and take the best K = max(2, 1 + #EOS) * num_beams continuations over all beams of the
   prompt (K > num_beams so that enough remain when the best ones end in EOS);
2. the best num_beams of them that did not just end (EOS, or max_new_tokens reached) run on;
   row i of the next step continues row `reorder[i]`, whose KV caches the caller reorders;
3. of those that ended and rank among the first num_beams candidates, the ones whose score
   divided by length ** length_penalty (length counts new tokens, EOS included) beats the worst
   kept hypothesis replace it — unless the prompt already holds num_beams finished ones and
   early_stopping is True, or the early-stop heuristic says the running beams cannot improve;
4. the heuristic: the best running score over (tokens so far, or max_new_tokens when
   early_stopping == "never" and length_penalty > 0) ** length_penalty must beat the worst
   finished score, else no more hypotheses are taken for that prompt.
Generation ends when no prompt can improve, or every prompt has num_beams finished hypotheses
and early_stopping is True, or every candidate ended. Only then are tokens reported: beams
change their past as they go, so nothing is streamed before the end.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .detokenize import SequenceText
from .layout import RowLayout
from .params import GenerationParams
from .processors import apply, processors_for, seen_tokens
from .stopping import EOS, LENGTH, StopRules
from .types import PromptResult, SequenceResult, StepRequest, TokenEvent, Update

NEG = -1.0e9  # "impossible", kept finite as transformers keeps it


def _take(tensor: Tensor, index: Tensor) -> Tensor:
    """tensor [B, N, ...] indexed along dim 1 by index [B, M] -> [B, M, ...]."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


class BeamSearch:
    def __init__(self, layout: RowLayout, params: GenerationParams, tokenizer) -> None:
        self.layout, self.params, self.tokenizer = layout, params, tokenizer
        self.rules = StopRules(params)
        self.processors = processors_for(params)
        self.prompts = len(layout.prompts)
        self.beams = k = params.num_beams
        self.candidates = max(2, 1 + len(params.eos_token_id)) * k
        b, n = self.prompts, params.max_new_tokens
        self.step = 0
        self.running_scores = torch.zeros(b, k)
        self.running_scores[:, 1:] = NEG  # only the first beam's tokens count at the start
        self.running_tokens = torch.zeros(b, k, n, dtype=torch.long)
        self.kept_tokens = torch.full((b, k, n), params.pad_id, dtype=torch.long)
        self.kept_lengths = torch.zeros(b, k, dtype=torch.long)
        self.kept_scores = torch.full((b, k), NEG)
        self.kept_finished = torch.zeros(b, k, dtype=torch.bool)
        self.improvable = torch.ones(b, 1, dtype=torch.bool)
        self._seen: Tensor | None = None
        self._generator: torch.Generator | None = None
        self._result: list[PromptResult] | None = None

    @property
    def done(self) -> bool:
        return self._result is not None

    def first_request(self) -> StepRequest:
        layout = self.layout
        return StepRequest(layout.ids, 0, layout.pad_lengths, None, layout.rows)

    def feed(self, logits: Tensor) -> Update:
        b, k, big_k = self.prompts, self.beams, self.candidates
        logits = logits.float().cpu()
        vocab = logits.shape[-1]
        if self._seen is None:
            self._seen = seen_tokens(self.layout.ids, vocab, self.layout.mask)
        logp = apply(self.processors, torch.log_softmax(logits, dim=-1), self._seen)
        total = (logp.view(b, k, vocab) + self.running_scores[:, :, None]).view(b, k * vocab)
        scores, flat = self._pick(total, big_k)
        source, tokens = flat // vocab, flat % vocab  # [b, K]: beam continued, token added
        cand_tokens = _take(self.running_tokens, source)
        cand_tokens[:, :, self.step] = tokens
        length = self.step + 1
        ended = self.rules.hits(tokens, length)

        # 2. the running beams of the next step
        live = scores + ended.to(torch.float32) * NEG
        best = torch.topk(live, k).indices
        self.running_tokens = _take(cand_tokens, best)
        self.running_scores = _take(live, best)
        running_source = _take(source, best)

        # 3. finished hypotheses
        self._keep_finished(scores, cand_tokens, ended, length)
        self.step = length

        # 4. can the running beams still improve on what is kept?
        lp = self.params.length_penalty
        never = self.params.early_stopping == "never" and lp > 0.0
        best_length = self.params.max_new_tokens if never else self.step
        best_running = self.running_scores[:, :1] / (best_length**lp)
        worst_kept = torch.where(
            self.kept_finished, self.kept_scores.min(dim=1, keepdim=True).values, NEG
        )
        self.improvable &= (best_running > worst_kept).any(dim=-1, keepdim=True)

        full = bool(self.kept_finished.all()) and self.params.early_stopping is True
        if not bool(self.improvable.any()) or full or bool(ended.all()):
            self._result = self._best()
            return Update(self._final_events(), None)

        offsets = torch.arange(b)[:, None] * k
        reorder = (running_source + offsets).reshape(-1)
        new = self.running_tokens[:, :, self.step - 1].reshape(-1)
        self._seen = self._seen[reorder]
        self._seen[torch.arange(b * k), new] = True
        identity = bool((reorder == torch.arange(b * k)).all())
        request = StepRequest(
            new[:, None],
            self.layout.length + self.step - 1,
            self.layout.pad_lengths,
            None if identity else reorder,
            self.layout.rows,
        )
        return Update([], request)

    def _pick(self, total: Tensor, count: int) -> tuple[Tensor, Tensor]:
        """The best `count` continuations (or `count` sampled without replacement), best first."""
        if not self.params.do_sample:
            return torch.topk(total, count)
        flat = torch.multinomial(total.softmax(dim=-1), count, generator=self._rng())
        scores = total.gather(1, flat)
        scores, order = scores.sort(dim=-1, descending=True)
        return scores, flat.gather(1, order)

    def _keep_finished(self, scores: Tensor, tokens: Tensor, ended: Tensor, length: int) -> None:
        k = self.beams
        among_first = torch.arange(self.candidates) < k
        just = ended & among_first[None, :]
        final = scores / (length**self.params.length_penalty)
        full = self.kept_finished.all(dim=-1, keepdim=True) & (self.params.early_stopping is True)
        final = final + full.to(torch.float32) * NEG
        final = final + (~self.improvable).to(torch.float32) * NEG
        final = final + (~just) * NEG
        merged_scores = torch.cat((self.kept_scores, final), dim=1)
        best = torch.topk(merged_scores, k).indices
        self.kept_scores = _take(merged_scores, best)
        self.kept_tokens = _take(torch.cat((self.kept_tokens, tokens), dim=1), best)
        lengths = torch.full_like(ended, length, dtype=torch.long)
        self.kept_lengths = _take(torch.cat((self.kept_lengths, lengths), dim=1), best)
        self.kept_finished = _take(torch.cat((self.kept_finished, just), dim=1), best)

    def result(self) -> list[PromptResult]:
        assert self._result is not None
        return self._result

    def _best(self) -> list[PromptResult]:
        """The best num_return_sequences kept hypotheses of every prompt, best first."""
        out = []
        for p, prompt in enumerate(self.layout.prompts):
            result = PromptResult(list(prompt))
            for j in range(self.params.num_return_sequences):
                ids = self.kept_tokens[p, j, : int(self.kept_lengths[p, j])].tolist()
                text = SequenceText(self.tokenizer, prompt, ())
                for token in ids:
                    text.push(token)
                text.finish()
                reason = EOS if ids and ids[-1] in self.rules.eos else LENGTH
                result.sequences.append(
                    SequenceResult(ids, text.text, reason, float(self.kept_scores[p, j]))
                )
            out.append(result)
        return out

    def _final_events(self) -> list[TokenEvent]:
        events = []
        for p, result in enumerate(self.result()):
            for j, seq in enumerate(result.sequences):
                text = SequenceText(self.tokenizer, result.prompt_ids, ())
                for i, token in enumerate(seq.token_ids):
                    piece = text.push(token)
                    last = i == len(seq.token_ids) - 1
                    if last:
                        piece += text.finish()
                    events.append(
                        TokenEvent(p, token, piece, j, seq.finish_reason if last else None)
                    )
        return events

    def _rng(self) -> torch.Generator | None:
        if self.params.seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.params.seed)
        return self._generator
