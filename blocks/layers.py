"""Pieces shared by the block families: norms, activations, rotary and ALiBi positions, attention.

Positions are computed once per call for all blocks of a span (`AttnContext`), not per block:
the rotary cos/sin of the new tokens, or BLOOM's ALiBi bias, plus the causal mask when
`scaled_dot_product_attention`'s own `is_causal` does not fit (new tokens after a cached prefix,
sliding windows). With left padding (see masks.py) the tables and the mask are per row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import RopeConfig
from .masks import padded_mask, real_positions

ACT_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class RMSNorm(nn.Module):
    """Llama's RMS norm; statistics in float32 whatever the activation dtype (as the reference)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


@dataclass
class AttnContext:
    """Everything position-dependent for one call: new tokens start at absolute `pos`."""

    pos: int
    length: int
    mask: Tensor | None = None  # bool (True = attend) or additive float, [.., length, pos+length]
    is_causal: bool = False
    cos: Tensor | None = None  # rotary tables of the new tokens, [length, head_dim]
    sin: Tensor | None = None  # (or [B, 1, length, head_dim], one per row, with padding)
    pads: Tensor | None = None  # left padding per row, LongTensor [B]; None if no row is padded


def causal_mask(
    pos: int,
    length: int,
    device: torch.device,
    window: int | None = None,
    pads: Tensor | None = None,
) -> tuple[Tensor | None, bool]:
    """(mask, is_causal) for `length` new queries at `pos` over keys [0, pos+length).

    Returns no mask when SDPA can do without one: a single query sees every key, and a prefill
    from position 0 is SDPA's own `is_causal`. Key j is visible to query i iff j <= i and, with a
    sliding window W, j > i - W (Mistral's convention). Left-padded rows (`pads`) always get a
    per-row mask [B, 1, length, pos+length] (masks.padded_mask).
    """
    if pads is not None:
        return padded_mask(pos, length, pads, window), False
    total = pos + length
    if window is None or total <= window:
        if length == 1:
            return None, False
        if pos == 0:
            return None, True
    q = torch.arange(pos, total, device=device)[:, None]
    k = torch.arange(total, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed, False


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ctx: AttnContext,
    kv: tuple[Tensor, Tensor] | None,
    scale: float | None = None,
) -> Tensor:
    """SDPA over [B, heads, T, D] tensors; with `kv`, first write k/v at ctx.pos and read the prefix."""
    if kv is not None:
        k_cache, v_cache = kv
        end = ctx.pos + ctx.length
        k_cache[:, :, ctx.pos : end] = k
        v_cache[:, :, ctx.pos : end] = v
        k, v = k_cache[:, :, :end], v_cache[:, :, :end]
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=ctx.mask,
        is_causal=ctx.is_causal,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> Tensor:
    """Inverse frequencies (float32) of the rotary embedding, with linear or Llama 3 scaling."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type != "llama3":
        return inv_freq
    # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, and the band in
    # between interpolated smoothly between the two.
    old_len = rope.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(
    inv_freq: Tensor, pos: int, length: int, dtype: torch.dtype, pads: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sin [length, head_dim] of positions pos..pos+length-1, computed in float32;
    with `pads`, [B, 1, length, head_dim] of each row's real positions (masks.real_positions)."""
    if pads is None:
        positions = torch.arange(pos, pos + length, device=inv_freq.device, dtype=torch.float32)
    else:
        positions = real_positions(pos, length, pads).to(torch.float32)
    freqs = positions[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    if pads is not None:
        emb = emb[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate [B, heads, T, D] by the tables; the halves layout of HF Llama checkpoints."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi head slopes (Press et al.), geometric from 2^(-8/n); non-powers of two interleave."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        extra = min(closest, num_heads - closest)
        slopes += [extra_base ** (2 * i + 1) for i in range(extra)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(
    slopes: Tensor,
    pos: int,
    length: int,
    dtype: torch.dtype,
    window: int | None = None,
    pads: Tensor | None = None,
) -> Tensor:
    """Additive [1, heads, length, pos+length] bias: -slope * distance, -inf on future keys;
    [B, heads, ...] with `pads`, -inf on padded keys too (masks.padded_mask).

    The reference adds slope * key_index; softmax is invariant to a per-row constant, and the
    relative form keeps the values small, which matters in float16. For the same reason left
    padding changes nothing but the mask: the reference's per-row key positions (key_index - pad)
    differ from ours by a constant per row.
    """
    device = slopes.device
    total = pos + length
    q = torch.arange(pos, total, device=device)[:, None]
    k = torch.arange(total, device=device)[None, :]
    bias = slopes[:, None, None] * (k - q).to(torch.float32)[None]
    if pads is not None:
        allowed = padded_mask(pos, length, pads, window)
        return bias[None].masked_fill(~allowed, float("-inf")).to(dtype)
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    bias = bias.masked_fill(~allowed[None], float("-inf"))
    return bias[None].to(dtype)
