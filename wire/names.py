"""Names and limits shared by the tensor codec and the message schemas.

Kept free of torch so that framing, errors and messages import without it: the light client
(`peerd/client`, standard library + msgpack) speaks the same codec, and torch is loaded only
when a tensor is actually encoded or decoded.
"""

COMPRESSIONS = ("none", "float16", "int8")
"""Lossy ones apply to floating tensors only; other dtypes always travel as "none"."""

DTYPE_NAMES = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
)

ITEMSIZES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
"""Bytes per element of each dtype on the wire (raw, before compression)."""
FLOATING_DTYPES = ("float32", "float16", "bfloat16", "float64")

INT8_BLOCK = 64
"""Values per int8 block of the activation compression (one float32 scale each)."""

MAX_NDIM = 8
MAX_DIM = 2**31 - 1
