"""Tensor codec: a torch tensor as a msgpack map of plain fields and raw little-endian bytes.

    {"dtype": "float32", "shape": [1, 128, 4096], "compression": "none", "data": <bin>}
    int8 adds {"scales": <bin, float32 per block>, "block": 64}

Encoding does not copy a contiguous CPU tensor: "data" is a read-only memoryview of its memory
that msgpack writes straight into the frame (so do not modify the tensor before packing).

Decoding validates everything (dtype, dims, byte counts against the shape) before allocating
anything, so a hostile map costs at most the bytes it actually carried. msgpack hands binary
fields over as immutable `bytes`; `torch.frombuffer` can alias those only as a tensor torch
warns about and that in-place ops would write through, so a read-only buffer is copied once
into a bytearray (0.17-0.19 ms per 2 MiB on our CPU, under 1% of the ~30 ms it takes to send
those 2 MiB over a libp2p stream), and a writable one (bytearray, writable memoryview) is
used without a copy. For compressed tensors that copy is of the compressed bytes only.
Decoded tensors are writable, contiguous and on the CPU; they own their memory unless they
were decoded zero-copy from a writable buffer the caller passed in.

A decoded tensor can be much bigger than the bytes that carried it (int8 codes declared as
float64 expand ~7.5x, float16 data declared as float64 4x), so `decode_tensor` also takes a
cap on the decoded bytes (`max_bytes`, the receiver's frame cap when parsed through
`parse_message`) and refuses a bigger tensor with "too_large" before allocating anything.

Bytes are in the host's order, which is little-endian on every platform torch supports.
"""

from __future__ import annotations

from typing import Any

import torch

from .compression import INT8_BLOCK, dequantize_int8, quantize_int8, to_float16
from .errors import ErrorCode, WireError, bad_request
from .names import COMPRESSIONS, DTYPE_NAMES, MAX_DIM, MAX_NDIM

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

MAX_INT8_BLOCK = 65536

_BASE_KEYS = frozenset({"dtype", "shape", "compression", "data"})
_INT8_KEYS = _BASE_KEYS | {"scales", "block"}


def encode_tensor(t: torch.Tensor, compression: str = "none") -> dict[str, Any]:
    """The msgpack-ready map for `t` (see the module docstring)."""
    if not isinstance(t, torch.Tensor):
        raise bad_request(f"expected a torch.Tensor, got {type(t).__name__}")
    if compression not in COMPRESSIONS:
        raise bad_request(f"unknown compression {compression!r}; expected one of {COMPRESSIONS}")
    name = _NAMES.get(t.dtype)
    if name is None:
        raise bad_request(f"dtype {t.dtype} cannot be sent; supported: {sorted(DTYPES)}")
    if t.layout != torch.strided:
        raise bad_request(f"only dense tensors can be sent, got layout {t.layout}")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.dtype.is_floating_point:
        compression = "none"
    obj: dict[str, Any] = {"dtype": name, "shape": list(t.shape), "compression": compression}
    if compression == "none":
        obj["data"] = _raw(t)
    elif compression == "float16":
        obj["data"] = _raw(to_float16(t))
    else:
        codes, scales = quantize_int8(t, INT8_BLOCK)
        obj.update(data=_raw(codes), scales=_raw(scales), block=INT8_BLOCK)
    return obj


