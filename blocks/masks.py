"""Left padding: which keys each query may see, and where each row's real tokens stand.

A batch of prompts of different lengths is left-padded, as transformers' `generate` does: the
first `pad_lengths[b]` positions of row b hold no token. Its real tokens sit at absolute indices
i >= pad_lengths[b] and have the positions i - pad_lengths[b], so that the row computes exactly
what its prompt alone would. Padded keys are hidden from every query; a padded query sees only
its own key, so its (meaningless) output stays finite instead of a softmax over nothing (NaN).

Right padding needs none of this: with causal attention a real token never sees the pads after
it, so only the caller's loss or sampling has to ignore them.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import InputError


def as_index(value: object) -> int | None:
    """ints and int-likes (numpy integers); None for anything else, bools included."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def int_list(values: Sequence[int] | Tensor, what: str) -> list[int]:
    """A 1-D integer tensor or a sequence of ints (not bools) as a list; InputError naming `what`."""
    if isinstance(values, Tensor):
        if values.dim() != 1 or values.dtype.is_floating_point or values.is_complex():
            raise InputError(
                f"{what} must be a 1-D integer tensor or a sequence of ints; got a "
                f"{values.dtype} tensor of shape {tuple(values.shape)}"
            )
        if values.dtype == torch.bool:
            raise InputError(f"{what} must hold ints, not bools")
        return values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise InputError(f"{what} must be a sequence of ints; got {type(values).__name__}")
    ints = [as_index(v) for v in values]
    if any(i is None for i in ints):
        raise InputError(f"{what} must hold ints; got {list(values)!r}")
    return ints


def check_pad_lengths(
    pad_lengths: Sequence[int] | Tensor | None, batch_size: int, limit: int | None = None
) -> tuple[int, ...] | None:
    """pad_lengths as a tuple of ints, one per row, each in [0, limit) (or >= 0 without a limit)."""
    if pad_lengths is None:
        return None
    values = int_list(pad_lengths, "pad_lengths")
    if len(values) != batch_size:
        raise InputError(
            f"pad_lengths must have one entry per row ({batch_size}); got {len(values)}"
        )
    top = "" if limit is None else f" and < {limit}"
    if any(v < 0 or (limit is not None and v >= limit) for v in values):
        raise InputError(f"pad_lengths must be >= 0{top}; got {values}")
    return tuple(values)


def pad_tensor(pad_lengths: Sequence[int] | None, device: torch.device) -> Tensor | None:
    """The pads as a LongTensor [B] on `device`, or None when no row is padded (the fast paths)."""
    if pad_lengths is None or not any(pad_lengths):
        return None
    return torch.tensor(pad_lengths, dtype=torch.long, device=device)


def real_positions(pos: int, length: int, pads: Tensor) -> Tensor:
    """Positions [B, length] of the tokens at absolute pos..pos+length-1: absolute - pad, and 0 on pads."""
    absolute = torch.arange(pos, pos + length, device=pads.device)
    return (absolute[None, :] - pads[:, None]).clamp(min=0)


def padded_mask(pos: int, length: int, pads: Tensor, window: int | None = None) -> Tensor:
    """Bool [B, 1, length, pos+length] (True = attend): causal (and windowed on absolute index
    differences, as Mistral's), never a padded key, and always a query's own key."""
    total = pos + length
    q = torch.arange(pos, total, device=pads.device)[:, None]
    k = torch.arange(total, device=pads.device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    allowed = allowed[None] & (k[None] >= pads[:, None, None])
    return (allowed | (k == q)[None])[:, None]
