"""Frames: a 4-byte big-endian payload length, then one msgpack map.

The same framing carries libp2p streams between peers and the local Unix socket. A reader
takes HEADER_SIZE bytes, calls `parse_header` (which refuses lengths above its cap before
anything is buffered), reads exactly that many bytes and calls `decode_payload`; or it feeds
whatever arrived into a `FrameDecoder`.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from .errors import ErrorCode, WireError, bad_request
from .guard import byte_view, check_msgpack

HEADER_SIZE = 4
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
_HEADER = struct.Struct(">I")

# errors msgpack may raise on input the guard let through (it also validates UTF-8, keys...)
_MSGPACK_ERRORS = (msgpack.UnpackException, ValueError)


def encode_frame(msg: dict[str, Any], max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Header + msgpack payload of `msg`; WireError if it cannot be packed or exceeds the cap."""
    if not isinstance(msg, dict):
        raise bad_request(f"a frame carries a map, got {type(msg).__name__}")
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    try:
        packer.pack(msg)
    except (TypeError, ValueError, OverflowError) as exc:
        raise bad_request(f"message cannot be packed: {exc}") from None
    payload = packer.getbuffer()
    size = len(payload)
    _check_size(size, max_frame)
    # getbuffer() exposes msgpack's own buffer, so joining copies the payload exactly once
    return b"".join((_HEADER.pack(size), payload))


def parse_header(header: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> int:
    """The payload length announced by a 4-byte header, checked against `max_frame`."""
    view = byte_view(header)
    if len(view) != HEADER_SIZE:
        raise bad_request(f"frame header must be {HEADER_SIZE} bytes, got {len(view)}")
    (size,) = _HEADER.unpack(view)
    if size == 0:
        raise bad_request("frame announces an empty payload")
    _check_size(size, max_frame)
    return size


def decode_payload(payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The map in one frame payload; WireError for anything that is not exactly one map."""
    view = byte_view(payload)
    check_msgpack(view)
    size = len(view)
    try:
        obj = msgpack.unpackb(
            view,
            raw=False,
            strict_map_key=True,
            use_list=True,
            object_pairs_hook=_unique_keys,
            ext_hook=_no_ext,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=size,
            max_map_len=size,
            max_ext_len=0,
        )
    except WireError:
        raise
    except _MSGPACK_ERRORS as exc:
        raise bad_request(f"invalid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise bad_request(f"a frame must carry a map, got {type(obj).__name__}")
    return obj


class FrameDecoder:
    """Incremental decoder for a byte stream of frames.

    `feed` returns every complete frame's map. A bad payload raises WireError once; the
    frame is consumed, the stream stays in sync, and maps decoded before it in the same call
    come out of the next `feed` (call `feed(b"")` to continue). A bad header (too large,
    empty) loses the frame boundary: the decoder then raises that error on every call.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._ready: list[dict[str, Any]] = []
        self._broken: WireError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def _slice(self, start: int, size: int) -> bytes:
        # a bytes copy, not a view: a view kept alive by a traceback would pin the buffer
        with memoryview(self._buffer) as view:
            return bytes(view[start : start + size])

    def feed(self, data: bytes | bytearray | memoryview) -> list[dict[str, Any]]:
        if self._broken is not None:
            raise self._broken
        self._buffer += data
        start = 0
        try:
            while len(self._buffer) - start >= HEADER_SIZE:
                try:
                    size = parse_header(self._slice(start, HEADER_SIZE), self.max_frame)
                except WireError as exc:
                    self._broken = exc
                    raise
                if len(self._buffer) - start - HEADER_SIZE < size:
                    break
                payload = self._slice(start + HEADER_SIZE, size)
                start += HEADER_SIZE + size
                self._ready.append(decode_payload(payload))
        finally:
            del self._buffer[:start]
        ready, self._ready = self._ready, []
        return ready


def _check_size(size: int, max_frame: int) -> None:
    if size > max_frame:
        raise WireError(
            ErrorCode.TOO_LARGE,
            f"frame of {size} bytes exceeds the limit of {max_frame}",
            {"size": size, "limit": max_frame},
        )


def _unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise bad_request("map has duplicate keys")
    return out


def _no_ext(code: int, data: bytes) -> Any:
    raise bad_request("msgpack extension types are not accepted")
