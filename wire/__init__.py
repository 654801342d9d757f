"""wire: everything that crosses a socket — framing, message schemas, the tensor codec.

Pure functions over bytes: no I/O, no trio, no libp2p. The daemon reads; wire parses. Every
problem with received bytes raises `WireError(code, message)` and nothing else.

Sending:   encode_frame(msg.to_wire())
Receiving: n = parse_header(four_bytes, max_frame); then read n bytes;
           msg = parse_message(decode_payload(payload))
           (or FrameDecoder(max_frame).feed(chunk) -> list of maps)
"""

from .compression import INT8_BLOCK
from .errors import ErrorCode, WireError
from .fields import Flag, Int, Maybe, PlainMap, Spec, TensorSpec, Text, wired
from .framing import (
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
    FrameDecoder,
    decode_payload,
    encode_frame,
    parse_header,
)
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
from .tensors import COMPRESSIONS, DTYPES, decode_tensor, encode_tensor

__all__ = [
    "COMPRESSIONS",
    "DEFAULT_MAX_FRAME",
    "DTYPES",
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
    "decode_payload",
    "decode_tensor",
    "encode_frame",
    "encode_tensor",
    "message_types",
    "parse_header",
    "parse_message",
    "register",
    "wired",
]
