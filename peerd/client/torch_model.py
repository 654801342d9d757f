"""Torch-side client helpers: remote blocks as an autograd-aware module, and a
transformers-style causal LM whose embeddings and head live here and whose blocks run in the
swarm through the daemon.

    model = AutoDistributedModelForCausalLM.from_pretrained("/models/llama-2-7b")
    out = model.generate(input_ids, max_new_tokens=20)      # like transformers' generate
    logits = model(input_ids).logits                         # differentiable through the swarm
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from blocks import ClientParts
from peerd.client.connection import PeerdError
from peerd.client.daemon_client import DaemonClient
from peerd.generation import (
    Generation,
    GenerationParams,
    StepRequest,
    embed_request,
    generate_sync,
    last_logits,
)
from wire import ErrorCode


class _ChainFunction(torch.autograd.Function):
    """Forward through the swarm; backward asks the daemon for input (and prompt) gradients."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        prompts: torch.Tensor,
        peer: DaemonClient,
        model: str,
        compression: str,
    ):
        has_prompts = prompts.numel() > 0
        out, trace_id = peer.forward(
            model,
            hidden.detach(),
            prompts.detach() if has_prompts else None,
            compression=compression,
            keep_trace=any(ctx.needs_input_grad[:2]),  # a trace only where a backward follows
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
        _check_grad("hidden states", grad_hidden, hidden)
        grad_p = None
        if has_prompts and grad_prompts is not None:
            _check_grad("prompts", grad_prompts, prompts)
            grad_p = grad_prompts.to(prompts.dtype)
        return grad_hidden.to(hidden.dtype), grad_p, None, None, None


def _check_grad(what: str, grad: torch.Tensor, like: torch.Tensor) -> None:
    """A gradient of another shape would broadcast silently into autograd: refuse it."""
    if grad.shape != like.shape:
        raise PeerdError(
            ErrorCode.BAD_REPLY,
            f"gradient of the {what} has shape {list(grad.shape)}, expected {list(like.shape)}",
        )


class RemoteBlocks(nn.Module):
    """Every transformer block of `model`, run by the swarm; gradients flow through it."""

    def __init__(
        self,
        model: str | os.PathLike,
        peer: DaemonClient | None = None,
        *,
        compression: str = "none",
    ):
        super().__init__()
        self.model = str(model)
        self.peer = peer or DaemonClient()
        self.compression = compression

    def forward(self, hidden: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        placeholder = prompts if prompts is not None else hidden.new_empty(0)
        return _ChainFunction.apply(hidden, placeholder, self.peer, self.model, self.compression)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor


class AutoDistributedModelForCausalLM(nn.Module):
    """Embeddings, final norm and LM head here; the blocks in the swarm."""

    def __init__(
        self, path: Path, parts: ClientParts, peer: DaemonClient, compression: str = "none"
    ):
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
        peer: DaemonClient | None = None,
        dtype: torch.dtype = torch.float32,
        compression: str = "none",
    ) -> AutoDistributedModelForCausalLM:
        """`path` is an HF-format checkpoint directory readable by this script and the daemon."""
        path = Path(path).expanduser().resolve()
        return cls(path, ClientParts.load(path, dtype=dtype), peer or DaemonClient(), compression)

    def forward(
        self, input_ids: torch.Tensor, prompts: torch.Tensor | None = None
    ) -> CausalLMOutput:
        hidden = self.parts.embed(input_ids)
        return CausalLMOutput(logits=self.parts.logits(self.blocks(hidden, prompts)))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        num_beams: int | None = None,
        length_penalty: float | None = None,
        early_stopping: bool | str | None = None,
        num_return_sequences: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Prompt ids [B, T] -> [B * num_return_sequences, T + new] ids, as transformers' generate.

        Arguments left None take the checkpoint's generation_config.json, then transformers'
        defaults (greedy; when sampling temperature 1.0, top_k 50). `attention_mask` marks left
        padding (0s first). Rows that end early (EOS) are filled with the pad token.
        """
        params = GenerationParams.from_checkpoint(
            self.path,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            num_return_sequences=num_return_sequences,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            seed=seed,
        )
        prompts = _unpadded_prompts(input_ids, attention_mask)
        gen = Generation(prompts, params, vocab_size=self.config.vocab_size)
        parts = self.parts
        session = self.peer.session(
            self.path, gen.max_length, batch_size=gen.rows, pad_lengths=gen.pad_lengths
        )
        with session:

            def step(request: StepRequest) -> torch.Tensor:
                hidden = embed_request(parts, request).float()
                reorder = None if request.reorder is None else request.reorder.tolist()
                return last_logits(parts, session.step(hidden, reorder=reorder))

            results = generate_sync(gen, step)
        return _output_ids(input_ids, results, params.pad_id)


def _unpadded_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list:
    """Each row's ids without its left padding (attention_mask 0s come first, then 1s)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [batch, tokens] tensor")
    rows = input_ids.tolist()
    if attention_mask is None:
        return rows
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; input_ids has "
            f"{tuple(input_ids.shape)}"
        )
    prompts = []
    for i, (ids, mask) in enumerate(zip(rows, attention_mask.tolist(), strict=True)):
        pads = mask.index(1) if 1 in mask else len(mask)
        if any(m != 0 for m in mask[:pads]) or any(m != 1 for m in mask[pads:]):
            raise ValueError(f"attention_mask row {i} is not left padding (0s, then 1s): {mask}")
        prompts.append(ids[pads:])
    return prompts


def _output_ids(input_ids: torch.Tensor, results: list, pad_id: int) -> torch.Tensor:
    """The input rows (as given, padding included), each followed by its new ids, filled with
    `pad_id` to the longest; a prompt's sequences in consecutive rows, as transformers does."""
    news = [seq.token_ids for result in results for seq in result.sequences]
    width = max(len(n) for n in news)
    copies = len(news) // input_ids.shape[0]
    rows = [
        input_ids[i // copies].tolist() + new + [pad_id] * (width - len(new))
        for i, new in enumerate(news)
    ]
    return torch.tensor(rows, dtype=input_ids.dtype, device=input_ids.device)
