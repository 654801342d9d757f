"""wire.rows_per_frame: the cut it says fits does fit, real frames measured, and no more is cut
than needed; a row that cannot fit is a too_large error that says why."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import wire
from wire.sizing import BATCH, SEQUENCE, counted_bytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@settings(max_examples=80, deadline=None)
@given(
    batch=st.integers(1, 4),
    tokens=st.integers(1, 300),
    hidden=st.integers(1, 96),
    dtype=st.sampled_from(DTYPES),
    compression=st.sampled_from(wire.COMPRESSIONS),
    dim=st.sampled_from([SEQUENCE, BATCH]),
    extra=st.integers(0, 200_000),
)
def test_cut_pieces_fit_the_frame_and_are_not_needlessly_small(
    batch, tokens, hidden, dtype, compression, dim, extra
):
    shape = [batch, tokens, hidden]
    limit = wire.ENVELOPE_BYTES + extra
    try:
        rows = wire.rows_per_frame(shape, dtype, compression, limit, dim=dim)
    except wire.WireError as exc:
        assert exc.code == "too_large"
        one = list(shape)
        one[dim] = 1
        assert counted_bytes(one, dtype, compression) > extra
        return
    x = torch.randn(shape).to(dtype)
    for piece in wire.cuts(shape[dim], rows):
        part = x[:, piece] if dim == SEQUENCE else x[piece]
        frame = wire.encode_frame(wire.Step(part, 2**62, compression=compression).to_wire())
        assert len(frame) <= limit
    if rows < shape[dim]:  # one more row would not have fitted the budget
        more = list(shape)
        more[dim] = rows + 1
        assert counted_bytes(more, dtype, compression) > extra


def test_tensor_bytes_is_what_the_codec_sends():
    x = torch.randn(3, 7, 10)
    for compression in wire.COMPRESSIONS:
        encoded = wire.encode_tensor(x, compression)
        sent = len(encoded["data"]) + len(encoded.get("scales", b""))
        assert wire.tensor_bytes(x.shape, x.dtype, compression) == sent


def test_a_token_too_big_for_the_frame_says_why():
    with pytest.raises(wire.WireError) as info:
        wire.rows_per_frame([1, 2048, 8192], torch.float32, "none", wire.ENVELOPE_BYTES + 1000)
    assert info.value.code == "too_large"
    assert "one token" in info.value.message and "frame limit" in info.value.message


def test_the_receivers_token_limit_cuts_too():
    assert wire.rows_per_frame([4, 100, 8], "float32", "none", 2**26, max_tokens=40) == 10
    assert (
        wire.rows_per_frame([4, 100, 8], "float32", "none", 2**26, dim=BATCH, max_tokens=250) == 2
    )
    with pytest.raises(wire.WireError, match="at most 3 per request"):
        wire.rows_per_frame([4, 100, 8], "float32", "none", 2**26, max_tokens=3)


def test_a_64_mib_step_of_2048_tokens_is_cut_in_two():
    """The step our own encoder used to refuse (and blame on the server)."""
    rows = wire.rows_per_frame([1, 2048, 8192], torch.float32, "none", wire.DEFAULT_MAX_FRAME)
    assert len(wire.cuts(2048, rows)) == 2


@pytest.mark.parametrize("total,per_piece", [(4096, 2047), (10, 3), (2048, 2048), (7, 1), (5, 100)])
def test_cuts_are_as_few_as_allowed_and_even(total, per_piece):
    pieces = wire.cuts(total, per_piece)
    sizes = [p.stop - p.start for p in pieces]
    assert len(pieces) == -(-total // per_piece)  # no more messages than the limit forces
    assert max(sizes) <= per_piece and max(sizes) - min(sizes) <= 1  # no 2-token tail
    assert [p.start for p in pieces] == [0] + [p.stop for p in pieces[:-1]]
    assert pieces[-1].stop == total
