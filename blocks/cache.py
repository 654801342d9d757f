"""The KV cache of one inference session over blocks [start, end) of a span.

It is allocated whole at creation (`max_length` tokens for `batch_size` sequences), so its size
is known before a session starts and a server can refuse a session that would not fit instead
of running out of memory halfway through a generation.

Rows may be left-padded (`pad_lengths`, see masks.py): `LoadedBlocks.step` then hides each row's pads
and runs its real tokens at their own positions. `reorder` permutes or duplicates rows, which is
what beam search needs when hypotheses are re-ranked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .config import ModelConfig
from .errors import InputError
from .masks import check_pad_lengths, int_list


def cache_bytes_per_token(
    config: ModelConfig, dtype: torch.dtype, num_blocks: int, batch_size: int = 1
) -> int:
    """Keys + values of one token position for `batch_size` sequences over `num_blocks` blocks."""
    per_block = 2 * config.num_kv_heads * config.head_dim * dtype.itemsize
    return per_block * num_blocks * batch_size


class KVCache:
    """Keys and values, one [batch, kv_heads, max_length, head_dim] tensor pair per block.

    `length` counts the positions already filled; `LoadedBlocks.step` appends and advances it.
    `pad_lengths` (None or one int per row): the first pad_lengths[b] positions of row b are
    left padding, never attended to.
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
        *,
        pad_lengths: Sequence[int] | None = None,
    ):
        if batch_size < 1 or max_length < 1:
            raise InputError(
                f"batch_size and max_length must be >= 1; got {batch_size}, {max_length}"
            )
        self.pad_lengths: tuple[int, ...] | None = check_pad_lengths(
            pad_lengths, batch_size, max_length
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

    def reorder(self, index: Tensor | Sequence[int]) -> None:
        """In place, new row i = old row index[i] (keys, values and pad_lengths), e.g. to follow
        beam search's surviving hypotheses. Rows may repeat or be dropped; only the filled
        `length` positions are moved."""
        rows = self._check_index(index)
        if self.length > 0:
            moved = torch.tensor(rows, dtype=torch.long, device=self.device)
            for tensor in (*self.keys, *self.values):
                tensor[:, :, : self.length] = tensor[moved, :, : self.length]
        if self.pad_lengths is not None:
            self.pad_lengths = tuple(self.pad_lengths[i] for i in rows)

    def _check_index(self, index: Tensor | Sequence[int]) -> list[int]:
        rows = int_list(index, "reorder index")
        if len(rows) != self.batch_size:
            raise InputError(
                f"reorder index must have one entry per row ({self.batch_size}); got {len(rows)}"
            )
        if any(not 0 <= r < self.batch_size for r in rows):
            raise InputError(f"reorder index values must lie in [0, {self.batch_size}); got {rows}")
        return rows

    def __repr__(self) -> str:
        pads = "" if self.pad_lengths is None else f", pad_lengths {list(self.pad_lengths)}"
        return (
            f"KVCache(blocks [{self.start}, {self.end}), batch {self.batch_size}, "
            f"{self.length}/{self.max_length} tokens, {self.nbytes} bytes{pads})"
        )
