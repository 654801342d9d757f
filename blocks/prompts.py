"""Deep prompts: per-block tensors added to the first P positions of a block's input.

A client that prompt-tunes sends prompts [num_blocks, B or 1, P, H]; before block i, prompt i is
added to positions 0..P-1 of the hidden states. In a step, only the part of the positions
[cache.length, cache.length + T) that falls below P gets a prompt. With left padding the
positions are each row's real ones (absolute - pad, see masks.py), so prompt position p goes to
the row's p-th real token and a padded row gets its prompt exactly as it would alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InputError


def check_prompts(
    prompts: Tensor | None,
    num_blocks: int,
    x: Tensor,
    hidden_size: int,
    dtype: torch.dtype,
    device: torch.device,
    in_step: bool = False,
) -> Tensor | None:
    """prompts on `device` if shaped [num_blocks, 1 or B, P, H] (P <= T outside a step)."""
    if prompts is None:
        return None
    h, (batch, length) = hidden_size, x.shape[:2]
    if not isinstance(prompts, Tensor):
        raise InputError(f"prompts must be a tensor; got {type(prompts).__name__}")
    ok = (
        prompts.dim() == 4
        and prompts.shape[0] == num_blocks
        and prompts.shape[1] in (1, batch)
        and prompts.shape[3] == h
        and (in_step or prompts.shape[2] <= length)
    )
    if not ok:
        longest = "P" if in_step else f"P<={length}"
        raise InputError(
            f"prompts must have shape [{num_blocks}, 1 or {batch}, {longest}, {h}]; "
            f"got {tuple(prompts.shape)}"
        )
    if prompts.dtype != dtype:
        raise InputError(f"prompts must be {dtype}; got {prompts.dtype}")
    return prompts.to(device)


def add_prompt(x: Tensor, prompt: Tensor, pos: int, pads: Tensor | None = None) -> Tensor:
    """Add prompt [B|1, P, H] to the positions [pos, pos+T) of x that fall below P (no in-place);
    with left padding (`pads` [B]), to each row's real positions (absolute - pad) below P."""
    if pads is not None:
        batch, length, hidden = x.shape
        real = torch.arange(pos, pos + length, device=x.device)[None, :] - pads[:, None]
        hit = (real >= 0) & (real < prompt.shape[1])
        where = real.clamp(0, prompt.shape[1] - 1)[..., None].expand(batch, length, hidden)
        added = x + prompt.expand(batch, -1, -1).gather(1, where)
        return torch.where(hit[..., None], added, x)
    hi = min(prompt.shape[1], pos + x.shape[1])
    if hi <= pos:
        return x
    head = x[:, : hi - pos] + prompt[:, pos:hi]
    return torch.cat([head, x[:, hi - pos :]], dim=1)
