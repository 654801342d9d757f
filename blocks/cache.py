"""The KV cache of one inference session over blocks [start, end) of a span.

It is allocated whole at creation (`max_length` tokens for `batch_size` sequences), so its size
is known before a session starts and a server can refuse a session that would not fit instead
of running out of memory halfway through a generation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import ModelConfig
from .errors import InputError


def cache_bytes_per_token(
    config: ModelConfig, dtype: torch.dtype, num_blocks: int, batch_size: int = 1
) -> int:
    """Keys + values of one token position for `batch_size` sequences over `num_blocks` blocks."""
    per_block = 2 * config.num_kv_heads * config.head_dim * dtype.itemsize
    return per_block * num_blocks * batch_size


class KVCache:
    """Keys and values, one [batch, kv_heads, max_length, head_dim] tensor pair per block.

    `length` counts the positions already filled; `Span.step` appends and advances it.
    """

    def __init__(
        self,
        config: ModelConfig,
        start: int,
        end: int,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        if batch_size < 1 or max_length < 1:
            raise InputError(
                f"batch_size and max_length must be >= 1; got {batch_size}, {max_length}"
            )
        self.start, self.end = start, end
        self.batch_size, self.max_length = batch_size, max_length
        self.dtype, self.device = dtype, torch.device(device)
        self.length = 0
        shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
        self.keys: list[Tensor] = [
            torch.empty(shape, dtype=dtype, device=device) for _ in range(end - start)
        ]
        self.values: list[Tensor] = [
            torch.empty(shape, dtype=dtype, device=device) for _ in range(end - start)
        ]
        self.nbytes = cache_bytes_per_token(config, dtype, end - start, batch_size) * max_length

    @property
    def free(self) -> int:
        """Token positions still available."""
        return self.max_length - self.length

    def truncate(self, length: int) -> None:
        """Forget positions >= length (e.g. to regenerate from an earlier point)."""
        if not 0 <= length <= self.length:
            raise InputError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def __repr__(self) -> str:
        return (
            f"KVCache(blocks [{self.start}, {self.end}), batch {self.batch_size}, "
            f"{self.length}/{self.max_length} tokens, {self.nbytes} bytes)"
        )
