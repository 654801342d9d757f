"""Lossy activation compression: float16 and blockwise 8-bit absmax.

int8 keeps one float32 scale per block of 64 values (1/3.76 the size of float32). On the
team's 2-core AVX2 CPU this plain-torch version was ~10x faster than bitsandbytes'
`quantize_blockwise` and at least as accurate on activations; per-row scales, the cheaper
alternative, lose accuracy badly on the outlier channels real LLM activations have
(TORCH-CPU-NOTES.md, "Activation compression").
"""

from __future__ import annotations

import torch

from .names import INT8_BLOCK


def quantize_int8(x: torch.Tensor, block: int = INT8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (int8 codes padded to whole blocks, float32 scale per block) for a float tensor.

    Each block is scaled so its largest magnitude maps to 127; decoding error per value is
    at most half a step, absmax(block) / 254. All-zero blocks get scale 0. An inf or NaN
    turns its whole block into NaN after decoding (the scale is no longer finite).
    """
    flat = x.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    blocks_count = -(-n // block)
    if blocks_count * block != n:
        flat = torch.nn.functional.pad(flat, (0, blocks_count * block - n))
    blocks = flat.view(blocks_count, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    inverse = (127.0 / absmax).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # zero blocks
    codes = blocks.mul(inverse).round_().to(torch.int8)
    return codes.view(-1), (absmax / 127.0).view(-1)


def dequantize_int8(
    codes: torch.Tensor, scales: torch.Tensor, numel: int, dtype: torch.dtype, block: int
) -> torch.Tensor:
    """Inverse of `quantize_int8`: a flat tensor of `numel` values in `dtype`."""
    values = codes.view(-1, block).to(torch.float32).mul_(scales.view(-1, 1))
    return values.view(-1)[:numel].to(dtype)


def to_float16(x: torch.Tensor) -> torch.Tensor:
    """Cast for the wire; magnitudes above 65504 become inf, as in any float16 cast."""
    return x.detach().to(torch.float16)
