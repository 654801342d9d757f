"""A tensor's decoded size is capped before anything is allocated (issue 9).

Compressed data expands when decoded: int8 codes declared as float64 take ~7.5x the bytes
that carried them. A receiver caps the decoded bytes of a message at its frame limit.
"""

from __future__ import annotations

import pytest
import torch

import wire
from wire.sizing import rows_per_frame


def _int8_as_float64(numel: int) -> dict:
    block = wire.INT8_BLOCK
    blocks = -(-numel // block)
    return {
        "dtype": "float64",
        "shape": [1, 1, numel],
        "compression": "int8",
        "data": bytes(blocks * block),
        "scales": bytes(blocks * 4),
        "block": block,
    }


def test_int8_declared_as_float64_is_refused_before_allocation(monkeypatch):
    numel = 64 * 1024
    obj = _int8_as_float64(numel)
    carried = len(obj["data"]) + len(obj["scales"])
    allocated = []
    monkeypatch.setattr(torch, "frombuffer", lambda *a, **k: allocated.append(a) or None)
    with pytest.raises(wire.WireError) as info:
        wire.decode_tensor(obj, max_bytes=carried * 2)
    assert info.value.code == wire.ErrorCode.TOO_LARGE
    assert "decodes to" in info.value.message
    assert not allocated


def test_decoded_bytes_of_a_message_are_capped_by_parse_message():
    hidden = torch.randn(1, 64, 512)
    step = wire.Step(hidden=hidden.double(), step_id=0, compression="int8").to_wire()
    frame = len(wire.encode_frame(step))
    assert frame < hidden.numel() * 8  # carried ~1 byte per value, decodes to 8
    with pytest.raises(wire.WireError) as info:
        wire.parse_message(step, max_decoded=frame)
    assert info.value.code == wire.ErrorCode.TOO_LARGE
    parsed = wire.parse_message(step, max_decoded=hidden.numel() * 8)
    assert parsed.hidden.dtype == torch.float64


def test_the_cap_counts_every_tensor_of_the_message():
    hidden = torch.randn(1, 8, 64)
    forward = wire.Forward(
        model_id="m@x", start=0, end=1, hidden=hidden, prompts=torch.randn(1, 8, 64)
    ).to_wire()
    one = hidden.numel() * 4
    with pytest.raises(wire.WireError) as info:
        wire.parse_message(forward, max_decoded=one + one // 2)
    assert "prompts" in info.value.message
    assert wire.parse_message(forward, max_decoded=2 * one).prompts is not None


def test_shape_claiming_more_elements_than_bytes_is_refused():
    obj = {"dtype": "float32", "shape": [1, 1, 1024], "compression": "float16", "data": b"\0" * 8}
    with pytest.raises(wire.WireError, match="holds 8 bytes"):
        wire.decode_tensor(obj)


def test_senders_cut_compressed_requests_to_the_decoded_size():
    shape, max_frame = (1, 4096, 1024), 4 * 2**20
    rows = rows_per_frame(shape, "float32", "int8", max_frame)
    decoded = rows * shape[2] * 4
    assert decoded + wire.ENVELOPE_BYTES <= max_frame
    step = wire.Step(hidden=torch.randn(1, rows, shape[2]), step_id=0, compression="int8").to_wire()
    wire.parse_message(step, max_decoded=max_frame)  # accepted by a receiver of that cap
