"""Exact arithmetic for placement decisions.

Throughputs are rounded onto an integer grid (1e-9 of the largest throughput involved) before
any decision is taken. Integer sums do not depend on the order of addition, subtraction undoes
addition exactly, and two placements that differ only by float noise compare equal, so every
peer reaches the same decision from the same records and "progress" is never an artefact of
rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from balancing.swarm import SwarmEntry

# Relative resolution of throughput comparisons.
RESOLUTION = 1e-9


class Grid:
    """Converts throughputs to integer grid units for one decision."""

    def __init__(self, values: Sequence[float]) -> None:
        scale = max([0.0, *values])
        self.unit = scale * RESOLUTION if scale > 0.0 else 1.0

    def units(self, value: float) -> int:
        return round(value / self.unit)


def totals(num_blocks: int, entries: Sequence[SwarmEntry], grid: Grid) -> np.ndarray:
    """Per-block summed throughput, in grid units (int64)."""
    diff = np.zeros(num_blocks + 1, dtype=np.int64)
    for entry in entries:
        weight = grid.units(entry.throughput)
        diff[entry.start] += weight
        diff[entry.end] -= weight
    return np.cumsum(diff[:-1])


@lru_cache(maxsize=128)
def window_masks(num_blocks: int, size: int) -> np.ndarray:
    """Row s is 1 on blocks [s, s + size): one row per possible start."""
    blocks = np.arange(num_blocks)
    starts = np.arange(num_blocks - size + 1)[:, None]
    return ((blocks >= starts) & (blocks < starts + size)).astype(np.int64)


def best_start(base: np.ndarray, size: int, step: int, current: int | None = None) -> int:
    """The start whose window, raised by `step`, gives the leximin-best sorted vector.

    Exact ties go to `current` when it is among the best (a server prefers to stay), else to the
    lowest start.
    """
    options = np.sort(base[None, :] + step * window_masks(len(base), size), axis=1)
    candidates = np.arange(options.shape[0])
    for column in range(options.shape[1]):  # the smallest values first: leximin order
        values = options[candidates, column]
        candidates = candidates[values == values.max()]
        if candidates.size == 1:
            break
    if current is not None and current in candidates:
        return current
    return int(candidates[0])


def bottleneck_gain(before: np.ndarray, after: np.ndarray, min_gain: float) -> bool:
    """Whether per-block vector `after` beats `before` by more than `min_gain` at the bottleneck.

    With a gap (a block at 0) a relative gain means nothing: closing every gap always counts,
    and otherwise leaving fewer blocks unserved does.
    """
    low_before, low_after = int(before.min()), int(after.min())
    if low_before > 0:
        return low_after > low_before * (1.0 + min_gain)
    if low_after > 0:
        return True
    return int(np.count_nonzero(after == 0)) < int(np.count_nonzero(before == 0))
