"""Torch-side client helpers: remote blocks as an autograd-aware module, and a
transformers-style causal LM whose embeddings and head live here and whose blocks run in the
swarm through the daemon.

    model = AutoDistributedModelForCausalLM.from_pretrained("/models/llama-2-7b")
    out = model.generate(input_ids, max_new_tokens=20)      # greedy, like transformers
    logits = model(input_ids).logits                         # differentiable through the swarm
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from blocks import ClientParts
from peerd.client.peer import Peer
from peerd.sampling import SamplingParams, next_tokens


class _ChainFunction(torch.autograd.Function):
    """Forward through the swarm; backward asks the daemon for input (and prompt) gradients."""

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, prompts: torch.Tensor, peer: Peer, model: str, compression: str
    ):
        has_prompts = prompts.numel() > 0
        out, trace_id = peer.forward(
            model,
            hidden.detach(),
            prompts.detach() if has_prompts else None,
            compression=compression,
            keep_trace=True,
        )
        ctx.save_for_backward(hidden, prompts)
        ctx.peer, ctx.model, ctx.trace_id, ctx.compression = peer, model, trace_id, compression
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, prompts = ctx.saved_tensors
        has_prompts = prompts.numel() > 0
        grad_hidden, grad_prompts = ctx.peer.backward(
            ctx.model,
            hidden.detach(),
            grad_out.contiguous(),
            prompts.detach() if has_prompts else None,
            trace_id=ctx.trace_id,
            compression=ctx.compression,
        )
        grad_p = (
            grad_prompts.to(prompts.dtype) if has_prompts and grad_prompts is not None else None
        )
        return grad_hidden.to(hidden.dtype), grad_p, None, None, None


class RemoteBlocks(nn.Module):
    """Every transformer block of `model`, run by the swarm; gradients flow through it."""

    def __init__(
        self, model: str | os.PathLike, peer: Peer | None = None, *, compression: str = "none"
    ):
        super().__init__()
        self.model = str(model)
        self.peer = peer or Peer()
        self.compression = compression

    def forward(self, hidden: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        placeholder = prompts if prompts is not None else hidden.new_empty(0)
        return _ChainFunction.apply(hidden, placeholder, self.peer, self.model, self.compression)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor


class AutoDistributedModelForCausalLM(nn.Module):
    """Embeddings, final norm and LM head here; the blocks in the swarm."""

    def __init__(self, path: Path, parts: ClientParts, peer: Peer, compression: str = "none"):
        super().__init__()
        self.path, self.parts, self.peer = path, parts, peer
        self.config = parts.config
        self.client_module = parts.module  # registered: trainable like any nn.Module
        self.blocks = RemoteBlocks(path, peer, compression=compression)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        peer: Peer | None = None,
        dtype: torch.dtype = torch.float32,
        compression: str = "none",
    ) -> AutoDistributedModelForCausalLM:
        """`path` is an HF-format checkpoint directory readable by this script and the daemon."""
        path = Path(path).expanduser().resolve()
        return cls(path, ClientParts.load(path, dtype=dtype), peer or Peer(), compression)

    def forward(
        self, input_ids: torch.Tensor, prompts: torch.Tensor | None = None
    ) -> CausalLMOutput:
        hidden = self.parts.embed(input_ids)
        return CausalLMOutput(logits=self.parts.logits(self.blocks(hidden, prompts)))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 20,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        eos_token_id: int | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Prompt ids [B, T] → [B, T + new] ids, transformers' `generate` semantics (no padding)."""
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature if do_sample else 0.0,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
        params.validate()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        ids = input_ids
        batch = ids.shape[0]
        finished = torch.zeros(batch, dtype=torch.bool)
        with self.peer.session(
            self.path, ids.shape[1] + max_new_tokens, batch_size=batch
        ) as session:
            hidden = self.parts.embed(ids)
            for _ in range(max_new_tokens):
                out = session.step(hidden.float())
                logits = self.parts.logits(out[:, -1:].to(self.parts.dtype))[:, -1]
                token = next_tokens(logits, ids, params, generator)
                if eos_token_id is not None:
                    token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                    finished |= token == eos_token_id
                ids = torch.cat([ids, token[:, None]], dim=1)
                if eos_token_id is not None and bool(finished.all()):
                    break
                hidden = self.parts.embed(token[:, None], past_length=ids.shape[1] - 1)
        return ids
