"""OPT blocks: LayerNorm (pre- or post-norm), separate q/k/v with biases, ReLU MLP.

OPT's learned positions are added to the embeddings on the client side, so its blocks need no
position information beyond the causal mask. Names mirror `model.decoder.layers.{i}.*`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .layers import ACT_FNS, AttnContext, attend, causal_mask
from .masks import pad_tensor, real_positions

BASE_PREFIXES = ("model.decoder.", "decoder.")
LAYERS = "layers"
POSITION_OFFSET = 2  # OPT's learned position table starts at index 2 (fairseq legacy)


def _layer_norm(cfg: ModelConfig, size: int) -> nn.LayerNorm:
    return nn.LayerNorm(size, eps=cfg.norm_eps, elementwise_affine=cfg.layer_norm_affine)


class OPTAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj = nn.Linear(h, h, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, h, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, h, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(h, h, bias=cfg.o_bias)

    def forward(self, x: Tensor, ctx: AttnContext, kv: tuple[Tensor, Tensor] | None) -> Tensor:
        b, t, h = x.shape
        q, k, v = (
            proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = attend(q, k, v, ctx, kv)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, h))


class OPTBlock(nn.Module):
    """Pre-norm (most OPTs) or post-norm (opt-350m, do_layer_norm_before=False) block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn_layer_norm = _layer_norm(cfg, cfg.hidden_size)
        self.self_attn = OPTAttention(cfg)
        self.final_layer_norm = _layer_norm(cfg, cfg.hidden_size)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACT_FNS[cfg.hidden_act]
        self.pre_norm = cfg.do_layer_norm_before

    def forward(
        self, x: Tensor, ctx: AttnContext, kv: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        if self.pre_norm:
            x = x + self.self_attn(self.self_attn_layer_norm(x), ctx, kv)
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x, ctx, kv))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class OPTPositions:
    """Only the causal (and padding) mask: OPT's positions live in the embeddings."""

    def __init__(self, cfg: ModelConfig, device: torch.device):
        self.device = device

    def __call__(
        self, pos: int, length: int, dtype: torch.dtype, pad_lengths: Sequence[int] | None = None
    ) -> AttnContext:
        pads = pad_tensor(pad_lengths, self.device)
        mask, is_causal = causal_mask(pos, length, self.device, pads=pads)
        return AttnContext(pos, length, mask=mask, is_causal=is_causal, pads=pads)


class OPTClient(nn.Module):
    """Client-side parts: token + learned position embeddings (offset 2), optional projections
    between the embedding width and hidden_size, final LayerNorm, LM head (tied)."""

    def __init__(self, cfg: ModelConfig, tied: bool):
        super().__init__()
        h, e = cfg.hidden_size, cfg.word_embed_proj_dim or cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, e)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, h)
        self.project_in = nn.Linear(e, h, bias=False) if e != h else None
        self.project_out = nn.Linear(h, e, bias=False) if e != h else None
        self.final_layer_norm = _layer_norm(cfg, h) if cfg.final_layer_norm else None
        self.lm_head = None if tied else nn.Linear(e, cfg.vocab_size, bias=False)

    def embed(self, input_ids: Tensor, past_length: int, pads: Tensor | None = None) -> Tensor:
        """With left padding (`pads` [B]), each row's positions start at its first real token
        (pads themselves get position 0), as transformers' OPT derives them from attention_mask."""
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        t = input_ids.shape[1]
        if pads is not None:
            positions = real_positions(past_length, t, pads)
            return x + self.embed_positions(positions + POSITION_OFFSET)
        positions = torch.arange(past_length, past_length + t, device=input_ids.device)
        return x + self.embed_positions(positions + POSITION_OFFSET)[None]

    def logits(self, hidden: Tensor) -> Tensor:
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, head)


Block = OPTBlock
Positions = OPTPositions
Client = OPTClient
