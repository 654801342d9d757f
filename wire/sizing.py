"""How much of a hidden-state tensor fits in one frame: the arithmetic for cutting requests.

A request whose tensors would not fit the receiver's frame limit (or ours) is refused before
a byte is read, so senders cut big requests into several: inference steps and replays along
the sequence (each piece advances the server's cache in turn), training requests along the
batch. Sizes are counted in encoded bytes: the tensor's data in the message's compression,
plus ENVELOPE_BYTES for msgpack headers and the message's small fields, plus whatever else
the caller says travels in every frame (`fixed_bytes`) or with every row (`row_extra_bytes`).

Pure integer arithmetic on shapes and dtype names: no torch, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .errors import ErrorCode, WireError, bad_request
from .names import COMPRESSIONS, FLOATING_DTYPES, INT8_BLOCK, ITEMSIZES

ENVELOPE_BYTES = 16 * 1024
"""Room in every frame for msgpack headers, field names, ids and a route list (well above
what any message needs besides its tensors and index lists)."""

INT_LIST_ITEM_BYTES = 9
"""Upper bound of one integer in a msgpack array (pad lengths, reorder indices)."""

SEQUENCE, BATCH = 1, 0
"""The dimension of a [batch, tokens, hidden] tensor along which a request is cut."""


def dtype_name(dtype: object) -> str:
    """ "float32" for torch.float32 or "float32" alike (without importing torch)."""
    name = str(dtype).removeprefix("torch.")
    if name not in ITEMSIZES:
        raise bad_request(f"dtype {dtype} cannot be sent; supported: {sorted(ITEMSIZES)}")
    return name


def tensor_bytes(shape: Sequence[int], dtype: object, compression: str = "none") -> int:
    """Bytes of a tensor's data on the wire (int8: codes padded to whole blocks + scales)."""
    if compression not in COMPRESSIONS:
        raise bad_request(f"unknown compression {compression!r}; expected one of {COMPRESSIONS}")
    name = dtype_name(dtype)
    numel = math.prod(shape)
    if compression == "none" or name not in FLOATING_DTYPES:
        return numel * ITEMSIZES[name]
    if compression == "float16":
        return numel * 2
    blocks = -(-numel // INT8_BLOCK)
    return blocks * INT8_BLOCK + blocks * 4


def counted_bytes(shape: Sequence[int], dtype: object, compression: str = "none") -> int:
    """What a tensor counts against a receiver's frame limit: the larger of its bytes on the
    wire and its decoded bytes (receivers cap both, as compressed data expands when decoded)."""
    return max(tensor_bytes(shape, dtype, compression), tensor_bytes(shape, dtype))


def int_list_bytes(length: int) -> int:
    """Upper bound of a msgpack array of `length` integers."""
    return 5 + INT_LIST_ITEM_BYTES * length


def rows_per_frame(
    shape: Sequence[int],
    dtype: object,
    compression: str,
    max_frame: int,
    *,
    dim: int = SEQUENCE,
    tensors: int = 1,
    fixed_bytes: int = 0,
    row_extra_bytes: int = 0,
    max_tokens: int | None = None,
) -> int:
    """The most slices along `dim` of a [batch, tokens, hidden] tensor one request may carry.

    `dim` is SEQUENCE (inference: a slice is one token of every sequence) or BATCH (training:
    a slice is one whole sequence). `tensors` same-shaped tensors travel together (backward
    sends hidden states and their gradient). `max_tokens` is the receiver's limit on batch ×
    tokens per request, if known. The answer is at most shape[dim] and at least 1: when not
    even one slice fits, WireError("too_large") says why; nothing is cut below one slice.
    """
    if len(shape) != 3 or dim not in (BATCH, SEQUENCE) or min(shape) < 1:
        raise bad_request(f"expected a [batch, tokens, hidden] shape to cut, got {list(shape)}")
    total = shape[dim]
    row_shape = list(shape)
    row_shape[dim] = 1
    what = "one token" if dim == SEQUENCE else "one sequence"
    of = f"{what} of a {list(shape)} {dtype_name(dtype)} tensor ({compression})"
    tokens_per_row = shape[0] * shape[1] // total
    rows = total
    if max_tokens is not None:
        rows = min(rows, max_tokens // tokens_per_row)
        if rows < 1:
            raise WireError(
                ErrorCode.TOO_LARGE,
                f"{of} is {tokens_per_row:,} tokens; the receiver takes at most "
                f"{max_tokens:,} per request",
                {"tokens": tokens_per_row, "limit": max_tokens},
            )

    def frame_size(n: int) -> int:
        row_shape[dim] = n
        data = tensors * counted_bytes(row_shape, dtype, compression)
        return ENVELOPE_BYTES + fixed_bytes + data + n * row_extra_bytes

    if frame_size(rows) > max_frame:  # the largest count that fits: sizes grow with the count
        low, high = 0, rows
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if frame_size(middle) <= max_frame else (low, middle)
        rows = max(1, low)
    if frame_size(rows) > max_frame:
        raise WireError(
            ErrorCode.TOO_LARGE,
            f"{of} needs a frame of {frame_size(1):,} bytes; the frame limit is {max_frame:,}",
            {"size": frame_size(1), "limit": max_frame},
        )
    return rows


def cuts(total: int, per_piece: int) -> list[slice]:
    """Consecutive slices of at most `per_piece` covering range(total), as few as that allows
    and of even sizes (4,096 tokens at 2,047 per piece: 3 × ~1,366, not 2,047 + 2,047 + 2)."""
    if total <= 0:
        return []
    pieces = -(-total // max(1, per_piece))
    base, extra = divmod(total, pieces)  # the first `extra` pieces take one more
    bounds = [i * base + min(i, extra) for i in range(pieces + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
