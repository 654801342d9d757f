"""Llama family blocks: Llama 2/3.x, Mistral, Qwen2 (RMSNorm, rotary, grouped-query attention, SwiGLU).

Module and parameter names mirror the HF checkpoint layout (`model.layers.{i}.self_attn.q_proj`),
so a block's state dict is the checkpoint's tensors with the layer prefix stripped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .layers import (
    ACT_FNS,
    AttnContext,
    RMSNorm,
    apply_rope,
    attend,
    causal_mask,
    rope_inv_freq,
    rope_tables,
)
from .masks import pad_tensor

BASE_PREFIXES = ("model.",)  # checkpoint names of the model body start with one of these
LAYERS = "layers"  # block i lives under f"{base}{LAYERS}.{i}."


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = nn.Linear(h, cfg.num_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, h, bias=cfg.o_bias)

    def forward(self, x: Tensor, ctx: AttnContext, kv: tuple[Tensor, Tensor] | None) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        out = attend(q, k, v, ctx, kv)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, f, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(f, h, bias=cfg.mlp_bias)
        self.act = ACT_FNS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(
        self, x: Tensor, ctx: AttnContext, kv: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaPositions:
    """Builds the AttnContext of a call: rotary tables and, when needed, a mask (per row, and
    rotary at each row's real positions, when rows are left-padded)."""

    def __init__(self, cfg: ModelConfig, device: torch.device):
        self.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim).to(device)
        self.window = cfg.sliding_window

    def __call__(
        self, pos: int, length: int, dtype: torch.dtype, pad_lengths: Sequence[int] | None = None
    ) -> AttnContext:
        device = self.inv_freq.device
        pads = pad_tensor(pad_lengths, device)
        cos, sin = rope_tables(self.inv_freq, pos, length, dtype, pads)
        mask, is_causal = causal_mask(pos, length, device, self.window, pads)
        return AttnContext(pos, length, mask=mask, is_causal=is_causal, cos=cos, sin=sin, pads=pads)


class LlamaClient(nn.Module):
    """Client-side parts: token embeddings, final RMSNorm, LM head (maybe tied)."""

    def __init__(self, cfg: ModelConfig, tied: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = None if tied else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, input_ids: Tensor, past_length: int, pads: Tensor | None = None) -> Tensor:
        return self.embed_tokens(input_ids)

    def logits(self, hidden: Tensor) -> Tensor:
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return nn.functional.linear(self.norm(hidden), head)


Block = LlamaBlock
Positions = LlamaPositions
Client = LlamaClient
