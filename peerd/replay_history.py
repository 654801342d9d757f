"""The inputs a chain sent at one block boundary: what a replacement server is replayed.

Beam search reorders the rows (hypotheses) at almost every step. Gathering every stored
tensor at each reorder would copy the whole history per step (quadratic in the length, on
the event loop); instead each stored piece keeps the row index still to apply to it, composed
at each reorder (a few integers), and the gather happens once, when a replay needs the inputs.
"""

from __future__ import annotations

import torch


class BoundaryHistory:
    """Every token's input at one boundary, in the rows' current order."""

    def __init__(self) -> None:
        self._pieces: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def __bool__(self) -> bool:
        return bool(self._pieces)

    def append(self, inputs: torch.Tensor) -> None:
        """Inputs of the newest tokens, [batch, tokens, hidden], already in the current order."""
        self._pieces.append((inputs, None))

    def __len__(self) -> int:
        """Tokens stored."""
        return sum(t.shape[1] for t, _ in self._pieces)

    def snapshot(self) -> list:
        """The stored pieces as they are now (cheap: tensors are shared), for `restore`."""
        return list(self._pieces)

    def restore(self, pieces: list) -> None:
        self._pieces = list(pieces)

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens (a step that failed part-way is forgotten)."""
        kept, total = [], 0
        for t, p in self._pieces:
            if total >= length:
                break
            take = min(t.shape[1], length - total)
            kept.append((t if take == t.shape[1] else t[:, :take], p))
            total += take
        self._pieces = kept

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes row rows[i] (as the servers' caches do)."""
        self._pieces = [(t, rows if p is None else p[rows]) for t, p in self._pieces]

    def inputs(self, dtype: torch.dtype) -> torch.Tensor:
        """All stored inputs, [batch, tokens so far, hidden], in `dtype`."""
        parts = [(t if p is None else t.index_select(0, p)).to(dtype) for t, p in self._pieces]
        whole = torch.cat(parts, dim=1)
        self._pieces = [(whole, None)]  # gathered once: later replays start from here
        return whole

    @classmethod
    def of(cls, inputs: torch.Tensor) -> BoundaryHistory:
        history = cls()
        history.append(inputs)
        return history
