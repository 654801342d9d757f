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

MAX_NDIM = 8
MAX_DIM = 2**31 - 1
