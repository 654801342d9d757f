"""wire: everything that crosses a socket — framing, message schemas, the tensor codec.

Pure functions over bytes: no I/O, no trio, no libp2p. The daemon reads; wire parses. Every
problem with received bytes raises `WireError(code, message)` and nothing else.

torch is imported only when a tensor is encoded or decoded (or `encode_tensor`,
`decode_tensor`, `DTYPES`, `INT8_BLOCK` are first looked up), so a process without torch can
still frame, parse and build every tensor-free message.

Sending:   encode_frame(msg.to_wire())
Receiving: n = parse_header(four_bytes, max_frame); then read n bytes;
           msg = parse_message(decode_payload(payload))
           (or FrameDecoder(max_frame).feed(chunk) -> list of maps)
"""

from typing import Any

from .errors import ALL_CODES, ErrorCode, WireError
from .fields import Flag, Int, Maybe, PlainMap, Spec, TensorSpec, Text, wired
from .framing import (
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
    FrameDecoder,
    decode_payload,
    encode_frame,
    parse_header,
)
from .names import COMPRESSIONS
from .rpc import (
    Backward,
    BackwardResult,
    CloseSession,
    Error,
    Forward,
    ForwardResult,
    Info,
    InfoResult,
    OpenSession,
    Ping,
    Pong,
    SessionOpened,
    Step,
    StepResult,
)
from .schema import (
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Message,
    message_types,
    parse_message,
    register,
)
from .sizing import ENVELOPE_BYTES, cuts, rows_per_frame, tensor_bytes

_NEED_TORCH = {
    "encode_tensor": "tensors",
    "decode_tensor": "tensors",
    "DTYPES": "tensors",
    "INT8_BLOCK": "compression",
}


def __getattr__(name: str) -> Any:
    """Load the torch-backed names on first use."""
    if name not in _NEED_TORCH:
        raise AttributeError(f"module 'wire' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_NEED_TORCH[name]}", __name__), name)


__all__ = [
    "ALL_CODES",
    "COMPRESSIONS",
    "DEFAULT_MAX_FRAME",
    "DTYPES",
    "ENVELOPE_BYTES",
    "HEADER_SIZE",
    "INT8_BLOCK",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "Backward",
    "BackwardResult",
    "CloseSession",
    "Error",
    "ErrorCode",
    "Flag",
    "Forward",
    "ForwardResult",
    "FrameDecoder",
    "Info",
    "InfoResult",
    "Int",
    "Maybe",
    "Message",
    "OpenSession",
    "Ping",
    "PlainMap",
    "Pong",
    "SessionOpened",
    "Spec",
    "Step",
    "StepResult",
    "TensorSpec",
    "Text",
    "WireError",
    "cuts",
    "decode_payload",
    "decode_tensor",
    "encode_frame",
    "encode_tensor",
    "message_types",
    "parse_header",
    "parse_message",
    "register",
    "rows_per_frame",
    "tensor_bytes",
    "wired",
]
