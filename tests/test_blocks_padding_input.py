"""Left padding and cache reordering on bad or unusual input: clear InputErrors, no NaN.

The parity tests are in test_blocks_padding.py.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    make_tiny_model,
    one_thread,  # noqa: F401 - autouse: one torch thread here
)

from blocks import ClientParts, InputError, LoadedBlocks

PADS = (0, 5, 2)


BAD_PADS = [
    [0, 1],  # one entry short
    [0, 1, 2, 3],
    [-1, 0, 0],
    [0, 0.5, 0],
    [True, 0, 0],
    "abc",
    5,
    torch.tensor([0.0, 1.0, 2.0]),
    torch.tensor([[0, 1, 2]]),
    torch.tensor([True, False, True]),
]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """OPT, the family whose client embed uses pad_lengths."""
    path = make_tiny_model(tmp_path_factory.mktemp("bad"), "opt", num_layers=2)
    return LoadedBlocks.load(path, 0, 2), ClientParts.load(path)


@pytest.mark.parametrize("bad", BAD_PADS, ids=repr)
def test_bad_pad_lengths_raise_input_error(small, bad):
    span, parts = small
    x = torch.randn(3, 6, span.config.hidden_size)
    with pytest.raises(InputError, match="pad_lengths"):
        span.new_cache(3, 8, pad_lengths=bad)
    with pytest.raises(InputError, match="pad_lengths"):
        span.forward(x, pad_lengths=bad)
    with pytest.raises(InputError, match="pad_lengths"):
        span.backward(x, x, pad_lengths=bad)
    with pytest.raises(InputError, match="pad_lengths"):
        parts.embed(torch.full((3, 6), 5), pad_lengths=bad)


def test_pad_lengths_must_leave_a_real_position(small):
    span, _ = small
    x = torch.randn(3, 6, span.config.hidden_size)
    with pytest.raises(InputError, match="< 8"):
        span.new_cache(3, 8, pad_lengths=[0, 8, 0])
    with pytest.raises(InputError, match="< 6"):
        span.forward(x, pad_lengths=[0, 6, 0])
    assert span.new_cache(3, 8, pad_lengths=torch.tensor([0, 7, 0])).pad_lengths == (0, 7, 0)


@pytest.mark.parametrize(
    "bad",
    [
        [0, 1],
        [0, 1, 3],
        [0, -1, 1],
        [0.0, 1, 2],
        [False, 1, 2],
        torch.tensor([0.0, 1.0, 2.0]),
        torch.tensor([[0, 1, 2]]),
        torch.tensor([True, True, False]),
        "012",
        None,
    ],
    ids=repr,
)
def test_bad_reorder_index_raises_input_error(small, bad):
    span, _ = small
    cache = span.new_cache(3, 8, pad_lengths=(0, 1, 2))
    x = torch.randn(3, 4, span.config.hidden_size)
    span.step(x, cache)
    keys = [k[:, :, :4].clone() for k in cache.keys]
    with pytest.raises(InputError, match="reorder index"):
        cache.reorder(bad)
    assert cache.pad_lengths == (0, 1, 2)
    assert all(torch.equal(a, b[:, :, :4]) for a, b in zip(keys, cache.keys, strict=True))


def test_low_precision_padded_rows_stay_finite(tmp_path):
    """Padded queries see their own key, so no softmax over nothing (NaN) even in float16."""
    for family in ("llama", "bloom"):
        path = make_tiny_model(tmp_path / family, family, num_layers=2)
        for dtype in (torch.bfloat16, torch.float16):
            span = LoadedBlocks.load(path, 0, 2, dtype=dtype)
            x = torch.randn(3, 11, span.config.hidden_size).to(dtype)
            assert torch.isfinite(span.forward(x, pad_lengths=PADS)).all()
            cache = span.new_cache(3, 12, pad_lengths=PADS)
            assert torch.isfinite(span.step(x[:, :4], cache)).all()
