"""Token-by-token generation in the daemon: client-side parts locally, blocks through a chain."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch
import trio

from blocks import ClientParts
from peerd.chain import InferenceChain
from peerd.sampling import SamplingParams, next_tokens


@dataclass
class LocalModel:
    """What a client daemon holds of a model: embeddings, final norm, LM head, tokenizer."""

    path: Path
    parts: ClientParts
    tokenizer: object | None  # tokenizers.Tokenizer, when the checkpoint has tokenizer.json

    @classmethod
    def load(cls, path: str | Path) -> LocalModel:
        path = Path(path)
        parts = ClientParts.load(path)
        tokenizer = None
        if (path / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        return cls(path=path, parts=parts, tokenizer=tokenizer)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"{self.path} has no tokenizer.json: pass token ids instead of text")
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids)

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.parts.config.raw.get("eos_token_id")
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, list) else {int(eos)}


async def generate_ids(
    chain: InferenceChain, model: LocalModel, input_ids: torch.Tensor, params: SamplingParams
) -> AsyncIterator[torch.Tensor]:
    """Yields the next token ids ([B]) one step at a time; stops at max_new_tokens or EOS (B=1)."""
    generator = None
    if params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    ids = input_ids
    parts = model.parts
    hidden = await trio.to_thread.run_sync(lambda: parts.embed(ids, past_length=0).float())
    eos = model.eos_token_ids
    for _ in range(params.max_new_tokens):
        out = await chain.step(hidden)
        current = ids

        def head(out: torch.Tensor = out, current: torch.Tensor = current) -> torch.Tensor:
            logits = parts.logits(out[:, -1:].to(parts.dtype))[:, -1]
            return next_tokens(logits, current, params, generator)

        token = await trio.to_thread.run_sync(head)
        yield token
        ids = torch.cat([ids, token[:, None]], dim=1)
        if ids.shape[0] == 1 and int(token[0]) in eos:
            return
        past = ids.shape[1] - 1
        hidden = await trio.to_thread.run_sync(
            lambda t=token, p=past: parts.embed(t[:, None], past_length=p).float()
        )
