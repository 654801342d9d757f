"""Tensor codec: exact round trips, compression error bounds, and refusal of bad tensor maps."""

from __future__ import annotations

import math
import warnings

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import wire
from wire import COMPRESSIONS, DTYPES, WireError, decode_tensor, encode_tensor

FLOATS = [name for name, dtype in DTYPES.items() if dtype.is_floating_point]


def _make(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 10).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    return torch.randint(low, high, shape, generator=g, dtype=torch.int64).to(dtype)


def _through_msgpack(obj: dict) -> dict:
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True))


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(DTYPES)),
    st.lists(st.integers(0, 5), max_size=4),
    st.sampled_from(COMPRESSIONS),
    st.integers(0, 2**16),
)
def test_round_trip_every_dtype_and_compression(name, shape, compression, seed):
    dtype = DTYPES[name]
    t = _make(dtype, shape, seed)
    obj = encode_tensor(t, compression)
    out = decode_tensor(_through_msgpack(obj))
    assert out.dtype == dtype and out.shape == t.shape
    if obj["compression"] == "none":
        assert torch.equal(out, t)
    elif compression == "float16":
        assert torch.equal(out, t.to(torch.float16).to(dtype))
    else:
        _assert_int8_bound(t, out)
    if not dtype.is_floating_point:
        assert obj["compression"] == "none"  # lossy codecs never touch integers or bools


def _assert_int8_bound(t: torch.Tensor, out: torch.Tensor) -> None:
    """Each value within half a quantization step of its 64-value block (+ output rounding)."""
    x = t.float().reshape(-1)
    pad = -x.numel() % wire.INT8_BLOCK
    blocks = torch.nn.functional.pad(x, (0, pad)).view(-1, wire.INT8_BLOCK)
    step = blocks.abs().amax(1, keepdim=True).expand_as(blocks).reshape(-1)[: x.numel()] / 127
    rounding = {torch.float16: 2**-10, torch.bfloat16: 2**-7}.get(t.dtype, 1e-6)
    err = (out.float().reshape(-1) - x).abs()
    assert bool((err <= step * 0.5001 + x.abs() * rounding + 1e-30).all())


def test_wire_layout_is_documented_map_of_little_endian_bytes():
    t = torch.tensor([[1.0, -2.0, 3.5]], dtype=torch.float32)
    obj = encode_tensor(t)
    assert set(obj) == {"dtype", "shape", "compression", "data"}
    assert (obj["dtype"], obj["shape"], obj["compression"]) == ("float32", [1, 3], "none")
    assert bytes(obj["data"]) == t.numpy().astype("<f4").tobytes()
    q = encode_tensor(torch.randn(4096), "int8")
    assert (q["block"], len(q["data"]), len(q["scales"])) == (64, 4096, 4 * 64)
    assert len(encode_tensor(torch.randn(4096), "float16")["data"]) == 2 * 4096


def test_encode_does_not_copy_contiguous_tensors():
    t = torch.zeros(8)
    data = encode_tensor(t)["data"]
    assert data.readonly
    t[0] = 1.0  # documented: the map views the tensor until it is packed
    assert bytes(data[:4]) == torch.tensor([1.0]).numpy().tobytes()


def test_decoded_tensor_is_writable_without_warning_and_owns_its_memory():
    payload = msgpack.packb(encode_tensor(torch.arange(6.0)), use_bin_type=True)
    obj = msgpack.unpackb(payload)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode_tensor(obj)
        out.add_(1)  # in place: must not write into msgpack's immutable bytes
    assert obj["data"] == torch.arange(6.0).numpy().tobytes()
    assert torch.equal(out, torch.arange(6.0) + 1)


def test_writable_buffers_decode_without_a_copy():
    obj = encode_tensor(torch.arange(4, dtype=torch.int32))
    obj["data"] = bytearray(obj["data"])
    out = decode_tensor(obj)
    obj["data"][0] = 9
    assert out[0].item() == 9


@pytest.mark.parametrize(
    "t",
    [
        torch.tensor(3.5),  # 0-d
        torch.zeros(0, 7),
        torch.zeros(2, 0, 3, dtype=torch.bool),
        torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
        torch.randn(2, 3, requires_grad=True),
    ],
)
def test_unusual_tensors_round_trip(t):
    for compression in COMPRESSIONS:
        out = decode_tensor(_through_msgpack(encode_tensor(t, compression)))
        assert out.shape == t.shape and out.dtype == t.dtype and out.is_contiguous()
        expected = t.detach() if compression == "none" or not t.is_floating_point() else out
        assert torch.allclose(out, expected, atol=0.05)


