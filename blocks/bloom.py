"""BLOOM blocks: LayerNorm, fused per-head q/k/v, ALiBi position bias, GELU MLP.

Parameter names mirror the HF checkpoint (`transformer.h.{i}.self_attention.query_key_value`;
some checkpoints omit the `transformer.` prefix).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .layers import AttnContext, alibi_bias, alibi_slopes, attend
from .masks import pad_tensor

BASE_PREFIXES = ("transformer.", "")
LAYERS = "h"


class BloomAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, ctx: AttnContext, kv: tuple[Tensor, Tensor] | None) -> Tensor:
        b, t, h = x.shape
        # The fused projection is laid out head by head: [q_h, k_h, v_h] for each head h.
        qkv = self.query_key_value(x).view(b, t, self.num_heads, 3, self.head_dim)
        q, k, v = (qkv[..., i, :].transpose(1, 2) for i in range(3))
        out = attend(q, k, v, ctx, kv)
        return self.dense(out.transpose(1, 2).reshape(b, t, h))


class BloomMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class BloomBlock(nn.Module):
    """Pre-norm block; the residual is the normed input when residual_post_layernorm is set."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attention = BloomAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = BloomMLP(cfg)
        self.residual_post_layernorm = cfg.residual_post_layernorm

    def forward(
        self, x: Tensor, ctx: AttnContext, kv: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        normed = self.input_layernorm(x)
        x = (normed if self.residual_post_layernorm else x) + self.self_attention(normed, ctx, kv)
        normed = self.post_attention_layernorm(x)
        return (normed if self.residual_post_layernorm else x) + self.mlp(normed)


class BloomPositions:
    """ALiBi: a per-head linear bias on key distance, merged with the causal (and padding) mask.
    Being relative, it needs no per-row positions under left padding."""

    def __init__(self, cfg: ModelConfig, device: torch.device):
        self.slopes = alibi_slopes(cfg.num_heads).to(device)

    def __call__(
        self, pos: int, length: int, dtype: torch.dtype, pad_lengths: Sequence[int] | None = None
    ) -> AttnContext:
        pads = pad_tensor(pad_lengths, self.slopes.device)
        mask = alibi_bias(self.slopes, pos, length, dtype, pads=pads)
        return AttnContext(pos, length, mask=mask, pads=pads)


class BloomClient(nn.Module):
    """Client-side parts: embeddings + their LayerNorm, final LayerNorm, LM head (tied)."""

    def __init__(self, cfg: ModelConfig, tied: bool):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = None if tied else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, input_ids: Tensor, past_length: int, pads: Tensor | None = None) -> Tensor:
        return self.word_embeddings_layernorm(self.word_embeddings(input_ids))

    def logits(self, hidden: Tensor) -> Tensor:
        head = self.word_embeddings.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.ln_f(hidden), head)


Block = BloomBlock
Positions = BloomPositions
Client = BloomClient