def decode_tensor(obj: object, max_bytes: int | None = None) -> torch.Tensor:
    """The tensor described by a map from `encode_tensor`; raises WireError on any flaw.

    `max_bytes` caps the decoded tensor's size (checked before any allocation)."""
    if not isinstance(obj, dict):
        raise bad_request(f"a tensor must be a map, got {type(obj).__name__}")
    compression = obj.get("compression")
    keys = _INT8_KEYS if compression == "int8" else _BASE_KEYS
    if obj.keys() != keys:
        problems = []
        if keys - obj.keys():
            problems.append(f"missing {sorted(keys - obj.keys())}")
        if obj.keys() - keys:
            problems.append(f"unexpected {sorted(repr(k)[:40] for k in obj.keys() - keys)[:5]}")
        raise bad_request(f"tensor map has wrong fields: {'; '.join(problems)}")
    if compression not in COMPRESSIONS:
        raise bad_request(f"tensor has unknown compression {compression!r}"[:120])
    name = obj["dtype"]
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise bad_request(f"tensor has unknown dtype {name!r}")
    shape, numel = _shape(obj["shape"])
    decoded = numel * dtype.itemsize
    if max_bytes is not None and decoded > max_bytes:
        raise WireError(
            ErrorCode.TOO_LARGE,
            f"tensor {list(shape)} {name} decodes to {decoded:,} bytes; the limit is {max_bytes:,}",
            {"size": decoded, "limit": max_bytes},
        )
    data = _buffer(obj["data"], "data")
    if compression == "none":
        flat = _decode_raw(data, dtype, numel)
    elif not dtype.is_floating_point:
        raise bad_request(f"compression {compression!r} applies only to floating dtypes")
    elif compression == "float16":
        _expect_bytes(data, numel * 2, "float16 data")
        flat = _frombuffer(data, torch.float16, numel).to(dtype)
    else:
        flat = _decode_int8(data, obj, dtype, numel)
    return flat.view(shape)


def _raw(t: torch.Tensor) -> memoryview:
    """Read-only bytes of `t` in C order, copying only if it is not contiguous."""
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).toreadonly()


def _shape(value: object) -> tuple[tuple[int, ...], int]:
    if not isinstance(value, (list, tuple)):
        raise bad_request(f"tensor shape must be a list, got {type(value).__name__}")
    if len(value) > MAX_NDIM:
        raise bad_request(f"tensor has {len(value)} dims; at most {MAX_NDIM} accepted")
    numel = 1
    for dim in value:
        if type(dim) is not int or not 0 <= dim <= MAX_DIM:
            raise bad_request(f"tensor dims must be integers in [0, {MAX_DIM}], got {dim!r}")
        numel *= dim  # Python ints: no overflow; compared with the byte count before any use
    return tuple(value), numel


def _buffer(value: object, what: str) -> memoryview:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise bad_request(f"tensor {what} must be binary, got {type(value).__name__}")
    view = memoryview(value)
    if not view.c_contiguous:
        raise bad_request(f"tensor {what} must be a contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _expect_bytes(data: memoryview, expected: int, what: str) -> None:
    if len(data) != expected:
        raise bad_request(f"{what} holds {len(data)} bytes; the shape needs {expected}")


def _frombuffer(data: memoryview, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A 1-D tensor over `data`, copying only when the buffer is read-only."""
    if numel == 0:
        return torch.empty(0, dtype=dtype)  # frombuffer refuses empty buffers
    return torch.frombuffer(bytearray(data) if data.readonly else data, dtype=dtype)


def _decode_raw(data: memoryview, dtype: torch.dtype, numel: int) -> torch.Tensor:
    _expect_bytes(data, numel * dtype.itemsize, f"{_NAMES[dtype]} data")
    if dtype is not torch.bool:
        return _frombuffer(data, dtype, numel)
    octets = _frombuffer(data, torch.uint8, numel)
    if numel and int(octets.max()) > 1:
        raise bad_request("bool tensor holds bytes other than 0 and 1")
    return octets.view(torch.bool)


def _decode_int8(data: memoryview, obj: dict, dtype: torch.dtype, numel: int) -> torch.Tensor:
    block = obj["block"]
    if type(block) is not int or not 1 <= block <= MAX_INT8_BLOCK:
        raise bad_request(f"int8 block must be an integer in [1, {MAX_INT8_BLOCK}], got {block!r}")
    blocks_count = -(-numel // block)
    _expect_bytes(data, blocks_count * block, "int8 data")
    scales = _buffer(obj["scales"], "scales")
    _expect_bytes(scales, blocks_count * 4, "int8 scales")
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    codes = _frombuffer(data, torch.int8, blocks_count * block)
    return dequantize_int8(
        codes, _frombuffer(scales, torch.float32, blocks_count), numel, dtype, block
    )