def _good() -> dict:
    return _through_msgpack(encode_tensor(torch.ones(2, 3)))


def _with(**changes) -> dict:
    obj = _good()
    for key, value in changes.items():
        if value is ...:
            del obj[key]
        else:
            obj[key] = value
    return obj


def _int8(**changes) -> dict:
    obj = _through_msgpack(encode_tensor(torch.ones(2, 3), "int8"))
    obj.update(changes)
    return obj


BAD = [
    ([1, 2], "must be a map"),
    (None, "must be a map"),
    (b"\x00" * 24, "must be a map"),
    (_with(dtype="float8"), "unknown dtype"),
    (_with(dtype=7), "unknown dtype"),
    (_with(dtype="complex64"), "unknown dtype"),
    (_with(shape=[2, -3]), "dims must be integers"),
    (_with(shape=[2, True, 3]), "dims must be integers"),
    (_with(shape=[2.0, 3]), "dims must be integers"),
    (_with(shape=[2**31, 3]), "dims must be integers"),
    (_with(shape=[1] * 9), "at most 8"),
    (_with(shape="2x3"), "shape must be a list"),
    (_with(shape=[2, 2]), "holds 24 bytes; the shape needs 16"),
    (_with(shape=[2, 4]), "holds 24 bytes; the shape needs 32"),
    (_with(shape=[2**31 - 1] * 8), "the shape needs"),  # product far past 2**64
    (_with(shape=[0, 2**31 - 1]), "the shape needs 0"),
    (_with(data="abc"), "must be binary"),
    (_with(data=[0] * 24), "must be binary"),
    (_with(data=...), "missing ['data']"),
    (_with(compression=...), "missing ['compression']"),
    (_with(extra=1), "unexpected [\"'extra'\"]"),
    (_with(compression="zstd"), "unknown compression"),
    (_with(compression="int8"), "missing ['block', 'scales']"),
    ({**_with(dtype="int32"), "compression": "float16"}, "only to floating"),
    (_int8(scales=b"\x00" * 8), "int8 scales holds 8 bytes; the shape needs 4"),
    (_int8(block=0), "int8 block must be"),
    (_int8(block=True), "int8 block must be"),
    (_int8(block=2**20), "int8 block must be"),
    (_int8(data=b"\x00" * 6), "int8 data holds 6 bytes"),
    (_int8(dtype="int8"), "only to floating"),
    ({**_with(dtype="bool", shape=[24])} | {"data": b"\x01" * 23 + b"\x02"}, "other than 0 and 1"),
]


@pytest.mark.parametrize(("obj", "fragment"), BAD, ids=[f for _, f in BAD])
def test_bad_tensor_maps_raise_wire_error(obj, fragment):
    with pytest.raises(WireError) as info:
        decode_tensor(obj)
    assert info.value.code == "bad_request"
    assert fragment in info.value.message


def test_sizes_are_checked_before_any_allocation(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("allocated before validating")

    monkeypatch.setattr(torch, "frombuffer", forbidden)
    monkeypatch.setattr(torch, "empty", forbidden)
    for obj in [_with(shape=[2**31 - 1] * 8), _with(shape=[65536, 65536]), _int8(shape=[2**30])]:
        with pytest.raises(WireError):
            decode_tensor(obj)


@pytest.mark.parametrize(
    ("value", "compression", "fragment"),
    [
        ([1.0, 2.0], "none", "expected a torch.Tensor"),
        (torch.zeros(2, dtype=torch.complex64), "none", "cannot be sent"),
        (torch.zeros(2), "lz4", "unknown compression"),
        (torch.zeros(3, 3).to_sparse(), "none", "only dense"),
    ],
)
def test_encoding_unsupported_values_raises_wire_error(value, compression, fragment):
    with pytest.raises(WireError, match=fragment):
        encode_tensor(value, compression)


def _relative_error(t: torch.Tensor, compression: str) -> float:
    out = decode_tensor(_through_msgpack(encode_tensor(t, compression)))
    return float((out - t).norm() / t.norm())


def test_int8_error_stays_low_with_outlier_channels():
    """Per-64-value scales keep outlier channels from flattening the rest (per-row would not)."""
    torch.manual_seed(0)
    x = torch.randn(1, 128, 4096)
    assert _relative_error(x, "int8") < 0.008
    assert _relative_error(x, "float16") < 0.001
    x[..., [7, 100, 1000, 2000, 3000, 4000]] *= 50
    assert _relative_error(x, "int8") < 0.02
    size = len(msgpack.packb(encode_tensor(x, "int8"), use_bin_type=True)) / x.numel()
    assert math.isclose(size, 1 + 4 / 64, rel_tol=0.01)
